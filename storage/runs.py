"""Training runs as storage records, so anything that can read the store (the console, a script) can list them;
and the one place that names the layout of runs, their checkpoints and tune searches in storage (trainers write
it, the console reads it).

Layout:

    runs/<run_id>/rayft-run.json        the driver's record: job spec, state, times, error (RunRecord)
    runs/<run_id>/rayft-progress.json   rank 0's live progress: step, history, ETA, console tail (RunProgress)
    runs/<run_id>/step-XXXXXXXX/...     checkpoints (`checkpoint_dir_name`; what they hold: trainers.checkpoints),
                                        each with the trainer state `trainer_state.{json,safetensors}`
    runs/<run_id>/eval/...              the results of an `eval:` gate (evaluation.pipeline)
    tune/<search_id>/job.json           the base job spec a search started from
    tune/<search_id>/results.json       its result, written last when it ends (beside results.csv, search.png)
    runs/<search_id>-<trial_id>/...     each trial's own run (`trial_run_id`)

Two files, one writer each (the driver, rank 0), so no write ever races another. Both are best effort
for the writers: a run never fails because its record could not be written. Readers validate run ids
before any storage call (`validate_run_id`), and treat a malformed record as missing fields, not a crash.
"""

from __future__ import annotations

import re
from collections import deque
from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, ValidationError

from storage.errors import InvalidName, NotFound
from storage.store import Store

RUNS_ROOT = "runs"
RECORD_FILE = "rayft-run.json"
PROGRESS_FILE = "rayft-progress.json"
#: A checkpoint folder's name: `step-` and the optimizer step, 8 digits.
CHECKPOINT_PREFIX = "step-"
#: The trainer state in each checkpoint: `trainer_state.json` (the tree) and `.safetensors` (its tensors).
STATE_NAME = "trainer_state"
STATE_FILES = (f"{STATE_NAME}.json", f"{STATE_NAME}.safetensors")
#: A run's folder of eval-gate results.
EVAL_DIR = "eval"
TUNE_ROOT = "tune"
SEARCH_JOB_FILE = "job.json"
SEARCH_RESULTS_FILE = "results.json"
#: Run ids rayft makes: `<output name>-<date>-<time>-<hex>`, a tune trial's `<search id>-<trial id>`.
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
_RUN_ID_RE = re.compile(RUN_ID_PATTERN)
#: Console lines kept in the progress record.
LOG_TAIL_LINES = 60

RunState = Literal["running", "succeeded", "failed"]


def validate_run_id(run_id: str) -> str:
    """`run_id` if it is a run id rayft could have made; InvalidName otherwise (before any storage call)."""
    if not isinstance(run_id, str) or not _RUN_ID_RE.fullmatch(run_id) or ".." in run_id:
        shown = repr(run_id)[:80]
        raise InvalidName(f"invalid run id {shown}: must match {RUN_ID_PATTERN} without '..'")
    return run_id


class RunRecord(BaseModel):
    """What the driver knows about a run: written when it starts, rewritten when it ends."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(description="The run's id (its folder under runs/).")
    state: RunState = Field(description="running until the driver sees the run end; then succeeded or failed.")
    name: str = Field(description="The job's output name (what a successful run publishes).")
    method: str = Field(description="Fine-tuning method (lora, qlora, full, ...).")
    objective: str = Field("sft", description="Training objective (sft, dpo, orpo, simpo, kto).")
    base: str = Field(description="The job's model source.")
    max_steps: int = Field(description="Optimizer steps the run is configured for.")
    spec: dict[str, JsonValue] = Field(description="The job spec as the run used it (paths made absolute).")
    started_at: AwareDatetime = Field(description="When the driver started the run, UTC.")
    finished_at: AwareDatetime | None = Field(None, description="When the driver saw the run end, UTC.")
    error: str | None = Field(None, description="The one-line error of a failed run.")
    metrics: dict[str, JsonValue] = Field(default_factory=dict, description="Final metrics of a succeeded run.")
    source: str = Field("cli", description="What started the run: cli (rayft train/submit) or api (the fine-tuning API).")


class RunProgress(BaseModel):
    """Rank 0's view while training: rewritten at console lines (at most once a second) and every evaluation."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(description="The run's id.")
    step: int = Field(description="Last optimizer step done.")
    max_steps: int = Field(description="Optimizer steps the run is configured for.")
    eta_s: float | None = Field(None, description="Seconds left at the current pace, None before the pace is known.")
    history: list[dict[str, JsonValue]] = Field(default_factory=list, description="The run's history so far (the checkpoint's).")
    log_tail: list[str] = Field(default_factory=list, description=f"Rank 0's last {LOG_TAIL_LINES} console lines.")
    updated_at: AwareDatetime = Field(description="When this record was written, UTC.")


