"""Full fine-tuning: every weight trains (DDP on one node, DeepSpeed ZeRO-3 across many)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from trainers.methods._traits import Traits, no_problems as problems, no_step_hook as after_optimizer_step  # noqa: F401

# The result is a whole model: served as a base of its own, never beside others.
TRAITS = Traits(produces="model", zero3=True, tunable=False, serving="none", mixes_in_batch=False)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["full"] = "full"


def quantization_config(cfg: Config, compute_dtype) -> None:
    return None


def peft_config(cfg: Config, total_steps: int) -> None:
    """No adapter: the model itself is what trains."""
    return None
