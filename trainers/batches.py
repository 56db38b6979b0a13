"""Where a worker's batches come from (the worker loop's data seam).

The loop asks a `Batches` object for exactly three things: rank `rank`'s micro-batch `micro` of optimizer
step `step`, this rank's eval batches, and one fixed example for the probe. `StreamingBatches` draws them from
the job's preprocessed data (trainers.ingest): the train micro-batches from this worker's Ray Data shard
(`ray.train.get_dataset_shard`), in an order that is a pure function of (seed, step), the eval rows straight
from the preprocessed files.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from trainers.ingest.live import LiveStream
from trainers.ingest.stream import (
    EVAL, TRAIN, WorkerStream, collate, collate_for, first_sequence, iter_examples, part_keys,
)


class Batches(Protocol):
    #: Examples in the train / eval sets (a pass still running during training is waited for).
    train_size: int
    eval_size: int
    #: The preprocessing statistics of the data (kept in the checkpoints: the run's history).
    stats: dict

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """This rank's micro-batch `micro` (0-based) of optimizer step `step` (1-based), padded, on the device.
        A restarted run asks again from its checkpoint's step and must get the same batches."""

    def eval_batches(self, lockstep: bool) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
        """This rank's eval batches, each with whether it counts. `lockstep`: every rank yields the same number
        of batches, topping up with ones that count nothing (ZeRO-3 gathers each layer from all ranks)."""

    def probe_input_ids(self) -> torch.Tensor:
        """One fixed example's input ids, shape (1, n), on the device: the final checkpoint's probe."""

    def describe(self) -> str:
        """The data's sizes for the worker's start-up line (without waiting for a pass still running)."""

    def eval_examples(self) -> list:
        """The whole eval split in a fixed order, the same on every rank (a task metric answers its first rows)."""


class StreamingBatches:
    """The worker's streaming shard of the preprocessed data (see trainers.ingest.stream for the order)."""

    def __init__(self, stream: WorkerStream, batch_size: int, grad_accum: int, pad_id: int, device: torch.device):
        self.stream, self.batch_size, self.grad_accum = stream, batch_size, grad_accum
        self.pad_id, self.device = pad_id, device
        #: examples -> padded batch: the SFT collate, or preference pairs / KTO rows with their own
        self.collate = collate_for(stream.kind, pad_id)
        self._reference: dict[str, tuple[dict[str, torch.Tensor], dict[int, int]]] = {}

    # read from the stream when asked: data still being preprocessed (trainers.ingest.live) knows them at the pass's end
    @property
    def train_size(self) -> int:
        return self.stream.n_train

    @property
    def eval_size(self) -> int:
        return self.stream.n_eval

    @property
    def stats(self) -> dict:
        return self.stream.stats

    def describe(self) -> str:
        return self.stream.describe()

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        examples = self.stream.micro_batch((step - 1) * self.grad_accum + micro)
        return _on(self.collate(self._with_reference(TRAIN, examples)), self.device)

    def eval_batches(self, lockstep: bool) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
        passes = 0
        for batch in self.stream.eval_batches(self.batch_size):
            passes += 1
            yield _on(self.collate(self._with_reference(EVAL, batch)), self.device), True
        while lockstep and passes < self.stream.eval_passes(self.batch_size):
            passes += 1
            yield _on(self.collate(self._with_reference(EVAL, [self.stream.probe_example()])), self.device), False

    def eval_examples(self) -> list:
        # read from the preprocessed files (eval sets are small; training never holds the train split like this)
        return list(iter_examples(self.stream.prepared, EVAL))

    def probe_input_ids(self) -> torch.Tensor:
        return torch.tensor([first_sequence(self.stream.probe_example()).input_ids], device=self.device)

    # --- a precomputed reference (full fine-tuning with a reference objective) -----------------------------

    def examples(self, part: str) -> tuple[Iterator, int]:
        """Every example of `part` ("train" or "eval") in file order, streamed, and how many there are."""
        return iter_examples(self.stream.prepared, part), (self.train_size if part == TRAIN else self.eval_size)

    def attach_reference(self, part: str, table: dict[str, torch.Tensor]) -> None:
        """`table` holds the reference log-probabilities of `part`'s examples in file order; from now on each batch
        carries those of its examples."""
        index = {key: i for i, key in enumerate(part_keys(self.stream.prepared, part))}
        self._reference[part] = (table, index)

    def _with_reference(self, part: str, examples: list) -> list:
        if part not in self._reference:
            return examples
        table, index = self._reference[part]
        for e in examples:
            i = index[e.key]
            e.ref = tuple(table["sums"][i].tolist())
            if "kl_sums" in table:
                e.ref_kl = float(table["kl_sums"][i])
        return examples


def worker_batches(spec, config: dict, world: int, rank: int, pad_id: int, device: torch.device) -> Batches:
    """The batch source of one worker of the job; `config["data"]` is the driver's preprocessed data (SFT rows, or
    the preference rows of a preference objective: the same pipeline)."""
    from trainers.checkpoints import newest_checkpoint

    t = spec.training
    # a fresh run starts at micro-batch 0, known now: its stream starts while the model loads (a resumed run's
    # position is known once its checkpoint is restored)
    fresh = newest_checkpoint(config) is None
    live = config["data"].get("live", False)  # data.preprocess: during (the order of the pass's manifest)
    stream_class = LiveStream if live else WorkerStream
    stream = stream_class(config["data"], micro_batch_size=t.micro_batch_size, seed=t.seed, world=world, rank=rank,
                          start_micro=0 if fresh else None, end_micro=t.max_steps * t.grad_accum)
    return StreamingBatches(stream, t.micro_batch_size, t.grad_accum, pad_id, device)


def examples_batches(examples: list, batch_size: int, pad_id: int, device: torch.device
                     ) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
    """A list of SFT examples as padded batches that all count (for tools and tests, in one process)."""
    for i in range(0, len(examples), batch_size):
        yield _on(collate(examples[i:i + batch_size], pad_id), device), True


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
