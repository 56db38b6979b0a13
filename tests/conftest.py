"""Shared pytest fixtures. Each block is owned by one area; append new blocks below."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Serve's proxy must answer its readiness probe within 5 s and its health probe within 10 s (Ray's
# defaults). Two xdist processes, each with Ray, Serve and trainers on 2 cores, can stall a starting
# proxy longer than that; Serve then kills it and `serve.start` fails. Every Ray started by the
# tests (in-process or `ray start` heads in subprocesses) inherits these.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
# Ray Train V2 starts a preemption watcher actor (a process of its own, ~2-3 CPU-seconds) for every run, to
# notice nodes being drained; a local single-node test cluster is never drained, and the suite runs ~60 trainings.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

# =============================================================================
# storage fixtures (owner: storage/). A real S3 API server on 127.0.0.1 (moto's
# ThreadedMotoServer) shared by the session; each test gets its own bucket.
# =============================================================================
from storage.local_s3 import S3Server, s3_env, start_s3_server

# Variables that would send boto3 elsewhere (a profile, a stale token, another
# endpoint) if inherited from the developer's shell.
_AWS_VARS_TO_CLEAR = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


@pytest.fixture(scope="session", autouse=True)
def rayft_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """RAYFT_HOME in a temp dir for the whole session, so no test touches ~/.rayft; RAYFT_STORAGE unset."""
    home = tmp_path_factory.mktemp("rayft-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYFT_HOME", str(home))
        patch.delenv("RAYFT_STORAGE", raising=False)
        yield home


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The session's S3 API server; the standard AWS variables point at it for the rest of the session."""
    with pytest.MonkeyPatch.context() as patch:
        for name in _AWS_VARS_TO_CLEAR:
            patch.delenv(name, raising=False)
        # Keep the developer's ~/.aws files (profiles, endpoint settings) out of the tests.
        patch.setenv("AWS_CONFIG_FILE", os.devnull)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        with start_s3_server(host="127.0.0.1", port=0) as server:
            for name, value in s3_env(server.endpoint_url).items():
                patch.setenv(name, value)
            yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty bucket; emptied and removed afterwards so the in-memory server stays small."""
    name = f"rayft-test-{uuid.uuid4().hex[:16]}"
    s3_server.ensure_bucket(name)
    yield name
    client = s3_server.client()
    for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
        client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=item["Key"])
    client.delete_bucket(Bucket=name)


@pytest.fixture
def s3_uri(s3_bucket: str) -> str:
    """`s3://<fresh bucket>/prefix` on the session's S3 server."""
    return f"s3://{s3_bucket}/prefix"


@pytest.fixture
def local_uri(tmp_path: Path) -> str:
    """A local directory store URI (plain path) under tmp_path; the directory does not exist yet."""
    return str(tmp_path / "store")


@pytest.fixture
def enforced_auth(s3_server: S3Server) -> Iterator[None]:
    """Make the S3 server check credentials (it accepts any by default), then restore."""
    import json
    import urllib.request

    def set_free_requests(count: str) -> None:
        request = urllib.request.Request(
            f"{s3_server.endpoint_url}/moto-api/reset-auth", data=count.encode(), method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request) as response:
            json.load(response)

    set_free_requests("0")
    try:
        yield
    finally:
        set_free_requests("inf")


# ============================ end of storage fixtures ========================


# =============================================================================
# Ray, tiny model and training fixtures (owner: trainers/). One Ray instance for the
# whole session: each `ray.init` costs seconds and each fit() ~15 s of worker start-up.
# =============================================================================


@pytest.fixture(scope="session")
def ray_session(s3_server: S3Server, rayft_home: Path) -> Iterator[None]:
    """A local Ray instance started after the S3 variables are set, so workers inherit them."""
    import ray

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # An earlier test may have run a rayft command in this process, which started a default Ray and left it up
    # (the order of files differs between a serial run and `pytest -n 2`): the session's Ray replaces it.
    if ray.is_initialized():
        ray.shutdown()
    # 4 logical CPUs on 2 cores: a Serve app and a 2-worker trainer can then be placed together.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + tokenizer saved as a transformers directory (built once per session)."""
    from trainers.tiny import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def reverse_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learnable synthetic task (spell a word backwards) as prompt/completion JSONL."""
    from trainers.tiny import task_examples, write_jsonl

    return write_jsonl(task_examples("reverse", 160, seed=1), tmp_path_factory.mktemp("data") / "reverse.jsonl")


# =============================================================================
# Ray Serve fixtures (owner: serve/). Serve's HTTP proxy on 127.0.0.1 for the session,
# on the session's Ray; each serve test module deploys its own application on it.
# =============================================================================


@pytest.fixture(scope="session")
def serve_http(ray_session: None) -> Iterator[str]:
    """Serve's HTTP proxy on 127.0.0.1:<free port>; yields its base URL. Serve is shut down at session end."""
    import socket

    from ray import serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


# ============================ end of Ray Serve fixtures ======================


# =============================================================================
# A Ray head of its own (owner: cluster/): `ray start --head` with token auth on free ports, for the
# tests of `rayft submit`/`jobs` and of `--address`; one per session (it takes ~10-20 s to start).
# =============================================================================


@pytest.fixture(scope="session")
def _kept_ray_head():
    from tests.support.ray_head import KeptHead

    kept = KeptHead()
    yield kept
    kept.stop()


@pytest.fixture
def ray_head(_kept_ray_head):
    """The session's head, alive (started again, with a warning, if it died since the last test used it)."""
    return _kept_ray_head.alive()


# =============================================================================
# Order of files (owner: the suite). `make test` runs `pytest -n 2 --dist loadfile --no-loadscope-reorder`:
# xdist hands out whole files in collection order, and its default order (most tests first) left the
# long end-to-end files, which hold few tests, to the end, with one process idle for minutes. Files that
# took a minute or more on 2 cores come first, longest first (per-file sums of a full run's durations);
# every other file follows in its usual order, and tests keep their order within a file.
# =============================================================================

LONGEST_FILES_FIRST = (  # seconds per file in a full clean-clone `make test` here, 2026-12-07 (31 min under load ~20)
    "test_tune.py",  # 624
    "test_service_jobs.py",  # 570
    "test_train.py",  # 528
    "test_fail_fast.py",  # 216
    "test_plan.py",  # 206
    "test_submit.py",  # 198
    "test_serve_vllm.py",  # 194
    "test_console.py",  # 183
    "test_zero3.py",  # 159
    "test_bench.py",  # 149
    "test_preference_train.py",  # 95
    "test_eval.py",  # 82
    "test_ingest.py",  # 81
    "test_serve.py",  # 70
    "test_eval_vllm.py",  # 64
    "test_web_console.py",  # 53
    "test_service_files.py",  # 37
    "test_cli_papercuts.py",  # 29
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: in-file order is kept
