"""AdaLoRA: LoRA whose rank budget moves, during training, to the layers that matter (Zhang et al., 2023)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from trainers.methods._targets import TargetModules, peft_target_modules


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["adalora"] = "adalora"
    init_r: int = Field(12, ge=1, le=4096, description="Rank each layer starts with.")
    target_r: int = Field(8, ge=1, le=4096, description="Average rank left after budget reallocation (<= init_r).")
    alpha: float = Field(16.0, gt=0, description="Scale numerator of the update.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: TargetModules = Field("default", description="Layers to adapt: default (q+v), all-linear, or names.")
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="Share of steps before ranks start to move (peft's tinit).")
    final_fraction: float = Field(0.2, ge=0, lt=1, description="Share of final steps with ranks frozen (peft's tfinal).")
    reallocate_every: int = Field(1, ge=1, description="Steps between two budget reallocations (peft's deltaT).")


def quantization_config(cfg: Config, compute_dtype) -> None:
    return None


def peft_config(cfg: Config, total_steps: int) -> "peft.PeftConfig":
    import peft

    # The schedule is tied to the real number of optimizer steps of this run.
    tinit = int(cfg.warmup_fraction * total_steps)
    tfinal = int(cfg.final_fraction * total_steps)
    if tinit >= total_steps - tfinal:
        tinit, tfinal = 0, 0
    return peft.AdaLoraConfig(
        task_type="CAUSAL_LM",
        init_r=cfg.init_r,
        target_r=cfg.target_r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=peft_target_modules(cfg.target_modules),
        tinit=tinit,
        tfinal=tfinal,
        deltaT=cfg.reallocate_every,
        total_step=max(total_steps, 1),
    )
