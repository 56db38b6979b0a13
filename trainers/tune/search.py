"""Running a search: pre-flight, the trial driver, searcher and scheduler, resuming and promoting the best adapter."""

from __future__ import annotations

import json
import math
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ray import tune

from storage.errors import NotFound, RayftError, root_cause
from storage.models import read_model_config, resolve_model_dir
from storage.registry import Manifest, Registry
from storage.runs import search_job_key
from storage.store import default_storage_uri, open_store, pyarrow_filesystem
from trainers.checkpoints import STATE_NAME
from trainers.ingest.prepare import Prepared, prepare_for_job
from trainers.plan import preflight_check, run_hardware
from trainers.publish import publish_run
from trainers.run import build_trainer, ensure_ray, use_gpu, with_absolute_paths
from trainers.spec import JobSpec, SpecError, parse_job_spec
from trainers.task_metrics import PAIR_METRICS
from trainers.tune_spec import DEFAULT_SAMPLES, LIBRARY_SEARCHERS, TuneSpec, problems_for_model
from trainers.tune.progress import (
    ProgressFn,
    ReleaseStoppedTrials,
    TrialProgress,
    _by_step,
    _from_metrics,
    record_for,
)
from trainers.tune.results import (
    CHECKPOINT_PATH,
    METRIC,
    SearchResult,
    TUNE_DIR,
    TrialRecord,
    load_search,
    save_results,
)
from trainers.tune.space import SearchContext, grid_size, param_space, train_run_id, trial_spec


#: CPU a trial's driver function holds while its TorchTrainer's workers do the work (Tune rejects 0).
DRIVER_CPU = 0.01


class SearchFailed(RayftError):
    """The search ended without a trial to promote (every trial errored or none reported an eval loss)."""

    http_status = 500


class SearcherUnavailable(RayftError):
    """The job asks for a model-based searcher whose library is not installed."""


def trial_driver(config: dict[str, Any], context: SearchContext) -> None:
    """One trial: fit a TorchTrainer for the trial's job; its reports reach Tune through TuneReportCallback.

    A failed fit raises, so Tune records the trial as errored (and retries it, resuming the
    same Train run from its last checkpoint).
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    spec = trial_spec(context.spec, config, source=f"trial {trial_id}")
    # Planned like every run (trainers.run.run_training): a trial that cannot fit errors before its workers start.
    preflight_check(spec, hardware=run_hardware(spec, remote=False), model_dir=context.model_dir)
    run_id = train_run_id(context.run_id, trial_id)
    # A task metric (tune.metric: exact_match) is scored by the trial's workers at each evaluation.
    # Every trial streams the one dataset the search's driver preprocessed: no trial tokenizes again.
    result = build_trainer(spec, run_id, context.storage_uri, Prepared.from_json(context.data), callbacks=[TuneReportCallback()],
                           task_eval=context.spec.tune.task_eval_for_workers()).fit()
    # A retried or resumed trial whose Train run had already reached its last step reports
    # nothing in this attempt, and Tune fails the whole search on a trial without a result:
    # repeat the run's last report (the same step twice is harmless to ASHA and the records).
    if result.checkpoint is None or not result.metrics:
        raise SearchFailed(f"trial {trial_id}: Train run {run_id} finished without a checkpoint")
    tune.report({**result.metrics, CHECKPOINT_PATH: result.checkpoint.path})


def trainable(context: SearchContext):
    return tune.with_resources(tune.with_parameters(trial_driver, context=context), {"CPU": DRIVER_CPU})


def trial_dir_name(trial) -> str:
    """Trial directories and names are the trial id (readable, and stable across --resume)."""
    return trial.trial_id


# ---------------------------------------------------------------------------
# Searcher, scheduler, concurrency


def check_searcher_available(tune_spec: TuneSpec) -> None:
    import importlib.util

    package = LIBRARY_SEARCHERS.get(tune_spec.searcher)
    if package and importlib.util.find_spec(package) is None:
        raise SearcherUnavailable(
            f"tune.searcher: {tune_spec.searcher!r} is Ray Tune's {package} searcher and needs the {package} package, "
            f"which is not installed; run `pip install {package}`, or use searcher: random or grid"
        )


def search_algorithm(tune_spec: TuneSpec, concurrent: int):
    """Ray Tune's searcher for the spec, limited to `concurrent` trials at a time.

    grid/random: BasicVariantGenerator, which takes the limit itself (Tune ignores
    TuneConfig.max_concurrent_trials for it); optuna/hyperopt: the library's searcher in a
    ConcurrencyLimiter.
    """
    check_searcher_available(tune_spec)
    if tune_spec.searcher in LIBRARY_SEARCHERS:
        from ray.tune.search import ConcurrencyLimiter

        if tune_spec.searcher == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(seed=tune_spec.seed)
        else:
            from ray.tune.search.hyperopt import HyperOptSearch

            searcher = HyperOptSearch(random_state_seed=tune_spec.seed)
        return ConcurrencyLimiter(searcher, max_concurrent=concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=tune_spec.seed, max_concurrent=concurrent)


def scheduler(tune_spec: TuneSpec, spec: JobSpec):
    """ASHA on eval loss, its time axis in optimizer steps; or FIFO (every trial runs to the end)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if tune_spec.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="step",
        max_t=spec.training.max_steps,
        grace_period=tune_spec.asha.grace_period or spec.training.eval_every,
        reduction_factor=tune_spec.asha.reduction_factor,
    )


