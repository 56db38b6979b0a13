"""Training while the data is preprocessed (`data.preprocess: during`).

A first run over a large corpus otherwise waits for the whole pass before its first step (at 3.2M rows on 2
cores, two minutes). Here the driver runs the same Ray Data pass (`prepare.prepare_data`) on a thread, in data
order, and after each block rewrites a manifest, `live.json` in the preprocessed dataset's directory: the files
written so far, in data order, then `done` with the finished dataset's `Prepared`, or the pass's error. The
workers start at once and read the files as they appear.

Order and resume: a worker keeps the train examples `i % world == rank` (i counts examples over the files in
manifest order, which is data order), re-cut into blocks of BLOCK_ROWS rows so that the order does not depend on
how the pass cut its files, and shuffles them in the same seeded window as the streaming path
(`stream.shuffled`). Micro-batch k of the run is therefore a function of (seed, k): a restarted worker reads the
manifest from the start and skips to its position. Every epoch reads the files in data order, shuffled in that
window with a seed of (seed, epoch); an epoch's length, (n_train // world) // micro_batch_size micro-batches, is
known when the pass ends, which is before the first epoch does. Evaluation waits for the pass (the held-out rows
are spread over the whole input), and so does the run's end: the driver publishes nothing before the pass is done,
so a bad row anywhere still fails the run, with its file and line (the checkpoints so far are kept).

Workers read the preprocessed files themselves (every worker reads every file and keeps its share) rather than
through Ray Data's streaming split, whose dataset must be whole when the trainer is built.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Callable, Iterator

import numpy as np

from trainers.ingest.prepared import BLOCK_ROWS, Prepared
from trainers.ingest.sources import DataError, filesystem_for
from trainers.ingest.stream import (
    EVAL, FETCH_MICRO_BATCHES, SHUFFLE_WINDOW, TRAIN, WorkerStream, _rows, micro_batches_per_epoch, read_columns, shuffled,
    to_examples,
)

MANIFEST = "live.json"
#: How often a worker waiting for more preprocessed files reads the manifest again.
POLL_S = 0.5

_RUNNING: dict[str, "LivePass"] = {}


class LivePass:
    """The driver's side: `run(on_block)` (the whole pass; it calls `on_block(paths)` with each block's files, in data
    order, and returns the finished `Prepared`) runs on a thread while training starts. `check(prepared)` raises a
    DataError for a finished dataset the job cannot train on (too few examples for its batch)."""

    def __init__(self, run: Callable, prepared: Prepared, out_fs, out_dir: str, check: Callable[[Prepared], None]):
        self.prepared = prepared  # what the workers get: the dataset's place, `live` set
        self._fs, self._dir = out_fs, out_dir
        self._files: dict[str, list[str]] = {TRAIN: [], EVAL: []}
        self._result: Prepared | None = None
        self._error: BaseException | None = None
        self._write(done=False)
        self._thread = threading.Thread(target=self._run, args=(run, check), name="rayft-live-pass", daemon=True)
        self._thread.start()
        _RUNNING[prepared.key] = self

    def _run(self, run: Callable, check: Callable[[Prepared], None]) -> None:
        try:
            result = run(self._on_block)
            check(result)
            self._result = result
            self._write(done=True, prepared=result.to_json())
        except BaseException as exc:  # the workers stop on it; `wait` raises it on the driver
            self._error = exc
            self._write(done=False, error=str(exc) or type(exc).__name__)

    def _on_block(self, paths: list[str]) -> None:
        for path in paths:
            self._files[EVAL if path.startswith(f"{self._dir}/eval/") else TRAIN].append(path)
        self._write(done=False)

    def _write(self, **state) -> None:
        # written whole then moved into place: a worker never reads half a manifest (an S3 move is a copy, also whole)
        tmp = f"{self._dir}/{MANIFEST}.tmp"
        with self._fs.open_output_stream(tmp) as f:
            f.write(json.dumps({**self._files, "error": None, **state}).encode())
        self._fs.move(tmp, f"{self._dir}/{MANIFEST}")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self) -> Prepared:
        """The finished dataset; raises the pass's error."""
        self._thread.join()
        _RUNNING.pop(self.prepared.key, None)
        if self._error is not None:
            raise self._error
        return self._result

    def stopped_on(self, timeout_s: float) -> BaseException | None:
        """The error the pass stopped on, or None (a pass that has one is stopping: up to `timeout_s` for it to end)."""
        if self._error is not None:
            self._thread.join(timeout_s)
        return self._error


def live_pass(prepared: Prepared) -> LivePass | None:
    """The running pass behind `prepared` (on the driver that started it), if any."""
    return _RUNNING.get(prepared.key) if prepared.live else None


