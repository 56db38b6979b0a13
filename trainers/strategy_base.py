"""What every strategy is: the worker's identity (`Worker`), the interface the worker loop drives (`Strategy`) and
the learning-rate schedule both strategies build. Below trainers.strategy (`TorchStrategy`, `strategy_for`) and
trainers.deepspeed (`Zero3Strategy`), which both implement it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from trainers.methods import traits
from trainers.precision import Precision
from trainers.spec import JobSpec, TrainingSpec


@dataclass
class Worker:
    """Who this worker is: the validated job, the trainer's config, its place in the group and its device."""

    spec: JobSpec
    config: dict  # {"spec", "storage_uri", "run_id", "faults"} as trainers.run hands it to Ray Train
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_adapter(self) -> bool:
        return traits(self.spec.method.name).is_adapter


class Strategy:
    """The interface the worker loop drives; see `TorchStrategy` and `trainers.deepspeed.Zero3Strategy`.

    Call order: `start()` (process set-up, before the model is fetched), `build(model_dir)`, `restore()`, then per
    step: under `forward_context(last)` the objective's loss of each micro-batch, `backward(loss)` (the
    micro-batch's mean loss, undivided), then `step()`, the method's `after_optimizer_step` hook on `inner`,
    `zero_grad()`; at a report `report_extras()` (before eval), and `report_checkpoint(...)` at a checkpoint.
    """

    #: Shown after the method's name in the start-up line.
    label = ""
    #: Eval runs the same number of forward passes on every rank.
    lockstep_eval = False
    precision: Precision
    model: torch.nn.Module  # what the loop calls forward on (DDP / DeepSpeed wrapper or the model itself)
    inner: torch.nn.Module  # the (peft) model inside it, for the method's hooks
    trainable: int
    total: int

    def start(self) -> None:
        pass

    def build(self, model_dir: str) -> None:
        raise NotImplementedError

    def restore(self) -> dict | None:
        """Load the run's newest complete checkpoint; its trainer state, or None when the run starts fresh."""
        raise NotImplementedError

    def banner_extra(self) -> str:
        return ""

    def forward_context(self, last_micro: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        pass

    def zero_grad(self) -> None:
        pass

    def lr(self) -> float:
        raise NotImplementedError

    def report_extras(self) -> tuple[dict, dict]:
        """(metrics, trainer state) this strategy adds to a report; called on every rank before eval."""
        return {}, {}

    def report_checkpoint(self, metrics: dict, state: dict, probe: dict | None) -> None:
        """Write a checkpoint of `state` (+ the final probe) and report it with `metrics`. Collective."""
        raise NotImplementedError


def build_scheduler(training: TrainingSpec, optimizer):
    """The job's learning-rate schedule (transformers') on `optimizer`; DeepSpeed ZeRO-3 builds the same one."""
    from transformers import get_scheduler

    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[training.schedule]
    return get_scheduler(schedule, optimizer, num_warmup_steps=training.warmup_steps, num_training_steps=training.max_steps)
