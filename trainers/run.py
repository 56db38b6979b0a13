"""Drive one fine-tuning run on Ray Train: TorchTrainer → checkpoints in storage → registry."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from storage.errors import RayftError, RunFailed, root_cause
from storage.registry import Manifest, Registry
from storage.store import default_storage_uri, open_store, pyarrow_filesystem
from trainers.ingest.prepare import Prepared, finish_live_pass, prepare_for_job
from trainers.ingest.stream import trainer_datasets
from trainers.loop import train_func
from storage.models import resolve_model_dir
from trainers.publish import checkpoint_for_publishing, publish_run
from trainers.spec import JobSpec
from trainers.state_io import load_state
from trainers.tune_spec import TaskEval


class TrainingFailed(RunFailed):
    """The run ended in error after its allowed restarts; the message carries the original error."""


@dataclass
class TrainResult:
    run_id: str
    metrics: dict
    checkpoint_path: str
    checkpoint: object = None  # ray.train.Checkpoint of the final step
    manifests: list[Manifest] = field(default_factory=list)
    wall_s: float = 0.0
    model_dir: str | None = None  # the base model as the driver resolved it (publishing and eval reuse it)


def new_run_id(spec: JobSpec) -> str:
    return f"{spec.output.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def ensure_ray(address: str | None = None) -> None:
    """Connect to `address` / RAY_ADDRESS, or start a local Ray instance."""
    import ray

    if ray.is_initialized():
        return
    # Each ray.train.report() waits for the controller's poll; a short interval keeps reports cheap.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True)


def use_gpu(spec: JobSpec) -> bool:
    if spec.resources.use_gpu != "auto":
        return bool(spec.resources.use_gpu)
    import ray

    return ray.cluster_resources().get("GPU", 0) >= spec.resources.num_workers


def cpus_for_cpu_workers(node_cpus: list[float], workers: int, available: float) -> int:
    """The most whole CPUs per worker such that `workers` fit on nodes with `node_cpus` at once, within
    `available` CPUs in all (so a job never waits on CPUs something else holds); at least 1."""
    best = 1
    for per in range(1, int(max(node_cpus, default=1)) + 1):
        if sum(int(c // per) for c in node_cpus) >= workers and per * workers <= available:
            best = per
    return best


def with_resolved_cpus(spec: JobSpec) -> JobSpec:
    """`resources.cpus_per_worker` filled in from the running cluster when the job left it unset."""
    if spec.resources.cpus_per_worker is not None:
        return spec
    import ray

    cpus = 1.0
    if not use_gpu(spec):
        nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        cpus = float(cpus_for_cpu_workers(nodes, spec.resources.num_workers, ray.available_resources().get("CPU", 0.0)))
    return spec.model_copy(update={"resources": spec.resources.model_copy(update={"cpus_per_worker": cpus})})


def build_trainer(spec: JobSpec, run_id: str, storage_uri: str, prepared: Prepared, faults: dict | None = None,
                  callbacks: list | None = None, task_eval: TaskEval | None = None):
    """A TorchTrainer for the job, streaming the preprocessed data `prepared` into its workers; `callbacks` are Ray
    Train callbacks (e.g. Tune's TuneReportCallback); `task_eval`: a task metric the workers score on generated
    answers at each evaluation (a tune trial ranked by exact_match)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    fs, base_path = pyarrow_filesystem(storage_uri)
    # data still being preprocessed is read by the workers from the pass's manifest (trainers.ingest.live)
    datasets, dataset_config = trainer_datasets(prepared, spec.training.seed) if not prepared.live else (None, None)
    return TorchTrainer(
        train_func,  # one worker loop; it picks the job's strategy (trainers.strategy)
        # The validated JobSpec itself travels (pickled): workers use it as it is, without validating it again.
        train_loop_config={"spec": spec, "storage_uri": storage_uri, "run_id": run_id, "faults": faults, "task_eval": task_eval,
                           "data": prepared.to_json()},
        datasets=datasets,
        **({"dataset_config": dataset_config} if dataset_config is not None else {}),
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.resources.num_workers,
            use_gpu=use_gpu(spec),
            resources_per_worker={"CPU": spec.resources.cpus_per_worker or 1},
        ),
        run_config=ray.train.RunConfig(
            name=run_id,
            storage_path=f"{base_path.rstrip('/')}/runs",
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=spec.resources.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=spec.training.keep_checkpoints),
            callbacks=callbacks or [],
        ),
    )


