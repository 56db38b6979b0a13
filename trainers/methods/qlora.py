"""QLoRA: LoRA over a frozen 4-bit NF4 base loaded through bitsandbytes (Dettmers et al., 2023)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from storage.configs import raw_get
from trainers.methods._lora import LoraFamilyConfig, lora_peft_config
from trainers.methods._targets import TargetModules
from trainers.methods._traits import Traits, no_step_hook as after_optimizer_step  # noqa: F401

TRAITS = Traits(
    produces="adapter", zero3=False, tunable=True, serving="multiplexed", mixes_in_batch=True, quantized_base=True, rank_field="r"
)


class Config(LoraFamilyConfig):
    name: Literal["qlora"] = "qlora"
    r: int = Field(16, ge=1, le=4096, description="Rank of the A·B update.")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: the update is scaled by alpha/r.")
    target_modules: TargetModules = Field("all-linear", description="QLoRA adapts every linear layer by default, as in the paper.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.4 bit/param saved).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the 4-bit weights are dequantized to for matmuls; auto follows training precision."
    )


def problems(raw: dict) -> list[str]:
    """Rules between qlora and the rest of a raw job mapping."""
    found = []
    if raw_get(raw, "resources", "strategy") == "deepspeed_zero3":
        found.append(
            "resources.strategy: got 'deepspeed_zero3', a 4-bit (qlora) base cannot be sharded by ZeRO-3; "
            "use strategy single/ddp, or method lora for ZeRO-3"
        )
    if raw_get(raw, "model", "dtype") not in (None, "auto"):
        found.append(
            f"model.dtype: got {raw_get(raw, 'model', 'dtype')!r}, a qlora base is loaded in 4-bit; "
            "set method.qlora.compute_dtype instead, or leave model.dtype as auto"
        )
    return found


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
    return lora_peft_config(cfg)
