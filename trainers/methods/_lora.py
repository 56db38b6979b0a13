"""The LoRA family's shared config base and peft config (lora, dora, rslora, qlora differ only in a flag)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from trainers.methods._targets import TargetModules, peft_target_modules

#: The fields every LoRA-family config has; `rayft tune` searches these, and a trial that switches between
#: LoRA-family methods carries them over.
LORA_FIELDS = ("r", "alpha", "dropout", "target_modules")


class LoraFamilyConfig(BaseModel):
    """Rank, scale, dropout and targets of a low-rank A·B update; each member sets its `name` and defaults."""

    model_config = ConfigDict(extra="forbid")

    # Declared first so every member dumps `name` first; each member narrows it to its Literal (the discriminator).
    name: str = Field(description="The method: lora, dora, rslora or qlora.")
    r: int = Field(8, ge=1, le=4096, description="Rank of the A·B update.")
    alpha: float = Field(16.0, gt=0, description="Scale numerator: the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: TargetModules = Field("default", description="Layers to adapt: default (q+v), all-linear, or names.")


def lora_peft_config(cfg: LoraFamilyConfig, **variant) -> "peft.PeftConfig":
    """peft's LoraConfig for `cfg`; `variant` is the member's flag (use_dora, use_rslora)."""
    import peft

    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=peft_target_modules(cfg.target_modules),
        **variant,
    )
