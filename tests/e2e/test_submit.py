"""`rayft submit` and `rayft jobs` against a real Ray head with token auth on.

The head is a cluster of its own (the session's `ray_head` fixture, tests/ray_head.py), separate
from the session's in-process Ray. It gets no storage or AWS variables of its own, so a job reaches
the S3 API server only through the runtime env that `rayft submit` builds, as on a real cluster,
and rayft is not on its PATH. Every CLI call runs as a subprocess with its own environment — what a
user types, with the cluster's token in RAY_AUTH_TOKEN.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cluster.client.auth import AuthToken, ClusterAuthError, find_auth_token
from cluster.cli import main
from cluster.client.follow import last_error_line
from cluster.client.jobs_client import SubmitError, jobs_api_address
from cluster.client.packaging import DEFAULT_EXCLUDES, WorkingDirTooLarge, check_package_size, packed_paths
from cluster.client.submission import SubmitOptions, endpoint_notes, prepare_submission
from tests.support.ray_head import Head, rayft, user_env


# =============================================================================
# Without a cluster: what gets packed, the runtime env, the checks made before upload.
# =============================================================================


def _touch(path: Path, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _job_yaml(path: Path, *, train: str = "data/train.jsonl", storage: str | None = "s3://bucket/prefix", name: str = "an-adapter") -> Path:
    raw = {
        "model": {"source": "registry:tiny-base"},
        "data": {"train": train, "eval_fraction": 0.15, "max_seq_len": 48},
        "method": {"name": "lora", "r": 4, "alpha": 8},
        "training": {"max_steps": 4, "micro_batch_size": 8, "lr": 0.01, "eval_every": 4, "checkpoint_every": 4, "log_every": 2},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "output": {"name": name},
    }
    if storage:
        raw["storage"] = {"uri": storage}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_package_leaves_out_environments_caches_outputs_and_ignored_files(tmp_path: Path) -> None:
    for name in ("job.yaml", "data/train.jsonl", "pkg/mod.py", ".venv/lib/site.py", ".git/HEAD",
                 "pkg/__pycache__/mod.cpython-311.pyc", ".pytest_cache/v", "demo-out/x", "bench/results/r.json",
                 "bench/run.py", "rayft.egg-info/PKG-INFO", "secret/key.pem", "notes.tmp"):
        _touch(tmp_path / name)
    _touch(tmp_path / ".rayignore", "secret/\n")
    _touch(tmp_path / ".gitignore", "*.tmp\n")

    packed = set(packed_paths(tmp_path, list(DEFAULT_EXCLUDES)))

    assert packed == {"job.yaml", "data/train.jsonl", "pkg/mod.py", "bench/run.py", ".rayignore", ".gitignore"}
    # Without rayft's defaults the outputs travel (Ray itself skips only .git, .venv, venv, __pycache__).
    assert {"demo-out/x", "bench/results/r.json"} <= set(packed_paths(tmp_path, []))


def test_oversized_working_dir_is_refused_with_size_limit_and_offenders(tmp_path: Path) -> None:
    _touch(tmp_path / "job.yaml")
    big = tmp_path / "weights" / "model.safetensors"
    big.parent.mkdir()
    with open(big, "wb") as f:  # sparse: 600 MiB on paper, nothing on disk
        f.truncate(600 * 2**20)

    with pytest.raises(WorkingDirTooLarge) as err:
        check_package_size(tmp_path, list(DEFAULT_EXCLUDES))

    message = str(err.value)
    assert "600.0 MiB" in message and "limit of 512.0 MiB" in message
    assert "weights/" in message and "--exclude" in message
    # Excluding it is the fix the message names.
    assert check_package_size(tmp_path, [*DEFAULT_EXCLUDES, "weights"]).total < 2**20


def test_runtime_env_forwards_storage_settings_but_credentials_only_when_asked(tmp_path: Path) -> None:
    _job_yaml(tmp_path / "job.yaml")
    _touch(tmp_path / "data/train.jsonl")
    environ = {
        "RAYFT_STORAGE": "s3://bucket/prefix", "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "shh", "HF_TOKEN": "hf_x", "OTHER": "1",
    }

    plain = prepare_submission(SubmitOptions(job="job.yaml"), environ=environ, cwd=tmp_path)
    env = plain.runtime_env()

    assert env["working_dir"] == str(tmp_path.resolve())
    assert ".venv" in env["excludes"] and ".git" in env["excludes"]
    assert env["env_vars"] == {"RAYFT_STORAGE": "s3://bucket/prefix", "AWS_ENDPOINT_URL": "http://minio:9000",
                               "AWS_REGION": "eu-west-1", "PYTHONUNBUFFERED": "1"}
    assert plain.command_line() == "rayft train job.yaml"
    # Run by the cluster's own Python (rayft need not be on the cluster's PATH).
    assert plain.entrypoint().endswith('exec "$py" -m cluster.cli train job.yaml')
    assert plain.submission_id.startswith("rayft-train-an-adapter-")

    asked = prepare_submission(
        SubmitOptions(job="job.yaml", aws_credentials=True, env_from_local=["HF_TOKEN"], env=["LOG_LEVEL=debug"],
                      pip=["peft==0.21.2"], storage="s3://other/p", args=["--merge"]),
        environ=environ, cwd=tmp_path,
    )
    env = asked.runtime_env()
    assert env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "shh" and env["env_vars"]["HF_TOKEN"] == "hf_x"
    assert env["env_vars"]["LOG_LEVEL"] == "debug" and "OTHER" not in env["env_vars"]
    assert env["pip"] == ["peft==0.21.2"]
    assert asked.command_line() == "rayft train job.yaml --merge --storage s3://other/p"
    assert any("credentials" in note for note in asked.notes)

    own = prepare_submission(SubmitOptions(job="job.yaml", forward_env=False), environ=environ, cwd=tmp_path)
    assert own.runtime_env()["env_vars"] == {"PYTHONUNBUFFERED": "1"}


def test_every_problem_is_reported_before_anything_is_sent(tmp_path: Path) -> None:
    work = tmp_path / "work"
    _job_yaml(work / "job.yaml", train="../outside.jsonl")
    _touch(tmp_path / "outside.jsonl")
    _job_yaml(work / "cache-job.yaml", train="demo-out/train.jsonl")
    _touch(work / "demo-out/train.jsonl")
    _touch(tmp_path / "elsewhere.yaml")

    with pytest.raises(SubmitError) as err:
        prepare_submission(
            SubmitOptions(job="job.yaml", env=["NOVALUE"], env_from_local=["UNSET_VAR"], aws_credentials=True,
                          pip=["missing-reqs.txt"]),
            environ={}, cwd=work,
        )
    message = str(err.value)
    for expected in ("data.train: '../outside.jsonl' is outside the working dir", "--env 'NOVALUE'",
                     "--env-from-local UNSET_VAR", "--aws-credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
                     "--pip missing-reqs.txt"):
        assert expected in message, (expected, message)

    with pytest.raises(SubmitError, match="data.train: 'demo-out/train.jsonl' is excluded from the upload"):
        prepare_submission(SubmitOptions(job="cache-job.yaml"), environ={}, cwd=work)
    with pytest.raises(SubmitError, match="outside the working dir"):
        prepare_submission(SubmitOptions(job="../elsewhere.yaml", command="serve"), environ={}, cwd=work)
    with pytest.raises(SubmitError, match="--image-uri"):
        prepare_submission(SubmitOptions(job="job.yaml", image_uri="ghcr.io/x/rayft:1", pip=["x"]), environ={}, cwd=work)
    with pytest.raises(SubmitError, match=r"method"):  # the spec itself is validated too
        (work / "bad.yaml").write_text("model: {source: x}\ndata: {train: job.yaml}\nmethod: {name: nope}\noutput: {name: a}\n")
        prepare_submission(SubmitOptions(job="bad.yaml"), environ={}, cwd=work)


def test_cluster_address_and_token_lookup(tmp_path: Path) -> None:
    assert jobs_api_address("http://head:8265/") == "http://head:8265"
    assert jobs_api_address(None, {"RAY_ADDRESS": "10.0.0.5:8265"}) == "http://10.0.0.5:8265"
    assert jobs_api_address(None, {"RAY_API_SERVER_ADDRESS": "https://a:1", "RAY_ADDRESS": "http://b:2"}) == "https://a:1"
    for bad, env in ((None, {}), ("ray://head:10001", {}), ("auto", {})):
        with pytest.raises(SubmitError, match="http"):
            jobs_api_address(bad, env)

    home = tmp_path / "home"
    assert find_auth_token({}, home) is None
    _touch(home / ".ray" / "auth_token", "from-file\n")
    assert find_auth_token({}, home) == AuthToken("from-file", str(home / ".ray" / "auth_token"))
    _touch(tmp_path / "tok", "from-path")
    assert find_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}, home).value == "from-path"
    assert find_auth_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}, home).value == "from-env"
    with pytest.raises(ClusterAuthError, match="RAY_AUTH_TOKEN_PATH"):
        find_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)


def test_a_loopback_storage_endpoint_is_flagged_for_a_remote_cluster() -> None:
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ENDPOINT_URL_S3": "http://minio.internal:9000"}
    notes = endpoint_notes(env, "http://10.0.0.5:8265")
    assert len(notes) == 1 and notes[0].startswith("AWS_ENDPOINT_URL=http://127.0.0.1:9000 is this machine's loopback")
    assert endpoint_notes(env, "http://127.0.0.1:8265") == []  # a port-forward: the endpoint may be forwarded too


def test_last_error_line_finds_the_drivers_error() -> None:
    logs = "[rayft] run x\nTraceback (most recent call last):\n  File ...\nValueError: boom\nrayft train: error: data.train: 'x' does not exist\n"
    assert last_error_line(logs) == "rayft train: error: data.train: 'x' does not exist"
    assert last_error_line("all good\n") is None


# =============================================================================
# A real head: ray start --head with token auth, on ports of its own (the session's `ray_head`).
# =============================================================================


@pytest.fixture(scope="module")
def jobs_storage(s3_server, tiny_model_dir: Path) -> Iterator[str]:
    """`s3://<bucket>/store` on the session's S3 server with the tiny base model published as `tiny-base`."""
    from cluster.commands.registry import push_directory
    from storage.registry import open_registry

    bucket = f"rayft-jobs-{secrets.token_hex(6)}"
    s3_server.ensure_bucket(bucket)
    uri = f"s3://{bucket}/store"
    push_directory(open_registry(uri), str(tiny_model_dir), "tiny-base", "model", None)
    yield uri
    client = s3_server.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=item["Key"])
    client.delete_bucket(Bucket=bucket)