def now() -> datetime:
    return datetime.now(UTC)


def run_prefix(run_id: str) -> str:
    """`runs/<run_id>`: the run's folder (its records, checkpoints and eval results). Readers of ids from outside
    check them first (`validate_run_id`)."""
    return f"{RUNS_ROOT}/{run_id}"


def checkpoint_dir_name(step: int) -> str:
    """The folder name of the checkpoint of optimizer step `step`."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(name: str) -> int:
    """The step a checkpoint folder name stands for (a trailing '/' allowed, as `run_ids` lists folders); -1 for
    any other name."""
    digits = name.removesuffix("/").removeprefix(CHECKPOINT_PREFIX)
    return int(digits) if name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else -1


def checkpoint_key(run_id: str, step: int, name: str) -> str:
    """The key of file `name` in the run's checkpoint of step `step`."""
    return f"{run_prefix(run_id)}/{checkpoint_dir_name(step)}/{name}"


def eval_prefix(run_id: str) -> str:
    return f"{run_prefix(run_id)}/{EVAL_DIR}"


def search_prefix(search_id: str) -> str:
    """`tune/<search_id>`: a search's folder (its job, Tune's experiment state, its results)."""
    return f"{TUNE_ROOT}/{search_id}"


def search_job_key(search_id: str) -> str:
    return f"{search_prefix(search_id)}/{SEARCH_JOB_FILE}"


def search_results_key(search_id: str) -> str:
    return f"{search_prefix(search_id)}/{SEARCH_RESULTS_FILE}"


def trial_run_id(search_id: str, trial_id: str) -> str:
    """The run id of a search's trial: its checkpoints are under `runs/<search_id>-<trial_id>/`."""
    return f"{search_id}-{trial_id}"


def search_of_trial(run_id: str, search_ids: set[str]) -> str | None:
    """The search (of `search_ids`) that run `run_id` is a trial of, or None."""
    return next((sid for sid in search_ids if run_id.startswith(trial_run_id(sid, ""))), None)


def search_files(store: Store) -> dict[str, set[str]]:
    """Every search folder under tune/ with the file names directly in it, from one listing (a search exists once
    its job file does)."""
    found: dict[str, set[str]] = {}
    for key in store.list(TUNE_ROOT):
        parts = key.split("/")
        if len(parts) == 3:
            found.setdefault(parts[1], set()).add(parts[2])
    return found


def record_key(run_id: str) -> str:
    return f"{run_prefix(validate_run_id(run_id))}/{RECORD_FILE}"


def progress_key(run_id: str) -> str:
    return f"{run_prefix(validate_run_id(run_id))}/{PROGRESS_FILE}"


def write_record(store: Store, record: RunRecord) -> None:
    store.put_bytes(record.model_dump_json(indent=1).encode(), record_key(record.run_id))


def write_progress(store: Store, progress: RunProgress) -> None:
    store.put_bytes(progress.model_dump_json().encode(), progress_key(progress.run_id))


def _read(store: Store, key: str, model: type[BaseModel]) -> BaseModel | None:
    try:
        return model.model_validate_json(store.get_bytes(key))
    except NotFound:
        return None
    except ValidationError:  # a record from another rayft version: shown as missing rather than breaking the page
        return None


def read_record(store: Store, run_id: str) -> RunRecord | None:
    return _read(store, record_key(run_id), RunRecord)


def read_progress(store: Store, run_id: str) -> RunProgress | None:
    return _read(store, progress_key(run_id), RunProgress)


def run_ids(store: Store, run_id: str | None = None) -> dict[str, list[str]]:
    """Every run folder under runs/ (or just `run_id`'s) with the names directly in it, folders ending in '/'
    (checkpoints: `step-XXXXXXXX/`), from one listing."""
    found: dict[str, list[str]] = {}
    for key in store.list(run_prefix(validate_run_id(run_id)) if run_id is not None else RUNS_ROOT):
        parts = key.split("/")
        if len(parts) < 3 or not _RUN_ID_RE.fullmatch(parts[1]):
            continue
        entries = found.setdefault(parts[1], [])
        entry = parts[2] if len(parts) == 3 else parts[2] + "/"
        if not entries or entries[-1] != entry:
            entries.append(entry)
    return found


class LogTail:
    """The last console lines of a process, for its progress record."""

    def __init__(self, size: int = LOG_TAIL_LINES):
        self.lines: deque[str] = deque(maxlen=size)

    def add(self, line: str) -> None:
        self.lines.append(line)

    def list(self) -> list[str]:
        return list(self.lines)