def num_trials(tune_spec: TuneSpec) -> int:
    return grid_size(tune_spec) or tune_spec.num_samples or DEFAULT_SAMPLES


def max_concurrent_trials(spec: JobSpec, resources: dict[str, float], gpu: bool) -> int:
    """Trials that fit the cluster at once: each holds num_workers × cpus_per_worker CPUs (and GPUs) plus its driver."""
    tune_spec = spec.tune
    if isinstance(tune_spec.max_concurrent_trials, int):
        return tune_spec.max_concurrent_trials
    r = spec.resources
    fit = math.floor(resources.get("CPU", 0) / (r.num_workers * (r.cpus_per_worker or 1) + DRIVER_CPU))
    if gpu:
        fit = min(fit, math.floor(resources.get("GPU", 0) / r.num_workers))
    return max(1, min(fit, num_trials(tune_spec)))


# ---------------------------------------------------------------------------
# Pre-flight checks, before Ray starts anything


def preflight(spec: JobSpec, source: str = "<spec>") -> str:
    """Refuse a search that cannot run: no tune section, a rank wider than the model, a searcher not installed.
    Returns the base model's directory (resolved once for the whole search)."""
    if spec.tune is None:
        raise SpecError(source, ["tune: missing; `rayft tune` needs a tune: section with the search space (see examples/tune-lora.yaml)"])
    storage_uri = spec.storage.uri or default_storage_uri()
    model_dir = resolve_model_dir(spec.model.source, storage_uri)
    if Path(model_dir).exists():
        problems = problems_for_model(spec.tune, read_model_config(model_dir))
        if problems:
            raise SpecError(source, problems)
    check_searcher_available(spec.tune)
    problems = []
    for method in spec.tune.space.method or []:
        try:
            trial_spec(spec, {"method": method}, source=source)
        except SpecError as exc:
            problems += [f"tune.space.method: {method!r} does not fit the base job: {p}" for p in exc.problems]
    if problems:
        raise SpecError(source, problems)
    return str(Path(model_dir).resolve()) if Path(model_dir).exists() else model_dir  # trials run elsewhere


# ---------------------------------------------------------------------------
# Running, resuming, promoting


def new_search_id(spec: JobSpec) -> str:
    return f"{spec.output.name}-tune-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def experiment_location(storage_uri: str) -> str:
    """Where Tune keeps its experiments, as a URI/path (not a filesystem object).

    Tune pickles its RunConfig into the experiment (tuner.pkl). Given an explicit S3
    filesystem it would store that filesystem's credentials in the bucket; given a URI,
    it resolves S3 access on each node from the standard AWS variables (AWS_ENDPOINT_URL
    included), as boto3 does.
    """
    _, base = pyarrow_filesystem(storage_uri)
    scheme = "s3://" if storage_uri.startswith("s3://") else ""
    return f"{scheme}{base.rstrip('/')}/{TUNE_DIR}"


def run_search(
    spec: JobSpec,
    *,
    address: str | None = None,
    run_id: str | None = None,
    on_progress: ProgressFn | None = None,
    source: str = "<spec>",
) -> SearchResult:
    """Run the job's search on Ray Tune, then publish the best trial's adapter."""
    model_dir = preflight(spec, source)
    spec = with_absolute_paths(spec)
    storage_uri = spec.storage.uri or default_storage_uri()
    spec = spec.model_copy(update={"storage": spec.storage.model_copy(update={"uri": storage_uri})})
    run_id = run_id or new_search_id(spec)
    open_store(storage_uri).put_bytes(spec.model_dump_json(indent=1).encode(), search_job_key(run_id))
    ensure_ray(address)
    spec, prepared = prepare_for_job(spec, storage_uri, search=True)
    context = SearchContext(spec=spec, run_id=run_id, storage_uri=storage_uri, model_dir=model_dir, data=prepared.to_json())
    concurrent = concurrency(context)
    return _fit(context, _new_tuner(context, concurrent, on_progress), concurrent)