#: How a run's worker loop is executed once its data is prepared: (spec, run_id, storage_uri, prepared, faults) ->
#: a `ray.train.Result` whose checkpoint is in `<storage>/runs/<run_id>/`; a failed loop raises
#: `ray.train.TrainingFailedError`.
Fit = Callable[[JobSpec, str, str, Prepared, "dict | None"], object]


def fit_on_ray_train(spec: JobSpec, run_id: str, storage_uri: str, prepared: Prepared, faults: dict | None = None):
    """The worker loop on Ray Train: one TorchTrainer worker per `resources.num_workers`, restarts per `max_failures`."""
    return build_trainer(spec, run_id, storage_uri, prepared, faults).fit()


def run_training(
    spec: JobSpec,
    *,
    address: str | None = None,
    run_id: str | None = None,
    publish: bool = True,
    faults: dict | None = None,
    force: bool = False,
    fit: Fit | None = None,
) -> TrainResult:
    """Plan the job, fit it on Ray Train and publish its result to the registry.

    `spec` is validated already (`trainers.spec`). The plan (from the model's config.json alone) refuses a job that
    cannot fit before Ray starts (DoesNotFit; `force` only prints it), and a model it cannot read is an error. The
    base model is then resolved here once for publishing (workers fetch it on their own nodes). `fit` runs the worker
    loop on the preprocessed data (default `fit_on_ray_train`: a TorchTrainer over the job's workers).
    """
    from trainers.plan import preflight_check, run_hardware

    t0 = time.perf_counter()
    storage_uri = spec.storage.uri or default_storage_uri()
    # The plan first (it reads the model's config.json alone): a job that cannot fit is refused before any
    # weights are fetched or anything starts.
    preflight_check(spec, force=force, hardware=run_hardware(spec, remote=bool(address or os.environ.get("RAY_ADDRESS"))))
    spec = with_absolute_paths(spec)
    model_dir = resolve_model_dir(spec.model.source, storage_uri)  # once: publishing uses it; workers fetch their own
    ensure_ray(address)
    run_id = run_id or new_run_id(spec)
    spec = with_resolved_cpus(spec)
    print(f"[rayft] run {run_id}: {spec.method.name} on {spec.resources.num_workers} worker(s) "
          f"× {spec.resources.cpus_per_worker:g} CPU(s), storage {storage_uri}", flush=True)
    try:
        # the data first: a bad row costs no worker; max_steps may come from training.epochs (the record shows it)
        spec, prepared = prepare_for_job(spec, storage_uri)
    except BaseException as err:
        RunRecorder(spec, run_id, storage_uri).finish("failed", error=str(err) or type(err).__name__)
        raise
    import ray.train

    record = RunRecorder(spec, run_id, storage_uri)
    try:
        try:
            result = (fit or fit_on_ray_train)(spec, run_id, storage_uri, prepared, faults)
        except ray.train.TrainingFailedError as exc:
            finish_live_pass(prepared, training_failed=True)  # a bad row the pass found: its error, not the workers' echo
            raise TrainingFailed(f"run {run_id} failed: {root_cause(exc)}") from exc  # the cause: for --verbose
        finish_live_pass(prepared)
        if result.error is not None:
            raise TrainingFailed(f"run {run_id} failed: {root_cause(result.error)}") from result.error
        if result.checkpoint is None:
            raise TrainingFailed(f"run {run_id} finished without a checkpoint")
        checkpoint, metrics = final_checkpoint(result, storage_uri, run_id)
        out = TrainResult(run_id=run_id, metrics=metrics, checkpoint_path=checkpoint.path, checkpoint=checkpoint, model_dir=model_dir)
        if publish:
            out.manifests = publish_result(spec, out, storage_uri)
    except BaseException as err:
        record.finish("failed", error=str(err) or type(err).__name__)
        raise
    record.finish("succeeded", metrics=metrics)
    out.wall_s = time.perf_counter() - t0
    return out


