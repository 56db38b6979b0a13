"""`rayft tune`: a Ray Tune search whose trials are Ray Train runs; the best adapter is published.

Ray 2.60 runs Train V2, where a `TorchTrainer` cannot be handed to a `Tuner` directly.
Each trial is instead a small driver function (`trial_driver`) that builds the trial's
job spec from the base spec and its sampled config, fits a `TorchTrainer` through
`trainers.run.build_trainer`, and forwards every Train report to Tune with
`TuneReportCallback` (which adds the reported checkpoint's storage path as
`checkpoint_path`). ASHA stops weak trials at evaluations; a trial that fails is retried
and then recorded as errored, never fatal to the search.

Storage layout (next to ordinary runs):

    tune/<run_id>/job.json                    the base job spec the search started from
    tune/<run_id>/...                         Ray Tune's experiment state (what --resume restores)
    tune/<run_id>/results.{csv,json}, search.png   written when the search ends (json last)
    runs/<run_id>-<trial_id>/step-XXXXXXXX/   each trial's own Train checkpoints
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from ray import tune
from ray.tune import Callback

from storage.errors import NotFound, RayftError, root_cause
from storage.models import read_model_config, resolve_model_dir
from storage.registry import Manifest, Registry
from storage.store import default_storage_uri, open_store, pyarrow_filesystem
from trainers.checkpoints import STATE_NAME
from trainers.methods import LORA_FIELDS
from trainers.spec import JobSpec, SpecError, parse_job_spec
from trainers.tune_spec import (
    DEFAULT_SAMPLES,
    LIBRARY_SEARCHERS,
    Dimension,
    TuneSpec,
    problems_for_model,
    target_label,
    target_value,
)

METRIC, MODE = "eval_loss", "min"
#: Where TuneReportCallback puts the storage path of a report's checkpoint.
CHECKPOINT_PATH = "checkpoint_path"
#: CPU a trial's driver function holds while its TorchTrainer's workers do the work (Tune rejects 0).
DRIVER_CPU = 0.01
TUNE_DIR = "tune"
#: Metrics the training loop reports that a promoted adapter's manifest records.
TRAIN_METRICS = ("step", "train_loss", "eval_loss", "trainable_params", "total_params", "tokens_per_s")


class SearchFailed(RayftError):
    """The search ended without a trial to promote (every trial errored or none reported an eval loss)."""

    http_status = 500


class SearcherUnavailable(RayftError):
    """The job asks for a model-based searcher whose library is not installed."""


# ---------------------------------------------------------------------------
# Results


class TrialRecord(BaseModel):
    """One row of the results table: a trial's config as trained, how far it got, and its losses."""

    model_config = ConfigDict(extra="forbid")

    trial_id: str = Field(description="Ray Tune's trial id.")
    status: Literal["pending", "running", "completed", "stopped", "errored"] = Field(
        description="completed: ran every step; stopped: cut early by ASHA; errored: failed after its retries."
    )
    config: dict[str, JsonValue] = Field(description="The sampled values, as Tune passed them to the trial.")
    method: str = Field(description="Fine-tuning method of the trial.")
    r: int = Field(description="LoRA rank.")
    alpha: float = Field(description="LoRA alpha (absolute).")
    target_modules: str = Field(description="Target-module set: a preset name, or module names joined by commas.")
    lr: float = Field(description="Peak learning rate.")
    dropout: float = Field(description="Adapter dropout.")
    steps: int = Field(0, description="Last step the trial reported.")
    eval_loss: float | None = Field(None, description="Eval loss at the last reported step (what trials are ranked by).")
    objective: str = Field("sft", description="Training objective of the trial.")
    beta: float | None = Field(None, description="The preference objective's beta.")
    eval_preference_accuracy: float | None = Field(
        None, description="Eval preference accuracy at the last reported step (ranks trials of different objectives).")
    best_eval_loss: float | None = Field(None, description="Lowest eval loss the trial reported.")
    train_loss: float | None = Field(None, description="Train loss at the last reported step.")
    trainable_params: int | None = Field(None, description="Trainable parameters of the adapter.")
    train_run_id: str = Field(description="The trial's Ray Train run (its checkpoints are under runs/<train_run_id>/).")
    checkpoint: str | None = Field(None, description="Storage path of the trial's last checkpoint.")
    error: str | None = Field(None, description="The error line of a trial that failed.")
    failures: int = Field(0, description="How many times the trial failed (each failure up to max_failures is retried).")
    eval_history: list[tuple[int, float]] = Field(default_factory=list, description="(step, eval loss) at every report.")


