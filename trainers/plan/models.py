"""The planner's request and result models, its constants, and memory sizes as people write them."""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.errors import RayftError
from trainers.methods import MethodConfig
from trainers.objectives import OBJECTIVES
from trainers.spec import auto_strategy, strategy_problems


GiB = 1024**3
MiB = 1024**2

#: Bytes a CUDA process holds before any tensor: context, cuBLAS/cuDNN workspaces, NCCL buffers.
CUDA_RUNTIME_BYTES = 1 * GiB
#: Resident memory of a CPU training worker before the model: python, torch, transformers, peft,
#: bitsandbytes, ray.train (533 MiB measured after those imports; bench/plan_vs_measured.py reports
#: ~420 MiB without Ray) plus Ray's core-worker threads and buffers.
CPU_RUNTIME_BYTES = 768 * MiB
#: Share of the dynamic memory (activations + transients) added for the allocator: PyTorch's CUDA caching
#: allocator fragments by ~10%; glibc's default heap on CPU kept freed blocks worth 0.86x the activations
#: in bench/plan_vs_measured.py (its "glibc" row), so CPU plans add the whole dynamic part again.
MARGIN_FRACTION = {"cuda": 0.10, "cpu": 1.0}
#: DeepSpeed's factor on host memory for offloaded states (pinned buffers), as in its own estimator.
OFFLOAD_BUFFER_FACTOR = 1.5
#: bitsandbytes block sizes: 4-bit weights (Params4bit default) and the double-quant level above it.
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
#: bitsandbytes 8-bit optimizers: block size, and the size under which a tensor keeps 32-bit states.
OPTIM8_BLOCKSIZE = 256
OPTIM8_MIN_SIZE = 4096
#: Default adapter-schedule length when planning a bare model (AdaLoRA's budget schedule needs one).
DEFAULT_TOTAL_STEPS = 1000

TaskType = Literal["style", "instruction", "classification", "knowledge", "multitask"]
TASK_HELP = {
    "style": "style / tone / output format",
    "instruction": "instruction following / chat",
    "classification": "narrow classification / extraction",
    "knowledge": "new domain knowledge from a large corpus",
    "multitask": "many tasks in one model",
}


class PlanError(RayftError):
    """A plan that cannot be made: an unreadable model config, a bad size, an impossible combination."""


class DoesNotFit(RayftError):
    """The pre-flight plan says the job cannot fit the resources it asks for."""

    http_status = 422


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- inputs


class Hardware(_Strict):
    """What the job runs on: `workers` devices of one kind, each with `memory_per_device` bytes."""

    device: Literal["cuda", "cpu"] = Field("cuda", description="Device kind each worker trains on.")
    workers: int = Field(1, ge=1, le=4096, description="Ray Train workers, one device each.")
    memory_per_device: int | None = Field(
        None, gt=0, description="Bytes of memory per device (GPU memory, or host memory per CPU worker); None = unknown."
    )
    gpus_per_node: int = Field(8, ge=1, le=64, description="Devices per node; sets the node count for offload host memory.")
    host_memory_per_node: int | None = Field(None, gt=0, description="Host RAM per node in bytes, checked for CPU offload; None = unknown.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker reserves (resources.cpus_per_worker).")

    @property
    def nodes(self) -> int:
        return math.ceil(self.workers / self.gpus_per_node)


