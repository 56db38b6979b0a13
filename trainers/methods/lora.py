"""LoRA: trainable low-rank A·B beside the chosen linear layers (Hu et al., 2021)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from trainers.methods._targets import TargetModules, peft_target_modules


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, le=4096, description="Rank of the A·B update.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: TargetModules = Field("default", description="Layers to adapt: default (q+v), all-linear, or names.")


def quantization_config(cfg: Config, compute_dtype) -> None:
    """LoRA keeps the base in its training precision."""
    return None


def peft_config(cfg: Config, total_steps: int) -> "peft.PeftConfig":
    import peft

    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=peft_target_modules(cfg.target_modules),
    )
