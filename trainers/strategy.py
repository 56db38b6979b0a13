"""How a worker holds and steps the model: the part of the worker loop that differs between strategies.

`trainers.loop.train_func` runs the same preamble and the same step / eval / checkpoint rhythm for every job;
a `Strategy` supplies the model, the backward pass, the optimizer step and the checkpoint files. Two exist:
`TorchStrategy` here (single and DDP: torch AdamW, transformers schedule, the whole trainable state in rank 0's
checkpoint) and `trainers.deepspeed.Zero3Strategy` (DeepSpeed ZeRO-3: parameters, gradients and optimizer
states sharded, each rank checkpointing its shard).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch

from trainers.checkpoints import (
    PROBE_NAME,
    STATE_NAME,
    dir_name,
    load_trainable_weights,
    resume_checkpoint,
    save_weights,
    unwrap,
)
from trainers.deepspeed import Zero3Strategy
from trainers.methods import method_module, traits
from trainers.precision import Precision, autocast, decide_precision
from trainers.spec import JobSpec
from trainers.state_io import load_state, save_state
# The interface every strategy implements, below this module and trainers.deepspeed (re-exported for the loop).
from trainers.strategy_base import Strategy, Worker, build_scheduler  # noqa: F401


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


class TorchStrategy(Strategy):
    """Single worker, or DDP over several: every rank holds the whole model; torch's AdamW and a transformers
    schedule step it; rank 0 checkpoints what trains with the optimizer and schedule state."""

    def __init__(self, worker: Worker):
        self.w = worker
        self.precision = decide_precision(worker.spec.training.precision, worker.device, full_finetune=not worker.is_adapter)

    def build(self, model_dir: str) -> None:
        import ray.train.torch

        spec, tcfg = self.w.spec, self.w.spec.training
        model = load_model(spec, model_dir, self.precision, self.w.device, tcfg.max_steps)
        self.trainable, self.total = count_parameters(model)
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
        self.scheduler = build_scheduler(tcfg, self.optimizer)
        if self.w.world > 1:
            find_unused = traits(spec.method.name).ddp_find_unused_parameters
            model = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="ddp",
                                                  parallel_strategy_kwargs={"find_unused_parameters": find_unused})
        self.model, self.inner = model, unwrap(model)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.name == "fp16" else None

    def restore(self) -> dict | None:
        with resume_checkpoint(self.w.config) as ckpt_dir:
            if ckpt_dir is not None:
                load_trainable_weights(self.model, ckpt_dir, self.w.is_adapter)
                state = load_state(ckpt_dir, STATE_NAME)
        if ckpt_dir is None:
            return None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return state

    def banner_extra(self) -> str:
        return f" ({100 * self.trainable / max(self.total, 1):.3f}%)"

    def forward_context(self, last_micro: bool):
        sync = last_micro or self.w.world == 1
        no_sync = contextlib.nullcontext() if sync or not hasattr(self.model, "no_sync") else self.model.no_sync()
        stack = contextlib.ExitStack()
        stack.enter_context(no_sync)
        stack.enter_context(autocast(self.w.device, self.precision))
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.w.spec.training.grad_accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> None:
        tcfg = self.w.spec.training
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if tcfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, tcfg.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def report_checkpoint(self, metrics: dict, state: dict, probe: dict | None) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="rayft-ckpt-") as tmp:
            checkpoint = None
            if self.w.rank == 0:
                save_weights(self.model, Path(tmp), self.w.is_adapter)
                save_state({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), **state},
                           tmp, STATE_NAME)
                if probe is not None:
                    save_state(probe, tmp, PROBE_NAME)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name(state["step"]))


def strategy_for(worker: Worker) -> Strategy:
    """The strategy the job resolves to."""
    if worker.spec.resolved_strategy() == "deepspeed_zero3":
        return Zero3Strategy(worker)
    return TorchStrategy(worker)


def select_accelerator(device: torch.device) -> None:
    """Tell DeepSpeed what it runs on; read once, when deepspeed is first imported in this process (validating a
    spec with `deepspeed.extra.zero_optimization` imports it), so every worker sets it first."""
    os.environ["DS_ACCELERATOR"] = "cuda" if device.type == "cuda" else "cpu"


def prepare_process(device: torch.device, world: int) -> None:
    """Pin this worker to its GPU; on CPU, share the node's cores among the workers."""
    select_accelerator(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
