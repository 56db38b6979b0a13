"""Pre-flight memory and strategy planner: how much memory a fine-tuning job needs, per device and in total.

Every figure describes what `trainers.loop` really allocates, and each comes from the library that owns it:

- parameters: the model is built from its config on the meta device (never weights) and wrapped with the
  method's own `peft_config`; trainable and total counts are peft's `get_nb_trainable_parameters()`;
- base weights: the dtype `trainers.loop.decide_precision` loads the base in (full fine-tuning keeps fp32
  master weights under autocast; adapters sit on a 16-bit base on GPUs). QLoRA: the linear layers
  transformers hands to bitsandbytes are 4-bit (two weights a byte) plus bitsandbytes' block constants
  (an fp32 absmax per 64 weights, or with double quant an 8-bit absmax per 64 weights and an fp32 one per
  256 blocks); everything else is fp32, because `peft.prepare_model_for_kbit_training` upcasts it;
- gradients and optimizer: torch AdamW keeps two tensors like each trainable parameter; bitsandbytes'
  8-bit AdamW keeps two uint8 tensors plus an fp32 absmax per 256 values (tensors under 4096 values stay fp32);
- activations: what autograd really saves. The wrapped model runs one forward pass under `FakeTensorMode`
  (shapes and dtypes only, no memory), with the loop's autocast and a padded batch's attention mask, and a
  saved-tensor hook sums every distinct storage autograd keeps for backward, by decoder layer. Gradient
  checkpointing keeps each layer's input and recomputes one layer at a time in backward;
- transients: the loss's logits gradients at the start of backward, the optimizer step's temporaries,
  the dequantized weight of one 4-bit layer;
- ZeRO-3: DeepSpeed's accounting (16-bit parameter shard, fp32 gradient shard, fp32 master + Adam moments:
  18 B per parameter over the GPUs, plus the largest layer gathered), host memory for CPU offload with
  DeepSpeed's 1.5x pinned-buffer factor;
- overhead: a stated runtime constant per device (CUDA context and library workspaces, or the torch/Ray
  worker process on CPU) plus an allocator margin on the dynamic part (10% on CUDA; 100% on CPU, where
  glibc keeps freed blocks in its heap).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.errors import RayftError
from trainers.methods import MethodConfig, method_module, traits
from trainers.spec import JobSpec, auto_strategy
from trainers.objectives import OBJECTIVES, objective_module

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
        problems = []
        strategy = self.resolved_strategy()
        if traits(self.method.name).quantized_base and strategy == "deepspeed_zero3":
            problems.append("strategy: a 4-bit (qlora) base cannot be sharded by ZeRO-3; use single/ddp, or method lora for ZeRO-3")
        if strategy == "single" and self.hardware.workers > 1:
            problems.append(f"strategy: 'single' runs one worker but workers is {self.hardware.workers}; use ddp or deepspeed_zero3")
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


def load_model_config(source: str):
    """The model's `PretrainedConfig` from a config.json, a model directory, s3://, registry:NAME or a hub id.

    Only the config is read: weights are never downloaded.
    """
    from transformers import AutoConfig

    path = Path(source).expanduser()
    if path.is_file():
        return _config_from_dict(_read_json(path), source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"model {source!r}: directory has no config.json; pass a transformers model directory or its config.json")
        return _config_from_dict(_read_json(path / "config.json"), source)
    if source.startswith("s3://") or source.startswith("registry:"):
        return _config_from_dict(json.loads(_remote_config_bytes(source)), source)
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith(".json"):
        raise PlanError(f"model {source!r}: no such file or directory; pass a local config.json or model directory")
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)  # the local hub cache, if it has it
    except Exception:
        pass
    offline = _hub_unreachable()
    if offline:
        raise PlanError(f"model {source!r}: the hub is not reachable ({offline}); pass a local config.json path or model directory instead")
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as exc:  # unknown id, gated repo, network failure: all end the same way for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError(
            f"model {source!r}: cannot fetch its config from the hub ({first[:120]}); "
            "pass a local config.json path or model directory instead"
        ) from None


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, or None: a quick check instead of huggingface_hub's ~30 s of retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a proxy decides; let the real request try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as exc:
        return f"offline: {exc.strerror or exc}"
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PlanError(f"model config {str(path)!r}: not readable JSON ({exc})") from None


def _remote_config_bytes(source: str) -> bytes:
    """config.json alone, from an s3:// model prefix or a registry artifact."""
    from storage.store import open_store

    try:
        if source.startswith("registry:"):
            from storage.registry import open_registry

            registry = open_registry()
            store = open_store(registry.files_uri(registry.resolve(source[len("registry:"):])))
        else:
            store = open_store(source)
        return store.get_bytes("config.json")
    except RayftError as exc:
        raise PlanError(f"model {source!r}: cannot read its config.json ({exc})") from None


def _config_from_dict(data: dict, source: str):
    from transformers import AutoConfig

    if not isinstance(data, dict) or "model_type" not in data:
        raise PlanError(f"model config {source!r}: no `model_type` key; it must be a transformers config.json")
    data = dict(data)
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as exc:
        raise PlanError(f"model config {source!r}: transformers does not know model_type {model_type!r} ({exc})") from None


# ----------------------------------------------------------------------------------- resolved settings


@dataclass(frozen=True)
class _Setup:
    """The request resolved the way the training loop resolves a job."""

    precision: str  # fp32 | bf16 | fp16
    base_dtype: Any  # torch dtype of the (non-quantized) base weights
    autocast_dtype: Any  # torch dtype or None
    strategy: str
    quantized: bool
    compute_dtype: Any  # 4-bit dequant dtype (qlora)
    trace_model_dtype: Any  # dtype the traced model is cast to (ZeRO-3 runs the model in 16-bit, no autocast)
    trace_autocast: Any