def resume_search(
    run_id: str,
    *,
    storage_uri: str | None = None,
    address: str | None = None,
) -> tuple[SearchResult, bool]:
    """Finish a search whose driver died: Tune restores its state and runs what was unfinished.

    Returns (result, resumed): resumed is False when the search had already finished, in
    which case its saved result is returned as it is. Progress goes to the callback the
    search started with (Tune restores it with the experiment).
    """
    storage_uri = storage_uri or default_storage_uri()
    finished = load_search(run_id, storage_uri)
    if finished is not None:
        return finished, False
    store = open_store(storage_uri)
    job_key = search_job_key(run_id)
    if not store.exists(job_key):
        raise NotFound(
            f"no search {run_id!r} in {storage_uri} ({store.uri_for(job_key)} does not exist); check the run id "
            "`rayft tune` printed, and --storage"
        )
    spec = parse_job_spec(json.loads(store.get_bytes(job_key)), store.uri_for(job_key))
    ensure_ray(address)
    spec, prepared = prepare_for_job(spec, storage_uri, search=True)  # reuses the preprocessing the search started with
    context = SearchContext(spec=spec, run_id=run_id, storage_uri=storage_uri,
                            model_dir=resolve_model_dir(spec.model.source, storage_uri), data=prepared.to_json())
    path = f"{experiment_location(storage_uri)}/{run_id}"
    if not tune.Tuner.can_restore(path):
        raise NotFound(
            f"search {run_id!r} has no Ray Tune state in {path} (its driver stopped before the first trial started); "
            "start it again with `rayft tune JOB.yaml`"
        )
    print(f"[rayft] resuming search {run_id} from {path}", flush=True)
    # The restored Tuner keeps its RunConfig (and so the progress callback the search started with).
    tuner = tune.Tuner.restore(path, trainable=trainable(context), resume_unfinished=True, resume_errored=False,
                               restart_errored=False)
    return _fit(context, tuner, concurrency(context)), True


def concurrency(context: SearchContext) -> int:
    import ray

    return max_concurrent_trials(context.spec, ray.cluster_resources(), use_gpu(context.spec))


def _new_tuner(context: SearchContext, concurrent: int, on_progress: ProgressFn | None):
    spec, tune_spec = context.spec, context.spec.tune
    print(
        f"[rayft] search {context.run_id}: {tune_spec.searcher} over {', '.join(tune_spec.space.dimensions())}, "
        f"{num_trials(tune_spec)} trial(s), {tune_spec.scheduler}, up to {concurrent} at a time, storage {context.storage_uri}",
        flush=True,
    )
    callbacks = [ReleaseStoppedTrials()] + ([TrialProgress(context, on_progress)] if on_progress else [])
    return tune.Tuner(
        trainable(context),
        param_space=param_space(tune_spec),
        tune_config=tune.TuneConfig(
            metric=tune_spec.ranking()[0], mode=tune_spec.ranking()[1],
            search_alg=search_algorithm(tune_spec, concurrent),
            scheduler=scheduler(tune_spec, spec),
            num_samples=1 if tune_spec.searcher == "grid" else num_trials(tune_spec),
            trial_name_creator=trial_dir_name,
            trial_dirname_creator=trial_dir_name,
        ),
        run_config=tune.RunConfig(
            name=context.run_id,
            storage_path=experiment_location(context.storage_uri),
            failure_config=tune.FailureConfig(max_failures=tune_spec.max_failures),
            callbacks=callbacks,
            verbose=0,
        ),
    )


def _fit(context: SearchContext, tuner, concurrent: int) -> SearchResult:
    """Run (or finish) the Tune experiment, then promote the winner and save the results."""
    t0 = time.perf_counter()
    grid = tuner.fit()
    trials = collect_records(context, grid)
    winner = best_trial(trials, context.storage_uri, context.spec.tune.ranking()[0])
    max_steps = context.spec.training.max_steps
    result = SearchResult(
        run_id=context.run_id, storage_uri=context.storage_uri, searcher=context.spec.tune.searcher,
        scheduler=context.spec.tune.scheduler, max_steps=max_steps, max_concurrent_trials=concurrent,
        wall_s=0.0, trials=trials, winner=winner.trial_id if winner else None,
        steps_run=sum(t.steps for t in trials if t.status != "errored"),
        steps_saved=sum(max_steps - t.steps for t in trials if t.status == "stopped"),
    )
    if winner is None:
        saved = save_results(result.model_copy(update={"wall_s": time.perf_counter() - t0}))
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error)
        raise SearchFailed(
            f"search {context.run_id}: no trial finished with an eval loss to promote"
            + (f" ({errors})" if errors else "") + f"; the table is in {saved.files[0]}"
        )
    manifests = promote(context, winner)
    result = result.model_copy(update={"published": [m.ref for m in manifests], "wall_s": time.perf_counter() - t0})
    return save_results(result)


