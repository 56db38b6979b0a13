"""The worker side: Ray Train hands each worker its streaming shard of the preprocessed data
(`TorchTrainer(datasets=...)` → `ray.train.get_dataset_shard`), and these helpers turn it into
micro-batches in a known, seeded order.

Eval rows are read by each worker straight from the preprocessed Parquet files (`iter_examples`): an eval
pass is small and frequent, and starting a Ray Data execution for each would cost more than the pass.

Order and resume: the train dataset is the preprocessed Parquet files in a seeded file order, executed
with `preserve_order`, so Ray Data's streaming split hands each worker the same rows every time
(equal shards of `n_train // world` rows). Each epoch shuffles them locally with a seed of (seed, epoch).
Every worker therefore sees `micro_batches_per_epoch` full micro-batches per epoch, and micro-batch k
of the run is batch `k % M` of epoch `k // M`: a pure function of (seed, step). A resumed worker
re-creates that epoch's iterator and skips to its position.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from trainers.ingest.formats import IGNORE
from trainers.ingest.prepared import BLOCK_ROWS, Prepared
from trainers.ingest.sources import filesystem_for, read_prepared_files

TRAIN, EVAL = "train", "eval"
#: Rows each worker shuffles among while streaming (a window, not the whole shard: memory stays flat).
SHUFFLE_WINDOW = 8192
#: Preprocessed files read at once while training. The reads reserve no CPU (below), so without a cap Ray Data
#: started a read task, and a worker process for it, for file after file of a large dataset at once, on the CPUs
#: the training step needed (data bench, 3.2M rows, ~780 files: steady tokens/s fell to 0.17x of the in-memory
#: path; capped: the same as at 20,000 rows).
READ_TASKS = 2
#: Micro-batches cut from each draw of the shuffle window at once (see `shuffled`): per row, slicing and converting
#: 512 rows at a time cost a tenth of what 8 at a time did (it runs on the training thread).
FETCH_MICRO_BATCHES = 64


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class PairExample:
    """A preference pair (DPO, ORPO, SimPO)."""

    chosen: Example
    rejected: Example
    #: reference log-probabilities (chosen, rejected), when precomputed (full fine-tuning)
    ref: tuple[float, float] | None = None
    #: where the row came from (`row_key`): finds its precomputed reference
    key: int | None = None


@dataclass
class UnpairedExample:
    """A KTO row: its completion, its KL sequence (its prompt with another row's completion) and its label."""

    completion: Example
    kl: Example
    label: bool
    ref: tuple[float] | None = None
    ref_kl: float | None = None
    key: int | None = None


def row_key(src: int, row: int) -> int:
    """One int per preprocessed row of a part (a file's `_row`s are all line numbers or all encoded indices)."""
    return int(src) * (1 << 40) + int(row)


def read_columns(prepared) -> list[str]:
    """The columns a worker reads: the examples', and for preference rows where each came from."""
    return list(prepared.columns) + (["_src", "_row"] if prepared.kind != "text" else [])


def to_examples(columns: dict, kind: str) -> list:
    """Rows of the preprocessed columns (lists or numpy arrays per column) → examples of the objective's `kind`."""
    def seq(prefix: str, i: int) -> Example:
        return Example(_ints(columns[prefix + "input_ids"][i]), _ints(columns[prefix + "labels"][i]))

    n = len(next(iter(columns.values())))
    if kind == "text":
        return [seq("", i) for i in range(n)]
    keys = [row_key(s, r) for s, r in zip(columns["_src"], columns["_row"])]
    if kind == "paired":
        return [PairExample(seq("chosen_", i), seq("rejected_", i), key=keys[i]) for i in range(n)]
    return [UnpairedExample(seq("", i), seq("kl_", i), bool(columns["label"][i]), key=keys[i]) for i in range(n)]


def _ints(values) -> list[int]:
    """A token column's cell (a list from pyarrow, or a numpy array) as Python ints."""
    return values if isinstance(values, list) else values.tolist()


def micro_batches_per_epoch(n_train: int, world: int, micro_batch_size: int) -> int:
    """Full micro-batches each worker gets per epoch (the streaming split gives every worker n_train // world rows)."""
    return (n_train // world) // micro_batch_size


def steps_per_epoch(n_train: int, world: int, micro_batch_size: int, grad_accum: int) -> int:
    return micro_batches_per_epoch(n_train, world, micro_batch_size) // grad_accum


def train_dataset(prepared, seed: int):
    """The Ray Dataset of preprocessed training examples, files in a seeded order (a lazy read, one file per task).

    The reading tasks reserve no CPU: while training runs, its workers may hold every CPU of the cluster (one worker
    on a 2-core laptop takes both), and a read that waited for a CPU would never start. `read_parquet` cannot do
    that (its file-listing step always asks for one CPU), hence a map over the file names. The map's function
    lives in a module that does not import torch: each epoch's read tasks may start fresh Ray worker processes,
    and importing this module there cost 3.4 s at each epoch's first batch (data bench, 2 cores)."""
    import ray.data

    files = list(prepared.train_files)
    random.Random(seed).shuffle(files)
    fs, _ = filesystem_for(prepared.uri)
    ds = ray.data.from_items([{"path": p} for p in files]).map_batches(
        read_prepared_files, batch_size=1, batch_format="pyarrow", num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=READ_TASKS),
        fn_kwargs={"filesystem": fs, "columns": read_columns(prepared)},
    )
    # the workers' console shows training progress; Ray Data's bars for each epoch's read would drown it
    ds.context.enable_progress_bars = False
    return ds


def trainer_datasets(prepared, seed: int) -> tuple[dict, object]:
    """`datasets=` and `dataset_config=` for the TorchTrainer: the train examples, split across the workers in a
    fixed order. (Eval rows are read by each worker straight from the preprocessed Parquet files: an eval pass is
    small and frequent, and a Ray Data execution per pass would cost more than the pass.)"""
    import ray.train
    from ray.data import ExecutionOptions

    config = ray.train.DataConfig(datasets_to_split=[TRAIN], execution_options=ExecutionOptions(preserve_order=True))
    return {TRAIN: train_dataset(prepared, seed)}, config


def read_examples(prepared, part: str = EVAL) -> list[Example]:
    """Every preprocessed example of `part` in file order, in memory: for tools and tests on small data
    (training never does this; it streams)."""
    return list(iter_examples(prepared, part))


def train_micro_batches(shard, *, n_train: int, world: int, micro_batch_size: int, seed: int,
                        start_micro: int = 0, kind: str = "text", end_micro: int | None = None) -> Iterator[list]:
    """This worker's micro-batches from micro-batch `start_micro` (0-based, counted over the whole run) on, forever.
    `end_micro`: the run's micro-batch count, if known (no pass is started early for an epoch the run never reaches).

    Each epoch is one pass of the shard, taken from Ray Data a block at a time and shuffled here in a seeded window
    (`shuffled`). The next epoch's pass is started on a thread as soon as this one's last block has arrived: starting
    an epoch (a new Ray Data execution, its read tasks' processes) took 3.6 s on 2 cores, a stall at every epoch
    boundary, and the rows still in the window cover it."""
    per_epoch = micro_batches_per_epoch(n_train, world, micro_batch_size)
    if per_epoch < 1:
        raise ValueError(f"{n_train} training examples are too few for {world} worker(s) × micro_batch_size {micro_batch_size}")
    epoch, skip = divmod(start_micro, per_epoch)
    window = max(micro_batch_size, min(SHUFFLE_WINDOW, n_train // world))
    fetch = micro_batch_size * FETCH_MICRO_BATCHES

    def epoch_blocks():
        # 4,096 rows at a time: with batch_size=None (whole blocks) Ray Data fetched far ahead (data bench, 3.2M rows
        # when a block was 1.56M rows: worker peak RSS 1.23 GiB instead of 0.94, steady tokens/s 0.72x)
        return shard.iter_batches(batch_size=BLOCK_ROWS, batch_format="pyarrow", prefetch_batches=1)

    # the first pass starts now, not at the first micro-batch: the caller may have a model to load meanwhile
    return _micro_batches(EpochStart(epoch_blocks), epoch_blocks, epoch, skip, per_epoch, window, fetch, seed, micro_batch_size,
                          kind, end_micro)


def _micro_batches(upcoming, epoch_blocks, epoch: int, skip: int, per_epoch: int, window: int, fetch: int, seed: int,
                   micro_batch_size: int, kind: str, end_micro: int | None = None) -> Iterator[list]:
    while True:
        blocks, i = upcoming or EpochStart(epoch_blocks), 0
        upcoming = None

        def start_next():
            nonlocal upcoming
            # a pass started for an epoch the run does not reach took the step's CPUs for nothing (data bench,
            # 20k rows, 2,000 steps on 2 cores: steps/s fell from ~90 to ~40 while it started)
            if end_micro is None or (epoch + 1) * per_epoch < end_micro:
                upcoming = EpochStart(epoch_blocks)

        rng = np.random.default_rng([seed, epoch])
        for batch in shuffled(blocks.blocks(), window, fetch, rng, on_exhausted=start_next):
            rows = _rows(batch)
            for start in range(0, rows - micro_batch_size + 1, micro_batch_size):
                if i >= per_epoch:
                    break  # the epoch's last rows that fill no whole micro-batch (every worker has as many)
                if i >= skip:
                    yield to_examples({k: v[start : start + micro_batch_size] for k, v in batch.items()}, kind)
                i += 1
        epoch, skip = epoch + 1, 0  # `shuffled` has started the next pass (`on_exhausted`)


class EpochStart:
    """One pass of a worker's shard, its first block fetched on a thread: the pass's Ray Data execution starts while
    the worker trains on what it already has."""

    _END = object()

    def __init__(self, make_iterator):
        import threading

        self._iterator = None
        self._first = self._END
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, args=(make_iterator,), name="rayft-epoch-start", daemon=True)
        self._thread.start()

    def _start(self, make_iterator) -> None:
        try:
            self._iterator = iter(make_iterator())
            self._first = next(self._iterator, self._END)
        except BaseException as exc:  # re-raised in the training thread by blocks()
            self._error = exc

    def blocks(self) -> Iterator["pyarrow.Table"]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is self._END:
            return
        yield self._first
        yield from self._iterator


def shuffled(blocks: Iterator, window: int, fetch: int, rng: np.random.Generator, on_exhausted=None) -> Iterator[dict]:
    """Arrow blocks → batches of `fetch` rows (columns as lists) in a seeded order: each batch is drawn at random
    from the next `window` + `fetch` rows (a local shuffle: memory stays bounded). `on_exhausted()` is called once
    the last block has been read, before the rows still held are handed out."""
    import pyarrow as pa

    held = None
    for block in blocks:
        held = block if held is None else pa.concat_tables([held, block])
        while held.num_rows >= window + fetch:
            pick = rng.choice(held.num_rows, fetch, replace=False)
            yield _columns(held.take(pick))
            keep = np.ones(held.num_rows, dtype=bool)
            keep[pick] = False
            held = held.filter(pa.array(keep)).combine_chunks()
    if on_exhausted is not None:
        on_exhausted()
    if held is not None:
        order = rng.permutation(held.num_rows)
        for start in range(0, len(order), fetch):
            yield _columns(held.take(order[start : start + fetch]))


def _rows(columns: dict) -> int:
    return len(next(iter(columns.values())))


def _columns(table) -> dict[str, list]:
    return {name: table.column(name).to_pylist() for name in table.column_names}


def iter_examples(prepared, part: str = EVAL, chunk: int = 1024) -> Iterator:
    """The preprocessed examples of `part` in file order, streamed from the Parquet files (bounded memory)."""
    import pyarrow.parquet as pq

    fs, _ = filesystem_for(prepared.uri)
    names = read_columns(prepared)
    left = prepared.n_train if part == TRAIN else prepared.n_evaluated
    for path in prepared.train_files if part == TRAIN else prepared.eval_files:
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=chunk, columns=names):
                examples = to_examples({n: batch.column(n).to_pylist() for n in names}, prepared.kind)[:left]
                yield from examples
                left -= len(examples)
                if left <= 0:
                    return


def part_keys(prepared, part: str) -> list[int]:
    """`row_key` of every example of `part`, in file order (the index of a precomputed reference table)."""
    import pyarrow.parquet as pq

    fs, _ = filesystem_for(prepared.uri)
    keys: list[int] = []
    wanted = prepared.n_train if part == TRAIN else prepared.n_evaluated
    for path in prepared.train_files if part == TRAIN else prepared.eval_files:
        if len(keys) >= wanted:
            break
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=["_src", "_row"])
        keys += [row_key(s, r) for s, r in zip(table.column(0).to_pylist(), table.column(1).to_pylist())]
    return keys[:wanted]