class LiveManifest:
    """A worker's view of the manifest."""

    def __init__(self, prepared: Prepared):
        self.prepared = prepared
        self.fs, base = filesystem_for(prepared.uri)
        self.path = f"{base}/{MANIFEST}"
        self._final: Prepared | None = None
        self._checked_at = -float("inf")

    def read(self) -> dict:
        with self.fs.open_input_stream(self.path) as f:
            state = json.loads(f.read())
        if state.get("error"):
            raise DataError(state["error"])
        return state

    def final(self) -> Prepared:
        """The finished dataset (waits for the pass)."""
        while not self._finished(self.read()):
            time.sleep(POLL_S)
        return self._final

    def done(self) -> bool:
        """Whether the pass has finished (without waiting; the manifest is read again at most every POLL_S: this is
        asked at every micro-batch)."""
        if self._final is None and time.monotonic() - self._checked_at >= POLL_S:
            self._checked_at = time.monotonic()
            self._finished(self.read())
        return self._final is not None

    def _finished(self, state: dict) -> bool:
        if state["done"] and self._final is None:
            self._final = Prepared.from_json(state["prepared"])
            self._final.eval_limit = self.prepared.eval_limit
        return self._final is not None

    def rank_blocks(self, world: int, rank: int, columns: list[str]) -> Iterator:
        """This rank's train examples (`i % world == rank`), in data order, as Arrow tables of BLOCK_ROWS rows (the
        last one shorter); waits for the pass to write more, and ends when it is done."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        taken, offset, held = 0, 0, None
        while True:
            state = self.read()
            files = state[TRAIN]
            if taken == len(files):
                if self._finished(state):  # known from here on: the epoch's end is decided by it
                    break
                time.sleep(POLL_S)
                continue
            for path in files[taken:]:
                with self.fs.open_input_file(path) as f:
                    table = pq.read_table(f, columns=columns)
                first = (rank - offset) % world
                mine = table.take(pa.array(np.arange(first, table.num_rows, world)))
                offset += table.num_rows
                held = mine if held is None else pa.concat_tables([held, mine])
                while held.num_rows >= BLOCK_ROWS:
                    yield held.slice(0, BLOCK_ROWS).combine_chunks()
                    held = held.slice(BLOCK_ROWS)
            taken = len(files)
        if held is not None and held.num_rows:
            yield held.combine_chunks()


class LiveStream(WorkerStream):
    """A worker's stream of a dataset preprocessed while the job trains (SFT rows): `WorkerStream`'s interface, the
    train micro-batches read from the manifest's files; the counts, eval rows and probe wait for the pass."""

    def __init__(self, data: dict, *, micro_batch_size: int, seed: int, world: int, rank: int,
                 start_micro: int | None = None, end_micro: int | None = None):
        self.manifest = LiveManifest(Prepared.from_json(data))
        self.micro_batch_size, self.seed, self.world, self.rank = micro_batch_size, seed, world, rank
        self.end_micro = end_micro
        self._batches: Iterator[list] | None = None
        self._next = 0
        self._probe = None

    @property
    def prepared(self) -> Prepared:
        return self.manifest.final()

    @property
    def kind(self) -> str:
        return self.manifest.prepared.kind  # known before the pass ends

    @property
    def stats(self) -> dict:
        """The preprocessing statistics once the pass is done; until then, that it is running."""
        return self.prepared.stats if self.manifest.done() else {"preprocessing": "running"}

    def describe(self) -> str:
        if not self.manifest.done():
            return "train / eval examples: preprocessing while training (data.preprocess: during)"
        return super().describe().replace("(streamed)", "(streamed in the pass's order)")

    def _per_epoch(self) -> int | None:
        """Micro-batches per epoch, once the pass is done."""
        if not self.manifest.done():
            return None
        return micro_batches_per_epoch(self.n_train, self.world, self.micro_batch_size)

    def _stream_from(self, index: int) -> Iterator[list]:
        per_epoch = self._per_epoch()
        epoch, skip = divmod(index, per_epoch) if per_epoch else (0, index)  # still running: epoch 1
        fetch = self.micro_batch_size * FETCH_MICRO_BATCHES
        columns = read_columns(self.manifest.prepared)
        while True:
            rng = np.random.default_rng([self.seed, epoch])
            blocks = self.manifest.rank_blocks(self.world, self.rank, columns)
            i = 0
            for batch in shuffled(blocks, SHUFFLE_WINDOW, fetch, rng):
                for start in range(0, _rows(batch) - self.micro_batch_size + 1, self.micro_batch_size):
                    per_epoch = self._per_epoch()
                    if per_epoch is not None and i >= per_epoch:
                        break  # the epoch's last rows that fill no whole micro-batch (every worker has as many)
                    if i >= skip:
                        yield to_examples({k: v[start : start + self.micro_batch_size] for k, v in batch.items()}, self.kind)
                    i += 1
            epoch, skip = epoch + 1, 0