def _resolve(req: PlanRequest) -> _Setup:
    import torch

    from trainers.precision import decide_precision

    full = not traits(req.method.name).is_adapter
    strategy = req.resolved_strategy()
    name = req.precision
    if name == "auto":
        # The loop asks the device; for a plan the device is hypothetical: bf16-capable GPUs (Ampere+) are assumed.
        name = "bf16" if req.hardware.device == "cuda" else "fp32"
    precision = decide_precision(name, torch.device(req.hardware.device), full_finetune=full)
    base = precision.base_dtype if req.model_dtype == "auto" else getattr(torch, req.model_dtype)
    quantized = traits(req.method.name).quantized_base
    compute = None
    if quantized:
        cd = getattr(req.method, "compute_dtype", "auto")
        compute = (precision.autocast_dtype or torch.float32) if cd == "auto" else getattr(torch, cd)
    trace_dtype, trace_autocast = None, precision.autocast_dtype
    if strategy == "deepspeed_zero3":
        # DeepSpeed keeps 16-bit parameters and runs the model in them: no autocast, no weight casts.
        trace_dtype = precision.autocast_dtype or torch.float32
        trace_autocast = None
    return _Setup(precision.name, base, precision.autocast_dtype, strategy, quantized, compute, trace_dtype, trace_autocast)


# ------------------------------------------------------------------------------------ model skeleton


@dataclass
class _Skeleton:
    model: Any
    layers: list
    quantized_modules: set[str]
    output_head: Any
    vocab_size: int


def _build_skeleton(config, req: PlanRequest, setup: _Setup) -> _Skeleton:
    """The model as the loop builds it, on the meta device: base dtype, 4-bit layers marked, method applied."""
    import torch
    from transformers import AutoModelForCausalLM

    method = method_module(req.method.name)
    peft_cfg = method.peft_config(req.method, req.total_steps)
    config = _copy_config(config)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=setup.base_dtype)
    except ValueError as exc:
        raise PlanError(f"model type {config.model_type!r}: no causal-LM class in transformers ({str(exc).splitlines()[0]})") from None
    quantized: set[str] = set()
    if setup.quantized:
        quantized = _quantized_module_names(model, req)
        for name, module in model.named_modules():
            if name in quantized:
                module.__class__ = _four_bit_standin()
                module.compute_dtype = setup.compute_dtype
                module.weight.data = module.weight.data.to(setup.compute_dtype)
        # As peft.prepare_model_for_kbit_training: freeze the base, upcast 16-bit non-4-bit params to fp32.
        for name, param in model.named_parameters():
            param.requires_grad = False
            owner = name.rsplit(".", 1)[0]
            if owner not in quantized and param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.to(torch.float32)
    output_head = model.get_output_embeddings()
    vocab = output_head.weight.shape[0] if output_head is not None else int(getattr(config, "vocab_size", 0))
    if peft_cfg is not None:
        import peft

        with torch.device("meta"):
            model = peft.get_peft_model(model, peft_cfg)
    layers = _decoder_layers(model, config)
    return _Skeleton(model, layers, quantized, output_head, vocab)


def _copy_config(config):
    config = config.__class__.from_dict(config.to_dict())
    config.use_cache = False  # the loop trains without a KV cache
    return config


def _quantized_module_names(model, req: PlanRequest) -> set[str]:
    """Names of the nn.Linear modules transformers' bitsandbytes integration turns into Linear4bit."""
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    qcfg = method_module("qlora").quantization_config(req.method, torch.float32)
    skips = HfQuantizer.get_modules_to_not_convert(model, qcfg.llm_int8_skip_modules, getattr(model, "_keep_in_fp32_modules", None))
    return {
        name for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and should_convert_module(name, skips)
    }


def _decoder_layers(model, config) -> list:
    import torch

    want = getattr(config, "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    for candidate in lists:
        if want is not None and len(candidate) == want:
            return list(candidate)
    return list(max(lists, key=len)) if lists else []


@functools.lru_cache(maxsize=1)
def _four_bit_standin():
    import torch

    class FourBitLinearStandIn(torch.nn.Linear):
        """Traces like bitsandbytes' Linear4bit: input cast to the compute dtype, output cast back; the
        matmul saves nothing but the (frozen) weight, exactly like `bnb.matmul_4bit`."""

        def forward(self, x):
            dtype = x.dtype
            out = torch.nn.functional.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype), self.bias)
            return out.to(dtype)

    return FourBitLinearStandIn


