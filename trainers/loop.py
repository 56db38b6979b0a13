"""The training loop that runs inside each Ray Train worker: `train_func(config)`.

Ray Train owns process groups, placement and restarts; this loop owns one step:
forward, backward, clip, optimizer and schedule (all from torch / transformers / peft),
plus checkpoints that make a restart continue at the same step and data position.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainers import data as data_mod
from trainers.methods import method_module
from storage.models import resolve_model_dir
from trainers.spec import JobSpec, TrainingSpec
from trainers.state_io import load_state, save_state

ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
STATE_NAME = "trainer_state"
PROBE_NAME = "probe"
#: In a checkpoint that several ranks write (DeepSpeed ZeRO-3 shards), rank 0's list of every rank's files and
#: sizes: the checkpoint is complete only once all of them are in storage.
SHARDS_NAME = "shards.json"


@dataclass
class Precision:
    name: str  # fp32 | bf16 | fp16
    base_dtype: torch.dtype  # dtype the frozen base is loaded in
    autocast_dtype: torch.dtype | None


def decide_precision(requested: str, device: torch.device, full_finetune: bool) -> Precision:
    """Resolve `auto` from the hardware; full fine-tuning keeps fp32 master weights under autocast."""
    name = requested
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("training.precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if name == "fp32":
        return Precision("fp32", torch.float32, None)
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    return Precision(name, torch.float32 if full_finetune else dtype, dtype)


def load_model(spec: JobSpec, model_dir: str, precision: Precision, device: torch.device, total_steps: int):
    """The base model with the method applied: a PeftModel, or the plain model for full fine-tuning."""
    from transformers import AutoModelForCausalLM

    method = method_module(spec.method.name)
    quant = method.quantization_config(spec.method, precision.autocast_dtype or torch.float32)
    dtype = precision.base_dtype if spec.model.dtype == "auto" else getattr(torch, spec.model.dtype)
    kwargs = {"dtype": dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quant is None:
        model.to(device)
    peft_cfg = method.peft_config(spec.method, total_steps)
    if quant is not None:
        import peft

        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.model.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif spec.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if peft_cfg is not None:
        import peft

        model = peft.get_peft_model(model, peft_cfg)
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) — peft's own count for adapters."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_rng_state(),
    }


def _numpy_rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def _unwrap(model):
    return model.module if hasattr(model, "module") and not hasattr(model, "peft_config") else model


def save_weights(model, directory: Path, is_adapter: bool) -> None:
    target = directory / (ADAPTER_DIR if is_adapter else MODEL_DIR)
    _unwrap(model).save_pretrained(target, safe_serialization=True)


def load_trainable_weights(model, directory: Path, is_adapter: bool) -> None:
    """Restore what trains from a checkpoint (adapter weights, or the whole model)."""
    from safetensors.torch import load_file

    inner = _unwrap(model)
    if is_adapter:
        import peft

        weights = load_file(str(directory / ADAPTER_DIR / "adapter_model.safetensors"))
        peft.set_peft_model_state_dict(inner, weights)
    else:
        state = {}
        for f in sorted((directory / MODEL_DIR).glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing, unexpected = inner.load_state_dict(state, strict=False)
        tied = set(getattr(inner, "_tied_weights_keys", None) or [])
        if unexpected or (set(missing) - tied):
            raise RuntimeError(f"checkpoint does not match the model: missing={missing} unexpected={unexpected}")


def say(message: str) -> None:
    """One console line from a worker. Written to the real stdout: Ray Train's print patch
    would otherwise both log and tee it, and the driver would show every line twice."""
    print(message, file=sys.__stdout__, flush=True)


#: Optimizer steps left out of `steady_tokens_per_s`: the first steps pay for lazy allocation and kernel set-up.
STEADY_AFTER_STEPS = 2


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class Progress:
    """Rank 0's console line: step, loss, tokens/s, ETA; and the steady-state throughput of the steps alone."""

    def __init__(self, total_steps: int, start_step: int, history: list[dict] | None = None):
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.tokens = 0
        # Tokens of the steps before a resume, as the checkpoint's history recorded them.
        self.tokens_before = int((history or [{}])[-1].get("trained_tokens") or 0)
        self.steady_tokens = 0
        self.steady_s = 0.0

    def add_step(self, step: int, tokens: int, seconds: float) -> None:
        """Count one optimizer step (its tokens, its own time: no eval, no checkpoint) once warm."""
        if step > self.start_step + STEADY_AFTER_STEPS:
            self.steady_tokens += tokens
            self.steady_s += seconds

    @property
    def trained_tokens(self) -> int:
        """Tokens (all ranks, padding excluded) of every optimizer step taken so far, resumes included."""
        return self.tokens_before + self.tokens

    def steady_tokens_per_s(self) -> float | None:
        return self.steady_tokens / self.steady_s if self.steady_s > 0 else None

    def line(self, step: int, loss: float, lr: float) -> str:
        elapsed = time.perf_counter() - self.t0
        done = max(step - self.start_step, 1)
        eta = (self.total - step) * elapsed / done
        tps = self.tokens / elapsed if elapsed > 0 else 0.0
        return (
            f"[rayft] step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
            f"tok/s {tps:,.0f} eta {int(eta) // 60}:{int(eta) % 60:02d}"
        )


