"""rsLoRA: LoRA scaled by alpha/sqrt(r), which keeps high ranks (r >= 64) stable (Kalajdzievski, 2023)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from trainers.methods._lora import LoraFamilyConfig, lora_peft_config
from trainers.methods._traits import Traits, no_problems as problems, no_step_hook as after_optimizer_step  # noqa: F401

TRAITS = Traits(produces="adapter", zero3=True, tunable=True, serving="multiplexed", mixes_in_batch=True, rank_field="r")


class Config(LoraFamilyConfig):
    name: Literal["rslora"] = "rslora"
    r: int = Field(64, ge=1, le=4096, description="Rank of the A·B update; rsLoRA is meant for high ranks.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: the update is scaled by alpha/sqrt(r).")


def quantization_config(cfg: Config, compute_dtype) -> None:
    return None


def peft_config(cfg: Config, total_steps: int) -> "peft.PeftConfig":
    return lora_peft_config(cfg, use_rslora=True)