class SearchResult(BaseModel):
    """A finished search: every trial, the winner and where it was published."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(description="The search's run id (`rayft tune --resume RUN_ID`).")
    storage_uri: str = Field(description="Storage the search, its trials and the registry live in.")
    searcher: str = Field(description="grid, random, optuna or hyperopt.")
    scheduler: str = Field(description="asha or fifo.")
    max_steps: int = Field(description="Steps a trial runs when nothing stops it.")
    max_concurrent_trials: int = Field(description="Trials that ran at once.")
    wall_s: float = Field(description="Wall time of the search (the last session, when resumed), seconds.")
    trials: list[TrialRecord] = Field(description="Every trial, in trial-id order.")
    winner: str | None = Field(None, description="trial_id of the promoted trial.")
    published: list[str] = Field(default_factory=list, description="Registry refs (name@version) the winner was published as.")
    files: list[str] = Field(default_factory=list, description="Storage URIs of the results table and plot.")
    steps_run: int = Field(0, description="Optimizer steps run by the trials that did not error.")
    steps_saved: int = Field(0, description="Steps ASHA saved: for every trial it stopped, max_steps minus the steps it ran.")

    def trial(self, trial_id: str) -> TrialRecord:
        return next(t for t in self.trials if t.trial_id == trial_id)


# ---------------------------------------------------------------------------
# The search space as Ray Tune domains, and a trial's job spec from its config.


def _domain(dim: Dimension, grid: bool, integer: bool):
    if dim.choice is not None:
        if len(dim.choice) == 1:
            return dim.choice[0]
        return tune.grid_search(list(dim.choice)) if grid else tune.choice(list(dim.choice))
    low, high = dim.range
    if integer:  # Tune's integer upper bounds are exclusive; ours are inclusive
        return tune.lograndint(low, high + 1) if dim.log else tune.randint(low, high + 1)
    return tune.loguniform(low, high) if dim.log else tune.uniform(low, high)


def _categorical(values: list, grid: bool):
    if len(values) == 1:
        return values[0]
    return tune.grid_search(list(values)) if grid else tune.choice(list(values))


def param_space(tune_spec: TuneSpec) -> dict[str, Any]:
    """Tune's param_space: a grid_search / sampling domain per searched dimension, a constant for a single value."""
    space, grid = tune_spec.space, tune_spec.searcher == "grid"
    out: dict[str, Any] = {}
    for name in space.dimensions():
        dim = getattr(space, name)
        if name in ("method", "objective"):
            out[name] = _categorical(dim, grid)
        elif name == "target_modules":
            out["target_modules"] = _categorical([target_label(t) for t in dim], grid)
        elif name == "alpha":
            if dim.ratio is not None:
                out["alpha_ratio"] = _domain(dim.ratio, grid, integer=False)
            else:
                out["alpha"] = _domain(Dimension[float](choice=dim.choice, range=dim.range, log=dim.log), grid, integer=False)
        else:
            out[name] = _domain(dim, grid, integer=name == "r")
    return out


def grid_size(tune_spec: TuneSpec) -> int | None:
    """Number of trials of a grid search; None for the sampling searchers (that is num_samples)."""
    if tune_spec.searcher != "grid":
        return None
    size = 1
    for value in param_space(tune_spec).values():
        if isinstance(value, dict) and "grid_search" in value:
            size *= len(value["grid_search"])
    return size


