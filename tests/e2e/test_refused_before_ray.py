"""Bad input to the CLI is refused before Ray starts: seen only from a fresh interpreter (in the test's own process
a session Ray may already be up), as a user runs `rayft`."""

from __future__ import annotations

import json

import yaml

from tests.support.cli import run_cli_isolated


def test_rayft_eval_bad_input_is_refused_before_ray_starts(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    store = str(tmp_path / "store")
    rc, err, ray_started = run_cli_isolated(["eval", "nosuch-adapter", "--data", str(data), "--storage", store])
    assert rc == 2 and "nosuch-adapter: not a local directory and not in the registry" in err and not ray_started
    rc, err, ray_started = run_cli_isolated(["eval", "x", "--storage", store])
    assert rc == 2 and "--data FILE" in err and not ray_started


def test_rayft_serve_with_missing_models_is_refused_before_ray_starts(tmp_path):
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({
        "storage": str(tmp_path / "empty-store"),
        "base": {"name": "tiny", "source": "registry:tiny"},
        "merged": [{"name": "m", "adapter": "no-such-adapter"}],
    }))
    rc, stderr, ray_started = run_cli_isolated(["serve", str(missing)])
    assert rc == 2 and "no published version of 'tiny'" in stderr and not ray_started
