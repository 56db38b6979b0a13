"""tests/unit: no Ray, no subprocesses (tests/unit/test_tiers.py reads the files for it). A test that starts Ray here
fails at once, saying where it belongs."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(autouse=True)
def _no_ray_in_unit_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("tests/unit starts no Ray: a test that needs Ray belongs in tests/integration (in-process Ray) "
                             "or tests/e2e (a head, the CLI as a subprocess)")

    monkeypatch.setattr(ray, "init", refuse)
