"""Rank 0's live progress record (`storage.runs.RunProgress`): what the console's run page shows while a run trains.

Written at console lines (at most once a second: a step of a few milliseconds would otherwise spend a tenth of its
time writing and syncing the record) and at every evaluation/checkpoint, into `runs/<run_id>/rayft-progress.json` next to
the checkpoints. Best effort: a store that cannot take the write costs one warning line, never the run.
"""

from __future__ import annotations

import sys
import time

from storage.runs import LogTail, RunProgress, now, write_progress
from storage.store import open_store

#: Rank 0's console lines of this process (a worker process trains one run at a time).
TAIL = LogTail()
#: The least time between two console-line writes of the record (evaluations and checkpoints always write).
MIN_INTERVAL_S = 1.0


class ProgressWriter:
    """Writes one run's progress record; a no-op without a storage URI or run id (a loop driven outside trainers.run)."""

    def __init__(self, config: dict, max_steps: int):
        self.run_id = config.get("run_id")
        self.storage_uri = config.get("storage_uri")
        self.max_steps = max_steps
        self.store = None
        self.failed = False
        self._written_at = float("-inf")
        if self.run_id and self.storage_uri:
            try:
                self.store = open_store(self.storage_uri)
            except Exception as err:  # the checkpoints will say the same; the run still trains
                self._give_up(err)

    def write(self, step: int, history: list[dict], eta_s: float | None, *, throttled: bool = False) -> None:
        """Write the record; `throttled` (a console line) skips the write if the last one is under MIN_INTERVAL_S old."""
        if self.store is None or self.failed:
            return
        if throttled and time.monotonic() - self._written_at < MIN_INTERVAL_S:
            return
        self._written_at = time.monotonic()
        try:
            write_progress(self.store, RunProgress(run_id=self.run_id, step=step, max_steps=self.max_steps, eta_s=eta_s,
                                                   history=history, log_tail=TAIL.list(), updated_at=now()))
        except Exception as err:
            self._give_up(err)

    def _give_up(self, err: Exception) -> None:
        self.failed = True
        print(f"[rayft] warning: progress record not written ({type(err).__name__}: {err}); training goes on",
              file=sys.__stdout__, flush=True)
