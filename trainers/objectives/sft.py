"""Supervised fine-tuning: next-token cross-entropy on the response tokens (the default objective)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from trainers.objectives._common import SequenceLogps

DATA = "text"
REFERENCE = False


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["sft"] = "sft"


def loss(cfg: Config, policy: SequenceLogps, reference: SequenceLogps | None) -> tuple[torch.Tensor, dict]:
    """Mean negative log-likelihood per response token (the loop uses the model's own loss, which is the same)."""
    return -policy.sums.sum() / policy.tokens.sum().clamp(min=1), {}
