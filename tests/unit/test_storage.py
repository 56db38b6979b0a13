"""storage.store against a local directory and a real S3 API server on 127.0.0.1."""

from __future__ import annotations

import os
import pickle
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ConnectionClosedError

from storage.errors import AlreadyExists, InvalidKey, InvalidURI, NotFound, StorageError
from storage.local_s3 import S3Server, ensure_bucket, s3_env, start_s3_server
from storage.store import (
    LocalStore,
    MiB,
    S3Options,
    S3Store,
    Store,
    default_cache_dir,
    default_storage_uri,
    open_store,
    pyarrow_filesystem,
)

SMALL_PARTS = S3Options(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_attempts=2)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> Store:
    """A fresh empty store of each backend."""
    return open_store(request.getfixturevalue("local_uri" if request.param == "local" else "s3_uri"))


def test_bytes_and_files_round_trip(store: Store, tmp_path: Path) -> None:
    store.put_bytes(b"hello", "a/b.txt")
    source = tmp_path / "src.bin"
    source.write_bytes(os.urandom(1000))
    store.put_file(source, "a/c/d.bin")
    assert store.get_bytes("a/b.txt") == b"hello"
    store.get_file("a/c/d.bin", tmp_path / "out" / "nested" / "d.bin")
    assert (tmp_path / "out" / "nested" / "d.bin").read_bytes() == source.read_bytes()
    assert store.exists("a/b.txt") and not store.exists("a/missing")
    assert store.size("a/c/d.bin") == 1000
    store.put_bytes(b"replaced", "a/b.txt")
    assert store.get_bytes("a/b.txt") == b"replaced"


def test_list_is_recursive_and_directory_scoped(store: Store) -> None:
    for key in ["a/1", "a/x/2", "ab/3", "b"]:
        store.put_bytes(b"x", key)
    assert store.list("") == ["a/1", "a/x/2", "ab/3", "b"]
    assert store.list("a") == ["a/1", "a/x/2"]  # not ab/3
    assert store.list("a/") == ["a/1", "a/x/2"]
    assert store.list("nothing") == []


def test_delete_and_delete_prefix(store: Store) -> None:
    for key in ["d/1", "d/e/2", "de/3", "keep"]:
        store.put_bytes(b"x", key)
    store.delete("keep")
    store.delete("keep")  # idempotent
    assert not store.exists("keep")
    assert store.delete_prefix("d") == 2
    assert store.list() == ["de/3"]
    with pytest.raises(StorageError, match="whole store"):
        store.delete_prefix("")


def test_missing_keys_raise_not_found(store: Store, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="nope"):
        store.get_bytes("nope")
    with pytest.raises(NotFound, match="nope"):
        store.get_file("nope", tmp_path / "x")
    with pytest.raises(NotFound, match="nope"):
        store.size("nope")
    assert not (tmp_path / "x").exists()


def test_exclusive_put(store: Store) -> None:
    store.put_bytes(b"first", "claim", overwrite=False)
    with pytest.raises(AlreadyExists):
        store.put_bytes(b"second", "claim", overwrite=False)
    assert store.get_bytes("claim") == b"first"


def test_invalid_keys_rejected(store: Store) -> None:
    for key in ["../escape", "/abs", "a/../../b", "a\\b", "a\x00"]:
        for call in (
            lambda: store.put_bytes(b"x", key),
            lambda: store.get_bytes(key),
            lambda: store.exists(key),
            lambda: store.list(key),
            lambda: store.delete_prefix(key),
        ):
            with pytest.raises(InvalidKey):
                call()
    assert store.list() == []


def test_uri_for(store: Store) -> None:
    uri = store.uri_for("x/y.json")
    assert uri.endswith("/x/y.json")
    assert uri.startswith("s3://" if isinstance(store, S3Store) else "file:///")
    assert isinstance(open_store(store.uri_for("sub")), type(store))


def test_local_writes_leave_no_temp_files(local_uri: str, tmp_path: Path) -> None:
    store = open_store(local_uri)
    assert isinstance(store, LocalStore)
    store.put_bytes(b"1", "k/v")
    source = tmp_path / "f"
    source.write_bytes(b"2")
    store.put_file(source, "k/w")
    assert sorted(p.name for p in (store.root / "k").iterdir()) == ["v", "w"]
    store.delete("k/v")
    store.delete("k/w")
    assert not (store.root / "k").exists()  # empty parents removed


