"""Driver decisions that need no Ray cluster: the checkpoint to publish, the CPUs per worker."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import ray.train

from trainers.checkpoints import STATE_NAME
from trainers.run import cpus_for_cpu_workers, final_checkpoint
from trainers.state_io import save_state


def _checkpoint(run: Path, step: int) -> Path:
    path = run / f"step-{step:08d}"
    save_state({"step": step, "history": [{"step": step, "train_loss": 1.0 / step, "eval_loss": 2.0 / step}], "resumes": []},
               path, STATE_NAME)
    return path


def test_a_newer_complete_checkpoint_in_storage_wins_over_the_registered_one(tmp_path):
    run = tmp_path / "runs" / "r1"
    registered = ray.train.Checkpoint(str(_checkpoint(run, 5)))
    _checkpoint(run, 10)  # reported, but its registration was lost with the worker
    (run / "step-00000015").mkdir()  # an upload cut short: no trainer state, never chosen
    result = SimpleNamespace(checkpoint=registered, metrics={"step": 5, "eval_loss": 0.4, "trainable_params": 7})

    checkpoint, metrics = final_checkpoint(result, str(tmp_path), "r1")

    assert Path(checkpoint.path).name == "step-00000010"
    assert metrics["step"] == 10 and metrics["eval_loss"] == 0.2 and metrics["trainable_params"] == 7


def test_the_registered_checkpoint_is_kept_when_it_is_the_newest(tmp_path):
    run = tmp_path / "runs" / "r2"
    _checkpoint(run, 5)
    registered = ray.train.Checkpoint(str(_checkpoint(run, 10)))
    result = SimpleNamespace(checkpoint=registered, metrics={"step": 10, "eval_loss": 0.2})

    checkpoint, metrics = final_checkpoint(result, str(tmp_path), "r2")

    assert checkpoint is registered and metrics == {"step": 10, "eval_loss": 0.2}


@pytest.mark.parametrize("nodes, workers, available, expected", [
    ([2.0], 1, 2.0, 2),  # one CPU worker on a laptop: the whole machine, not OMP_NUM_THREADS=1
    ([2.0], 2, 2.0, 1),
    ([16.0], 3, 16.0, 5),
    ([8.0, 2.0], 2, 10.0, 4),  # both on the 8-CPU node; 5 each would leave the second unplaced
    ([0.0, 8.0, 8.0], 2, 16.0, 8),  # a KubeRay head with no CPUs for work
    ([8.0], 1, 3.0, 3),  # a Serve app holds 5 CPUs: take what is free instead of waiting forever
    ([1.0], 4, 1.0, 1),  # more workers than CPUs: 1 each, Ray queues them as it would anyway
])
def test_unset_cpus_per_worker_is_the_most_every_worker_can_hold(nodes, workers, available, expected):
    assert cpus_for_cpu_workers(nodes, workers, available) == expected
