"""Full fine-tuning, and adapters on models too big for one card, with DeepSpeed ZeRO-3 across Ray Train workers.

`train_func_zero3(config)` is the Ray Train worker loop for strategy deepspeed_zero3. It shares the data order,
fault injection, checkpoint discovery and publishing of `trainers.loop`; DeepSpeed owns the parameters, the
optimizer and the schedule, each sharded over the ranks:

- the DeepSpeed config is generated from the job spec (`deepspeed_config`), never hand-edited;
- the model is built under `deepspeed.zero.Init` (transformers does so while an `HfDeepSpeedConfig` is alive):
  each parameter is partitioned as it is created and the weights are copied in one module at a time, so no rank
  ever holds the whole model. A local or s3:// transformers directory loads the same way;
- a checkpoint is DeepSpeed's own sharded files (`zero3/`, each rank writing its shard into the same
  `step-XXXXXXXX` dir), the trainer state through `trainers.state_io`, and `shards.json`, rank 0's list of every
  rank's files: the checkpoint counts as complete only once all of them are in storage;
- the last checkpoint also carries the model gathered from the shards: a transformers directory (`model/`,
  safetensors, in the training dtype) or the real gathered adapter (`adapter/`), which `trainers.publish` publishes.

On CPU (`DS_ACCELERATOR=cpu`, gloo) nothing is compiled: the optimizer is torch's AdamW (DeepSpeed's `torch_adam`),
and the shared-memory all-reduce op that DeepSpeed's comm backend builds at start-up is marked unavailable, since
only DeepSpeed inference uses it. The same code runs NCCL and CUDA kernels on GPUs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from trainers import data as data_mod
from trainers.loop import (
    ADAPTER_DIR,
    MODEL_DIR,
    PROBE_NAME,
    SHARDS_NAME,
    STATE_NAME,
    Precision,
    Progress,
    build_scheduler,
    decide_precision,
    evaluate,
    maybe_inject_fault,
    micro_batch,
    newest_checkpoint,
    peak_rss_bytes,
    probe_logits,
    rng_state,
    say,
    set_rng_state,
)
from trainers.methods import method_module
from trainers.spec import JobSpec, deepspeed_extra_problems
from trainers.state_io import load_state, save_state
from storage.models import resolve_model_dir

#: DeepSpeed's checkpoint tag: its shard files sit in `step-XXXXXXXX/zero3/`.
TAG = "zero3"
#: Adam's defaults, as `trainers.loop` gets them from torch.optim.AdamW.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def zero3_precision(requested: str, device: torch.device) -> Precision:
    """DeepSpeed's precision mode: bf16 where the hardware has it, loss-scaled fp16 on older GPUs, else fp32.

    The parameters live in that dtype and DeepSpeed keeps the fp32 master weights in the optimizer, so the
    forward pass runs without autocast.
    """
    name = decide_precision(requested, device, full_finetune=True).name
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("training.precision: got 'bf16', which this GPU does not support; use fp16 or auto")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return Precision(name, dtype, None)


def deepspeed_config(spec: JobSpec, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed config for `spec` on `world_size` ranks of `device`'s kind, with `deepspeed.extra` merged in."""
    t, ds = spec.training, spec.deepspeed
    precision = zero3_precision(t.precision, device).name

    def offload(enabled: bool) -> dict:
        return {"device": "cpu", "pin_memory": device.type == "cuda"} if enabled else {"device": "none"}

    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
        # torch's AdamW steps the flat fp32 partitions: nothing to compile (DeepSpeed's FusedAdam is a JIT-built
        # op). Offloaded states are stepped on the CPU by DeepSpeed's CPU Adam, as DeepSpeed requires.
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "weight_decay": t.weight_decay, "betas": list(ADAM_BETAS), "eps": ADAM_EPS,
                       "torch_adam": not ds.offload_optimizer},
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16} if precision == "fp16" else {"enabled": False},
        "zero_optimization": {
            "stage": 3,
            "offload_param": offload(ds.offload_params),
            "offload_optimizer": offload(ds.offload_optimizer),
            "stage3_gather_16bit_weights_on_model_save": True,
        },
    }
    return merge_extra(config, ds.extra)


