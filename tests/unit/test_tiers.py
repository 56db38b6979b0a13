"""The suite's tiers hold what they say (README: tests by cost). tests/unit: no Ray started, no subprocess, so the
folder runs in about a minute; what needs Ray or a process of its own lives in tests/integration or tests/e2e."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
#: Fixtures that start Ray, Serve or a head (tests/conftest.py), and helpers that start a process.
NOT_IN_UNIT = {"ray_session", "serve_http", "ray_head", "_kept_ray_head", "run_cli_isolated", "running_head", "subprocess",
               "multiprocessing", "fit_in_process"}


def names_used(path: Path) -> set[str]:
    """Imported modules and names, and the arguments of every test function (its fixtures)."""
    tree = ast.parse(path.read_text())
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            used |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            used |= {alias.name for alias in node.names} | {(node.module or "").split(".")[0]}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            used |= {a.arg for a in node.args.args}
    return used


@pytest.mark.parametrize("path", sorted((TESTS / "unit").glob("*.py")), ids=lambda p: p.name)
def test_unit_files_start_no_ray_and_no_process(path: Path) -> None:
    found = names_used(path) & NOT_IN_UNIT
    assert not found, f"{path.name} uses {sorted(found)}: move those tests to tests/integration or tests/e2e"


def test_every_test_file_is_in_a_tier() -> None:
    loose = sorted(p.name for p in TESTS.glob("test_*.py"))
    assert not loose, f"{loose}: put each in tests/unit, tests/integration or tests/e2e by what it starts"
    assert not list((TESTS / "support").glob("test_*.py")), "tests/support holds helpers, not tests"
