"""Progress: Tune callbacks that keep a record per trial, tell the caller what changed, and release stopped trials."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import JsonValue
from ray.tune import Callback

from storage.errors import root_cause
from trainers.tune_spec import target_label
from trainers.task_metrics import PAIR_METRICS
from trainers.tune.results import CHECKPOINT_PATH, METRIC, TrialRecord
from trainers.tune.space import SearchContext, train_run_id, trial_spec


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
    for key in ("eval_preference_accuracy", *(f"eval_{name}" for name in PAIR_METRICS)):
        if metrics.get(key) is not None:
            out[key] = float(metrics[key])
    if metrics.get("train_loss") is not None:
        out["train_loss"] = float(metrics["train_loss"])
    if metrics.get("trainable_params") is not None:
        out["trainable_params"] = int(metrics["trainable_params"])
    if metrics.get(CHECKPOINT_PATH):
        out["checkpoint"] = str(metrics[CHECKPOINT_PATH])
    return out
