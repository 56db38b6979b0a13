"""Plans of job specs, and the pre-flight check every training run makes before it starts."""

from __future__ import annotations

from typing import Any, Literal

from storage.errors import RayftError
from storage.registry import open_registry
from trainers.methods import METHODS, MethodConfig
from trainers.plan.memory import plan
from trainers.plan.models import DoesNotFit, Hardware, Plan, PlanError, PlanRequest, _validation_lines, parse_size
from trainers.plan.recommend import cheapest_fit


def spec_model_location(spec: JobSpec) -> str:
    """The job's model source, with a `registry:` ref resolved in the job's own storage (not the default one)."""
    source = spec.model.source
    if not source.startswith("registry:") or spec.storage.uri is None:
        return source
    try:
        registry = open_registry(spec.storage.uri)
        return registry.files_uri(registry.resolve(source[len("registry:"):]))
    except RayftError as exc:
        raise PlanError(f"model {source!r}: cannot resolve it in {spec.storage.uri} ({exc})") from None


def request_for_spec(spec: JobSpec, hardware: Hardware | None = None, model_dir: str | None = None) -> PlanRequest:
    """The plan request a job spec stands for (hardware: from the spec's resources unless given; `model_dir`: the
    model as the run already resolved it, so planning does not resolve it again)."""
    hw = hardware or Hardware(
        device="cpu" if spec.resources.use_gpu is False else "cuda", workers=spec.resources.num_workers,
        cpus_per_worker=spec.resources.cpus_per_worker or 1.0,
    )
    return PlanRequest(
        model=model_dir or spec_model_location(spec), method=spec.method, hardware=hw, seq_len=spec.data.max_seq_len,
        micro_batch=spec.training.micro_batch_size, precision=spec.training.precision, model_dtype=spec.model.dtype,
        gradient_checkpointing=spec.model.gradient_checkpointing, strategy=spec.resources.strategy,
        offload_optimizer=spec.deepspeed.offload_optimizer, offload_params=spec.deepspeed.offload_params,
        total_steps=spec.training.max_steps, objective=spec.objective.name,
    )


def plan_for_spec(spec: JobSpec, hardware: Hardware | None = None, model_dir: str | None = None) -> Plan:
    """The plan of a job spec: its model, method, batch shape, strategy and workers."""
    return plan(request_for_spec(spec, hardware, model_dir))


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


def run_hardware(spec: JobSpec, remote: bool) -> Hardware:
    """What a run of `spec` will train on, as far as this process can tell. Submitting to a cluster, this machine's
    hardware says nothing about the workers': plan for GPUs of unknown size there (which never refuses) unless
    the job trains on CPUs; locally, this machine's devices."""
    if remote and spec.resources.use_gpu is not False:
        return Hardware(device="cuda", workers=spec.resources.num_workers, cpus_per_worker=spec.resources.cpus_per_worker or 1.0)
    return detect_hardware(spec)


def preflight_check(spec: JobSpec, force: bool = False, hardware: Hardware | None = None, model_dir: str | None = None) -> Plan:
    """Plan the job; raise DoesNotFit (one line: why, and the cheapest configuration that fits) unless forced.

    `hardware` is what the job will run on (detected from this machine when not given). With `force`, a
    job that does not fit only prints the verdict. A model whose config cannot be read is a PlanError: a run
    never starts unplanned.
    """
    hw = hardware or detect_hardware(spec)
    result = plan_for_spec(spec, hw, model_dir)
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