def merge_extra(config: dict, extra: dict) -> dict:
    """`config` with the user's extra keys added (`zero_optimization` key by key). A key rayft sets is an error,
    never an override: the spec's owned-key tables cover every key `deepspeed_config` writes (tests/test_zero3.py)."""
    problems = deepspeed_extra_problems(extra)
    if problems:
        raise ValueError("; ".join(problems))
    merged = copy.deepcopy(config)
    for key, value in copy.deepcopy(extra).items():
        if key == "zero_optimization":
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def lr_scheduler_factory(spec: JobSpec) -> Callable:
    """The job's schedule for DeepSpeed to build on its optimizer: the same transformers schedule as `trainers.loop`.

    DeepSpeed's own WarmupLR / WarmupCosineLR take at least 2 warmup steps and start at lr 0, so a config
    scheduler would train the same spec differently under ZeRO-3 than under DDP. DeepSpeed saves and restores
    the schedule's state in its checkpoints either way.
    """
    return lambda optimizer: build_scheduler(spec.training, optimizer)


def select_accelerator(device: torch.device) -> None:
    """Tell DeepSpeed what it runs on; read once, when deepspeed is first imported in this process."""
    os.environ["DS_ACCELERATOR"] = "cuda" if device.type == "cuda" else "cpu"


def skip_inference_comm_build() -> None:
    """Mark DeepSpeed's CPU shared-memory all-reduce op unavailable in this process.

    Starting DeepSpeed's comm backend on CPU JIT-compiles it (~30 s cold on 2 cores); only DeepSpeed
    inference's all-reduce uses it, never ZeRO training.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def loaded_ops() -> list[str]:
    """DeepSpeed C++ ops loaded in this process so far; each is compiled on first use unless cached
    (~/.cache/torch_extensions). Empty on CPU: nothing to compile."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    return sorted(getattr(OpBuilder, "_loaded_ops", {}))


def quiet_deepspeed() -> None:
    """DeepSpeed's INFO log and torch's per-call deprecation warnings for the collectives ZeRO-3 uses would
    bury the progress lines."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def load_model_zero3(spec: JobSpec, model_dir: str, precision: Precision, total_steps: int):
    """The base model with the method applied, its parameters partitioned as they are created.

    Needs a live `HfDeepSpeedConfig` with stage 3: transformers then builds the model under `deepspeed.zero.Init`
    and copies the checkpoint in one module at a time (rank 0 reads it, the others only its shapes).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=precision.base_dtype)
    if not all(hasattr(p, "ds_id") for p in model.parameters()):
        raise RuntimeError("transformers did not build the model under deepspeed.zero.Init (is an HfDeepSpeedConfig alive?)")
    if spec.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_cfg = method_module(spec.method.name).peft_config(spec.method, total_steps)
    if peft_cfg is not None:
        import peft

        # Every rank makes the same adapter init; DeepSpeed also broadcasts rank 0's when it partitions them.
        torch.manual_seed(spec.training.seed)
        model = peft.get_peft_model(model, peft_cfg)
    return model


def rank_parameter_share(module) -> dict:
    """What this rank holds of the parameters: its ZeRO-3 partition, and whole parameters still gathered.

    Between training steps DeepSpeed keeps only parameters smaller than `stage3_param_persistence_threshold`
    elements (default 1e5) gathered. A forward pass without backward (eval) leaves up to
    `stage3_max_live_parameters` gathered for reuse until the next training step releases them.
    """
    params = list(module.parameters())
    return {
        "total": sum(p.ds_numel for p in params),
        "partition": sum(p.ds_tensor.numel() for p in params),
        "partition_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params),
        "gathered": sum(p.data.numel() for p in params),
        "gathered_bytes": sum(p.data.numel() * p.data.element_size() for p in params),
    }


