"""Training objectives: how the loss of one micro-batch is computed from the model (the worker loop's loss seam).

An objective is a callable `(model, batch) -> (loss, metrics)`: `batch` is what the worker's batch source
yields (tensors on the device), `loss` the micro-batch's mean loss as a scalar tensor to back-propagate (the
loop divides it over gradient accumulation), `metrics` extra floats worth reporting (averaged over the
micro-batches between two reports and added to the run's metrics). The loop runs it under the strategy's
forward context (autocast, DDP's no_sync). `sft` is the next-token loss on the completion tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Objective = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def sft(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised fine-tuning: transformers' causal-LM loss (labels = input ids, IGNORE where no loss is taken)."""
    return model(**batch).loss, {}


#: Objectives by name.
OBJECTIVES: dict[str, Objective] = {"sft": sft}


def objective_for(spec) -> Objective:
    """The job's objective. Job specs do not choose one yet: every job is `sft`."""
    return OBJECTIVES["sft"]
