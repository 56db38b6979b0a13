"""Prefix tuning: trainable key/value prefixes in every attention layer (Li & Liang, 2021)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from storage.configs import raw_get
from trainers.methods._traits import Traits, no_step_hook as after_optimizer_step  # noqa: F401

# Lives in the prompt, not the weights: nothing to merge or multiplex.
TRAITS = Traits(produces="adapter", zero3=False, tunable=False, serving="none", mixes_in_batch=False, prompt_learning=True)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(16, ge=1, le=1024, description="Length of the learned prefix per layer.")
    prefix_projection: bool = Field(False, description="Reparameterize the prefix through an MLP (more stable, more params).")
    encoder_hidden_size: int | None = Field(None, ge=1, description="Hidden size of that MLP; default: the model's.")


def problems(raw: dict) -> list[str]:
    if raw_get(raw, "method", "target_modules") is not None:
        return [
            "method.prefix_tuning.target_modules: prefix tuning adds virtual tokens to every layer and has no "
            "target modules; remove this field"
        ]
    return []


def quantization_config(cfg: Config, compute_dtype) -> None:
    return None


def peft_config(cfg: Config, total_steps: int) -> "peft.PeftConfig":
    import peft

    kwargs = {}
    if cfg.encoder_hidden_size is not None:
        kwargs["encoder_hidden_size"] = cfg.encoder_hidden_size
    return peft.PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=cfg.num_virtual_tokens,
        prefix_projection=cfg.prefix_projection,
        **kwargs,
    )