def job_dir(root: Path, reverse_data: Path, storage: str, name: str, train: str = "data/reverse.jsonl") -> Path:
    """A project directory the way a user has one: the job file, its data, and junk that must not travel."""
    shutil.copy(reverse_data, _touch(root / "data" / "reverse.jsonl"))
    _job_yaml(root / "job.yaml", train=train, storage=storage, name=name)
    _touch(root / ".venv" / "lib" / "huge.bin", "not uploaded")
    return root


@pytest.mark.slow
def test_submit_runs_a_lora_job_with_auth_on_and_publishes_its_adapter(
    ray_head: Head, jobs_storage: str, reverse_data: Path, tmp_path: Path
) -> None:
    from storage.registry import open_registry

    work = job_dir(tmp_path / "project", reverse_data, jobs_storage, "submitted-lora")
    env = user_env(tmp_path / "home", RAY_AUTH_TOKEN=ray_head.token, RAYFT_STORAGE=jobs_storage)

    result = rayft(["submit", "job.yaml", "--address", ray_head.address, "--aws-credentials"], cwd=work, env=env)

    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    # Status transitions, then the driver's own log lines from the cluster, streamed back.
    assert "RUNNING" in out and "SUCCEEDED" in out
    assert "[rayft] run submitted-lora-" in out
    assert "published        : submitted-lora@1 (adapter)" in out
    manifest = open_registry(jobs_storage).resolve("submitted-lora")
    assert manifest.kind == "adapter" and manifest.base_model == "registry:tiny-base"
    assert "adapter_model.safetensors" in {f.path for f in manifest.files}
    # The job ran with what `rayft submit` gave it, and nothing more.
    job_id = out.split("[rayft] submitted job ", 1)[1].split()[0]
    details = ray_head.client().info(job_id)
    assert details.entrypoint.endswith('-m cluster.cli train job.yaml') and details.metadata["rayft_command_line"] == "rayft train job.yaml"
    assert details.runtime_env["env_vars"]["RAYFT_STORAGE"] == jobs_storage


