"""Odds Ratio Preference Optimization (Hong et al., 2024): SFT on the chosen response plus an odds-ratio term.

No reference model. The NLL term is over the chosen response tokens (TRL's ORPOTrainer also counts the prompt).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from trainers.objectives._common import SequenceLogps, pair_metrics

DATA = "paired"
REFERENCE = False


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0, le=100, description="Weight λ of the odds-ratio term against the NLL of the chosen response.")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def loss(cfg: Config, policy: SequenceLogps, reference: SequenceLogps | None) -> tuple[torch.Tensor, dict]:
    chosen_tokens = policy.tokens.chunk(2)[0]
    nll = -policy.chosen.sum() / chosen_tokens.sum().clamp(min=1)
    chosen, rejected = policy.means().float().chunk(2)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    metrics = pair_metrics(cfg.beta * chosen, cfg.beta * rejected)
    metrics.update(nll=nll.detach(), log_odds_ratio=log_odds.detach().mean())
    return nll - cfg.beta * ratio.mean(), metrics
