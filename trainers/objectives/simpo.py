"""Simple Preference Optimization (Meng et al., 2024): length-normalized log-probabilities with a target margin.

No reference model.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from trainers.objectives._common import SequenceLogps, conservative_sigmoid, pair_metrics

DATA = "paired"
REFERENCE = False


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0, le=100, description="Scale of the reward (mean log-probability per response token).")
    gamma: float = Field(0.5, ge=0, le=100, description="Target reward margin γ between chosen and rejected.")


def loss(cfg: Config, policy: SequenceLogps, reference: SequenceLogps | None) -> tuple[torch.Tensor, dict]:
    chosen, rejected = policy.means().chunk(2)
    losses = conservative_sigmoid(cfg.beta * (chosen - rejected) - cfg.gamma, 0.0)
    return losses.mean(), pair_metrics(cfg.beta * chosen, cfg.beta * rejected)