def trial_spec(base: JobSpec, config: dict[str, Any], source: str = "<trial>") -> JobSpec:
    """The base job with a trial's sampled values put in, validated like any job spec.

    Trials checkpoint at every evaluation, so the adapter of any trial (stopped early or not)
    is the one its last reported eval loss measured; they log only their last step, the
    search's table shows progress.
    """
    raw = base.model_dump(mode="json")
    method = raw["method"]
    name = config.get("method", method["name"])
    if name != method["name"]:
        method = {k: method[k] for k in LORA_FIELDS if k in method}  # what the LoRA-family methods share
    method["name"] = name
    if "r" in config:
        method["r"] = int(config["r"])
    if "alpha" in config:
        method["alpha"] = float(config["alpha"])
    if "alpha_ratio" in config:
        method["alpha"] = float(config["alpha_ratio"]) * method["r"]
    if "dropout" in config:
        method["dropout"] = float(config["dropout"])
    if "target_modules" in config:
        method["target_modules"] = target_value(config["target_modules"])
    training = raw["training"]
    if "lr" in config:
        training["lr"] = float(config["lr"])
    objective = raw["objective"]
    if config.get("objective", objective["name"]) != objective["name"]:
        objective = {"name": config["objective"]}
    if "beta" in config:
        objective["beta"] = float(config["beta"])
    training["checkpoint_every"] = training["eval_every"]
    training["log_every"] = training["max_steps"]
    raw.update(method=method, training=training, objective=objective, tune=None)
    return parse_job_spec(raw, source)


@dataclass(frozen=True)
class SearchContext:
    """What every trial needs besides its sampled config (handed to trials by `tune.with_parameters`)."""

    spec: JobSpec  # the base job, with absolute local paths
    run_id: str
    storage_uri: str


def train_run_id(run_id: str, trial_id: str) -> str:
    return f"{run_id}-{trial_id}"