def evaluate(
    model, examples, batch_size: int, pad_id: int, device, precision: Precision, world: int, rank: int, lockstep: bool = False
) -> float:
    """Mean token loss on `examples`, each rank taking its share. `lockstep`: every rank runs the same number of
    forward passes, topping up with passes that count nothing (ZeRO-3 gathers each layer from all ranks in forward)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    batches = [(batch, True) for batch in data_mod.eval_batches(examples, batch_size, world, rank)]
    if lockstep:
        most = math.ceil(math.ceil(len(examples) / world) / batch_size)
        batches += [(examples[:1], False)] * (most - len(batches))
    with torch.no_grad():
        for batch, counts in batches:
            b = {k: v.to(device) for k, v in data_mod.collate(batch, pad_id).items()}
            with _autocast(device, precision):
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            n_virtual = logits.shape[1] - b["input_ids"].shape[1]  # prefix tuning prepends none to logits, but be safe
            logits = logits[:, n_virtual:, :]
            shift_logits = logits[:, :-1, :].float()
            shift_labels = b["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=data_mod.IGNORE, reduction="sum",
            )
            if counts:
                total += torch.tensor([loss.item(), (shift_labels != data_mod.IGNORE).sum().item()], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def _autocast(device: torch.device, precision: Precision):
    if precision.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.autocast_dtype)


def build_scheduler(training: TrainingSpec, optimizer):
    """The job's learning-rate schedule (transformers') on `optimizer`; DeepSpeed ZeRO-3 builds the same one."""
    from transformers import get_scheduler

    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[training.schedule]
    return get_scheduler(schedule, optimizer, num_warmup_steps=training.warmup_steps, num_training_steps=training.max_steps)


def micro_batch(train: list, tcfg, step: int, micro: int, world: int, rank: int, pad_id: int,
                device: torch.device) -> dict[str, torch.Tensor]:
    """Rank `rank`'s micro-batch `micro` of optimizer step `step` (1-based), padded and on `device`.

    A pure function of (seed, step, micro): a resumed run replays exactly the batches it would have seen.
    """
    idx = data_mod.micro_batch_indices(
        len(train), step_micro=(step - 1) * tcfg.grad_accum + micro,
        micro_batch_size=tcfg.micro_batch_size, world=world, rank=rank, seed=tcfg.seed,
    )
    return {k: v.to(device) for k, v in data_mod.collate([train[i] for i in idx], pad_id).items()}


def maybe_inject_fault(faults: dict | None, step: int, rank: int) -> None:
    """Fault injection for the fault-tolerance tests (Python API only, never from a job file).

    `crash_at_step` exits the worker process (not an exception) once: a marker file makes
    the restarted worker carry on. `fail_at_step` raises on every attempt.
    """
    if not faults:
        return
    if faults.get("crash_at_step") == step and rank == faults.get("rank", 0):
        marker = Path(faults["marker"])
        if not marker.exists():
            marker.write_text(str(step))
            os._exit(1)
    if faults.get("fail_at_step") == step:
        raise RuntimeError(f"injected failure at step {step}")


def _step_of(name: str) -> int:
    return int(name.rsplit("-", 1)[1]) if name.startswith("step-") and name[5:].isdigit() else -1


def newest_checkpoint(config: dict):
    """The newest complete checkpoint of this run (a `ray.train.Checkpoint`), or None.

    Ray Train registers a reported checkpoint when its controller next polls the workers;
    a worker that dies right after reporting can lose that registration although the files
    are already in storage. So the run's storage is scanned too, and the newer one wins.
    """
    import ray.train

    candidates: list[tuple[int, object]] = []
    registered = ray.train.get_checkpoint()
    if registered is not None:
        candidates.append((_step_of(Path(registered.path).name), registered))
    if config.get("storage_uri") and config.get("run_id"):
        candidates += stored_checkpoints(config["storage_uri"], config["run_id"])
    if not candidates:
        return None
    return max(candidates, key=lambda c: c[0])[1]


def stored_checkpoints(storage_uri: str, run_id: str) -> list[tuple[int, object]]:
    """(step, `ray.train.Checkpoint`) of every complete checkpoint of the run found in its storage."""
    import pyarrow.fs
    import ray.train

    from storage.store import pyarrow_filesystem

    fs, base = pyarrow_filesystem(storage_uri)
    run_dir = f"{base.rstrip('/')}/runs/{run_id}"
    found = []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(run_dir, allow_not_found=True)):
        if info.type == pyarrow.fs.FileType.Directory and _step_of(info.base_name) >= 0 and checkpoint_complete(fs, info.path):
            found.append((_step_of(info.base_name), ray.train.Checkpoint(info.path, filesystem=fs)))
    return found


def checkpoint_complete(fs, path: str) -> bool:
    """All files of the checkpoint at `path` are in storage: the trainer state, and every file `shards.json` lists."""
    import json

    import pyarrow.fs

    File = pyarrow.fs.FileType.File
    state = fs.get_file_info([f"{path}/{STATE_NAME}.json", f"{path}/{STATE_NAME}.safetensors", f"{path}/{SHARDS_NAME}"])
    if not all(f.type == File for f in state[:2]):
        return False
    if state[2].type != File:
        return True
    with fs.open_input_stream(f"{path}/{SHARDS_NAME}") as stream:
        listing = json.loads(stream.read())
    expected = {rel: size for files in listing["files"].values() for rel, size in files.items()}
    found = fs.get_file_info([f"{path}/{rel}" for rel in expected])
    return all(f.type == File and f.size == size for f, size in zip(found, expected.values()))


@contextlib.contextmanager
def resume_checkpoint(config: dict):
    """The newest complete checkpoint of this run as a local directory, or None."""
    newest = newest_checkpoint(config)
    if newest is None:
        yield None
        return
    with newest.as_directory() as local:
        yield Path(local)


def train_func(config: dict) -> None:
    """Ray Train worker entry point. `config = {"spec": JobSpec as JSON, "storage_uri": str, "run_id": str, "faults": dict|None}`."""
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world > 1 and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    torch.manual_seed(spec.training.seed)
    random.seed(spec.training.seed)
    np.random.seed(spec.training.seed)
    device = ray.train.torch.get_device()
    is_adapter = spec.method.name != "full"
    precision = decide_precision(spec.training.precision, device, full_finetune=not is_adapter)
    tcfg = spec.training

    model_dir = resolve_model_dir(spec.model.source, config.get("storage_uri"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    datasets = data_mod.build_datasets(spec.data, tokenizer, tcfg.seed)

    model = load_model(spec, model_dir, precision, device, tcfg.max_steps)
    trainable, total = count_parameters(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    scheduler = build_scheduler(tcfg, optimizer)
    if world > 1:
        model = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="ddp",
                                              parallel_strategy_kwargs={"find_unused_parameters": spec.method.name == "adalora"})
    scaler = torch.amp.GradScaler("cuda") if precision.name == "fp16" else None

    start_step, history, resumes = 0, [], []
    with resume_checkpoint(config) as ckpt_dir:
        if ckpt_dir is not None:
            load_trainable_weights(model, ckpt_dir, is_adapter)
            state = load_state(ckpt_dir, STATE_NAME)
    if ckpt_dir is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        start_step, history, resumes = state["step"], state["history"], state["resumes"] + [state["step"]]
        if rank == 0:
            say(f"[rayft] resumed from checkpoint at step {start_step}")

    if rank == 0:
        say(
            f"[rayft] {spec.method.name}: trainable {trainable:,} / {total:,} params "
            f"({100 * trainable / max(total, 1):.3f}%), precision {precision.name}, workers {world}, "
            f"train {len(datasets.train)} / eval {len(datasets.eval)} examples"
            + (f", {datasets.skipped_rows} bad rows skipped" if datasets.skipped_rows else "")
        )
    progress = Progress(tcfg.max_steps, start_step, history)
    inner = _unwrap(model)
    running_loss, running_n = 0.0, 0
    eval_loss = None

    for step in range(start_step + 1, tcfg.max_steps + 1):
        maybe_inject_fault(config.get("faults"), step, rank)
        step_t0, step_tokens0 = time.perf_counter(), progress.tokens
        for micro in range(tcfg.grad_accum):
            batch = micro_batch(datasets.train, tcfg, step, micro, world, rank, pad_id, device)
            sync = micro == tcfg.grad_accum - 1 or world == 1
            ctx_sync = contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()
            with ctx_sync, _autocast(device, precision):
                loss = model(**batch).loss / tcfg.grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
            running_loss += loss.item()
            progress.tokens += int(batch["attention_mask"].sum().item()) * world
        running_n += 1
        if scaler:
            scaler.unscale_(optimizer)
        if tcfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        if spec.method.name == "adalora":
            inner.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        progress.add_step(step, progress.tokens - step_tokens0, time.perf_counter() - step_t0)

        if rank == 0 and (step % tcfg.log_every == 0 or step == tcfg.max_steps):
            say(progress.line(step, running_loss / running_n, scheduler.get_last_lr()[0]))
        train_loss = running_loss / running_n
        do_eval = step % tcfg.eval_every == 0 or step == tcfg.max_steps
        do_ckpt = step % tcfg.checkpoint_every == 0 or step == tcfg.max_steps
        if do_eval and datasets.eval:
            eval_loss = evaluate(model, datasets.eval, tcfg.micro_batch_size, pad_id, device, precision, world, rank)
        if do_eval or do_ckpt:
            history.append({"step": step, "train_loss": train_loss, "eval_loss": eval_loss if do_eval else None,
                            "trained_tokens": progress.trained_tokens})
            running_loss, running_n = 0.0, 0
            metrics = {
                "step": step, "train_loss": train_loss, "eval_loss": eval_loss,
                "trainable_params": trainable, "total_params": total, "trained_tokens": progress.trained_tokens,
                "tokens_per_s": progress.tokens / max(time.perf_counter() - progress.t0, 1e-9),
                "steady_tokens_per_s": progress.steady_tokens_per_s(), "peak_rss_bytes": peak_rss_bytes(),
            }
            if do_ckpt:
                probe = probe_logits(model, datasets, device, precision) if step == tcfg.max_steps else None
                state = {"step": step, "history": history, "resumes": resumes}
                _report_with_checkpoint(metrics, model, optimizer, scheduler, state, probe, is_adapter, rank, world)
            else:
                ray.train.report(metrics)


def probe_logits(model, datasets, device, precision: Precision) -> dict[str, torch.Tensor]:
    """Logits of the final model on one fixed example, kept with the last checkpoint so anyone
    can check that the published artifact reproduces the model as it was at the end of training."""
    example = (datasets.eval or datasets.train)[0]
    ids = torch.tensor([example.input_ids], device=device)
    model.eval()
    with torch.no_grad(), _autocast(device, precision):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().cpu()
    model.train()
    return {"input_ids": ids.cpu(), "logits": logits}


def _report_with_checkpoint(metrics, model, optimizer, scheduler, state, probe, is_adapter, rank, world) -> None:
    import ray.train

    # Every rank's RNG state goes into the checkpoint so a restart replays dropout exactly.
    states = [None] * world
    mine = rng_state()
    if world > 1:
        torch.distributed.all_gather_object(states, mine)
    else:
        states = [mine]
    with tempfile.TemporaryDirectory(prefix="rayft-ckpt-") as tmp:
        checkpoint = None
        if rank == 0:
            save_weights(model, Path(tmp), is_adapter)
            save_state(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": states, **state},
                tmp, STATE_NAME,
            )
            if probe is not None:
                save_state(probe, tmp, PROBE_NAME)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{state['step']:08d}")