def eval_batches(prepared, batch_size: int, world: int, rank: int) -> Iterator[list]:
    """This worker's share of the eval set (every `world`-th row from `rank`), in file order."""
    mine: list[Example] = []
    for seen, ex in enumerate(iter_examples(prepared, EVAL)):
        if seen % world == rank:
            mine.append(ex)
            if len(mine) == batch_size:
                yield mine
                mine = []
    if mine:
        yield mine


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    # numpy rows from Python lists, then one tensor each: a tenth of the time of a torch.tensor per row, which
    # showed in the profile of a small model's steps
    width = max(len(e.input_ids) for e in examples)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE, dtype=np.int64)
    attn = np.zeros((len(examples), width), dtype=np.int64)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = e.input_ids
        labels[i, : len(e.labels)] = e.labels
        attn[i, : len(e.input_ids)] = 1
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels), "attention_mask": torch.from_numpy(attn)}


def _pad(examples: list[Example], pad_id: int, prefix: str = "") -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in collate(examples, pad_id).items()}


def collate_preference(examples: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Pairs as one batch of 2·B rows (every chosen, then every rejected); KTO rows with labels and KL sequences.
    Precomputed reference log-probabilities ride along as `ref_sums` (and `ref_kl_sums`)."""
    if isinstance(examples[0], PairExample):
        batch = _pad([e.chosen for e in examples] + [e.rejected for e in examples], pad_id)
        if all(e.ref is not None for e in examples):
            batch["ref_sums"] = torch.tensor([e.ref[0] for e in examples] + [e.ref[1] for e in examples])
        return batch
    batch = {**_pad([e.completion for e in examples], pad_id), **_pad([e.kl for e in examples], pad_id, "kl_")}
    batch["kto_labels"] = torch.tensor([e.label for e in examples])
    if all(e.ref is not None for e in examples):
        batch["ref_sums"] = torch.tensor([e.ref[0] for e in examples])
        batch["ref_kl_sums"] = torch.tensor([e.ref_kl for e in examples])
    return batch


def collate_for(kind: str, pad_id: int):
    """examples -> padded batch, for the rows of `kind` ("text": SFT; preference rows bring their own)."""
    if kind == "text":
        return lambda examples: collate(examples, pad_id)
    return lambda examples: collate_preference(examples, pad_id)


def first_sequence(example) -> Example:
    """The example's first token sequence: itself (SFT), its chosen response (pairs) or its completion (KTO)."""
    return getattr(example, "chosen", None) or getattr(example, "completion", None) or example


class WorkerStream:
    """One worker's view of the job's data: its streaming train shard (`ray.train.get_dataset_shard`), the eval
    rows it evaluates, the counts. `data` is the driver's `Prepared` (trainers.ingest.prepare) as JSON."""

    def __init__(self, data: dict, *, micro_batch_size: int, seed: int, world: int, rank: int, start_micro: int | None = None,
                 end_micro: int | None = None):
        import ray.train

        self.prepared = Prepared.from_json(data)
        self.micro_batch_size, self.seed, self.world, self.rank = micro_batch_size, seed, world, rank
        self.end_micro = end_micro  # the run's micro-batches per worker (max_steps x grad_accum)
        self.train_shard = ray.train.get_dataset_shard(TRAIN)
        self._batches: Iterator[list] | None = None
        self._next = 0  # the run-wide index of the micro-batch `_batches` yields next
        self._probe: Example | None = None
        if start_micro is not None:  # the first epoch's Ray Data execution starts while the worker loads its model
            self._batches, self._next = self._stream_from(start_micro), start_micro

    @property
    def n_train(self) -> int:
        return self.prepared.n_train

    @property
    def n_eval(self) -> int:
        return self.prepared.n_evaluated

    @property
    def stats(self) -> dict:
        return self.prepared.stats

    @property
    def kind(self) -> str:
        return self.prepared.kind

    def describe(self) -> str:
        skipped = self.stats.get("bad_rows_skipped", 0)
        return f"train {self.n_train} / eval {self.n_eval} examples (streamed)" + (f", {skipped} bad rows skipped" if skipped else "")

    def micro_batch(self, index: int) -> list:
        """This worker's micro-batch number `index` (0-based, over the whole run). Asked in order, it streams;
        asked out of order (a resumed run's first batch), the stream is positioned there first."""
        if self._batches is None or index != self._next:
            self._batches = self._stream_from(index)
        self._next = index + 1
        return next(self._batches)

    def _stream_from(self, index: int) -> Iterator[list]:
        return train_micro_batches(self.train_shard, n_train=self.n_train, world=self.world, micro_batch_size=self.micro_batch_size,
                                   seed=self.seed, start_micro=index, kind=self.kind, end_micro=self.end_micro)

    def eval_batches(self, batch_size: int) -> Iterator[list]:
        return eval_batches(self.prepared, batch_size, self.world, self.rank)

    def eval_passes(self, batch_size: int) -> int:
        """Eval batches the busiest worker has (ZeRO-3 ranks run in lockstep)."""
        return -(-(-(-self.n_eval // self.world)) // batch_size)

    def probe_example(self):
        """A fixed example for the final-model probe and lockstep fillers: the first eval row, else the first train row."""
        if self._probe is None:
            part = EVAL if self.n_eval else TRAIN
            self._probe = next(iter_examples(self.prepared, part))
        return self._probe
