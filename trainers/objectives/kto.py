"""Kahneman-Tversky Optimization (Ethayarajh et al., 2024): unpaired desirable / undesirable completions.

The reference point is the KL between policy and reference, estimated on mismatched (prompt, completion) pairs of
the batch, clamped at 0 and not differentiated.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from trainers.objectives._common import SequenceLogps

DATA = "unpaired"
REFERENCE = True


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0, le=100, description="How far the policy may move from the reference: smaller = further.")
    desirable_weight: float = Field(1.0, gt=0, le=100, description="Weight λ_D of the desirable (label true) losses.")
    undesirable_weight: float = Field(1.0, gt=0, le=100, description="Weight λ_U of the undesirable (label false) losses.")


def loss(cfg: Config, policy: SequenceLogps, reference: SequenceLogps | None) -> tuple[torch.Tensor, dict]:
    kl = (policy.kl_sums - reference.kl_sums).mean().detach().clamp(min=0)
    ratio = policy.sums - reference.sums
    good = policy.labels.bool()
    chosen_losses = 1 - torch.sigmoid(cfg.beta * (ratio[good] - kl))
    rejected_losses = 1 - torch.sigmoid(cfg.beta * (kl - ratio[~good]))
    losses = torch.cat((cfg.desirable_weight * chosen_losses, cfg.undesirable_weight * rejected_losses))
    rewards = (cfg.beta * ratio).detach()
    metrics = {"kl": kl}
    if good.any():
        metrics["rewards_chosen"] = rewards[good].mean()
    if (~good).any():
        metrics["rewards_rejected"] = rewards[~good].mean()
    if good.any() and (~good).any():
        metrics["reward_margin"] = metrics["rewards_chosen"] - metrics["rewards_rejected"]
        # unpaired: the share of completions whose implied reward has the sign of their label
        metrics["preference_accuracy"] = (
            (rewards[good] > 0).float().sum() + (rewards[~good] < 0).float().sum()
        ) / len(rewards)
    return losses.mean(), metrics
