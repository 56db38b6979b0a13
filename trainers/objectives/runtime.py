"""The objective inside a training worker: its data, its loss function, its reference and its metrics.

The worker loop (single/DDP in trainers/loop.py, ZeRO-3 in trainers/deepspeed.py) owns the step; it asks this object
for the examples and how to batch them, for the loss of a batch, for the eval figures, and for what goes on the
progress line and into the history. For `sft` everything is what the loop did before: the model's own loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import ContextManager

import torch

from trainers.objectives import objective_module
from trainers.objectives.forward import (
    MetricMeter,
    adapter_reference,
    evaluate_objective,
    make_loss_fn,
    needs_reference_table,
    reference_table,
)
from trainers.preference_data import attach_reference, objective_datasets

#: Metrics shown on the progress line, with their short labels.
PROGRESS_METRICS = (("preference_accuracy", "acc"), ("reward_margin", "margin"), ("kl", "kl"))


class ObjectiveRuntime:
    """One worker's view of the job's objective (see the module doc)."""

    def __init__(self, spec, tokenizer, pad_id: int):
        self.cfg = spec.objective
        self.module = objective_module(self.cfg.name)
        self.preference = self.module.DATA != "text"
        self.is_adapter = spec.method.name != "full"
        self.datasets, collate = objective_datasets(spec, tokenizer, spec.training.seed)
        self.collate: Callable[[list], dict] = lambda examples: collate(examples, pad_id)
        self.meter = MetricMeter()
        self.loss_fn = None

    def bind(self, model) -> None:
        """Build the loss function for `model` (the PeftModel or plain model, before any DDP/DeepSpeed wrapper)."""
        live = self.module.REFERENCE and self.is_adapter
        self.loss_fn = make_loss_fn(self.cfg, adapter_reference(model) if live else None)

    def prepare_reference(self, model, saved: dict | None, device: torch.device, batch_size: int, world: int, rank: int,
                          autocast: Callable[[], ContextManager] = contextlib.nullcontext, lockstep: bool = False) -> dict | None:
        """Full fine-tuning with a reference objective: every example's reference log-probabilities, from a resumed
        checkpoint (`saved`) or computed now by the model as loaded (the frozen base, before step 1); attached to the
        examples so their batches carry them. Returns the table to keep in checkpoints (None when not needed)."""
        if not needs_reference_table(self.cfg, self.is_adapter):
            return None
        examples = self.datasets.train + self.datasets.eval
        table = saved
        if table is None:
            table = reference_table(model, examples, self.collate, batch_size, world, rank, device, autocast, lockstep)
        attach_reference(examples, table)
        return table

    def loss(self, model, batch: dict) -> torch.Tensor:
        """The batch's loss (what backward runs on); its metrics go into the running means."""
        loss, metrics = self.loss_fn(model, batch)
        self.meter.add(metrics)
        return loss

    def evaluate(self, model, batch_size: int, device: torch.device, world: int, rank: int,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext, lockstep: bool = False) -> dict[str, float]:
        """{"eval_loss", "eval_preference_accuracy", ...} of a preference objective on the eval set."""
        return evaluate_objective(self.loss_fn, model, self.datasets.eval, self.collate, batch_size, device, world, rank,
                                  autocast, lockstep)

    def train_metrics(self) -> dict[str, float]:
        """Means of the metrics since the last call, as `train_<name>`; then starts over."""
        out = self.meter.means("train_")
        self.meter.reset()
        return out

    def progress_suffix(self) -> str:
        """The running metrics for the progress line, e.g. ` acc 0.875 margin 0.412`."""
        means = self.meter.means()
        return "".join(f" {label} {means[key]:.3f}" for key, label in PROGRESS_METRICS if key in means)


def first_sequence(example):
    """The example's first token sequence: itself (SFT), its chosen response (pairs) or its completion (KTO)."""
    return getattr(example, "chosen", None) or getattr(example, "completion", None) or example