@functools.lru_cache(maxsize=1)
def _fused_dropout_standin():
    """nn.Dropout as CUDA runs it: the fused kernel saves a 1-byte mask (the CPU kernel saves a float one)."""
    import torch

    class FusedDropout(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(torch.empty(x.shape, dtype=torch.bool, device=x.device))
            return x.clone()

        @staticmethod
        def backward(ctx, grad):  # never run: the trace only needs what forward saves
            return grad

    class FusedDropoutStandIn(torch.nn.Dropout):
        def forward(self, x):
            return FusedDropout.apply(x) if self.training and self.p > 0 else x

    return FusedDropoutStandIn


# ----------------------------------------------------------------------------------------- counting


def four_bit_bytes(numel: int, double_quant: bool) -> int:
    """Bytes bitsandbytes stores for one 4-bit weight of `numel` values (packed data + block constants)."""
    packed = (numel + 1) // 2
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    if double_quant:
        constants = blocks * 1 + math.ceil(blocks / NF4_NESTED_BLOCKSIZE) * 4 + 4  # 8-bit absmax, fp32 absmax2, offset
    else:
        constants = blocks * 4
    return packed + constants


def optimizer_state_bytes(trainable: list[tuple[int, int]], optimizer: str) -> int:
    """Optimizer memory for trainable tensors given as (numel, element size)."""
    total = 0
    for numel, itemsize in trainable:
        if optimizer == "adamw_8bit" and numel >= OPTIM8_MIN_SIZE:
            total += 2 * (numel + math.ceil(numel / OPTIM8_BLOCKSIZE) * 4)
        elif optimizer == "adamw_8bit":
            total += 2 * numel * 4
        else:
            total += 2 * numel * itemsize + 4  # exp_avg, exp_avg_sq like the parameter; fp32 step counter
    return total


@dataclass
class _Inventory:
    total: int
    trainable: int
    largest_layer: int
    quantized_numel: int
    weight_bytes: int
    trainable_tensors: list[tuple[int, int]] = field(default_factory=list)
    head_trainable_bytes: int = 0
    largest_trainable_bytes: int = 0
    largest_quantized_numel: int = 0
    frozen_numel: int = 0


def _inventory(skel: _Skeleton, req: PlanRequest) -> _Inventory:
    model = skel.model
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
    else:
        params = list(model.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
    double_quant = bool(getattr(req.method, "double_quant", False))
    weight_bytes, quantized_numel, largest_q = 0, 0, 0
    trainable_tensors: list[tuple[int, int]] = []
    frozen = 0
    for name, param in model.named_parameters():  # named_parameters() yields a tied weight once
        owner = _strip_peft_prefix(name.rsplit(".", 1)[0])
        if owner in skel.quantized_modules and name.endswith("weight") and not param.requires_grad and "lora_" not in name:
            weight_bytes += four_bit_bytes(param.numel(), double_quant)
            quantized_numel += param.numel()
            largest_q = max(largest_q, param.numel())
        else:
            weight_bytes += param.numel() * param.element_size()
        if param.requires_grad:
            trainable_tensors.append((param.numel(), param.element_size()))
        else:
            frozen += param.numel()
    largest_layer = 0
    for module in model.modules():
        largest_layer = max(largest_layer, sum(p.numel() for p in module.parameters(recurse=False)))
    head = skel.output_head
    head_bytes = sum(p.numel() * p.element_size() for p in head.parameters() if p.requires_grad) if head is not None else 0
    largest_trainable = max((n * s for n, s in trainable_tensors), default=0)
    return _Inventory(
        total, trainable, largest_layer, quantized_numel, weight_bytes, trainable_tensors, head_bytes,
        largest_trainable, largest_q, frozen,
    )


def _strip_peft_prefix(name: str) -> str:
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.replace(".base_layer", "")


# ----------------------------------------------------------------------------------- activation trace


@dataclass
class _Trace:
    outside: int  # saved bytes not attributed to a decoder layer
    layers: list[int]  # saved bytes per decoder layer
    layer_input: int  # bytes of one layer's input hidden states


@dataclass
class ActivationModel:
    """Saved-activation bytes as an affine function of the micro-batch: a + b * batch (exact for a fixed seq_len)."""

    at1: _Trace
    at2: _Trace

    def _lin(self, a: int, b: int, batch: int) -> int:
        return max(0, a + (b - a) * (batch - 1))

    def parts(self, batch: int) -> tuple[int, int, int, int]:
        """(outside-layer saved, all layers saved, largest layer saved, all layer inputs) for `batch` examples."""
        outside = self._lin(self.at1.outside, self.at2.outside, batch)
        per_layer = [self._lin(a, b, batch) for a, b in zip(self.at1.layers, self.at2.layers)]
        inputs = self._lin(self.at1.layer_input, self.at2.layer_input, batch) * len(per_layer)
        return outside, sum(per_layer), max(per_layer, default=0), inputs

    def saved(self, batch: int, checkpointing: bool) -> int:
        """Bytes saved for backward; with checkpointing: layer inputs + outside tensors + one recomputed layer."""
        outside, layers, largest, inputs = self.parts(batch)
        return outside + (inputs + largest if checkpointing else layers)


def _to_fake(model, mode) -> None:
    """Swap every meta tensor of the model for a fake CPU tensor (keeping ties and requires_grad)."""
    import torch

    swapped: dict[int, Any] = {}

    def fake_like(t):
        if id(t) not in swapped:
            with mode:
                new = torch.empty(t.shape, dtype=t.dtype)
            swapped[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else new
        return swapped[id(t)]

    def convert(value):
        if isinstance(value, torch.Tensor) and value.device.type == "meta":
            return fake_like(value)
        if isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            return {k: convert(v) for k, v in value.items()}
        return value

    for module in model.modules():
        for key, value in list(module._parameters.items()):
            if value is not None:
                module._parameters[key] = fake_like(value)
        for key, value in list(module._buffers.items()):
            if value is not None:
                module._buffers[key] = fake_like(value)
        for key, value in list(vars(module).items()):
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            new = convert(value)
            if new is not value:
                setattr(module, key, new)


def _trace(skel: _Skeleton, setup: _Setup, seq_len: int, batch: int, mode, method_name: str) -> _Trace:
    """Bytes autograd saves in one training forward pass of `batch` x `seq_len` tokens, by decoder layer."""
    import torch

    model = skel.model
    excluded = {p.untyped_storage()._cdata for p in model.parameters()}
    excluded |= {b.untyped_storage()._cdata for b in model.buffers()}
    seen: set[int] = set()
    where = {"layer": None}
    outside, per_layer, layer_input = 0, [0] * len(skel.layers), [0]

    def pack(t):
        nonlocal outside
        storage = t.untyped_storage()
        key = storage._cdata
        if key in excluded or key in seen:
            return t
        seen.add(key)
        if where["layer"] is None:
            outside += storage.nbytes()
        else:
            per_layer[where["layer"]] += storage.nbytes()
        return t

    handles = []
    for i, layer in enumerate(skel.layers):
        def enter(module, args, kwargs, i=i):
            where["layer"] = i
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                layer_input[0] = max(layer_input[0], hidden.numel() * hidden.element_size())

        def leave(module, args, kwargs, output):
            where["layer"] = None

        handles.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(layer.register_forward_hook(leave, with_kwargs=True))
    model.train()
    try:
        with mode:
            ids = torch.zeros(batch, seq_len, dtype=torch.long)
            kwargs: dict[str, Any] = {"input_ids": ids, "labels": ids}
            if not traits(method_name).prompt_learning:
                # A padded batch (the loop right-pads): transformers builds this 4-D mask and sdpa keeps it.
                kwargs["attention_mask"] = torch.ones(batch, 1, seq_len, seq_len, dtype=torch.bool)
            autocast = (
                torch.autocast("cpu", dtype=setup.trace_autocast) if setup.trace_autocast is not None else contextlib.nullcontext()
            )
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
                out = model(**kwargs)
            del out
    finally:
        for handle in handles:
            handle.remove()
    return _Trace(outside, per_layer, layer_input[0])


def _activation_model(skel: _Skeleton, setup: _Setup, seq_len: int, method_name: str, device: str) -> ActivationModel:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    if setup.trace_model_dtype is not None:
        for param in skel.model.parameters():
            if param.dtype.is_floating_point and param.dtype != setup.trace_model_dtype and param.numel() > 0:
                param.data = param.data.to(setup.trace_model_dtype)
    if device == "cuda":
        for module in skel.model.modules():
            if type(module) is torch.nn.Dropout:
                module.__class__ = _fused_dropout_standin()
    _to_fake(skel.model, mode)
    try:
        return ActivationModel(
            _trace(skel, setup, seq_len, 1, mode, method_name),
            _trace(skel, setup, seq_len, 2, mode, method_name),
        )
    except (RuntimeError, NotImplementedError) as exc:  # data-dependent control flow, an op without a fake kernel
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError(
            f"cannot trace the forward pass of this {type(skel.model).__name__} on shapes alone ({first[:160]}); "
            "its activations cannot be planned"
        ) from None


# ------------------------------------------------------------------------------------------- compose


def zero3_model_states(
    total_params: int, largest_layer_params: int, workers: int, gpus_per_node: int,
    offload_optimizer: bool, offload_params: bool, trainable_params: int | None = None,
) -> tuple[dict[str, int], int]:
    """ZeRO-3 model states per GPU (weights/gradients/optimizer) and host bytes per node, DeepSpeed's way.

    Per trainable parameter over N GPUs: 2 B 16-bit shard + 4 B fp32 gradient shard + 12 B fp32 master,
    momentum and variance (18 B); a frozen parameter keeps only its 2 B shard. The largest layer is gathered
    whole (4 B per parameter: 16-bit values and their gradients). Offloaded states live in host memory with
    DeepSpeed's 1.5x buffer factor; without offload the host needs the largest layer per GPU to load it.
    """
    trainable = total_params if trainable_params is None else trainable_params
    frozen = total_params - trainable
    nodes = math.ceil(workers / gpus_per_node)
    per_node_gpus = min(workers, gpus_per_node)
    gathered = 4 * largest_layer_params
    param_shard = 2 * total_params / workers
    grad_shard = 4 * trainable / workers
    optim_shard = 12 * trainable / workers
    if offload_params:
        gpu = {"weights": gathered, "gradients": 0, "optimizer": 0}
        host = (18 * trainable + 2 * frozen) / nodes * OFFLOAD_BUFFER_FACTOR
    elif offload_optimizer:
        gpu = {"weights": gathered + int(param_shard), "gradients": 0, "optimizer": 0}
        host = 16 * trainable / nodes * OFFLOAD_BUFFER_FACTOR
    else:
        gpu = {"weights": gathered + int(param_shard), "gradients": int(grad_shard), "optimizer": int(optim_shard)}
        host = largest_layer_params * 4 * per_node_gpus * OFFLOAD_BUFFER_FACTOR
    return gpu, int(host)


def _breakdown(
    req: PlanRequest, setup: _Setup, inv: _Inventory, acts: ActivationModel, skel: _Skeleton,
) -> tuple[MemoryBreakdown, int, ActivationFigures]:
    """Bytes per device by holder, host bytes per node (ZeRO-3), and the activation figures."""
    import torch

    hw = req.hardware
    # the rows one forward pass holds: a preference pair is chosen + rejected
    batch = req.micro_batch * sequences_per_example(req.objective)
    outside, _, largest_layer_saved, inputs = acts.parts(batch)
    saved = acts.saved(batch, req.gradient_checkpointing)
    saved_no_gc, saved_gc = acts.saved(batch, False), acts.saved(batch, True)
    out_dtype = setup.trace_model_dtype or (
        setup.trace_autocast if setup.trace_autocast is not None else _head_dtype(skel)
    )
    logits = batch * req.seq_len * skel.vocab_size * _itemsize(out_dtype)
    logits_fp32 = batch * req.seq_len * skel.vocab_size * 4
    # Backward starts at the loss: log_softmax's and nll_loss's fp32 gradients, cast back to the logits dtype.
    loss_transient = 2 * logits_fp32 + (logits if out_dtype != torch.float32 else 0)
    # A reference (adapter off) or KL pass runs without gradient while the policy's activations are held: its logits
    # and their fp32 copy are alive on top of them. Full fine-tuning precomputes the reference before step 1 instead.
    loss_transient += (logits + logits_fp32) * no_grad_passes(req.objective, traits(req.method.name).is_adapter)
    dequant = inv.largest_quantized_numel * _itemsize(setup.compute_dtype) if setup.quantized else 0
    trainable_bytes = sum(n * s for n, s in inv.trainable_tensors)
    host = 0
    if setup.strategy == "deepspeed_zero3":
        gpu, host = zero3_model_states(
            inv.total, inv.largest_layer, hw.workers, hw.gpus_per_node, req.offload_optimizer, req.offload_params, inv.trainable,
        )
        weights, grads, optim = gpu["weights"], gpu["gradients"], gpu["optimizer"]
        # trainers.deepspeed steps the flat fp32 partition with torch's AdamW (foreach on CUDA: one state-sized
        # temporary; single-tensor on CPU: two); offloaded states are stepped in place by DeepSpeed's CPU Adam.
        shard_fp32 = 4 * inv.trainable // hw.workers
        optim_transient = 0 if req.offload_optimizer else (shard_fp32 if hw.device == "cuda" else 2 * shard_fp32)
        head_grad = 0
    else:
        weights = inv.weight_bytes
        grads = trainable_bytes
        optim = optimizer_state_bytes(inv.trainable_tensors, req.optimizer)
        if hw.device == "cuda" and req.optimizer == "adamw":
            optim_transient = trainable_bytes  # foreach AdamW: one sqrt(exp_avg_sq) copy of all states at once
        elif req.optimizer == "adamw":
            optim_transient = 2 * inv.largest_trainable_bytes  # single-tensor AdamW: sqrt and its quotient
        else:
            optim_transient = inv.largest_trainable_bytes
        head_grad = inv.head_trainable_bytes
        if setup.strategy == "ddp":
            grads += trainable_bytes  # DDP's gradient buckets are a second copy
    # Peak: backward's start (all activations + loss gradients + first gradients) or the optimizer step.
    # With checkpointing the loss gradients are gone before the first layer is recomputed.
    if req.gradient_checkpointing:
        backward_phase = outside + inputs + max(loss_transient, largest_layer_saved + dequant) + head_grad
    else:
        backward_phase = saved + loss_transient + dequant + head_grad
    transient = backward_phase - saved
    peak = weights + optim + max(backward_phase, grads + optim_transient)
    runtime = CUDA_RUNTIME_BYTES if hw.device == "cuda" else CPU_RUNTIME_BYTES
    overhead = runtime + int(MARGIN_FRACTION[hw.device] * max(backward_phase, optim_transient))
    breakdown = MemoryBreakdown(
        weights=int(weights), gradients=int(grads), optimizer=int(optim), activations=int(saved),
        transient=int(transient), step_transient=int(optim_transient), overhead=overhead, peak=int(peak),
        total=int(peak + overhead),
    )
    figures = ActivationFigures(
        without_checkpointing=int(saved_no_gc), with_checkpointing=int(saved_gc),
        per_layer=int(largest_layer_saved), logits=int(logits),
    )
    return breakdown, host, figures


def sequences_per_example(objective: str) -> int:
    """Sequences one example puts through the policy's forward pass with gradient: 2 for a preference pair."""
    return 2 if objective_module(objective).DATA == "paired" else 1


def no_grad_passes(objective: str, is_adapter: bool) -> int:
    """Forward passes without gradient per step besides the policy's: the live reference (adapter methods) and
    KTO's KL estimate (policy, and reference when live)."""
    module = objective_module(objective)
    live_reference = module.REFERENCE and is_adapter
    kl = module.DATA == "unpaired"
    return int(live_reference) + int(kl) * (1 + int(live_reference))


def _itemsize(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype, device="meta").element_size() if dtype is not None else 4


def _head_dtype(skel: _Skeleton):
    import torch

    head = skel.output_head
    return next(head.parameters()).dtype if head is not None else torch.float32


def _artifact(req: PlanRequest, inv: _Inventory, setup: _Setup) -> tuple[int, str]:
    """Bytes the run publishes: the adapter's tensors, or the whole model as the loop saves it."""
    if not traits(req.method.name).is_adapter:
        # The loop saves the model as it holds it: fp32 master weights without ZeRO-3; ZeRO-3 gathers
        # its 16-bit shards into one checkpoint.
        dtype = setup.trace_model_dtype if setup.strategy == "deepspeed_zero3" else setup.base_dtype
        return inv.total * _itemsize(dtype), "model"
    return sum(n * s for n, s in inv.trainable_tensors), "adapter"


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _scaling(hw: Hardware) -> ScalingSpec:
    per = {"CPU": hw.cpus_per_worker, "GPU": 1.0} if hw.device == "cuda" else {"CPU": hw.cpus_per_worker}
    return ScalingSpec(num_workers=hw.workers, use_gpu=hw.device == "cuda", resources_per_worker=per)


def _total(per: MemoryBreakdown, workers: int) -> MemoryBreakdown:
    return MemoryBreakdown(**{k: v * workers for k, v in per.model_dump().items()})


@dataclass
class _Prepared:
    """What is expensive to make for a request and reusable across batch/strategy variants of it."""

    config: Any
    skeleton: _Skeleton
    inventory: _Inventory
    activations: ActivationModel


_PREPARED_CACHE: dict[str, _Prepared] = {}


def _prepare(config, req: PlanRequest, setup: _Setup) -> _Prepared:
    key = json.dumps(
        [config.to_json_string(use_diff=False), req.method.model_dump(mode="json"), req.seq_len, req.total_steps, req.hardware.device,
         str(setup.base_dtype), str(setup.compute_dtype), str(setup.trace_model_dtype), str(setup.trace_autocast)],
        sort_keys=True,
    )
    if key not in _PREPARED_CACHE:
        skel = _build_skeleton(config, req, setup)
        inv = _inventory(skel, req)
        acts = _activation_model(skel, setup, req.seq_len, req.method.name, req.hardware.device)
        if len(_PREPARED_CACHE) > 32:
            _PREPARED_CACHE.clear()
        _PREPARED_CACHE[key] = _Prepared(config, skel, inv, acts)
    return _PREPARED_CACHE[key]


def plan(req: PlanRequest, config=None) -> Plan:
    """The memory plan for one request (config read from `req.model` unless given)."""
    config = config if config is not None else load_model_config(req.model)
    setup = _resolve(req)
    prepared = _prepare(config, req, setup)
    inv, skel = prepared.inventory, prepared.skeleton
    per, host, figures = _breakdown(req, setup, inv, prepared.activations, skel)
    artifact, kind = _artifact(req, inv, setup)
    hw = req.hardware
    fits, reason = _verdict(per, host, hw, req.offload_optimizer)
    notes = _notes(req, setup)
    if setup.quantized:
        base = getattr(req.method, "quant_type", "nf4") + " (linear layers)"
    elif setup.strategy == "deepspeed_zero3":
        base = _dtype_name(setup.trace_model_dtype) + " shards (fp32 master copy in the optimizer)"
    else:
        base = _dtype_name(setup.base_dtype)
    return Plan(
        request=req, model_type=str(config.model_type),
        params=ParameterCounts(
            total=inv.total, trainable=inv.trainable, trainable_percent=100.0 * inv.trainable / max(inv.total, 1),
            largest_layer=inv.largest_layer, quantized=inv.quantized_numel,
        ),
        precision=setup.precision, base_dtype=base, strategy=setup.strategy,
        per_device=per, total=_total(per, hw.workers), host_per_node=host, activations=figures,
        artifact_bytes=int(artifact), artifact_kind=kind, device_memory=hw.memory_per_device, fits=fits, reason=reason,
        scaling=_scaling(hw), notes=notes,
    )


def _verdict(per: MemoryBreakdown, host: int, hw: Hardware, offload: bool) -> tuple[bool | None, str]:
    dev = "GPU" if hw.device == "cuda" else "CPU worker"
    if hw.memory_per_device is None:
        return None, f"needs {format_bytes(per.total)} per {dev}; device memory unknown (pass --gpu-memory)"
    if per.total > hw.memory_per_device:
        return False, (
            f"needs {format_bytes(per.total)} per {dev} (weights {format_bytes(per.weights)}, gradients "
            f"{format_bytes(per.gradients)}, optimizer {format_bytes(per.optimizer)}, activations "
            f"{format_bytes(per.activations)}, other {format_bytes(per.transient + per.overhead)}) "
            f"but each has {format_bytes(hw.memory_per_device)}"
        )
    if hw.host_memory_per_node is not None and host > hw.host_memory_per_node:
        return False, f"ZeRO-3 needs {format_bytes(host)} host memory per node but a node has {format_bytes(hw.host_memory_per_node)}"
    fits = f"fits: {format_bytes(per.total)} of {format_bytes(hw.memory_per_device)} per {dev}"
    if offload and hw.host_memory_per_node is None:
        fits += f", if each node has {format_bytes(host)} of host memory for the offloaded states"
    elif offload:
        fits += f", and {format_bytes(host)} of {format_bytes(hw.host_memory_per_node)} host memory per node"
    return True, fits


def _notes(req: PlanRequest, setup: _Setup) -> list[str]:
    notes = []
    if req.precision == "auto" and req.hardware.device == "cuda":
        notes.append("precision auto planned as bf16 (a bf16-capable GPU, Ampere or newer, is assumed)")
    if setup.strategy == "deepspeed_zero3":
        notes.append("ZeRO-3 model states follow DeepSpeed's own accounting (18 B/trainable param over the GPUs)")
    if traits(req.method.name).prompt_learning:
        notes.append(f"{req.method.name.replace('_', ' ')} traced without a padding mask")
    module = objective_module(req.objective)
    if module.DATA == "paired":
        notes.append(f"objective {req.objective}: each example is 2 sequences (chosen + rejected), {req.micro_batch * 2} rows per forward pass")
    if module.REFERENCE and traits(req.method.name).is_adapter:
        notes.append(f"objective {req.objective}: the reference is the base with the adapter off, one more forward pass per step (no gradient)")
    elif module.REFERENCE:
        notes.append(f"objective {req.objective}: reference log-probabilities are computed once by the frozen base before step 1 "
                     "(one forward pass over the data set, no gradient)")
    return notes


# ------------------------------------------------------------------------------------ public entries


def _spec_model_location(spec: JobSpec) -> str:
    """The job's model source, with a `registry:` ref resolved in the job's own storage (not the default one)."""
    source = spec.model.source
    if not source.startswith("registry:") or spec.storage.uri is None:
        return source
    from storage.registry import open_registry

    try:
        registry = open_registry(spec.storage.uri)
        return registry.files_uri(registry.resolve(source[len("registry:"):]))
    except RayftError as exc:
        raise PlanError(f"model {source!r}: cannot resolve it in {spec.storage.uri} ({exc})") from None


def request_for_spec(spec: JobSpec, hardware: Hardware | None = None) -> PlanRequest:
    """The plan request a job spec stands for (hardware: from the spec's resources unless given)."""
    hw = hardware or Hardware(
        device="cpu" if spec.resources.use_gpu is False else "cuda", workers=spec.resources.num_workers,
        cpus_per_worker=spec.resources.cpus_per_worker or 1.0,
    )
    return PlanRequest(
        model=_spec_model_location(spec), method=spec.method, hardware=hw, seq_len=spec.data.max_seq_len,
        micro_batch=spec.training.micro_batch_size, precision=spec.training.precision, model_dtype=spec.model.dtype,
        gradient_checkpointing=spec.model.gradient_checkpointing, strategy=spec.resources.strategy,
        offload_optimizer=spec.deepspeed.offload_optimizer, offload_params=spec.deepspeed.offload_params,
        total_steps=spec.training.max_steps, objective=spec.objective.name,
    )


def plan_for_spec(spec: JobSpec, hardware: Hardware | None = None) -> Plan:
    """The plan of a job spec: its model, method, batch shape, strategy and workers."""
    return plan(request_for_spec(spec, hardware))


def plan_for_model(
    config_source: str,
    method: str | MethodConfig = "lora",
    gpus: int = 1,
    gpu_memory: int | str | None = None,
    seq_len: int = 512,
    batch: int = 1,
    *,
    device: Literal["cuda", "cpu"] = "cuda",
    host_memory: int | str | None = None,
    **options: Any,
) -> Plan:
    """The plan for a bare model config: `method` by name (defaults) or as a config; memory in bytes or as '24GiB'.

    `options` are further PlanRequest fields (precision, gradient_checkpointing, strategy, offload_optimizer, ...).
    """
    from pydantic import TypeAdapter, ValidationError

    try:
        method_cfg = TypeAdapter(MethodConfig).validate_python({"name": method} if isinstance(method, str) else method)
    except ValidationError:
        from trainers.methods import METHODS

        raise PlanError(f"method {method!r}: must be one of {', '.join(METHODS)}") from None
    memory = parse_size(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    host = parse_size(host_memory) if isinstance(host_memory, str) else host_memory
    try:
        req = PlanRequest(
            model=config_source, method=method_cfg, seq_len=seq_len, micro_batch=batch,
            hardware=Hardware(device=device, workers=gpus, memory_per_device=memory, host_memory_per_node=host), **options,
        )
    except ValidationError as exc:
        raise PlanError("; ".join(_validation_lines(exc))) from None
    return plan(req)


def _validation_lines(exc) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}" if loc else msg)
    return lines


# ------------------------------------------------------------------------------------ recommendation


_KNOWLEDGE_TASKS = ("knowledge", "multitask")


def _candidates(task: TaskType, hw: Hardware, batch: int) -> list[dict]:
    """Configurations to try, best-for-the-task first (the methods table of DESIGN.md)."""
    n = hw.workers
    multi = "ddp" if n > 1 else "single"
    # Offload moves states to host RAM: only a candidate when the host's size is known.
    offloads = ((True, False), (True, True)) if hw.host_memory_per_node is not None else ()
    full = [
        dict(method="full", strategy=multi, gc=False, off=(False, False)),
        dict(method="full", strategy=multi, gc=True, off=(False, False)),
    ]
    if n > 1:
        full += [
            dict(method="full", strategy="deepspeed_zero3", gc=gc, off=off)
            for off in ((False, False), *offloads) for gc in (False, True)
        ]
    else:
        full += [dict(method="full", strategy="deepspeed_zero3", gc=True, off=off) for off in offloads]
    lora = [dict(method="lora", strategy=multi, gc=gc, off=(False, False)) for gc in (False, True)]
    qlora = [dict(method="qlora", strategy=multi, gc=gc, off=(False, False)) for gc in (False, True)]
    lora_z3 = [dict(method="lora", strategy="deepspeed_zero3", gc=gc, off=(False, False)) for gc in (False, True)] if n > 1 else []
    # Several GPUs shard a 16-bit LoRA base (ZeRO-3) before quantizing it; 4-bit is for when memory runs out.
    order = full + lora + lora_z3 + qlora if task in _KNOWLEDGE_TASKS else lora + lora_z3 + qlora + full
    out = []
    for cand in order:
        for b in _batches(batch):
            out.append({**cand, "batch": b})
    return out


def _batches(batch: int) -> list[int]:
    out, b = [], batch
    while b >= 1:
        out.append(b)
        b //= 2
    return out


def _method_config(name: str, task: TaskType):
    from pydantic import TypeAdapter

    data: dict[str, Any] = {"name": name}
    if traits(name).tunable:  # a LoRA-family adapter
        # all-linear adapters for quality; a larger rank where the task asks the adapter to hold knowledge
        data.update(target_modules="all-linear", r=64 if task in _KNOWLEDGE_TASKS else 16, alpha=128 if task in _KNOWLEDGE_TASKS else 32)
    return TypeAdapter(MethodConfig).validate_python(data)


def recommend(
    task: TaskType,
    hardware: Hardware,
    model: str,
    seq_len: int = 512,
    batch: int = 1,
    config=None,
) -> Recommendation:
    """Method, strategy and ScalingConfig for `task` on `hardware`, checked against the memory plan.

    Style/format, instruction/chat and classification/extraction prefer LoRA (QLoRA when the card is
    too small); new-domain knowledge and multi-task prefer full fine-tuning (ZeRO-3, then offload, when
    one card cannot hold it), falling back to adapters when no full configuration fits.
    """
    if task not in TASK_HELP:
        raise PlanError(f"task {task!r}: must be one of {', '.join(TASK_HELP)}")
    if hardware.memory_per_device is None:
        raise PlanError("hardware.memory_per_device: needed for a recommendation; pass --gpu-memory, e.g. 24GiB")
    config = config if config is not None else load_model_config(model)
    preferred = "full" if task in _KNOWLEDGE_TASKS else "lora"
    for cand in _candidates(task, hardware, batch):
        try:
            req = PlanRequest(
                model=model, method=_method_config(cand["method"], task), hardware=hardware, seq_len=seq_len,
                micro_batch=cand["batch"], gradient_checkpointing=cand["gc"], strategy=cand["strategy"],
                offload_optimizer=cand["off"][0], offload_params=cand["off"][1],
            )
        except ValueError:
            continue
        result = plan(req, config)
        if result.fits:
            return Recommendation(
                task=task, method=cand["method"], strategy=result.strategy, gradient_checkpointing=cand["gc"],
                offload_optimizer=cand["off"][0], offload_params=cand["off"][1], micro_batch=cand["batch"],
                scaling=result.scaling, plan=result, reasons=_reasons(task, preferred, cand, result, batch),
            )
    return Recommendation(
        task=task, method=preferred, strategy="none", gradient_checkpointing=True, offload_optimizer=False,
        offload_params=False, micro_batch=1, scaling=_scaling(hardware), plan=None,
        reasons=[f"nothing fits {hardware.workers} x {format_bytes(hardware.memory_per_device)}: not even QLoRA with "
                 "gradient checkpointing at micro-batch 1; add devices or use a smaller model"],
    )


def _reasons(task: TaskType, preferred: str, cand: dict, result: Plan, requested_batch: int) -> list[str]:
    why = {
        "style": "style, tone and format change little knowledge: a LoRA adapter learns them (< 1% of the weights)",
        "instruction": "instruction following / chat is the default LoRA use: adapters match full fine-tuning at < 1% of the weights",
        "classification": "a narrow classification / extraction task needs few parameters: LoRA",
        "knowledge": "new domain knowledge from a large corpus is best learned by updating every weight: full fine-tuning",
        "multitask": "many tasks in one model: full fine-tuning (or adapters merged later, TIES/DARE)",
    }
    lines = [why[task]]
    if cand["method"] != preferred:
        lines.append(f"{preferred} does not fit {result.request.hardware.workers} x {format_bytes(result.device_memory or 0)}; "
                     f"{cand['method']} is the largest method that does")
    if task in _KNOWLEDGE_TASKS and traits(cand["method"]).is_adapter:
        lines.append("rank 64 on every linear layer gives the adapter room for the new knowledge")
    if traits(cand["method"]).quantized_base:
        lines.append("QLoRA: a 4-bit NF4 base is the way to train this model on this card")
    strategy = {
        "single": "one device holds the whole job",
        "ddp": "each device holds the job; DDP across the devices multiplies throughput",
        "deepspeed_zero3": "ZeRO-3 shards weights, gradients and optimizer states across the GPUs"
        + (" and offloads to host memory" if cand["off"][0] else ""),
    }[result.strategy]
    lines.append(strategy)
    if cand["gc"]:
        lines.append("gradient checkpointing is needed to fit the activations (about 30% slower steps)")
    if cand["batch"] < requested_batch:
        accum = requested_batch // cand["batch"]
        lines.append(f"micro-batch {cand['batch']} instead of {requested_batch}: raise grad_accum x{accum} to keep the batch")
    lines.append(result.reason)
    return lines


# ----------------------------------------------------------------------------------------- pre-flight


def detect_hardware(spec: JobSpec) -> Hardware:
    """The hardware this machine offers the job: its CUDA devices, else host memory shared by the workers."""
    import psutil

    workers = spec.resources.num_workers
    use_gpu = spec.resources.use_gpu
    if use_gpu is not False:
        try:
            import torch

            if torch.cuda.is_available():
                memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
                return Hardware(device="cuda", workers=workers, memory_per_device=memory)
        except Exception:  # a broken CUDA install plans like a CPU-only machine
            pass
    available = psutil.virtual_memory().available
    return Hardware(device="cpu", workers=workers, memory_per_device=max(1, available // workers), gpus_per_node=max(workers, 1))


def preflight_check(spec: JobSpec, force: bool = False, hardware: Hardware | None = None) -> Plan | None:
    """Plan the job; raise DoesNotFit (one line: why, and the cheapest configuration that fits) unless forced.

    `hardware` is what the job will run on (detected from this machine when not given). With `force`, a
    job that does not fit only prints the verdict. A model whose config cannot be read plans nothing.
    """
    hw = hardware or detect_hardware(spec)
    try:
        result = plan_for_spec(spec, hw)
    except PlanError as exc:
        print(f"[rayft] pre-flight plan skipped: {exc}", flush=True)
        return None
    if result.fits is not False:
        return result
    cheapest = cheapest_fit(result)
    if cheapest:
        suggestion = f"cheapest configuration that fits: {cheapest}"
    else:
        suggestion = "no configuration of this model fits up to 64 devices of this size"
    message = f"job does not fit: {result.reason}; {suggestion}; pass --force to start anyway"
    if force:
        print(f"[rayft] pre-flight (forced): {message}", flush=True)
        return result
    raise DoesNotFit(message)


def cheapest_fit(failed: Plan) -> str | None:
    """The fewest devices (of the same size) and the smallest change to the job that make it fit, as one phrase."""
    config = load_model_config(failed.request.model)
    for candidate in _variants_by_cost(failed.request):
        result = plan(candidate, config)
        if result.fits:
            return _describe_change(failed.request, candidate, result)
    return None


def _variants_by_cost(req: PlanRequest) -> Iterator[PlanRequest]:
    """Valid variants of `req`, cheapest first: fewer devices, then the method kept (full → lora → qlora),
    then a strategy change (ZeRO-3, then offload when the host's memory is known), then gradient
    checkpointing, then a smaller micro-batch."""
    hw = req.hardware
    methods = [req.method]
    # Cheaper methods to fall back on: a whole model → a LoRA adapter → one over a 4-bit base.
    if not traits(req.method.name).is_adapter:
        methods += [_method_config("lora", "instruction"), _method_config("qlora", "instruction")]
    elif not traits(req.method.name).quantized_base:
        methods.append(_method_config("qlora", "instruction"))
    offloads = [(False, False)]
    if hw.device == "cuda" and hw.host_memory_per_node is not None:
        offloads += [(True, False), (True, True)]
    checkpointing = (True,) if req.gradient_checkpointing else (False, True)
    for workers in [n for n in (1, 2, 4, 8, 16, 32, 64) if n >= hw.workers] or [hw.workers]:
        for method in methods:
            if workers == 1:
                strategies = ["single"]
            else:
                first = traits(method.name).many_workers_strategy
                strategies = [first] + [s for s in ("ddp", "deepspeed_zero3") if s != first]
            for strategy, offload, gc, batch in itertools.product(strategies, offloads, checkpointing, _batches(req.micro_batch)):
                if offload[0] and strategy != "deepspeed_zero3":
                    continue
                update = {
                    "method": method, "strategy": strategy, "offload_optimizer": offload[0], "offload_params": offload[1],
                    "gradient_checkpointing": gc, "micro_batch": batch, "hardware": hw.model_copy(update={"workers": workers}),
                }
                try:
                    candidate = PlanRequest.model_validate({**req.model_dump(), **update})
                except ValueError:  # an invalid combination (qlora + ZeRO-3): not a candidate
                    continue
                yield candidate


def _describe_change(old: PlanRequest, new: PlanRequest, result: Plan) -> str:
    parts = []
    if new.method.name != old.method.name:
        parts.append(f"method {new.method.name}")
    if new.hardware.workers != old.hardware.workers:
        parts.append(f"num_workers {new.hardware.workers}")
    if new.resolved_strategy() != old.resolved_strategy():
        parts.append(f"strategy {new.resolved_strategy()}")
    if new.offload_optimizer != old.offload_optimizer or new.offload_params != old.offload_params:
        parts.append("offload " + ("params+optimizer" if new.offload_params else "optimizer"))
    if new.gradient_checkpointing != old.gradient_checkpointing:
        parts.append("gradient_checkpointing true")
    if new.micro_batch != old.micro_batch:
        accum = old.micro_batch // new.micro_batch
        parts.append(f"micro_batch_size {new.micro_batch} (grad_accum x{accum} keeps the batch)")
    return ", ".join(parts or ["as is"]) + f" ({format_bytes(result.per_device.total)} per device)"
