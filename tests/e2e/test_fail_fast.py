"""Every rayft command fails with one line naming the problem and the fix, a documented exit status
(2 bad input or usage, 1 a failure while running) and no Python traceback; input errors before any
Ray instance starts (issue 21).

Each case runs the CLI as a user would, in a process of its own (so "Ray was not started" can be
observed), against real things: a local registry, the session's S3 API server (made to refuse the
credentials, or an endpoint where nothing listens), a port something listens on, a token-auth
`ray start --head` (tests/ray_head.py).
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.support.cli import run_cli_isolated


def _job(tmp_path: Path, *, source: str, train: str, storage: str, name: str = "ff-adapter") -> Path:
    raw = {
        "model": {"source": source},
        "data": {"train": train, "eval_fraction": 0.15, "max_seq_len": 48},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "training": {"max_steps": 4, "micro_batch_size": 8, "lr": 0.01, "eval_every": 4, "checkpoint_every": 4, "log_every": 2},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "output": {"name": name},
        "storage": {"uri": storage},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def local_registry(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> str:
    """A local storage dir with the tiny model published as `tiny-base`."""
    from cluster.commands.registry import push_directory
    from storage.registry import open_registry

    uri = str(tmp_path_factory.mktemp("ff-store") / "store")
    push_directory(open_registry(uri), str(tiny_model_dir), "tiny-base", "model", None)
    return uri


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Case:
    """One way to get it wrong: the command, and what its one message must name (the problem, the fix)."""

    name: str
    exit_code: int
    must_say: list[str]
    env: dict[str, str] = field(default_factory=dict)


def _assert_one_clear_line(case: Case, rc: int, stderr: str, context: Callable[[], str] = str) -> None:
    """`context()` is added to a failure's message (e.g. the state of the Ray head the command talked to)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == case.exit_code, (case.name, rc, stderr[-3000:], context())
    assert "Traceback" not in stderr, (case.name, stderr[-3000:], context())
    assert len(lines) == 1 and lines[0].startswith("rayft "), (case.name, stderr[-3000:], context())
    for text in case.must_say:
        assert text in lines[0], (case.name, text, lines[0], context())


INPUT_CASES = ["registry typo", "missing data file", "unreachable S3 endpoint", "wrong S3 credentials", "port in use",
               "nothing listens at the Jobs API address"]


@pytest.mark.parametrize("case_name", INPUT_CASES)
def test_bad_input_fails_in_one_line_before_ray_starts(
    case_name: str, request: pytest.FixtureRequest, tmp_path: Path, local_registry: str, reverse_data: Path, s3_server
) -> None:
    data = str(reverse_data)
    env = dict(os.environ)
    if case_name == "registry typo":
        args = ["train", str(_job(tmp_path, source="registry:tiny-bsae", train=data, storage=local_registry))]
        case = Case(case_name, 2, ["model.source registry:tiny-bsae", "no published version of 'tiny-bsae'", "did you mean 'tiny-base'"])
    elif case_name == "missing data file":
        args = ["train", str(_job(tmp_path, source="registry:tiny-base", train="data/nope.jsonl", storage=local_registry))]
        case = Case(case_name, 2, ["data.train: 'data/nope.jsonl' does not exist", "relative paths are taken from"])
    elif case_name == "unreachable S3 endpoint":
        endpoint = f"http://127.0.0.1:{_closed_port()}"
        env.update(AWS_ENDPOINT_URL=endpoint, AWS_ENDPOINT_URL_S3=endpoint)
        args = ["train", str(_job(tmp_path, source="registry:tiny-base", train=data, storage="s3://ff-bucket/store"))]
        case = Case(case_name, 2, ["storage.uri s3://ff-bucket/store", f"{endpoint} is unreachable", "AWS_ENDPOINT_URL"])
    elif case_name == "wrong S3 credentials":
        s3_server.ensure_bucket("ff-creds")
        request.getfixturevalue("enforced_auth")
        args = ["train", str(_job(tmp_path, source="registry:tiny-base", train=data, storage="s3://ff-creds/store"))]
        case = Case(case_name, 2, ["storage.uri s3://ff-creds/store", "rejected the credentials", "AWS_ACCESS_KEY_ID"])
    elif case_name == "nothing listens at the Jobs API address":
        address = f"http://127.0.0.1:{_closed_port()}"  # refused before the cluster ever answered: no retries
        args = ["jobs", "list", "--address", address]
        case = Case(case_name, 2, [f"cannot reach a Ray Jobs API at {address}", "pass the head's dashboard URL (port 8265)"])
    else:  # port in use
        spec = tmp_path / "serve.yaml"
        spec.write_text(yaml.safe_dump({"storage": local_registry, "base": {"name": "tiny-base", "source": "registry:tiny-base"}}))
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        request.addfinalizer(taken.close)
        port = taken.getsockname()[1]
        args = ["serve", str(spec), "--port", str(port)]
        case = Case(case_name, 2, [f"port {port} on 127.0.0.1 is already in use", "choose a free one with --port"])

    rc, stderr, ray_started = run_cli_isolated(args, cwd=tmp_path, env=env)

    _assert_one_clear_line(case, rc, stderr)
    assert not ray_started, case_name