@pytest.mark.slow
def test_a_failing_job_exits_non_zero_and_shows_why(
    ray_head: Head, jobs_storage: str, reverse_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # A data path that exists on the laptop but not on the cluster's nodes.
    work = job_dir(tmp_path / "project", reverse_data, jobs_storage, "doomed", train="/nonexistent/rayft-test/train.jsonl")
    env = user_env(tmp_path / "home", RAY_AUTH_TOKEN=ray_head.token, RAYFT_STORAGE=jobs_storage)

    result = rayft(["submit", "job.yaml", "--address", ray_head.address, "--aws-credentials"], cwd=work, env=env)

    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "note: data.train is the absolute path /nonexistent/rayft-test/train.jsonl" in result.stdout
    # One line: the worker's own error, without its `rayft train: error:` prefix, after the job's state.
    assert "rayft submit: error: job " in result.stderr
    assert " FAILED: data.train: '/nonexistent/rayft-test/train.jsonl' does not exist" in result.stderr
    job_id = result.stdout.split("[rayft] submitted job ", 1)[1].split()[0]

    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    assert main(["jobs", "status", job_id, "--address", ray_head.address]) == 0
    status = capsys.readouterr().out
    assert "FAILED" in status and "exit code  2" in status


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:ssl=None is deprecated:DeprecationWarning")  # inside Ray's tail_job_logs
def test_no_wait_returns_the_id_and_jobs_stop_stops_it(
    ray_head: Head, jobs_storage: str, reverse_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from storage.registry import open_registry

    work = job_dir(tmp_path / "project", reverse_data, jobs_storage, "stopped-lora")
    env = user_env(tmp_path / "home", RAY_AUTH_TOKEN=ray_head.token, RAYFT_STORAGE=jobs_storage)

    submitted = rayft(["submit", "job.yaml", "--address", ray_head.address, "--aws-credentials", "--no-wait"], cwd=work, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith("rayft-train-stopped-lora-")

    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    assert main(["jobs", "stop", job_id, "--address", ray_head.address]) == 0
    assert f"stop requested for job {job_id}" in capsys.readouterr().out
    assert main(["jobs", "logs", job_id, "--follow", "--address", ray_head.address]) == 1
    assert f"job {job_id} STOPPED" in capsys.readouterr().err
    assert ray_head.client().status(job_id) == "STOPPED"
    assert "stopped-lora" not in {m.name for m in open_registry(jobs_storage).list()}
    assert main(["jobs", "list", "--address", ray_head.address]) == 0
    assert job_id in capsys.readouterr().out


class DroppingProxy:
    """A real HTTP proxy on loopback in front of the head's Jobs API that closes chosen requests' connections
    without an answer, as a busy dashboard or a `kubectl port-forward` sometimes does.

    `drops` maps "METHOD /path-prefix" to what happens to the next such requests, in order: "before" (closed
    unforwarded) or "after" (forwarded, so the head acts on it, then closed unanswered).
    """

    def __init__(self, target: str, drops: dict[str, list[str]]):
        import http.server
        import threading

        import requests

        self.dropped: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = next((k for k in drops if f"{self.command} {self.path}".startswith(k) and drops[k]), None)
                mode = drops[key].pop(0) if key else None
                if mode == "before":
                    return self._drop(key)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = requests.request(self.command, target + self.path, data=body, headers=headers, timeout=120)
                if mode == "after":
                    return self._drop(key)
                self.send_response(answer.status_code)
                for name in ("Content-Type",):
                    if name in answer.headers:
                        self.send_header(name, answer.headers[name])
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def _drop(self, key: str) -> None:
                proxy.dropped.append(key)
                self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _relay

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_a_dropped_connection_is_retried_and_a_submission_is_not_made_twice(
    ray_head: Head, jobs_storage: str, reverse_data: Path, tmp_path: Path
) -> None:
    work = job_dir(tmp_path / "project", reverse_data, jobs_storage, "dropped", train="/nonexistent/rayft-test/train.jsonl")
    env = user_env(tmp_path / "home", RAY_AUTH_TOKEN=ray_head.token, RAYFT_STORAGE=jobs_storage)
    proxy = DroppingProxy(ray_head.address, {"GET /api/version": ["before"], "POST /api/jobs/": ["after"],
                                             "GET /api/jobs/rayft-": ["before"]})
    try:
        submitted = rayft(["submit", "job.yaml", "--address", proxy.address, "--no-wait"], cwd=work, env=env)
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        job_id = submitted.stdout.strip().splitlines()[-1]
        status = rayft(["jobs", "status", job_id, "--address", proxy.address], cwd=work, env=env)
    finally:
        proxy.close()

    assert sorted(proxy.dropped) == ["GET /api/jobs/rayft-", "GET /api/version", "POST /api/jobs/"]
    assert status.returncode == 0 and f"{'job':<11}{job_id}" in status.stdout, status.stderr
    # The first POST reached the head: the retry found that job instead of starting a second one.
    client = ray_head.client()
    assert [j.submission_id for j in client.list()].count(job_id) == 1
    client.stop(job_id)


@pytest.mark.slow
def test_an_oversized_working_dir_is_refused_before_upload(
    ray_head: Head, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    work = tmp_path / "project"
    _job_yaml(work / "job.yaml", train="data/train.jsonl")
    _touch(work / "data" / "train.jsonl", '{"text": "x"}\n')
    with open(work / "data" / "dump.bin", "wb") as f:
        f.truncate(700 * 2**20)  # sparse
    jobs_before = len(ray_head.client().list())
    monkeypatch.chdir(work)
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)

    assert main(["submit", "job.yaml", "--address", ray_head.address]) == 2

    err = capsys.readouterr().err
    assert "over Ray's limit of 512.0 MiB" in err and "data/ 700.0 MiB" in err
    assert len(ray_head.client().list()) == jobs_before


@pytest.mark.slow
def test_the_token_is_required_sent_and_checked(ray_head: Head, tmp_path: Path) -> None:
    args = ["jobs", "list", "--address", ray_head.address]

    missing = rayft(args, cwd=tmp_path, env=user_env(tmp_path / "empty-home"))
    assert missing.returncode == 2
    assert "requires an auth token and none was found" in missing.stderr
    assert "RAY_AUTH_TOKEN" in missing.stderr and "~/.ray/auth_token" in missing.stderr

    wrong_home = tmp_path / "home"
    _touch(wrong_home / ".ray" / "auth_token", "not-the-token")  # e.g. the token of a local Ray
    wrong = rayft(args, cwd=tmp_path, env=user_env(wrong_home))
    assert wrong.returncode == 2
    assert f"refused the auth token from {wrong_home / '.ray' / 'auth_token'}" in wrong.stderr
