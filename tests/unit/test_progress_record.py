"""Rank 0's live progress record (trainers.progress): console lines write it at most once per MIN_INTERVAL_S,
evaluations and checkpoints always do."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from storage.runs import read_progress
from storage.store import open_store
from trainers import progress


def test_console_line_writes_are_throttled_and_evaluation_writes_are_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: clock.now))
    writer = progress.ProgressWriter({"run_id": "r-1", "storage_uri": str(tmp_path)}, max_steps=10)
    store = open_store(str(tmp_path))

    def write(step: int, throttled: bool) -> int:
        writer.write(step, [{"step": s} for s in range(1, step + 1)], None, throttled=throttled)
        return read_progress(store, "r-1").step

    assert write(1, throttled=True) == 1  # the first line always writes
    clock.now += progress.MIN_INTERVAL_S / 2
    assert write(2, throttled=True) == 1  # too soon after the last write: skipped
    assert write(2, throttled=False) == 2  # an evaluation/checkpoint writes whatever the time
    clock.now += progress.MIN_INTERVAL_S * 0.9
    assert write(3, throttled=True) == 2  # counted from the evaluation's write
    clock.now += progress.MIN_INTERVAL_S * 0.1
    assert write(4, throttled=True) == 4
    assert [row["step"] for row in read_progress(store, "r-1").history] == [1, 2, 3, 4]
