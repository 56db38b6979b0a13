"""`rayft plan JOB.yaml | MODEL`: how much memory a fine-tuning job needs, and which method/strategy fits.

MODEL is a local config.json, a model directory, s3://..., registry:NAME or a hub id (only the config is
read, never weights). Flags override a job file's values.
"""

from __future__ import annotations

import argparse
import json

from trainers.plan import TASK_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="memory plan (per GPU and in total) and a method/strategy recommendation")
    p.add_argument("target", help="job YAML file, or a model: config.json path, model directory, s3://, registry:NAME or hub id")
    p.add_argument("--method", default=None, help="fine-tuning method (default: the job's, or lora)")
    p.add_argument("--rank", type=int, default=None, help="adapter rank r for lora/qlora/dora/rslora")
    p.add_argument("--target-modules", default=None, help="default, all-linear, or comma-separated module names")
    p.add_argument("--gpus", type=int, default=None, help="number of workers/GPUs (default: the job's, or 1)")
    p.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 24GiB or 80GB (default: this machine's GPUs if any)")
    p.add_argument("--host-memory", default=None, help="host RAM per node, checked for ZeRO-3 offload, e.g. 1TiB")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (for offload host memory), default 8")
    p.add_argument("--cpu", action="store_true", help="plan for CPU workers (memory = host memory per worker)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per example (default: the job's max_seq_len, or 512)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch per device (default: the job's, or 1)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=None, help="training precision")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None, help="recompute activations")
    p.add_argument("--strategy", choices=["auto", "single", "ddp", "deepspeed_zero3"], default=None, help="distribution strategy")
    p.add_argument("--offload", choices=["none", "optimizer", "all"], default=None, help="ZeRO-3 CPU offload")
    p.add_argument("--optimizer", choices=["adamw", "adamw_8bit"], default="adamw", help="optimizer states to count")
    p.add_argument("--objective", choices=["sft", "dpo", "orpo", "simpo", "kto"], default=None,
                   help="training objective (default: the job's, or sft); preference pairs double the rows per forward pass")
    p.add_argument("--task", choices=list(TASK_HELP), default=None,
                   help="also recommend a method and strategy for this task: " + "; ".join(f"{k} = {v}" for k, v in TASK_HELP.items()))
    p.add_argument("--json", action="store_true", help="print the plan (and recommendation) as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trainers import plan as planner

    req = build_request(args)
    config = planner.load_model_config(req.model)
    result = planner.plan(req, config)
    rec = None
    if args.task:
        rec = planner.recommend(args.task, req.hardware, req.model, seq_len=req.seq_len, batch=req.micro_batch, config=config)
    if args.json:
        out = {"plan": result.model_dump(mode="json")}
        if rec is not None:
            out["recommendation"] = rec.model_dump(mode="json")
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(result, config))
        if rec is not None:
            print(format_recommendation(rec))
    return 0


def build_request(args: argparse.Namespace):
    """The PlanRequest the command line stands for (a job file's values, overridden by flags)."""
    from pydantic import TypeAdapter, ValidationError

    from trainers import plan as planner
    from trainers.methods import METHODS, MethodConfig, traits

    memory = planner.parse_size(args.gpu_memory) if args.gpu_memory else None
    host = planner.parse_size(args.host_memory) if args.host_memory else None
    is_job = args.target.endswith((".yaml", ".yml"))
    if is_job:
        from trainers.spec import load_job_spec

        spec = load_job_spec(args.target)
        base = planner.request_for_spec(spec, planner.detect_hardware(spec) if memory is None and not args.cpu else None)
        data = base.model_dump()
    else:
        data = {"model": args.target, "method": {"name": "lora"}, "seq_len": 512, "micro_batch": 1,
                "hardware": {"device": "cuda", "workers": 1}}
    if args.method:
        if args.method not in METHODS:
            raise planner.PlanError(f"--method {args.method!r}: must be one of {', '.join(METHODS)}")
        if args.method != data["method"]["name"]:
            data["method"] = {"name": args.method}
    if args.rank is not None:
        rank_field = traits(data["method"]["name"]).rank_field
        if rank_field is None:
            raise planner.PlanError(f"--rank: method {data['method']['name']} has no rank; leave --rank out")
        data["method"][rank_field] = args.rank
    if args.target_modules:
        tm = args.target_modules
        data["method"]["target_modules"] = tm if tm in ("default", "all-linear") else [m.strip() for m in tm.split(",") if m.strip()]
    hw = dict(data["hardware"])
    if args.cpu:
        hw["device"] = "cpu"
    elif memory is not None:
        hw["device"] = "cuda"
    if args.gpus is not None:
        hw["workers"] = args.gpus
    if memory is not None:
        hw["memory_per_device"] = memory
    if host is not None:
        hw["host_memory_per_node"] = host
    hw["gpus_per_node"] = args.gpus_per_node
    data["hardware"] = hw
    for flag, key in (("seq_len", "seq_len"), ("batch", "micro_batch"), ("precision", "precision"),
                      ("gradient_checkpointing", "gradient_checkpointing"), ("strategy", "strategy"), ("objective", "objective")):
        value = getattr(args, flag)
        if value is not None:
            data[key] = value
    if args.offload is not None:
        data["offload_optimizer"] = args.offload in ("optimizer", "all")
        data["offload_params"] = args.offload == "all"
    data["optimizer"] = args.optimizer
    try:
        data["method"] = TypeAdapter(MethodConfig).validate_python(data["method"])
        return planner.PlanRequest.model_validate(data)
    except ValidationError as exc:
        raise planner.PlanError("; ".join(planner._validation_lines(exc))) from None


def _gib(n: int) -> str:
    from trainers.plan import format_bytes

    return format_bytes(n)


def _method_text(method) -> str:
    fields = method.model_dump(exclude={"name"})
    keys = [k for k in ("r", "init_r", "alpha", "target_modules", "quant_type", "double_quant", "num_virtual_tokens") if k in fields]
    inner = ", ".join(f"{k}={fields[k]}" for k in keys)
    return f"{method.name}" + (f" ({inner})" if inner else "")


def format_plan(p, config=None) -> str:
    """The plan as a small table: per device and over all devices."""
    req = p.request
    hw = req.hardware
    unit = "GPU" if hw.device == "cuda" else "CPU worker"
    mem = _gib(hw.memory_per_device) if hw.memory_per_device else "memory unknown"
    gc = "on" if req.gradient_checkpointing else "off"
    lines = [
        f"rayft plan: {p.model_type} {p.params.total / 1e9:.2f}B params · {_method_text(req.method)}",
        f"  hardware {hw.workers} x {unit} ({mem}) · strategy {p.strategy}"
        + (f" + offload {'params+optimizer' if req.offload_params else 'optimizer'}" if req.offload_optimizer else "")
        + f" · {p.precision} · seq {req.seq_len} x micro-batch {req.micro_batch} · checkpointing {gc}",
        f"  parameters: total {p.params.total:,} · trainable {p.params.trainable:,} ({p.params.trainable_percent:.3f}%)"
        + (f" · 4-bit {p.params.quantized:,}" if p.params.quantized else "")
        + f" · base weights {p.base_dtype}",
        "",
        f"  {'':26}{'per ' + unit:>14}{'total (' + str(hw.workers) + ')':>16}",
    ]
    rows = [
        ("weights", "weights"), ("gradients", "gradients"), ("optimizer states", "optimizer"),
        ("activations", "activations"), ("backward transient", "transient"), ("optimizer-step transient", "step_transient"),
        ("peak (live tensors)", "peak"), ("overhead", "overhead"), ("needed", "total"),
    ]
    for label, key in rows:
        lines.append(f"  {label:26}{_gib(getattr(p.per_device, key)):>14}{_gib(getattr(p.total, key)):>16}")
    a = p.activations
    lines.append(f"  activations: {_gib(a.without_checkpointing)} without gradient checkpointing, "
                 f"{_gib(a.with_checkpointing)} with; one layer {_gib(a.per_layer)}, logits {_gib(a.logits)}")
    if p.host_per_node:
        lines.append(f"  host memory per node (ZeRO-3): {_gib(p.host_per_node)}")
    lines.append(f"  on disk: {p.artifact_kind} {_gib(p.artifact_bytes)}")
    verdict = {True: "FITS", False: "DOES NOT FIT", None: "UNKNOWN"}[p.fits]
    lines.append(f"  verdict: {verdict} — {p.reason}")
    s = p.scaling
    lines.append(f"  ScalingConfig(num_workers={s.num_workers}, use_gpu={s.use_gpu}, resources_per_worker={s.resources_per_worker})")
    for note in p.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def format_recommendation(rec) -> str:
    lines = ["", f"recommendation for {rec.task}:"]
    if rec.plan is None:
        lines.append(f"  {rec.reasons[0]}")
        return "\n".join(lines)
    off = " + offload " + ("params+optimizer" if rec.offload_params else "optimizer") if rec.offload_optimizer else ""
    lines.append(
        f"  {_method_text(rec.plan.request.method)}, strategy {rec.strategy}{off}, micro-batch {rec.micro_batch}, "
        f"gradient checkpointing {'on' if rec.gradient_checkpointing else 'off'} "
        f"-> {_gib(rec.plan.per_device.total)} per device"
    )
    for reason in rec.reasons:
        lines.append(f"  - {reason}")
    s = rec.scaling
    lines.append(f"  ray.train.ScalingConfig(num_workers={s.num_workers}, use_gpu={s.use_gpu}, "
                 f"resources_per_worker={s.resources_per_worker})")
    return "\n".join(lines)
