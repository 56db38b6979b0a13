"""The worker side: Ray Train hands each worker its streaming shard of the preprocessed data
(`TorchTrainer(datasets=...)` → `ray.train.get_dataset_shard`), and these helpers turn it into
micro-batches in a known, seeded order.

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

import torch

from trainers.ingest.formats import IGNORE

TRAIN, EVAL = "train", "eval"
#: Rows each worker shuffles among while streaming (a window, not the whole shard: memory stays flat).
SHUFFLE_WINDOW = 8192


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def micro_batches_per_epoch(n_train: int, world: int, micro_batch_size: int) -> int:
    """Full micro-batches each worker gets per epoch (the streaming split gives every worker n_train // world rows)."""
    return (n_train // world) // micro_batch_size


def steps_per_epoch(n_train: int, world: int, micro_batch_size: int, grad_accum: int) -> int:
    return micro_batches_per_epoch(n_train, world, micro_batch_size) // grad_accum


def train_dataset(prepared, seed: int):
    """The Ray Dataset of preprocessed training examples, files in a seeded order (a lazy Parquet read)."""
    import ray.data

    from trainers.ingest.sources import filesystem_for

    files = list(prepared.train_files)
    random.Random(seed).shuffle(files)
    fs, _ = filesystem_for(prepared.uri)
    return ray.data.read_parquet(files, filesystem=fs, columns=["input_ids", "labels"])


def eval_dataset(prepared):
    import ray.data

    from trainers.ingest.sources import filesystem_for

    fs, _ = filesystem_for(prepared.uri)
    return ray.data.read_parquet(list(prepared.eval_files), filesystem=fs, columns=["input_ids", "labels"])


def trainer_datasets(prepared, seed: int) -> tuple[dict, object]:
    """`datasets=` and `dataset_config=` for the TorchTrainer: train split across workers in a fixed order,
    eval read whole by every worker (each takes its own rows)."""
    import ray.train
    from ray.data import ExecutionOptions

    datasets = {TRAIN: train_dataset(prepared, seed)}
    if prepared.eval_files:
        datasets[EVAL] = eval_dataset(prepared)
    config = ray.train.DataConfig(datasets_to_split=[TRAIN], execution_options=ExecutionOptions(preserve_order=True))
    return datasets, config


def _examples(batch: dict) -> list[Example]:
    return [Example([int(t) for t in ids], [int(t) for t in labels]) for ids, labels in zip(batch["input_ids"], batch["labels"])]


def train_micro_batches(shard, *, n_train: int, world: int, micro_batch_size: int, seed: int,
                        start_micro: int = 0) -> Iterator[list[Example]]:
    """This worker's micro-batches from micro-batch `start_micro` (0-based, counted over the whole run) on, forever."""
    per_epoch = micro_batches_per_epoch(n_train, world, micro_batch_size)
    if per_epoch < 1:
        raise ValueError(f"{n_train} training examples are too few for {world} worker(s) × micro_batch_size {micro_batch_size}")
    epoch, skip = divmod(start_micro, per_epoch)
    window = max(micro_batch_size, min(SHUFFLE_WINDOW, n_train // world))
    while True:
        batches = shard.iter_batches(
            batch_size=micro_batch_size, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=window, local_shuffle_seed=seed * 1_000_003 + epoch,
        )
        for i, batch in enumerate(batches):
            if i >= skip:
                yield _examples(batch)
        epoch, skip = epoch + 1, 0


def eval_batches(shard, batch_size: int, world: int, rank: int) -> Iterator[list[Example]]:
    """This worker's share of the eval set (every `world`-th row from `rank`), in file order."""
    mine: list[Example] = []
    seen = 0
    for batch in shard.iter_batches(batch_size=1024, batch_format="numpy"):
        for ex in _examples(batch):
            if seen % world == rank:
                mine.append(ex)
                if len(mine) == batch_size:
                    yield mine
                    mine = []
            seen += 1
    if mine:
        yield mine


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        attn[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}