def test_open_store_parses_uris(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    local = open_store((tmp_path / "with space").as_uri())
    assert isinstance(local, LocalStore) and local.root == tmp_path / "with space"
    s3 = open_store("s3://my-bucket/a/b/")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix, s3.uri) == ("my-bucket", "a/b", "s3://my-bucket/a/b")
    assert open_store("s3://my-bucket").uri == "s3://my-bucket"


@pytest.mark.parametrize(
    "uri",
    ["gs://bucket/x", "http://host/x", "s3://Bad_Bucket/x", "s3://ab", "s3://bucket/../x", "s3://bucket/x?y=1", "file://host/x", ""],
)
def test_open_store_rejects_bad_uris(uri: str) -> None:
    with pytest.raises(InvalidURI):
        open_store(uri)


def test_default_locations(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAYFT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAYFT_STORAGE", raising=False)
    assert default_storage_uri() == str(tmp_path / "home" / "storage")
    assert default_cache_dir() == tmp_path / "home" / "cache"
    monkeypatch.setenv("RAYFT_STORAGE", "s3://bucket/p")
    assert default_storage_uri() == "s3://bucket/p"


# --------------------------------------------------------------------------- S3 errors


def test_missing_bucket_message(s3_server: S3Server) -> None:
    store = open_store("s3://rayft-no-such-bucket/p")
    for call in (lambda: store.put_bytes(b"x", "k"), lambda: store.get_bytes("k"), lambda: store.exists("k"), lambda: store.list()):
        with pytest.raises(StorageError, match=r"bucket 'rayft-no-such-bucket' does not exist.*create it"):
            call()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_message(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    store = open_store("s3://some-bucket/p", s3_options=S3Options(max_attempts=1))
    with pytest.raises(StorageError, match=rf"{endpoint} is unreachable.*AWS_ENDPOINT_URL"):
        store.get_bytes("k")


def test_missing_credentials_message(s3_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = open_store(s3_uri)
    with pytest.raises(StorageError, match=r"no usable AWS credentials.*AWS_ACCESS_KEY_ID"):
        store.get_bytes("k")


def test_bad_credentials_message(s3_uri: str, enforced_auth: None) -> None:
    store = open_store(s3_uri)
    with pytest.raises(StorageError, match=r"rejected the credentials \(InvalidAccessKeyId\).*AWS_ACCESS_KEY_ID"):
        store.put_bytes(b"x", "k")


# --------------------------------------------------------------------------- multipart


def _large_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def _hook(store: S3Store, event: str, handler: Any) -> None:
    store.client.meta.events.register(event, handler)


def _part_number(url: str) -> int | None:
    from urllib.parse import parse_qs, urlparse

    values = parse_qs(urlparse(url).query).get("partNumber")
    return int(values[0]) if values else None


def test_multipart_upload_and_download(s3_uri: str, tmp_path: Path) -> None:
    store = open_store(s3_uri, s3_options=SMALL_PARTS)
    assert isinstance(store, S3Store)
    parts: list[int | None] = []
    _hook(store, "before-send.s3.UploadPart", lambda request, **_: parts.append(_part_number(request.url)))
    source = _large_file(tmp_path / "big.bin", 11 * MiB + 123)
    store.put_file(source, "big.bin")
    assert sorted(parts) == [1, 2, 3]
    assert store.size("big.bin") == source.stat().st_size
    store.get_file("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()


def test_multipart_part_retried_after_transient_failure(s3_uri: str, tmp_path: Path) -> None:
    store = open_store(s3_uri, s3_options=SMALL_PARTS)
    assert isinstance(store, S3Store)
    attempts: list[int | None] = []

    def drop_first_attempt_of_part_2(request: Any, **_: Any) -> None:
        number = _part_number(request.url)
        attempts.append(number)
        if number == 2 and attempts.count(2) == 1:
            raise ConnectionClosedError(endpoint_url=request.url)

    _hook(store, "before-send.s3.UploadPart", drop_first_attempt_of_part_2)
    source = _large_file(tmp_path / "big.bin", 6 * MiB)
    store.put_file(source, "big.bin")
    assert attempts.count(2) == 2
    assert store.get_bytes("big.bin") == source.read_bytes()


@pytest.mark.parametrize("s3transfer_abort_fails", [False, True])
def test_failed_multipart_upload_leaves_nothing(
    s3_uri: str, s3_bucket: str, s3_server: S3Server, tmp_path: Path, s3transfer_abort_fails: bool
) -> None:
    store = open_store(s3_uri, s3_options=SMALL_PARTS.model_copy(update={"max_attempts": 1}))
    assert isinstance(store, S3Store)
    aborts: list[str] = []

    def fail_part_2(request: Any, **_: Any) -> None:
        if _part_number(request.url) == 2:
            raise ConnectionClosedError(endpoint_url=request.url)

    def count_abort(request: Any, **_: Any) -> None:
        aborts.append(request.url)
        if s3transfer_abort_fails and len(aborts) == 1:
            raise ConnectionClosedError(endpoint_url=request.url)

    _hook(store, "before-send.s3.UploadPart", fail_part_2)
    _hook(store, "before-send.s3.AbortMultipartUpload", count_abort)
    source = _large_file(tmp_path / "big.bin", 11 * MiB)
    with pytest.raises(StorageError, match="big.bin"):
        store.put_file(source, "big.bin")
    client = s3_server.client()
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert store.list() == []
    assert aborts  # an abort was actually sent
    if s3transfer_abort_fails:
        assert len(aborts) == 2  # ours, after s3transfer's failed one


def test_conditional_put_enforced_by_server(s3_uri: str) -> None:
    """Even when the existence pre-check misses a racing writer, IfNoneMatch makes the server refuse."""

    class RacingStore(S3Store):
        def _exists(self, key: str) -> bool:
            return False

    plain = open_store(s3_uri)
    assert isinstance(plain, S3Store)
    racing = RacingStore(plain.bucket, plain.prefix)
    racing.put_bytes(b"first", "manifest.json", overwrite=False)
    with pytest.raises(AlreadyExists):
        racing.put_bytes(b"second", "manifest.json", overwrite=False)
    assert plain.get_bytes("manifest.json") == b"first"


# --------------------------------------------------------------------------- pyarrow


def test_pyarrow_filesystem_local(local_uri: str) -> None:
    import pyarrow.fs

    filesystem, path = pyarrow_filesystem(local_uri)
    assert isinstance(filesystem, pyarrow.fs.LocalFileSystem)
    assert pyarrow_filesystem(Path(local_uri).as_uri())[1] == path
    filesystem.create_dir(f"{path}/ckpt")
    with filesystem.open_output_stream(f"{path}/ckpt/a.txt") as out:
        out.write(b"local")
    assert open_store(local_uri).get_bytes("ckpt/a.txt") == b"local"


def test_pyarrow_filesystem_s3_works_after_pickling_without_env(s3_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.fs

    filesystem, path = pyarrow_filesystem(s3_uri)
    assert isinstance(filesystem, pyarrow.fs.S3FileSystem)
    assert path == s3_uri.removeprefix("s3://")
    with filesystem.open_output_stream(f"{path}/ckpt/a.txt") as out:
        out.write(b"via pyarrow")
    assert open_store(s3_uri).get_bytes("ckpt/a.txt") == b"via pyarrow"

    shipped = pickle.dumps(filesystem)  # what Ray does to send it to workers
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    on_worker = pickle.loads(shipped)
    with on_worker.open_input_stream(f"{path}/ckpt/a.txt") as stream:
        assert stream.read() == b"via pyarrow"


# --------------------------------------------------------------------------- embedded server


def test_ensure_bucket_is_idempotent_and_uses_env(s3_server: S3Server) -> None:
    ensure_bucket("rayft-ensure-env")  # endpoint from AWS_ENDPOINT_URL (set by the fixture)
    ensure_bucket("rayft-ensure-env")
    s3_server.ensure_bucket("rayft-ensure-env")
    store = open_store("s3://rayft-ensure-env/x")
    store.put_bytes(b"ok", "k")
    assert store.get_bytes("k") == b"ok"
    store.delete("k")
    s3_server.client().delete_bucket(Bucket="rayft-ensure-env")


def test_second_server_and_explicit_env(s3_server: S3Server) -> None:
    with start_s3_server() as other:
        assert other.endpoint_url != s3_server.endpoint_url
        env = s3_env(other.endpoint_url)
        assert env["AWS_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL_S3"] == other.endpoint_url
        assert env["AWS_DEFAULT_REGION"] == "us-east-1"
        ensure_bucket("rayft-other-server", other.endpoint_url)
        assert "rayft-other-server" in [b["Name"] for b in other.client().list_buckets()["Buckets"]]
        other.client().delete_bucket(Bucket="rayft-other-server")
    with pytest.raises(StorageError, match="cannot create bucket"):
        ensure_bucket("ab", s3_server.endpoint_url)  # too short for S3
