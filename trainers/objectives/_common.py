"""What every objective computes from: per-sequence sums of response-token log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


#: Every metric an objective may report (each objective reports a subset).
METRIC_KEYS = ("rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy", "logp_accuracy", "kl", "nll",
               "log_odds_ratio")


@dataclass
class SequenceLogps:
    """Log-probabilities of a batch of sequences under one model, summed over each sequence's response tokens.

    Paired batches hold the chosen sequences first, then the rejected ones (`sums` has 2·B rows). Unpaired (KTO)
    batches hold B completions with `labels` (True = desirable) and `kl_sums`, the sums of B mismatched
    (prompt, other completion) sequences that estimate the KL term.
    """

    sums: torch.Tensor
    tokens: torch.Tensor
    labels: torch.Tensor | None = None
    kl_sums: torch.Tensor | None = None

    @property
    def chosen(self) -> torch.Tensor:
        return self.sums.chunk(2)[0]

    @property
    def rejected(self) -> torch.Tensor:
        return self.sums.chunk(2)[1]

    def means(self) -> torch.Tensor:
        """Per-token average log-probability of each sequence (SimPO, ORPO, IPO)."""
        return self.sums / self.tokens.clamp(min=1)


def conservative_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-log σ(x), with the labels flipped with probability `label_smoothing` (cDPO; Mitchell, 2023)."""
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """The metrics every paired objective reports: mean rewards, margin, preference accuracy."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards_chosen": chosen_rewards.mean(),
        "rewards_rejected": rejected_rewards.mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "preference_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }
