"""Recommendations (`rayft plan --task`) and the cheapest change to a job that makes it fit."""

from __future__ import annotations

import itertools
from typing import Any, Iterator

from trainers.methods import MethodConfig, traits
from trainers.plan.configs import load_model_config
from trainers.plan.memory import _scaling, plan
from trainers.plan.models import (
    Hardware,
    Plan,
    PlanError,
    PlanRequest,
    Recommendation,
    TASK_HELP,
    TaskType,
    format_bytes,
)


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
