"""DoRA: LoRA on the weight's direction plus a learned magnitude per output (Liu et al., 2024)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trainers.methods._lora import LoraFamilyConfig, lora_peft_config
from trainers.methods._traits import Traits, no_problems as problems, no_step_hook as after_optimizer_step  # noqa: F401

# peft cannot put a DoRA adapter in one forward pass with others: it serves in a sub-batch of its own.
TRAITS = Traits(produces="adapter", zero3=False, tunable=True, serving="multiplexed", mixes_in_batch=False, rank_field="r")


class Config(LoraFamilyConfig):
    name: Literal["dora"] = "dora"
    r: int = Field(8, ge=1, le=4096, description="Rank of the directional A·B update.")


def quantization_config(cfg: Config, compute_dtype) -> None:
    return None


def peft_config(cfg: Config, total_steps: int) -> "peft.PeftConfig":
    return lora_peft_config(cfg, use_dora=True)