class RunRecorder:
    """The driver's run record in storage (`storage.runs.RunRecord`): written when the run starts and when it ends.

    Best effort: a store that refuses the record costs one warning line; the run itself still trains (and its
    checkpoints will meet the same store)."""

    def __init__(self, spec: JobSpec, run_id: str, storage_uri: str, source: str = "cli"):
        from storage.runs import RunRecord, now

        self.store = None
        self.record = RunRecord(
            run_id=run_id, state="running", name=spec.output.name, method=spec.method.name, objective=spec.objective.name,
            base=spec.model.source, max_steps=spec.training.max_steps, spec=spec.model_dump(mode="json"),
            started_at=now(), source=os.environ.get("RAYFT_RUN_SOURCE", source),
        )
        try:
            self.store = open_store(storage_uri)
        except Exception as err:
            self._warn(err)
        self._write()

    def finish(self, state: str, error: str | None = None, metrics: dict | None = None) -> None:
        from storage.runs import now

        self.record = self.record.model_copy(update={"state": state, "error": error, "finished_at": now(),
                                                     "metrics": _json_ready(metrics or {})})
        self._write()

    def _write(self) -> None:
        from storage.runs import write_record

        if self.store is None:
            return
        try:
            write_record(self.store, self.record)
        except Exception as err:
            self.store = None
            self._warn(err)

    @staticmethod
    def _warn(err: Exception) -> None:
        print(f"[rayft] warning: run record not written ({type(err).__name__}: {err}); the run goes on", flush=True)


def _json_ready(metrics: dict) -> dict:
    """Metrics as plain JSON values (Ray hands back numpy scalars and nested dicts)."""
    import json

    return json.loads(json.dumps(metrics, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def publish_result(spec: JobSpec, result: TrainResult, storage_uri: str, extra_metrics: dict | None = None, *,
                   checkpoint_dir: Path | None = None, artifact: Path | None = None) -> list[Manifest]:
    """Publish a finished run's final checkpoint (a run trained with publish=False, e.g. one that had to pass its
    gates first); `extra_metrics` join the training metrics in the manifest. `checkpoint_dir` / `artifact`: the
    checkpoint already fetched (`checkpoint_for_publishing`) and staged (`stage_artifact`) by the caller."""
    registry = Registry(open_store(storage_uri))
    model_dir = result.model_dir or resolve_model_dir(spec.model.source, storage_uri)
    metrics = {**result.metrics, **(extra_metrics or {})}
    with (contextlib.nullcontext(checkpoint_dir) if checkpoint_dir is not None else checkpoint_for_publishing(result.checkpoint)) as ckpt, \
            tempfile.TemporaryDirectory(prefix="rayft-publish-") as work:
        return publish_run(spec, registry, Path(ckpt), model_dir, metrics, result.run_id, Path(work), artifact=artifact)


def final_checkpoint(result, storage_uri: str, run_id: str):
    """The run's last checkpoint and its metrics.

    A worker restarted after its final checkpoint reports nothing more, and Ray Train may have lost
    the registration of that checkpoint (reported just before the worker died). Publishing Ray's
    registered one would then publish an older model, so a newer complete checkpoint in storage wins.
    """
    from trainers.checkpoints import STATE_NAME, step_of, stored_checkpoints

    registered, metrics = result.checkpoint, dict(result.metrics or {})
    step, newest = max(stored_checkpoints(storage_uri, run_id) or [(-1, None)], key=lambda c: c[0])
    if newest is None or step <= step_of(Path(registered.path).name):
        return registered, metrics
    with newest.as_directory() as local:
        history = load_state(local, STATE_NAME)["history"]
    return newest, {**metrics, **(history[-1] if history else {}), "step": step}


def with_absolute_paths(spec: JobSpec) -> JobSpec:
    """Local data/model paths made absolute: Ray Train workers do not run in the driver's cwd.

    Missing local files are reported here, before any worker starts.
    """
    def absolute(value: str | None, field: str) -> str | None:
        if value is None or "://" in value or value.startswith("registry:"):
            return value
        path = Path(value).expanduser()
        if field.startswith("data.") and any(c in value for c in "*?["):
            return str(path.absolute())  # a glob: trainers.ingest.sources says if it matches nothing
        if path.exists():
            return str(path.resolve())
        if field.startswith("data."):
            raise DataNotFound(f"{field}: {value!r} does not exist (relative paths are taken from {Path.cwd()})")
        return value  # a hub id; resolve_model_dir says if it is neither

    data = spec.data.model_copy(update={"train": absolute(spec.data.train, "data.train"), "eval": absolute(spec.data.eval, "data.eval")})
    model = spec.model.model_copy(update={"source": absolute(spec.model.source, "model.source")})
    return spec.model_copy(update={"data": data, "model": model})


class DataNotFound(RayftError):
    """A local data file named by the job spec does not exist."""