def collect_records(context: SearchContext, grid) -> list[TrialRecord]:
    """Every trial of a finished Tune run as a TrialRecord (status, losses, checkpoint, error)."""
    max_steps = context.spec.training.max_steps
    records = []
    for result in grid:
        trial_id = Path(result.path).name
        record = record_for(context, trial_id, dict(result.config or {}), "pending")
        updates: dict[str, Any] = {}
        frame = result.metrics_dataframe
        if frame is not None and METRIC in frame and "step" in frame:
            rows = frame[["step", METRIC]].dropna()
            updates["eval_history"] = _by_step([(int(s), float(v)) for s, v in zip(rows["step"], rows[METRIC])])
            if updates["eval_history"]:
                updates["best_eval_loss"] = min(v for _, v in updates["eval_history"])
        if result.metrics:
            updates.update(_from_metrics(result.metrics))
        if result.error is not None:
            updates.update(status="errored", error=root_cause(str(result.error)))
        else:
            updates["status"] = "completed" if updates.get("steps", 0) >= max_steps else "stopped"
        records.append(record.model_copy(update=updates))
    return sorted(records, key=lambda t: t.trial_id)


def best_trial(trials: list[TrialRecord], storage_uri: str, metric: str = METRIC) -> TrialRecord | None:
    """The trial with the lowest eval loss (or, ranked by `eval_preference_accuracy` or a task metric such as
    `eval_exact_match`, the highest value) at its last reported checkpoint; ties go to the lower eval loss, then
    the trial id. Errored trials never win.

    A trial ASHA stopped may have trained a little past the report Tune acted on, and
    `keep_checkpoints` may then have rotated that checkpoint out: such a trial cannot be
    promoted, and the next best one is.
    """
    import pyarrow.fs

    fs, _ = pyarrow_filesystem(storage_uri)
    candidates = sorted(
        (t for t in trials if t.status in ("completed", "stopped") and getattr(t, metric) is not None and t.checkpoint),
        key=lambda t: (t.eval_loss if metric == METRIC else -getattr(t, metric),
                       t.eval_loss if t.eval_loss is not None else math.inf, t.trial_id),
    )
    for trial in candidates:
        if fs.get_file_info(f"{trial.checkpoint}/{STATE_NAME}.json").type == pyarrow.fs.FileType.File:
            return trial
    return None


def promote(context: SearchContext, winner: TrialRecord) -> list[Manifest]:
    """Publish the winner's adapter from its last checkpoint (unless this trial was published already)."""
    import ray.train

    registry = Registry(open_store(context.storage_uri))
    spec = trial_spec(context.spec, winner.config, source=f"trial {winner.trial_id}")
    existing = published_from(registry, spec.output.name, winner.train_run_id)
    if existing:
        return existing
    fs, _ = pyarrow_filesystem(context.storage_uri)
    model_dir = context.model_dir or resolve_model_dir(spec.model.source, context.storage_uri)
    metrics = {k: v for k, v in _metrics_of(winner).items() if v is not None}
    checkpoint = ray.train.Checkpoint(winner.checkpoint, filesystem=fs)
    with checkpoint.as_directory() as ckpt, tempfile.TemporaryDirectory(prefix="rayft-promote-") as work:
        return publish_run(spec, registry, Path(ckpt), model_dir, metrics, winner.train_run_id, Path(work))


def _metrics_of(trial: TrialRecord) -> dict[str, Any]:
    return {"step": trial.steps, "eval_loss": trial.eval_loss, "train_loss": trial.train_loss,
            "trainable_params": trial.trainable_params, "best_eval_loss": trial.best_eval_loss,
            "eval_preference_accuracy": trial.eval_preference_accuracy,
            **{f"eval_{name}": getattr(trial, f"eval_{name}") for name in PAIR_METRICS}}


def published_from(registry: Registry, name: str, run_id: str) -> list[Manifest]:
    """Manifests of `name` already published from the Train run `run_id` (a resumed search does not publish twice)."""
    out = []
    for manifest in registry.list(all_versions=True):
        if manifest.name in (name, f"{name}-merged") and manifest.lineage.get("run_id") == run_id:
            out.append(manifest)
    return sorted(out, key=lambda m: (m.name != name, m.version))