class PlanRequest(_Strict):
    """One job shape to plan: a model config, a method, a batch shape, a strategy, and the hardware."""

    model: str = Field(description="Where the model config comes from: a config.json, a model directory, s3://, registry:NAME or a hub id.")
    method: MethodConfig = Field(description="Fine-tuning method and its parameters, as in a job spec.")
    hardware: Hardware = Field(default_factory=Hardware, description="Devices the job runs on.")
    seq_len: int = Field(512, ge=1, le=1_048_576, description="Tokens per example (the longest a batch holds).")
    micro_batch: int = Field(1, ge=1, le=4096, description="Examples per device per forward pass.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Training precision, as training.precision.")
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Base dtype, as model.dtype.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward, as model.gradient_checkpointing.")
    strategy: Literal["auto", "single", "ddp", "deepspeed_zero3"] = Field(
        "auto", description="Distribution strategy, as resources.strategy."
    )
    offload_optimizer: bool = Field(False, description="ZeRO-3: optimizer states and fp32 gradients in host memory.")
    offload_params: bool = Field(False, description="ZeRO-3: parameter shards in host memory too (needs offload_optimizer).")
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="adamw = torch AdamW (what the loop runs); adamw_8bit = bitsandbytes' 8-bit AdamW."
    )
    total_steps: int = Field(DEFAULT_TOTAL_STEPS, ge=1, description="Optimizer steps (AdaLoRA's schedule depends on it).")
    objective: Literal[tuple(OBJECTIVES)] = Field(  # type: ignore[valid-type]
        "sft", description="Training objective, as objective.name: a preference pair is two sequences per example, and a "
        "reference (or KTO's KL) pass adds a no-gradient forward of the same rows."
    )

    @model_validator(mode="after")
    def _combinations(self) -> "PlanRequest":
        # The job spec's own rules between method, strategy and workers, on the job this request stands for.
        problems = strategy_problems({
            "method": self.method.model_dump(), "resources": {"strategy": self.strategy, "num_workers": self.hardware.workers},
        })
        strategy = self.resolved_strategy()
        if (self.offload_optimizer or self.offload_params) and strategy != "deepspeed_zero3":
            problems.append("offload: CPU offload is a ZeRO-3 feature; set strategy deepspeed_zero3 or turn offload off")
        if self.offload_params and not self.offload_optimizer:
            problems.append("offload_params: DeepSpeed offloads parameters only together with the optimizer; set offload_optimizer too")
        if self.precision == "fp16" and self.hardware.device == "cpu":
            problems.append("precision: fp16 needs CUDA; use bf16 or fp32 on CPU")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def resolved_strategy(self) -> str:
        """What `auto` stands for: the same rule as JobSpec.resolved_strategy."""
        if self.strategy != "auto":
            return self.strategy
        return auto_strategy(self.method.name, self.hardware.workers)


# --------------------------------------------------------------------------------------------- results


class MemoryBreakdown(_Strict):
    """Bytes by what holds them. The peak is the larger of two moments of a step:
    `weights + optimizer + max(activations + transient, gradients + step_transient)`."""

    weights: int = Field(description="Base and adapter weights (4-bit packing and constants for qlora; ZeRO-3: shard + gathered layer).")
    gradients: int = Field(description="Gradients of trainable parameters (ZeRO-3: the fp32 shard; DDP: plus its bucket copy).")
    optimizer: int = Field(description="Optimizer states (AdamW moments; ZeRO-3: fp32 master + moments shard).")
    activations: int = Field(description="Tensors autograd saves for backward (with checkpointing: layer inputs + one recomputed layer).")
    transient: int = Field(description="Extra at the start of backward: logits gradients, first gradients, 4-bit dequant buffer.")
    step_transient: int = Field(description="Optimizer-step temporaries (foreach AdamW: a copy of all states; CPU: of the largest).")
    overhead: int = Field(description="Runtime constant plus the fragmentation margin (see MARGIN_FRACTION).")
    peak: int = Field(description="Predicted peak without overhead: what the step's live tensors reach.")
    total: int = Field(description="peak + overhead: what the device must hold.")


class ParameterCounts(_Strict):
    total: int = Field(description="All parameters (peft's count: base + adapter).")
    trainable: int = Field(description="Parameters that receive gradients (peft's count).")
    trainable_percent: float = Field(description="100 * trainable / total.")
    largest_layer: int = Field(description="Parameters of the largest single module (DeepSpeed's gathered unit).")
    quantized: int = Field(0, description="Base parameters stored in 4-bit (qlora).")