def trial_driver(config: dict[str, Any], context: SearchContext) -> None:
    """One trial: fit a TorchTrainer for the trial's job; its reports reach Tune through TuneReportCallback.

    A failed fit raises, so Tune records the trial as errored (and retries it, resuming the
    same Train run from its last checkpoint).
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainers.run import build_trainer

    trial_id = tune.get_context().get_trial_id()
    spec = trial_spec(context.spec, config, source=f"trial {trial_id}")
    run_id = train_run_id(context.run_id, trial_id)
    result = build_trainer(spec, run_id, context.storage_uri, callbacks=[TuneReportCallback()]).fit()
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


def preflight(spec: JobSpec, source: str = "<spec>") -> None:
    """Refuse a search that cannot run: no tune section, a rank wider than the model, a searcher not installed."""
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


# ---------------------------------------------------------------------------
# Progress: a Tune callback that keeps a record per trial and tells the caller what changed.

ProgressFn = Callable[[list[TrialRecord], str], None]


class TrialProgress(Callback):
    """Keeps a TrialRecord per trial from Tune's trial events and calls `on_progress(records, event)` on each.

    Tune pickles its RunConfig (with this callback) into the experiment, so `on_progress`
    must be picklable (a module-level function is).
    """

    def __init__(self, context: SearchContext, on_progress: ProgressFn):
        self.context = context
        self.on_progress = on_progress
        self.records: dict[str, TrialRecord] = {}

    def _update(self, trial, status: str | None = None, result: dict | None = None, **fields: Any) -> TrialRecord:
        record = self.records.get(trial.trial_id) or record_for(self.context, trial.trial_id, dict(trial.config), "pending")
        updates: dict[str, Any] = dict(fields)
        if status:
            updates["status"] = status
        if result and result.get(METRIC) is not None:
            updates.update(_from_metrics(result))
            history = _by_step(record.eval_history + [(int(result.get("step") or 0), float(result[METRIC]))])
            updates.update(eval_history=history, best_eval_loss=min(loss for _, loss in history))
        record = record.model_copy(update=updates)
        self.records[trial.trial_id] = record
        return record

    def _tell(self, event: str) -> None:
        self.on_progress(sorted(self.records.values(), key=lambda t: t.trial_id), event)

    def on_trial_start(self, iteration, trials, trial, **info):
        record = self._update(trial, "running")
        self._tell(f"trial {trial.trial_id} started: {describe_config(record)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        previous = self.records.get(trial.trial_id)
        seen = {step for step, _ in previous.eval_history} if previous else set()
        record = self._update(trial, "running", result)
        if record.eval_loss is not None and record.steps not in seen:
            self._tell(f"trial {trial.trial_id} step {record.steps}: eval loss {record.eval_loss:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        record = self.records.get(trial.trial_id) or self._update(trial)
        done = record.steps >= self.context.spec.training.max_steps
        record = self._update(trial, "completed" if done else "stopped")
        loss = f"{record.eval_loss:.4f}" if record.eval_loss is not None else "n/a"
        if done:
            self._tell(f"trial {trial.trial_id} completed: eval loss {loss}")
        else:
            self._tell(f"trial {trial.trial_id} stopped by ASHA at step {record.steps} (eval loss {loss})")

    def on_trial_recover(self, iteration, trials, trial, **info):
        error = _trial_error(trial)
        self._update(trial, "pending", failures=trial.num_failures, error=error)
        self._tell(f"trial {trial.trial_id} failed (attempt {trial.num_failures}), retrying: {error}")

    def on_trial_error(self, iteration, trials, trial, **info):
        error = _trial_error(trial)
        self._update(trial, "errored", failures=trial.num_failures, error=error)
        self._tell(f"trial {trial.trial_id} errored after {trial.num_failures} attempt(s), recorded: {error}")


class ReleaseStoppedTrials(Callback):
    """Frees the worker resources of trials that Tune stopped (ASHA) or that died.

    Stopping a trial ends its driver actor, which takes its Train controller with it, but
    the controller's placement group outlives both: Ray frees it only when the whole job
    ends, and Train's own PlacementGroupCleaner needs the dashboard's state API (off in
    local mode here). Without this the next trial waits forever for those CPUs.
    """

    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self._last = 0.0

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            release_orphaned_train_placement_groups()

    def on_trial_complete(self, iteration, trials, trial, **info):
        release_orphaned_train_placement_groups()

    def on_trial_error(self, iteration, trials, trial, **info):
        release_orphaned_train_placement_groups()

    def on_experiment_end(self, trials, **info):
        release_orphaned_train_placement_groups()


def release_orphaned_train_placement_groups() -> int:
    """Remove placement groups whose creator, a Ray Train controller, is dead; returns how many.

    Uses Ray's GCS tables directly (no dashboard needed); if those internals change, it
    warns once and does nothing.
    """
    import logging

    import ray
    from ray._private.state import actors, state
    from ray.core.generated import gcs_pb2
    from ray.util import placement_group_table, remove_placement_group
    from ray.util.placement_group import PlacementGroup

    global _release_warned
    try:
        table = actors()
        removed = 0
        for pg_id, info in placement_group_table().items():
            if info["state"] == "REMOVED":
                continue
            raw = state._global_state_accessor.get_placement_group_info(ray.PlacementGroupID(bytes.fromhex(pg_id)))
            data = gcs_pb2.PlacementGroupTableData.FromString(raw)
            creator = table.get(data.creator_actor_id.hex(), {})
            if data.creator_actor_dead and not data.is_detached and creator.get("ActorClassName") == "TrainController":
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
                removed += 1
        return removed
    except Exception as exc:  # Ray internals moved: degrade to Ray's own cleanup
        if not _release_warned:
            _release_warned = True
            logging.getLogger(__name__).warning("cannot release stopped trials' placement groups: %s", exc)
        return 0


_release_warned = False


def _by_step(history: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """One (step, eval loss) per step, in step order (a trial's final report can arrive twice)."""
    return sorted(dict(history).items())


def _trial_error(trial) -> str:
    path = trial.error_file
    if path and Path(path).exists():
        return root_cause(Path(path).read_text())
    return "unknown error (see the trial's error file in the Tune experiment directory)"


def describe_config(record: TrialRecord) -> str:
    objective = "" if record.objective == "sft" else f" {record.objective}" + (f" beta={record.beta:g}" if record.beta is not None else "")
    return (f"{record.method} r={record.r} alpha={record.alpha:g} targets={record.target_modules} "
            f"lr={record.lr:.2g} dropout={record.dropout:g}{objective}")


def record_for(context: SearchContext, trial_id: str, config: dict[str, Any], status: str) -> TrialRecord:
    """A trial's record before any result: its config as the trial's job spec resolves it."""
    spec = trial_spec(context.spec, config)
    method = spec.method
    return TrialRecord(
        trial_id=trial_id, status=status, config=_jsonable(config), method=method.name, r=method.r, alpha=method.alpha,
        target_modules=target_label(config.get("target_modules") or _label_of(method.target_modules)),
        lr=spec.training.lr, dropout=method.dropout, train_run_id=train_run_id(context.run_id, trial_id),
        objective=spec.objective.name, beta=getattr(spec.objective, "beta", None),
    )


def _label_of(target_modules: str | list[str]) -> str:
    return target_modules if isinstance(target_modules, str) else ",".join(target_modules)


def _jsonable(config: dict[str, Any]) -> dict[str, JsonValue]:
    return json.loads(json.dumps(config, default=str))


def _from_metrics(metrics: dict) -> dict[str, Any]:
    out: dict[str, Any] = {"steps": int(metrics.get("step") or 0)}
    if metrics.get(METRIC) is not None:
        out["eval_loss"] = float(metrics[METRIC])
    if metrics.get("eval_preference_accuracy") is not None:
        out["eval_preference_accuracy"] = float(metrics["eval_preference_accuracy"])
    if metrics.get("train_loss") is not None:
        out["train_loss"] = float(metrics["train_loss"])
    if metrics.get("trainable_params") is not None:
        out["trainable_params"] = int(metrics["trainable_params"])
    if metrics.get(CHECKPOINT_PATH):
        out["checkpoint"] = str(metrics[CHECKPOINT_PATH])
    return out


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
    from trainers.run import ensure_ray, with_absolute_paths

    preflight(spec, source)
    spec = with_absolute_paths(spec)
    storage_uri = spec.storage.uri or default_storage_uri()
    spec = spec.model_copy(update={"storage": spec.storage.model_copy(update={"uri": storage_uri})})
    run_id = run_id or new_search_id(spec)
    open_store(storage_uri).put_bytes(spec.model_dump_json(indent=1).encode(), f"{TUNE_DIR}/{run_id}/job.json")
    ensure_ray(address)
    context = SearchContext(spec=spec, run_id=run_id, storage_uri=storage_uri)
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
    from trainers.run import ensure_ray

    storage_uri = storage_uri or default_storage_uri()
    finished = load_search(run_id, storage_uri)
    if finished is not None:
        return finished, False
    store = open_store(storage_uri)
    job_key = f"{TUNE_DIR}/{run_id}/job.json"
    if not store.exists(job_key):
        raise NotFound(
            f"no search {run_id!r} in {storage_uri} ({store.uri_for(job_key)} does not exist); check the run id "
            "`rayft tune` printed, and --storage"
        )
    spec = parse_job_spec(json.loads(store.get_bytes(job_key)), store.uri_for(job_key))
    ensure_ray(address)
    context = SearchContext(spec=spec, run_id=run_id, storage_uri=storage_uri)
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

    from trainers.run import use_gpu

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
            metric=tune_spec.space.ranking()[0], mode=tune_spec.space.ranking()[1],
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
    winner = best_trial(trials, context.storage_uri, context.spec.tune.space.ranking()[0])
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
    """The trial with the lowest eval loss (or, ranked by `eval_preference_accuracy`, the highest preference accuracy)
    at its last reported checkpoint; errored trials never win.

    A trial ASHA stopped may have trained a little past the report Tune acted on, and
    `keep_checkpoints` may then have rotated that checkpoint out: such a trial cannot be
    promoted, and the next best one is.
    """
    import pyarrow.fs

    fs, _ = pyarrow_filesystem(storage_uri)
    candidates = sorted(
        (t for t in trials if t.status in ("completed", "stopped") and getattr(t, metric) is not None and t.checkpoint),
        key=lambda t: (-t.eval_preference_accuracy if metric == "eval_preference_accuracy" else t.eval_loss, t.trial_id),
    )
    for trial in candidates:
        if fs.get_file_info(f"{trial.checkpoint}/{STATE_NAME}.json").type == pyarrow.fs.FileType.File:
            return trial
    return None


def promote(context: SearchContext, winner: TrialRecord) -> list[Manifest]:
    """Publish the winner's adapter from its last checkpoint (unless this trial was published already)."""
    import ray.train

    from trainers.publish import publish_run

    registry = Registry(open_store(context.storage_uri))
    spec = trial_spec(context.spec, winner.config, source=f"trial {winner.trial_id}")
    existing = published_from(registry, spec.output.name, winner.train_run_id)
    if existing:
        return existing
    fs, _ = pyarrow_filesystem(context.storage_uri)
    model_dir = resolve_model_dir(spec.model.source, context.storage_uri)
    metrics = {k: v for k, v in _metrics_of(winner).items() if v is not None}
    checkpoint = ray.train.Checkpoint(winner.checkpoint, filesystem=fs)
    with checkpoint.as_directory() as ckpt, tempfile.TemporaryDirectory(prefix="rayft-promote-") as work:
        return publish_run(spec, registry, Path(ckpt), model_dir, metrics, winner.train_run_id, Path(work))


def _metrics_of(trial: TrialRecord) -> dict[str, Any]:
    return {"step": trial.steps, "eval_loss": trial.eval_loss, "train_loss": trial.train_loss,
            "trainable_params": trial.trainable_params, "best_eval_loss": trial.best_eval_loss,
            "eval_preference_accuracy": trial.eval_preference_accuracy}


def published_from(registry: Registry, name: str, run_id: str) -> list[Manifest]:
    """Manifests of `name` already published from the Train run `run_id` (a resumed search does not publish twice)."""
    out = []
    for manifest in registry.list(all_versions=True):
        if manifest.name in (name, f"{name}-merged") and manifest.lineage.get("run_id") == run_id:
            out.append(manifest)
    return sorted(out, key=lambda m: (m.name != name, m.version))


# ---------------------------------------------------------------------------
# Results table and plot, saved with the run


RESULTS_JSON, RESULTS_CSV, RESULTS_PNG = "results.json", "results.csv", "search.png"
CSV_COLUMNS = ("trial_id", "status", "method", "r", "alpha", "target_modules", "lr", "dropout", "steps",
               "eval_loss", "best_eval_loss", "train_loss", "trainable_params", "failures", "error", "train_run_id", "checkpoint")


def results_csv(result: SearchResult) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for trial in result.trials:
        writer.writerow({k: getattr(trial, k) for k in CSV_COLUMNS})
    return buf.getvalue()


def plot_search(result: SearchResult, out: Path) -> Path:
    """Left: eval loss by step for every trial (ASHA's cuts show as short curves). Right: final eval loss by rank, one series per target set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, by_rank) = plt.subplots(1, 2, figsize=(11, 4))
    for trial in result.trials:
        if trial.eval_history:
            steps, losses = zip(*trial.eval_history)
            style = "-" if trial.status == "completed" else "--"
            curves.plot(steps, losses, style, marker="o", ms=3, label=f"{trial.trial_id[-5:]} ({trial.status})")
    curves.set_xlabel("step")
    curves.set_ylabel("eval loss")
    curves.set_title("eval loss by trial")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7)
    sets = sorted({t.target_modules for t in result.trials})
    for target_set in sets:
        points = sorted((t.r, t.eval_loss) for t in result.trials if t.target_modules == target_set and t.eval_loss is not None)
        if points:
            by_rank.plot(*zip(*points), marker="s", linestyle="none", label=target_set)
    if result.winner:
        w = result.trial(result.winner)
        by_rank.plot([w.r], [w.eval_loss], marker="o", ms=15, markerfacecolor="none", markeredgecolor="black",
                     markeredgewidth=1.5, linestyle="none", label="winner")
    by_rank.set_xscale("log", base=2)
    by_rank.set_xlabel("rank r")
    by_rank.set_ylabel("last eval loss")
    by_rank.set_title("eval loss by rank and target set")
    by_rank.grid(alpha=0.3)
    by_rank.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def save_results(result: SearchResult) -> SearchResult:
    """Write results.csv and search.png, then results.json (last: its presence marks the search finished)."""
    store = open_store(result.storage_uri)
    prefix = f"{TUNE_DIR}/{result.run_id}"
    with tempfile.TemporaryDirectory(prefix="rayft-tune-") as tmp:
        png = plot_search(result, Path(tmp) / RESULTS_PNG)
        store.put_file(png, f"{prefix}/{RESULTS_PNG}")
    store.put_bytes(results_csv(result).encode(), f"{prefix}/{RESULTS_CSV}")
    files = [store.uri_for(f"{prefix}/{name}") for name in (RESULTS_CSV, RESULTS_JSON, RESULTS_PNG)]
    result = result.model_copy(update={"files": files})
    store.put_bytes(result.model_dump_json(indent=1).encode(), f"{prefix}/{RESULTS_JSON}")
    return result


def load_search(run_id: str, storage_uri: str) -> SearchResult | None:
    """The saved result of a finished search, or None if it has not finished."""
    store = open_store(storage_uri)
    key = f"{TUNE_DIR}/{run_id}/{RESULTS_JSON}"
    if not store.exists(key):
        return None
    return SearchResult.model_validate_json(store.get_bytes(key))
