"""The objective inside a training worker, for the worker loop (trainers/loop.py): its loss function, its reference
log-probabilities when they are precomputed, its eval figures and what it adds to the progress line.

For `sft` everything is what the loop does anyway: the model's own loss, no reference, no extra metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import ContextManager

import torch

from trainers.methods import traits
from trainers.objectives._table import objective_module
from trainers.objectives.forward import evaluate_objective, make_loss_fn, reference_table

#: Metrics shown on the progress line, with their short labels.
PROGRESS_METRICS = (("preference_accuracy", "acc"), ("reward_margin", "margin"), ("kl", "kl"))
#: Eval figures on an eval line, with their labels.
EVAL_LABELS = (("eval_loss", "eval loss"), ("eval_preference_accuracy", "preference accuracy"),
               ("eval_logp_accuracy", "chosen more likely"), ("eval_reward_margin", "reward margin"), ("eval_kl", "kl"))


def _is_adapter(spec) -> bool:
    return traits(spec.method.name).is_adapter


def loss_function(spec):
    """The job's objective as the loop calls it: `(model, batch) -> (loss, metrics)`."""
    live = objective_module(spec.objective.name).REFERENCE and _is_adapter(spec)
    return make_loss_fn(spec.objective, live_reference=live)


def is_preference(spec) -> bool:
    return objective_module(spec.objective.name).DATA != "text"


def prepare_reference(spec, model, batches, saved: dict | None, device: torch.device, world: int, rank: int,
                      autocast: Callable[[], ContextManager] = contextlib.nullcontext, lockstep: bool = False) -> dict:
    """Full fine-tuning with a reference objective: every example's reference log-probabilities, from the resumed
    checkpoint's state (`saved`) or computed now by `model` as loaded (the frozen base, before step 1) in one pass over
    the preprocessed train and eval examples (each rank scores its share), handed to `batches` so that every batch
    carries its examples' figures. Returns what the checkpoints must keep ({} when nothing)."""
    if not objective_module(spec.objective.name).REFERENCE or _is_adapter(spec):
        return {}
    tables = (saved or {}).get("reference")
    if tables is None:
        tables = {}
        for part in ("train", "eval"):
            examples, n = batches.examples(part)
            tables[part] = reference_table(model, examples, n, batches.collate, spec.training.micro_batch_size, world, rank,
                                           device, autocast, lockstep)
    for part, table in tables.items():
        batches.attach_reference(part, table)
    return {"reference": tables}


def evaluate(loss_fn, model, batches, device: torch.device, world: int,
             autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> dict[str, float]:
    """{"eval_loss", "eval_preference_accuracy", ...} of a preference objective over this rank's eval batches."""
    return evaluate_objective(loss_fn, model, batches, device, world, autocast)


def progress_suffix(running: dict[str, float], steps: int) -> str:
    """The objective's running metrics for the progress line, e.g. ` acc 0.875 margin 0.412`."""
    return "".join(f" {label} {running[key] / steps:.3f}" for key, label in PROGRESS_METRICS if key in running and steps)


def format_eval(metrics: dict) -> str:
    """An eval result on one line: loss, preference accuracy, reward margin (what the objective reports)."""
    return ", ".join(f"{label} {metrics[key]:.4f}" for key, label in EVAL_LABELS if metrics.get(key) is not None)
