"""LoRA: trainable low-rank A·B beside the chosen linear layers (Hu et al., 2021)."""

from __future__ import annotations

from typing import Literal

from trainers.methods._lora import LoraFamilyConfig, lora_peft_config
from trainers.methods._traits import Traits, no_problems as problems, no_step_hook as after_optimizer_step  # noqa: F401

TRAITS = Traits(produces="adapter", zero3=True, tunable=True, serving="multiplexed", mixes_in_batch=True, rank_field="r")


class Config(LoraFamilyConfig):
    name: Literal["lora"] = "lora"


def quantization_config(cfg: Config, compute_dtype) -> None:
    """LoRA keeps the base in its training precision."""
    return None


def peft_config(cfg: Config, total_steps: int) -> "peft.PeftConfig":
    return lora_peft_config(cfg)