def test_several_input_problems_are_listed_together(tmp_path: Path, local_registry: str) -> None:
    job = _job(tmp_path, source="registry:tiny-bsae", train="nope.jsonl", storage=local_registry, name="tiny-base")

    rc, stderr, ray_started = run_cli_isolated(["tune", str(job)], cwd=tmp_path)

    assert rc == 2 and not ray_started and "Traceback" not in stderr
    assert "3 problems with the job's inputs" in stderr
    assert "output.name: 'tiny-base' is already published as a model" in stderr


def test_an_unexpected_error_is_one_line_and_its_traceback_needs_verbose(tmp_path: Path) -> None:
    """An error rayft has no message for (here: the job file is a directory) exits 1 with its one-line message."""
    (tmp_path / "job.yaml").mkdir()
    rc, quiet, _ = run_cli_isolated(["validate", "job.yaml"], cwd=tmp_path)
    rc_verbose, verbose, _ = run_cli_isolated(["--verbose", "validate", "job.yaml"], cwd=tmp_path)

    _assert_one_clear_line(Case("unexpected", 1, ["IsADirectoryError", "job.yaml", "--verbose shows the traceback"]), rc, quiet)
    assert rc_verbose == 1 and "Traceback (most recent call last)" in verbose


# --------------------------------------------------------------------------- against a token-auth Ray head


def _user_env(home: Path, **extra: str) -> dict[str, str]:
    from tests.support.ray_head import user_env

    return user_env(home, **extra)


@pytest.mark.slow
@pytest.mark.parametrize("token", ["none", "wrong"])
def test_a_token_auth_head_refuses_no_token_and_a_wrong_one_in_one_line(
    token: str, ray_head, tmp_path: Path, local_registry: str, reverse_data: Path, tiny_model_dir: Path
) -> None:
    job = _job(tmp_path, source=str(tiny_model_dir), train=str(reverse_data), storage=local_registry)
    home = tmp_path / "home"
    if token == "wrong":
        (home / ".ray").mkdir(parents=True)
        (home / ".ray" / "auth_token").write_text("not-this-clusters-token")  # e.g. the token of a local Ray
        case = Case("wrong token", 2, [f"refused the auth token from {home / '.ray' / 'auth_token'}", "set RAY_AUTH_TOKEN"])
    else:
        case = Case("no token", 2, ["requires an auth token and none was found", "RAY_AUTH_TOKEN", "~/.ray/auth_token"])

    rc, stderr, ray_started = run_cli_isolated(["train", str(job), "--address", ray_head.gcs_address], cwd=tmp_path,
                                               env=_user_env(home))

    _assert_one_clear_line(case, rc, stderr)
    assert not ray_started


@pytest.mark.slow
def test_submit_says_in_one_line_when_the_clusters_python_cannot_import_rayft(
    ray_head, _kept_ray_head, tmp_path: Path, local_registry: str, reverse_data: Path
) -> None:
    # A job environment whose Python lacks rayft: a virtualenv (as Ray activates for --pip) without it.
    fake_venv = tmp_path / "venv-without-rayft"
    python = fake_venv / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")  # no site-packages, no cwd: no rayft
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    work = tmp_path / "project"
    work.mkdir()
    (work / "data.jsonl").write_text(reverse_data.read_text())
    _job(work, source="registry:tiny-base", train="data.jsonl", storage=local_registry)
    env = _user_env(tmp_path / "home", RAY_AUTH_TOKEN=ray_head.token)

    rc, stderr, _ = run_cli_isolated(["submit", "job.yaml", "--address", ray_head.address, "--env", f"VIRTUAL_ENV={fake_venv}"],
                                     cwd=work, env=env)

    case = Case("rayft missing on the cluster", 1, ["FAILED", f"rayft is not importable by the cluster's Python ({python})",
                                                     "install rayft there", "--pip"])
    _assert_one_clear_line(case, rc, stderr, context=_kept_ray_head.report)


@pytest.mark.slow
def test_train_with_address_runs_on_a_token_auth_head_with_the_token_from_the_environment(
    ray_head, _kept_ray_head, tmp_path: Path, reverse_data: Path, tiny_model_dir: Path
) -> None:
    """`rayft train --address HEAD:6379` against `ray start --head` (token auth on); the user sets only
    RAY_AUTH_TOKEN, as the README says, not RAY_AUTH_MODE."""
    from storage.registry import open_registry

    storage = str(tmp_path / "store")  # the head runs on this machine: its workers see this path
    job = _job(tmp_path, source=str(tiny_model_dir), train=str(reverse_data), storage=storage, name="addressed-lora")
    env = _user_env(tmp_path / "home", RAY_AUTH_TOKEN=ray_head.token)
    assert "RAY_AUTH_MODE" not in env

    rc, stderr, ray_started = run_cli_isolated(["train", str(job), "--address", ray_head.gcs_address], cwd=tmp_path, env=env)

    assert rc == 0, stderr[-4000:] + f"\n--- the head: {_kept_ray_head.report()}"
    assert ray_started and "Traceback" not in stderr
    manifest = open_registry(storage).resolve("addressed-lora")
    assert manifest.kind == "adapter" and "adapter_model.safetensors" in {f.path for f in manifest.files}
