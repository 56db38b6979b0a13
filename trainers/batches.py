"""Where a worker's batches come from (the worker loop's data seam).

The loop asks a `Batches` object for exactly three things: rank `rank`'s micro-batch `micro` of optimizer
step `step`, this rank's eval batches, and one fixed example for the probe. `InMemoryBatches` builds the
tokenized datasets in the worker (`trainers.data.build_datasets`) and draws from them; a streaming source
(Ray Data's `ray.train.get_dataset_shard`) replaces it by implementing the same protocol and being returned
by `worker_batches`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol

import torch

from trainers import data as data_mod
from trainers.spec import JobSpec, TrainingSpec


class Batches(Protocol):
    #: Examples in the train / eval sets and rows skipped as malformed (for the start-up line).
    train_size: int
    eval_size: int
    skipped_rows: int

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """This rank's micro-batch `micro` (0-based) of optimizer step `step` (1-based), padded, on the device.
        A restarted run asks again from its checkpoint's step and must get the same batches."""

    def eval_batches(self, lockstep: bool) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
        """This rank's eval batches, each with whether it counts. `lockstep`: every rank yields the same number
        of batches, topping up with ones that count nothing (ZeRO-3 gathers each layer from all ranks)."""

    def probe_input_ids(self) -> torch.Tensor:
        """One fixed example's input ids, shape (1, n), on the device: the final checkpoint's probe."""

    def eval_examples(self) -> list:
        """The whole eval split in a fixed order, the same on every rank (a task metric answers its first rows)."""


class InMemoryBatches:
    """The whole tokenized dataset in each worker's memory; batches drawn by index, a pure function of
    (seed, step, micro): a resumed run replays exactly the batches it would have seen."""

    def __init__(self, datasets: data_mod.Datasets, training: TrainingSpec, world: int, rank: int, pad_id: int, device: torch.device,
                 collate=None):
        self.datasets, self.training = datasets, training
        #: examples -> padded batch (default: the SFT collate; preference pairs bring their own)
        self.collate = collate or (lambda examples: data_mod.collate(examples, pad_id))
        self.world, self.rank, self.pad_id, self.device = world, rank, pad_id, device
        self.train_size, self.eval_size = len(datasets.train), len(datasets.eval)
        self.skipped_rows = datasets.skipped_rows

    def train_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        return micro_batch(self.datasets.train, self.training, step, micro, self.world, self.rank, self.pad_id, self.device,
                           self.collate)

    def eval_batches(self, lockstep: bool) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
        yield from eval_batches(self.datasets.eval, self.training.micro_batch_size, self.pad_id, self.device,
                                self.world, self.rank, lockstep, self.collate)

    def eval_examples(self) -> list:
        return self.datasets.eval

    def probe_input_ids(self) -> torch.Tensor:
        from trainers.objectives.runtime import first_sequence

        example = first_sequence((self.datasets.eval or self.datasets.train)[0])
        return torch.tensor([example.input_ids], device=self.device)


def worker_batches(spec: JobSpec, tokenizer, world: int, rank: int, pad_id: int, device: torch.device) -> Batches:
    """The batch source of one worker of the job: the SFT shapes, or preference rows for a preference objective."""
    from trainers.objectives import objective_module

    kind = objective_module(spec.objective.name).DATA
    if kind != "text":
        from trainers.preference_data import build_preference_datasets, collate_preference

        datasets = build_preference_datasets(spec.data, tokenizer, spec.training.seed, kind)
        return InMemoryBatches(datasets, spec.training, world, rank, pad_id, device, lambda ex: collate_preference(ex, pad_id))
    datasets = data_mod.build_datasets(spec.data, tokenizer, spec.training.seed)
    return InMemoryBatches(datasets, spec.training, world, rank, pad_id, device)


def micro_batch(train: list, tcfg: TrainingSpec, step: int, micro: int, world: int, rank: int, pad_id: int,
                device: torch.device, collate=None) -> dict[str, torch.Tensor]:
    """Rank `rank`'s micro-batch `micro` of optimizer step `step` (1-based) of `train`, padded and on `device`."""
    idx = data_mod.micro_batch_indices(
        len(train), step_micro=(step - 1) * tcfg.grad_accum + micro,
        micro_batch_size=tcfg.micro_batch_size, world=world, rank=rank, seed=tcfg.seed,
    )
    examples = [train[i] for i in idx]
    return _on(collate(examples) if collate else data_mod.collate(examples, pad_id), device)


def eval_batches(examples: list, batch_size: int, pad_id: int, device: torch.device, world: int, rank: int,
                 lockstep: bool = False, collate=None) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
    """Rank `rank`'s share of `examples` as padded batches on `device`, each with whether it counts."""
    batches = [(batch, True) for batch in data_mod.eval_batches(examples, batch_size, world, rank)]
    if lockstep:
        most = math.ceil(math.ceil(len(examples) / world) / batch_size)
        batches += [(examples[:1], False)] * (most - len(batches))
    for batch, counts in batches:
        yield _on(collate(batch) if collate else data_mod.collate(batch, pad_id), device), counts


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
