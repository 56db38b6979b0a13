"""QLoRA: LoRA over a frozen 4-bit NF4 base loaded through bitsandbytes (Dettmers et al., 2023)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from trainers.methods._targets import TargetModules, peft_target_modules


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["qlora"] = "qlora"
    r: int = Field(16, ge=1, le=4096, description="Rank of the A·B update.")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: TargetModules = Field("all-linear", description="QLoRA adapts every linear layer by default, as in the paper.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.4 bit/param saved).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the 4-bit weights are dequantized to for matmuls; auto follows training precision."
    )


def quantization_config(cfg: Config, compute_dtype: "torch.dtype"):
    import torch
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype if cfg.compute_dtype == "auto" else getattr(torch, cfg.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant_type,
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def peft_config(cfg: Config, total_steps: int) -> "peft.PeftConfig":
    import peft

    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=peft_target_modules(cfg.target_modules),
    )
