"""Full fine-tuning: every weight trains (DDP on one node, DeepSpeed ZeRO-3 across many)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["full"] = "full"


def quantization_config(cfg: Config, compute_dtype) -> None:
    return None


def peft_config(cfg: Config, total_steps: int) -> None:
    """No adapter: the model itself is what trains."""
    return None
