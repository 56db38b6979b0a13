"""Training precision: what `training.precision` (auto | fp32 | bf16 | fp16) means on a device, for a strategy.

The worker loop and the planner both decide precision here, so a plan accounts for the dtypes a run will use.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Precision:
    name: str  # fp32 | bf16 | fp16
    base_dtype: torch.dtype  # dtype the frozen base is loaded in
    autocast_dtype: torch.dtype | None


def decide_precision(requested: str, device: torch.device, full_finetune: bool) -> Precision:
    """Resolve `auto` from the hardware; full fine-tuning keeps fp32 master weights under autocast."""
    name = requested
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("training.precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if name == "fp32":
        return Precision("fp32", torch.float32, None)
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    return Precision(name, torch.float32 if full_finetune else dtype, dtype)


def zero3_precision(requested: str, device: torch.device) -> Precision:
    """DeepSpeed's precision mode: bf16 where the hardware has it, loss-scaled fp16 on older GPUs, else fp32.

    The parameters live in that dtype and DeepSpeed keeps the fp32 master weights in the optimizer, so the
    forward pass runs without autocast.
    """
    name = decide_precision(requested, device, full_finetune=True).name
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("training.precision: got 'bf16', which this GPU does not support; use fp16 or auto")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return Precision(name, dtype, None)


def autocast(device: torch.device, precision: Precision):
    """The forward pass's autocast context for `precision` (none for fp32 and ZeRO-3)."""
    if precision.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.autocast_dtype)
