"""Training objectives, registered by name: what the loss is, given the log-probabilities of the sequences.

Each objective is one module of the same shape:
  - `Config`: its pydantic config (`name: Literal[...]` is the discriminator of the job spec's `objective:`);
  - `DATA`: the rows it trains on: "text" (the SFT shapes), "paired" ({prompt, chosen, rejected}) or
    "unpaired" ({prompt, completion, label}, KTO);
  - `REFERENCE`: whether it compares against a frozen reference model;
  - `loss(cfg, policy, reference)`: (scalar loss, metrics) from `SequenceLogps` of the policy (and the reference).
An objective knows nothing of methods, strategies or models: `objective_for(spec)` gives the worker loop a
`(model, batch) -> (loss, metrics)` callable that computes the log-probabilities (forward.py) and takes the
reference from the model with its adapter off, or from the batch (precomputed for full fine-tuning; runtime.py). Adding an objective is adding one
module and one line in the table (_table.py, below forward.py and runtime.py, which read it).
"""

from __future__ import annotations

from trainers.objectives._table import OBJECTIVES, PREFERENCE_OBJECTIVES, ObjectiveConfig, objective_module  # noqa: F401
from trainers.objectives.runtime import loss_function


def objective_for(spec):
    """The job's objective as the worker loop's loss seam: `(model, batch) -> (loss, metrics)`
    (trainers/objectives/forward.py computes the log-probabilities; the reference is the adapter switched off, or
    precomputed and carried in the batch)."""
    return loss_function(spec)
