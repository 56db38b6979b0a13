"""Training state round-trips through safetensors + JSON, and nothing in the package unpickles."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from trainers.checkpoints import rng_state, set_rng_state
from trainers.state_io import load_state, save_state

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "trainers", "serve", "storage", "bench")


def test_optimizer_scheduler_and_rng_round_trip(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    rng = rng_state()
    expected = (torch.rand(3), random.random())
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": [rng], "step": 3, "pair": (1, "a")}
    save_state(state, tmp_path, "s")
    back = load_state(tmp_path, "s")
    assert back["step"] == 3 and back["pair"] == (1, "a")
    assert set(back["optimizer"]["state"]) == {0, 1}  # int keys survive
    torch.testing.assert_close(back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    fresh = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=0.1)
    fresh.load_state_dict(back["optimizer"])
    assert back["scheduler"]["last_epoch"] == 1

    set_rng_state(back["rng"][0])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_unsupported_objects_are_refused_not_pickled(tmp_path):
    with pytest.raises(TypeError, match="without pickle"):
        save_state({"fn": object()}, tmp_path)


def test_no_unpickling_loader_anywhere_in_the_package():
    pattern = re.compile(r"\b(torch\.load|pickle\.loads?|cloudpickle\.loads?|joblib\.load)\s*\(")
    offenders = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "weights must load through safetensors only:\n" + "\n".join(offenders)