class ActivationFigures(_Strict):
    """Saved activations per device, with and without gradient checkpointing (the plan uses one of them)."""

    without_checkpointing: int = Field(description="Bytes autograd saves over the whole forward pass.")
    with_checkpointing: int = Field(description="Layer inputs + outside-layer tensors + one layer recomputed in backward.")
    per_layer: int = Field(description="Bytes one decoder layer saves (the largest layer).")
    logits: int = Field(description="Bytes of one logits tensor (batch x seq x vocab in the output dtype).")


class ScalingSpec(_Strict):
    """The Ray Train `ScalingConfig` to ask for (`ray.train.ScalingConfig(**scaling.model_dump())`)."""

    num_workers: int = Field(description="Workers, one per device.")
    use_gpu: bool = Field(description="Whether each worker gets a GPU.")
    resources_per_worker: dict[str, float] = Field(description="Resources each worker reserves.")


class Plan(_Strict):
    """The planner's answer for one request."""

    request: PlanRequest = Field(description="What was planned.")
    model_type: str = Field(description="The config's model_type (e.g. llama).")
    params: ParameterCounts
    precision: str = Field(description="Resolved training precision: fp32, bf16 or fp16.")
    base_dtype: str = Field(description="dtype of the base weights in memory (or nf4/fp4 for qlora's linear layers).")
    strategy: str = Field(description="Resolved strategy: single, ddp or deepspeed_zero3.")
    per_device: MemoryBreakdown = Field(description="Bytes on each device.")
    total: MemoryBreakdown = Field(description="Bytes over all devices (per_device x workers).")
    host_per_node: int = Field(description="Host RAM per node the strategy needs beyond the runtime (ZeRO-3 offload / zero.Init load).")
    activations: ActivationFigures
    artifact_bytes: int = Field(description="Size on disk of what the run publishes: the adapter, or the whole model.")
    artifact_kind: Literal["adapter", "model"]
    device_memory: int | None = Field(description="Memory per device checked against, bytes (None = unknown).")
    fits: bool | None = Field(description="per_device.total <= device memory (and host memory for offload); None when unknown.")
    reason: str = Field(description="One line: why it fits or not.")
    scaling: ScalingSpec = Field(description="Ray ScalingConfig for this plan.")
    notes: list[str] = Field(default_factory=list, description="Assumptions worth knowing for this plan.")


class Recommendation(_Strict):
    """A method and strategy for a task on given hardware, with the plan that shows it fits."""

    task: TaskType
    method: str = Field(description="Recommended method: full, lora or qlora.")
    strategy: str = Field(description="single, ddp or deepspeed_zero3.")
    gradient_checkpointing: bool
    offload_optimizer: bool
    offload_params: bool
    micro_batch: int = Field(description="Micro-batch per device the plan fits with.")
    scaling: ScalingSpec
    plan: Plan | None = Field(description="The plan of the recommended configuration; None when nothing fits.")
    reasons: list[str] = Field(description="Why, one line each, following the methods table in DESIGN.md.")


# ------------------------------------------------------------------------------------ sizes and configs

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?[bB]?|[bB])?\s*$")
_UNITS = {"b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """Bytes in '24GiB', '80GB', '512MiB', '24' (a bare number is GiB). GB = 10^9, GiB = 2^30."""
    match = _SIZE.match(str(text))
    if not match:
        raise PlanError(f"memory size {text!r}: expected a number with a unit, e.g. 24GiB, 80GB or 512MiB")
    number, unit = float(match.group(1)), (match.group(2) or "gi").lower().rstrip("b") or "b"
    if number <= 0:
        raise PlanError(f"memory size {text!r}: must be > 0")
    return int(number * _UNITS[unit])


def format_bytes(n: int | float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def _validation_lines(exc) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return lines
