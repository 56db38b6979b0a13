"""The layout of runs, checkpoints and tune searches in storage is named once, in storage/runs.py: the trainers
that write it and the console that reads it use those names."""

from __future__ import annotations

import ast
import json
from pathlib import Path

from service.console import ConsoleData
from storage.registry import open_registry
from storage.runs import (
    STATE_FILES,
    checkpoint_dir_name,
    checkpoint_key,
    checkpoint_step,
    search_job_key,
    search_results_key,
    trial_run_id,
)
from trainers.checkpoints import STATE_NAME, dir_name, step_of
from trainers.tune.results import TUNE_DIR
from trainers.tune.space import train_run_id

ROOT = Path(__file__).resolve().parents[2]
#: The modules that write or read the layout, beside storage/runs.py.
USERS = ["service/console.py", "trainers/checkpoints.py", "trainers/tune/results.py", "trainers/tune/search.py",
         "trainers/tune/space.py"]


def layout_literals(path: Path) -> list[str]:
    """String constants (f-string pieces included, docstrings not) that spell a piece of the layout."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            if text.startswith("/console/"):  # the console's own routes
                continue
            if (text in ("tune", "runs/", "tune/") or "/runs/" in text or text.startswith(("runs/", "tune/"))
                    or any(piece in text for piece in ("step-", "trainer_state", "job.json", "results.json",
                                                       "rayft-run.json", "rayft-progress.json"))):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text!r}")
    return found


def test_the_layout_is_spelled_only_in_storage_runs():
    assert [hit for user in USERS for hit in layout_literals(ROOT / user)] == []
    assert layout_literals(ROOT / "storage" / "runs.py")  # where it is spelled (so the check can find it)


def test_trainers_and_console_share_the_names():
    assert dir_name(12) == checkpoint_dir_name(12) == "step-00000012"
    assert step_of("step-00000012") == checkpoint_step("step-00000012/") == 12
    assert checkpoint_step("rayft-run.json") == step_of("stepx") == -1
    assert STATE_FILES[0] == f"{STATE_NAME}.json"
    assert train_run_id("search-1", "abc") == trial_run_id("search-1", "abc")
    assert search_results_key("search-1").startswith(f"{TUNE_DIR}/search-1/")


def test_console_reads_what_the_trainers_write(tmp_path):
    """A run with only a checkpoint (a tune trial) and a finished search, written under storage.runs' names, are what
    the console lists."""
    registry = open_registry(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    store = registry.store
    trial = trial_run_id("search-1", "t0001")
    history = [{"step": 3, "train_loss": 1.5, "eval_loss": 1.7}]
    store.put_bytes(json.dumps({"history": history}).encode(), checkpoint_key(trial, 3, STATE_FILES[0]))
    store.put_bytes(b"{}", search_job_key("search-1"))
    store.put_bytes(json.dumps({"trials": [{"trial_id": "t0001", "eval_loss": 1.7}], "winner": "t0001"}).encode(),
                    search_results_key("search-1"))
    data = ConsoleData(registry)
    (row,) = data.runs()["runs"]
    assert (row["run_id"], row["search_id"], row["state"], row["checkpoints"]) == (trial, "search-1", "tune trial", [3])
    assert data.run(trial)["history"] == history
    (search,) = data.searches()["searches"]
    assert (search["state"], search["winner"], search["best_eval_loss"]) == ("finished", "t0001", 1.7)
