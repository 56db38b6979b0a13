"""The driver's choice of the checkpoint to publish (no Ray cluster needed)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import ray.train

from trainers.loop import STATE_NAME
from trainers.run import final_checkpoint
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
