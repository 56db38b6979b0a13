"""Counting (parameters, 4-bit packing, optimizer states) and composing them into a `Plan`: `plan(req)`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from trainers.methods import traits
from trainers.objectives import objective_module
from trainers.plan.configs import load_model_config
from trainers.plan.models import (
    ActivationFigures,
    CPU_RUNTIME_BYTES,
    CUDA_RUNTIME_BYTES,
    Hardware,
    MARGIN_FRACTION,
    MemoryBreakdown,
    NF4_BLOCKSIZE,
    NF4_NESTED_BLOCKSIZE,
    OFFLOAD_BUFFER_FACTOR,
    OPTIM8_BLOCKSIZE,
    OPTIM8_MIN_SIZE,
    ParameterCounts,
    Plan,
    PlanRequest,
    ScalingSpec,
    format_bytes,
)
from trainers.plan.trace import ActivationModel, _Setup, _Skeleton, _activation_model, _build_skeleton, _resolve


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
