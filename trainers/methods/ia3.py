"""IA3: learned scaling vectors on keys, values and feed-forward activations (Liu et al., 2022)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from trainers.methods._targets import TargetModules, peft_target_modules
from trainers.methods._traits import Traits, no_problems as problems, no_step_hook as after_optimizer_step  # noqa: F401

# Not multiplexed in serving (peft mixes LoRA adapters only): it serves merged.
TRAITS = Traits(produces="adapter", zero3=False, tunable=False, serving="merged", mixes_in_batch=False)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["ia3"] = "ia3"
    target_modules: TargetModules = Field("default", description="Layers to scale: default (k, v, down_proj for Llama) or names.")
    feedforward_modules: list[str] | None = Field(
        None, description="Which of target_modules are feed-forward (scaled on the input); default: peft's per-architecture list."
    )


def quantization_config(cfg: Config, compute_dtype) -> None:
    return None


def peft_config(cfg: Config, total_steps: int) -> "peft.PeftConfig":
    import peft

    return peft.IA3Config(
        task_type="CAUSAL_LM",
        target_modules=peft_target_modules(cfg.target_modules),
        feedforward_modules=cfg.feedforward_modules,
    )
