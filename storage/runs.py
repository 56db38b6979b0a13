"""Training runs as storage records, so anything that can read the store (the console, a script) can list them.

Layout, next to each run's checkpoints:

    runs/<run_id>/rayft-run.json        the driver's record: job spec, state, times, error (RunRecord)
    runs/<run_id>/rayft-progress.json   rank 0's live progress: step, history, ETA, console tail (RunProgress)
    runs/<run_id>/step-XXXXXXXX/...     checkpoints (trainers.checkpoints)

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


def record_key(run_id: str) -> str:
    return f"{RUNS_ROOT}/{validate_run_id(run_id)}/{RECORD_FILE}"


def progress_key(run_id: str) -> str:
    return f"{RUNS_ROOT}/{validate_run_id(run_id)}/{PROGRESS_FILE}"


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
    for key in store.list(f"{RUNS_ROOT}/{validate_run_id(run_id)}" if run_id is not None else RUNS_ROOT):
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