def gathered_model_state(engine) -> dict | None:
    """The whole model gathered from the shards, one module at a time, on rank 0 (None on the others). Collective.

    The same call accelerate and the transformers Trainer make for a ZeRO-3 model; it needs
    `stage3_gather_16bit_weights_on_model_save`, which `deepspeed_config` sets.
    """
    if not engine.zero_gather_16bit_weights_on_model_save():
        raise RuntimeError("zero_optimization.stage3_gather_16bit_weights_on_model_save is off; the model cannot be gathered")
    return engine._zero3_consolidated_16bit_state_dict()


def gathered_trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable parameters (for PEFT: the adapter) gathered from every rank's partition, on every rank. Collective.

    Outside this, each rank's tensors are empty placeholders: saving them is how other tools publish an empty
    adapter from ZeRO-3 (peft#2892, trl#4416).
    """
    import deepspeed

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {n: p.detach().cpu().clone() for n, p in named}


def _files_with_sizes(directory: Path) -> dict[str, int]:
    return {str(f.relative_to(directory)): f.stat().st_size for f in sorted(directory.rglob("*")) if f.is_file()}


def _report_zero3_checkpoint(engine, metrics: dict, state: dict, final: dict | None, rank: int, world: int) -> None:
    """Each rank writes its DeepSpeed shard into a temp dir and reports it; Ray Train copies every rank's files
    into the same `step-XXXXXXXX` dir of the run's storage. Rank 0 adds the trainer state, the final export and
    `shards.json`, the list of every rank's files that makes the checkpoint's completeness checkable."""
    import ray.train

    rngs = [None] * world
    torch.distributed.all_gather_object(rngs, rng_state())
    with tempfile.TemporaryDirectory(prefix="rayft-zero3-") as tmp:
        out = Path(tmp)
        engine.save_checkpoint(tmp, tag=TAG)
        if rank == 0:
            save_state({"rng": rngs, **state}, out, STATE_NAME)
            if final is not None:
                _write_final(engine, final, out)
        listings = [None] * world
        torch.distributed.all_gather_object(listings, _files_with_sizes(out))
        if rank == 0:
            shards = {"world_size": world, "tag": TAG, "files": {str(r): files for r, files in enumerate(listings)}}
            (out / SHARDS_NAME).write_text(json.dumps(shards, indent=1))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step-{state['step']:08d}")


def _write_final(engine, final: dict, out: Path) -> None:
    """Rank 0: the gathered model as a transformers directory, or the gathered adapter as a peft one, and the probe."""
    module = engine.module
    if final["is_adapter"]:
        module.save_pretrained(out / ADAPTER_DIR, state_dict=final["weights"], safe_serialization=True)
    else:
        module.save_pretrained(out / MODEL_DIR, state_dict=final["weights"], safe_serialization=True)
    save_state(final["probe"], out, PROBE_NAME)


@contextlib.contextmanager
def rank_files(checkpoint, rank: int, world: int):
    """A local directory with what this rank needs of a ZeRO-3 checkpoint: its own shard files and the trainer
    state. The other ranks' shards, and a final checkpoint's gathered model, stay in storage (each rank would
    otherwise download the whole optimizer state)."""
    import pyarrow.fs

    fs, base = checkpoint.filesystem, checkpoint.path.rstrip("/")
    with fs.open_input_stream(f"{base}/{SHARDS_NAME}") as stream:
        listing = json.loads(stream.read())
    if listing["world_size"] != world:
        raise RuntimeError(
            f"checkpoint {base} holds ZeRO-3 shards of {listing['world_size']} ranks but this run has {world}; "
            f"DeepSpeed cannot re-partition them: run with resources.num_workers: {listing['world_size']}"
        )
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        yield Path(base)
        return
    shard = [rel for rel in listing["files"][str(rank)] if rel.startswith(f"{TAG}/")]
    wanted = shard + [f"{STATE_NAME}.json", f"{STATE_NAME}.safetensors"]
    local = pyarrow.fs.LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="rayft-resume-") as tmp:
        for rel in wanted:
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            pyarrow.fs.copy_files(f"{base}/{rel}", str(Path(tmp) / rel), source_filesystem=fs, destination_filesystem=local)
        yield Path(tmp)


def restore(engine, config: dict, rank: int, world: int) -> dict | None:
    """Load the run's newest complete checkpoint into `engine` (DeepSpeed reads this rank's shard); its trainer state, or None."""
    choice = [newest_checkpoint(config) if rank == 0 else None]
    torch.distributed.broadcast_object_list(choice, src=0)  # one choice for all ranks, whatever each would see
    checkpoint = choice[0]
    if checkpoint is None:
        return None
    with rank_files(checkpoint, rank, world) as local:
        # DeepSpeed's loader unpickles its own shard files (torch.load); they come from this run's storage only.
        load_path, _ = engine.load_checkpoint(str(local), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no shard for rank {rank} in {checkpoint.path}")
        state = load_state(local, STATE_NAME)
    if engine.global_steps != state["step"]:
        raise RuntimeError(f"checkpoint {checkpoint.path}: DeepSpeed is at step {engine.global_steps}, the trainer state at {state['step']}")
    return state


def _model_dir(spec: JobSpec, storage_uri: str | None, local_rank: int) -> str:
    """The base model as a local directory, fetched by one rank per node first so no two write the same cache files."""
    if local_rank == 0:
        path = resolve_model_dir(spec.model.source, storage_uri)
    torch.distributed.barrier()
    if local_rank != 0:
        path = resolve_model_dir(spec.model.source, storage_uri)
    return path


def train_func_zero3(config: dict) -> None:
    """Ray Train worker entry point for strategy deepspeed_zero3; `config` as for `trainers.loop.train_func`."""
    import ray.train
    import ray.train.torch

    device = ray.train.torch.get_device()
    select_accelerator(device)  # before anything imports deepspeed
    import deepspeed
    from transformers import AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    quiet_deepspeed()
    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    tcfg = spec.training
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    is_adapter = spec.method.name != "full"
    precision = zero3_precision(tcfg.precision, device)

    t0 = time.perf_counter()
    if device.type == "cpu":
        skip_inference_comm_build()
    # Ray Train made the process group (gloo / NCCL); DeepSpeed's comm layer wraps it.
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    comm_s = time.perf_counter() - t0
    ds_config = deepspeed_config(spec, world, device)
    hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 - transformers sees ZeRO-3 while this object lives

    model_dir = _model_dir(spec, config.get("storage_uri"), ctx.get_local_rank())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    datasets = data_mod.build_datasets(spec.data, tokenizer, tcfg.seed)

    t0 = time.perf_counter()
    model = load_model_zero3(spec, model_dir, precision, tcfg.max_steps)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lr_scheduler_factory(spec),
    )
    init_s = time.perf_counter() - t0
    after_init = rank_parameter_share(engine.module)  # the base from zero.Init, adapters partitioned by initialize
    total = after_init["total"]
    trainable = sum(p.ds_numel for p in engine.module.parameters() if p.requires_grad)
    timings = {"comm_init_s": comm_s, "model_build_s": build_s, "deepspeed_init_s": init_s, "deepspeed_ops": loaded_ops()}

    start_step, history, resumes = 0, [], []
    state = restore(engine, config, rank, world)
    if state is not None:
        set_rng_state(state["rng"][rank])
        start_step, history, resumes = state["step"], state["history"], state["resumes"] + [state["step"]]
        if rank == 0:
            say(f"[rayft] resumed from checkpoint at step {start_step}")
    shares_init = [None] * world
    torch.distributed.all_gather_object(shares_init, after_init)

    if rank == 0:
        mine = shares_init[0]
        say(
            f"[rayft] {spec.method.name} on DeepSpeed ZeRO-3: trainable {trainable:,} / {total:,} params, "
            f"precision {precision.name}, workers {world}; rank 0 holds {mine['partition']:,} params "
            f"({mine['partition_bytes'] / 2**20:.2f} MiB) + {mine['gathered']:,} gathered; "
            f"deepspeed init {init_s:.1f} s, model build {build_s:.1f} s; "
            f"train {len(datasets.train)} / eval {len(datasets.eval)} examples"
        )
    progress = Progress(tcfg.max_steps, start_step, history)
    running_loss, running_n, eval_loss = 0.0, 0, None
    step_s: list[float] = []

    for step in range(start_step + 1, tcfg.max_steps + 1):
        maybe_inject_fault(config.get("faults"), step, rank)
        step_t0, step_tokens0 = time.perf_counter(), progress.tokens
        for micro in range(tcfg.grad_accum):
            batch = micro_batch(datasets.train, tcfg, step, micro, world, rank, pad_id, device)
            loss = engine(**batch).loss
            engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
            engine.step()  # steps the optimizer (clip, AdamW, schedule) at the accumulation boundary only
            running_loss += loss.item() / tcfg.grad_accum
            progress.tokens += int(batch["attention_mask"].sum().item()) * world
        running_n += 1
        step_s.append(time.perf_counter() - step_t0)
        progress.add_step(step, progress.tokens - step_tokens0, step_s[-1])

        if rank == 0 and (step % tcfg.log_every == 0 or step == tcfg.max_steps):
            say(progress.line(step, running_loss / running_n, engine.get_lr()[0]))
        train_loss = running_loss / running_n
        do_eval = step % tcfg.eval_every == 0 or step == tcfg.max_steps
        do_ckpt = step % tcfg.checkpoint_every == 0 or step == tcfg.max_steps
        if not (do_eval or do_ckpt):
            continue
        shares = [None] * world  # between steps, before an eval pass fills DeepSpeed's parameter cache
        torch.distributed.all_gather_object(shares, rank_parameter_share(engine.module))
        if do_eval and datasets.eval:
            eval_loss = evaluate(engine, datasets.eval, tcfg.micro_batch_size, pad_id, device, precision, world, rank, lockstep=True)
        history.append({"step": step, "train_loss": train_loss, "eval_loss": eval_loss if do_eval else None,
                        "trained_tokens": progress.trained_tokens})
        running_loss, running_n = 0.0, 0
        metrics = {
            "step": step, "train_loss": train_loss, "eval_loss": eval_loss,
            "trainable_params": trainable, "total_params": total, "trained_tokens": progress.trained_tokens,
            "tokens_per_s": progress.tokens / max(time.perf_counter() - progress.t0, 1e-9),
            "steady_tokens_per_s": progress.steady_tokens_per_s(), "peak_rss_bytes": peak_rss_bytes(),
            "step_time_s": sum(step_s) / len(step_s),
            "rank_partition_bytes": [s["partition_bytes"] for s in shares],
            "rank_gathered_bytes": [s["gathered_bytes"] for s in shares],
            **timings,
        }
        if not do_ckpt:
            ray.train.report(metrics)
            continue
        final = None
        if step == tcfg.max_steps:
            probe = probe_logits(engine, datasets, device, precision)
            weights = gathered_trainable_state(engine.module) if is_adapter else gathered_model_state(engine)
            final = {"is_adapter": is_adapter, "weights": weights, "probe": probe}
        state = {
            "step": step, "history": history, "resumes": resumes,
            "zero3": {"after_init": shares_init, "now": shares, "step_time_s": metrics["step_time_s"], **timings},
        }
        _report_zero3_checkpoint(engine, metrics, state, final, rank, world)
