"""Full fine-tuning, and adapters on models too big for one card, with DeepSpeed ZeRO-3 across Ray Train workers.

`Zero3Strategy` is the strategy deepspeed_zero3 of the worker loop (`trainers.loop.train_func`, which owns the
preamble, data order, fault injection and the step / eval / checkpoint rhythm); DeepSpeed owns the parameters,
the optimizer and the schedule, each sharded over the ranks:

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
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from trainers.checkpoints import (
    PROBE_NAME,
    SHARDS_NAME,
    STATE_FILES,
    STATE_NAME,
    ZERO3_TAG as TAG,
    dir_name,
    local_parts,
    newest_checkpoint,
    read_shards_listing,
    save_weights,
)
from trainers.methods import method_module
from trainers.precision import Precision, zero3_precision
from trainers.spec import JobSpec, deepspeed_extra_problems
from trainers.state_io import load_state, save_state
from trainers.strategy_base import Strategy, Worker, build_scheduler

#: Adam's defaults, as `trainers.strategy.TorchStrategy` gets them from torch.optim.AdamW.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


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
    never an override: the spec's owned-key tables cover every key `deepspeed_config` writes (tests/integration/test_zero3.py)."""
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
    """The job's schedule for DeepSpeed to build on its optimizer: the same transformers schedule as single/DDP.

    DeepSpeed's own WarmupLR / WarmupCosineLR take at least 2 warmup steps and start at lr 0, so a config
    scheduler would train the same spec differently under ZeRO-3 than under DDP. DeepSpeed saves and restores
    the schedule's state in its checkpoints either way.
    """
    return lambda optimizer: build_scheduler(spec.training, optimizer)


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


@contextlib.contextmanager
def rank_files(checkpoint, rank: int, world: int):
    """A local directory with what this rank needs of a ZeRO-3 checkpoint: its own shard files and the trainer
    state. The other ranks' shards, and a final checkpoint's gathered model, stay in storage (each rank would
    otherwise download the whole optimizer state)."""
    base = checkpoint.path.rstrip("/")
    listing = read_shards_listing(checkpoint.filesystem, base)
    if listing["world_size"] != world:
        raise RuntimeError(
            f"checkpoint {base} holds ZeRO-3 shards of {listing['world_size']} ranks but this run has {world}; "
            f"DeepSpeed cannot re-partition them: run with resources.num_workers: {listing['world_size']}"
        )
    shard = [rel for rel in listing["files"][str(rank)] if rel.startswith(f"{TAG}/")]
    with local_parts(checkpoint, shard + list(STATE_FILES)) as local:
        yield local


