"""AdaLoRA: LoRA whose rank budget moves, during training, to the layers that matter (Zhang et al., 2023)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from storage.configs import raw_get
from trainers.methods._targets import TargetModules, peft_target_modules
from trainers.methods._traits import Traits

# Not multiplexed in serving (peft mixes LoRA adapters only): it serves merged. AdaLoRA masks ranks out as it
# trains, so DDP must expect parameters without gradients.
TRAITS = Traits(
    produces="adapter", zero3=False, tunable=False, serving="merged", mixes_in_batch=False, rank_field="init_r",
    ddp_find_unused_parameters=True,
)


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


def problems(raw: dict) -> list[str]:
    init_r, target_r = raw_get(raw, "method", "init_r"), raw_get(raw, "method", "target_r")
    if isinstance(init_r, int) and isinstance(target_r, int) and target_r > init_r:
        return [f"method.adalora.target_r: got {target_r}, must be <= init_r ({init_r})"]
    return []


def after_optimizer_step(model, step: int) -> None:
    """Move the rank budget by the importance of each rank, measured from this step's gradients (peft's
    `update_and_allocate`): called after the optimizer step, before the gradients are zeroed."""
    model.base_model.update_and_allocate(step)


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
