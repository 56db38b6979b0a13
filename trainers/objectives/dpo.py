"""Direct Preference Optimization (Rafailov et al., 2023), with the IPO and hinge variants and cDPO label smoothing."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from trainers.objectives._common import SequenceLogps, conservative_sigmoid, pair_metrics

DATA = "paired"
REFERENCE = True


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0, le=100, description="How far the policy may move from the reference: smaller = further (IPO: the τ regularizer).")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="sigmoid: DPO; ipo: squared loss on per-token log-ratios (Azar et al., 2023); hinge: SLiC's max(0, 1 - β·margin)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Probability that a preference label is wrong (conservative DPO); sigmoid loss only."
    )


def loss(cfg: Config, policy: SequenceLogps, reference: SequenceLogps | None) -> tuple[torch.Tensor, dict]:
    chosen_ratio = policy.chosen - reference.chosen
    rejected_ratio = policy.rejected - reference.rejected
    delta = chosen_ratio - rejected_ratio
    if cfg.loss_type == "sigmoid":
        losses = conservative_sigmoid(cfg.beta * delta, cfg.label_smoothing)
    elif cfg.loss_type == "hinge":
        losses = torch.relu(1 - cfg.beta * delta)
    else:  # ipo: log-ratios averaged per response token, as TRL and the IPO authors do
        chosen_n, rejected_n = policy.tokens.chunk(2)
        ipo_delta = chosen_ratio / chosen_n.clamp(min=1) - rejected_ratio / rejected_n.clamp(min=1)
        losses = (ipo_delta - 1 / (2 * cfg.beta)) ** 2
    return losses.mean(), pair_metrics(cfg.beta * chosen_ratio, cfg.beta * rejected_ratio)