class Zero3Strategy(Strategy):
    """DeepSpeed ZeRO-3: the model built partitioned (`deepspeed.zero.Init`), stepped by DeepSpeed's engine; each
    rank checkpoints its shard, and the final checkpoint also holds the model or adapter gathered from them."""

    label = " on DeepSpeed ZeRO-3"
    lockstep_eval = True

    def __init__(self, worker: Worker):
        self.w = worker
        self.precision = zero3_precision(worker.spec.training.precision, worker.device)

    def start(self) -> None:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        quiet_deepspeed()
        t0 = time.perf_counter()
        if self.w.device.type == "cpu":
            skip_inference_comm_build()
        # Ray Train made the process group (gloo / NCCL); DeepSpeed's comm layer wraps it.
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
        self.timings = {"comm_init_s": time.perf_counter() - t0}
        self.ds_config = deepspeed_config(self.w.spec, self.w.world, self.w.device)
        self.hf_ds_config = HfDeepSpeedConfig(self.ds_config)  # transformers sees ZeRO-3 while this object lives

    def build(self, model_dir: str) -> None:
        import deepspeed

        spec = self.w.spec
        t0 = time.perf_counter()
        model = load_model_zero3(spec, model_dir, self.precision, spec.training.max_steps)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.ds_config,
            lr_scheduler=lr_scheduler_factory(spec),
        )
        init_s = time.perf_counter() - t0
        self.model, self.inner = engine, engine.module
        after_init = rank_parameter_share(engine.module)  # the base from zero.Init, adapters partitioned by initialize
        self.total = after_init["total"]
        self.trainable = sum(p.ds_numel for p in engine.module.parameters() if p.requires_grad)
        self.timings.update(model_build_s=build_s, deepspeed_init_s=init_s, deepspeed_ops=loaded_ops())
        self.shares_init = [None] * self.w.world
        torch.distributed.all_gather_object(self.shares_init, after_init)

    def restore(self) -> dict | None:
        """Load the run's newest complete checkpoint into the engine (DeepSpeed reads this rank's shard)."""
        rank, world = self.w.rank, self.w.world
        choice = [newest_checkpoint(self.w.config) if rank == 0 else None]
        torch.distributed.broadcast_object_list(choice, src=0)  # one choice for all ranks, whatever each would see
        checkpoint = choice[0]
        if checkpoint is None:
            return None
        engine = self.model
        with rank_files(checkpoint, rank, world) as local:
            # DeepSpeed's loader unpickles its own shard files (torch.load); they come from this run's storage only.
            load_path, _ = engine.load_checkpoint(str(local), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed found no shard for rank {rank} in {checkpoint.path}")
            state = load_state(local, STATE_NAME)
        if engine.global_steps != state["step"]:
            raise RuntimeError(f"checkpoint {checkpoint.path}: DeepSpeed is at step {engine.global_steps}, the trainer state at {state['step']}")
        return state

    def banner_extra(self) -> str:
        mine, t = self.shares_init[0], self.timings
        return (
            f"; rank 0 holds {mine['partition']:,} params ({mine['partition_bytes'] / 2**20:.2f} MiB) + "
            f"{mine['gathered']:,} gathered; deepspeed init {t['deepspeed_init_s']:.1f} s, model build {t['model_build_s']:.1f} s"
        )

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        self.model.step()  # steps the optimizer (clip, AdamW, schedule) at the accumulation boundary only

    def lr(self) -> float:
        return self.model.get_lr()[0]

    def report_extras(self) -> tuple[dict, dict]:
        shares = [None] * self.w.world  # between steps, before an eval pass fills DeepSpeed's parameter cache
        torch.distributed.all_gather_object(shares, rank_parameter_share(self.model.module))
        metrics = {
            "rank_partition_bytes": [s["partition_bytes"] for s in shares],
            "rank_gathered_bytes": [s["gathered_bytes"] for s in shares],
            **self.timings,
        }
        return metrics, {"zero3": {"after_init": self.shares_init, "now": shares, **self.timings}}

    def report_checkpoint(self, metrics: dict, state: dict, probe: dict | None) -> None:
        """Each rank writes its DeepSpeed shard into a temp dir and reports it; Ray Train copies every rank's files
        into the same `step-XXXXXXXX` dir of the run's storage. Rank 0 adds the trainer state, the final export and
        `shards.json`, the list of every rank's files that makes the checkpoint's completeness checkable."""
        import ray.train

        engine, rank, world = self.model, self.w.rank, self.w.world
        state["zero3"]["step_time_s"] = metrics["step_time_s"]
        weights = None
        if probe is not None:  # the final checkpoint: gather what trained from the shards (collective)
            weights = gathered_trainable_state(engine.module) if self.w.is_adapter else gathered_model_state(engine)
        with tempfile.TemporaryDirectory(prefix="rayft-zero3-") as tmp:
            out = Path(tmp)
            engine.save_checkpoint(tmp, tag=TAG)
            if rank == 0:
                save_state(state, out, STATE_NAME)
                if probe is not None:
                    save_weights(engine.module, out, self.w.is_adapter, state_dict=weights)
                    save_state(probe, out, PROBE_NAME)
            listings = [None] * world
            torch.distributed.all_gather_object(listings, _files_with_sizes(out))
            if rank == 0:
                shards = {"world_size": world, "tag": TAG, "files": {str(r): files for r, files in enumerate(listings)}}
                (out / SHARDS_NAME).write_text(json.dumps(shards, indent=1))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=dir_name(state["step"]))
