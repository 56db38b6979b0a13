"""storage.registry over a local directory and a real S3 API server: publish, resolve, download, verify."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ConnectionClosedError

from storage.errors import IntegrityError, InvalidArtifact, NotFound, StorageError
from storage.local_s3 import S3Server
from storage.registry import Manifest, Registry, base_config_digest, base_config_digest_of_dir, open_registry
from storage.store import LocalStore, MiB, S3Options, S3Store, Store, open_store

DIGEST = "ab" * 32


def make_adapter(directory: Path, seed: int = 0, *, extra_mib: int = 0) -> Path:
    """A small peft-like adapter directory (content varies with `seed`)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": 4, "seed": seed}))
    (directory / "adapter_model.safetensors").write_bytes(bytes([seed % 256]) * 2048 + os.urandom(64))
    (directory / "tokenizer").mkdir(exist_ok=True)
    (directory / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    if extra_mib:
        (directory / "big.safetensors").write_bytes(os.urandom(extra_mib * MiB))
    return directory


def publish(registry: Registry, name: str, directory: Path, **overrides: Any) -> Manifest:
    arguments: dict[str, Any] = {
        "kind": "adapter",
        "base_model": "tiny-llama",
        "base_config_digest": DIGEST,
        "method": "lora",
        "params": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
        "metrics": {"loss": 1.25},
        "lineage": {"run_id": "run-1", "job": {"method": "lora"}},
    }
    arguments.update(overrides)
    return registry.publish(name, directory, **arguments)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store_uri(backend: str, request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("local_uri" if backend == "local" else "s3_uri")


@pytest.fixture
def registry(store_uri: str, tmp_path: Path) -> Registry:
    return Registry(open_store(store_uri), cache_dir=tmp_path / "cache")


def _same_tree(a: Path, b: Path) -> bool:
    files_a = {p.relative_to(a).as_posix(): p.read_bytes() for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b).as_posix(): p.read_bytes() for p in b.rglob("*") if p.is_file()}
    return files_a == files_b


def test_publish_resolve_download_round_trip(registry: Registry, tmp_path: Path) -> None:
    source = make_adapter(tmp_path / "adapter")
    manifest = publish(registry, "my-adapter", source)
    assert manifest.ref == "my-adapter@1"
    assert {entry.path for entry in manifest.files} == {"adapter_config.json", "adapter_model.safetensors", "tokenizer/vocab.json"}
    assert manifest.created_at.utcoffset().total_seconds() == 0

    resolved = registry.resolve("my-adapter")
    assert resolved == manifest == registry.resolve("my-adapter@1")
    assert resolved.params["targets"] == ["q_proj", "v_proj"]
    assert resolved.lineage["run_id"] == "run-1"

    local = registry.download("my-adapter@1")
    assert _same_tree(local, source)

    second = publish(registry, "my-adapter", make_adapter(tmp_path / "adapter2", seed=1))
    assert second.version == 2
    assert registry.resolve("my-adapter").version == 2
    assert registry.versions("my-adapter") == [1, 2]
    assert _same_tree(registry.download("my-adapter"), tmp_path / "adapter2")
    assert _same_tree(registry.download("my-adapter@1"), source)  # old versions stay immutable


def test_layout_and_manifest_contents(registry: Registry, tmp_path: Path) -> None:
    publish(registry, "m", make_adapter(tmp_path / "a"), kind="model", method=None)
    keys = registry.store.list("registry/m/1")
    assert "registry/m/1/manifest.json" in keys
    assert "registry/m/1/files/tokenizer/vocab.json" in keys
    stored = json.loads(registry.store.get_bytes("registry/m/1/manifest.json"))
    assert stored["kind"] == "model" and stored["method"] is None
    assert stored["base_config_digest"] == DIGEST
    assert all(len(entry["sha256"]) == 64 and entry["size"] > 0 for entry in stored["files"])
    shown = registry.show("m")
    assert shown["ref"] == "m@1" and shown["uri"].endswith("registry/m/1/files") and shown["total_size"] > 2048


class RecordingStoreMixin:
    """Records every write/delete in order (real store underneath)."""

    events: list[tuple[str, str]]

    def put_file(self, local_path: Any, key: str) -> None:
        self.events.append(("put", key))
        super().put_file(local_path, key)  # type: ignore[misc]

    def put_bytes(self, data: bytes, key: str, *, overwrite: bool = True) -> None:
        self.events.append(("put", key))
        super().put_bytes(data, key, overwrite=overwrite)  # type: ignore[misc]

    def get_file(self, key: str, local_path: Any) -> None:
        self.events.append(("get", key))
        super().get_file(key, local_path)  # type: ignore[misc]

    def delete(self, key: str) -> None:
        self.events.append(("delete", key))
        super().delete(key)  # type: ignore[misc]

    def delete_prefix(self, prefix: str) -> int:
        self.events.append(("delete_prefix", prefix))
        return super().delete_prefix(prefix)  # type: ignore[misc]


def recording(store: Store) -> Store:
    """The same store wrapped in RecordingStoreMixin."""
    if isinstance(store, S3Store):
        wrapped: Store = type("RecordingS3", (RecordingStoreMixin, S3Store), {})(store.bucket, store.prefix, options=store.options)
    else:
        assert isinstance(store, LocalStore)
        wrapped = type("RecordingLocal", (RecordingStoreMixin, LocalStore), {})(store.root)
    wrapped.events = []  # type: ignore[attr-defined]
    return wrapped


def test_manifest_written_last_and_deleted_first(store_uri: str, tmp_path: Path) -> None:
    store = recording(open_store(store_uri))
    registry = Registry(store, cache_dir=tmp_path / "cache")
    publish(registry, "ordered", make_adapter(tmp_path / "a"))
    puts = [key for op, key in store.events if op == "put"]  # type: ignore[attr-defined]
    assert puts[0] == "registry/ordered/1/.claim"
    assert puts[-1] == "registry/ordered/1/manifest.json"
    assert len(puts) == 5

    store.events.clear()  # type: ignore[attr-defined]
    registry.delete("ordered@1")
    assert store.events == [  # type: ignore[attr-defined]
        ("delete", "registry/ordered/1/manifest.json"),
        ("delete_prefix", "registry/ordered/1/files"),
    ]


def test_cached_second_download_fetches_nothing(store_uri: str, tmp_path: Path) -> None:
    store = recording(open_store(store_uri))
    registry = Registry(store, cache_dir=tmp_path / "cache")
    source = make_adapter(tmp_path / "a")
    publish(registry, "cached", source)
    publish(registry, "cached", source)  # same bytes, new version

    def file_downloads() -> list[str]:
        return [key for op, key in store.events if op == "get"]  # type: ignore[attr-defined]

    store.events.clear()  # type: ignore[attr-defined]
    first = registry.download("cached@1")
    assert len(file_downloads()) == 3
    store.events.clear()  # type: ignore[attr-defined]
    assert registry.download("cached@1") == first
    assert registry.download("cached@2") != first  # another version, same content-addressed blobs
    assert file_downloads() == []
    assert _same_tree(registry.download("cached@2"), source)


def test_cached_download_sends_no_file_get_to_s3(s3_uri: str, tmp_path: Path) -> None:
    """The same property measured on the wire: only the manifest is fetched the second time."""
    store = open_store(s3_uri)
    assert isinstance(store, S3Store)
    registry = Registry(store, cache_dir=tmp_path / "cache")
    publish(registry, "wire", make_adapter(tmp_path / "a"))
    gets: list[str] = []
    store.client.meta.events.register("before-send.s3.GetObject", lambda request, **_: gets.append(request.url))
    registry.download("wire@1")
    assert sum("/files/" in url for url in gets) == 3
    gets.clear()
    registry.download("wire@1")
    assert [url.rsplit("/", 1)[-1] for url in gets] == ["manifest.json"]


def test_flipped_byte_is_detected_naming_the_file(registry: Registry, tmp_path: Path) -> None:
    publish(registry, "flip", make_adapter(tmp_path / "a"))
    key = "registry/flip/1/files/adapter_model.safetensors"
    data = bytearray(registry.store.get_bytes(key))
    data[100] ^= 0x01
    registry.store.put_bytes(bytes(data), key)
    with pytest.raises(IntegrityError, match=r"flip@1 file 'adapter_model\.safetensors'"):
        registry.download("flip")
    assert not (tmp_path / "cache" / "artifacts" / "flip").exists()
    assert not any((tmp_path / "cache" / "tmp").iterdir())


class FailingPutMixin:
    """A real store whose N-th put_file fails (like a network drop mid-publish)."""

    fail_on: int = 2
    also_fail_cleanup: bool = False

    def put_file(self, local_path: Any, key: str) -> None:
        self.puts = getattr(self, "puts", 0) + 1
        if self.puts == self.fail_on:
            raise StorageError(f"injected failure uploading {key}")
        super().put_file(local_path, key)  # type: ignore[misc]

    def delete_prefix(self, prefix: str) -> int:
        if self.also_fail_cleanup:
            raise StorageError("injected: store unreachable during cleanup")
        return super().delete_prefix(prefix)  # type: ignore[misc]


def failing(store: Store, **attributes: Any) -> Store:
    if isinstance(store, S3Store):
        wrapped: Store = type("FailingS3", (FailingPutMixin, S3Store), attributes)(store.bucket, store.prefix, options=store.options)
    else:
        assert isinstance(store, LocalStore)
        wrapped = type("FailingLocal", (FailingPutMixin, LocalStore), attributes)(store.root)
    return wrapped


@pytest.mark.parametrize("cleanup_fails", [False, True])
def test_failure_mid_publish_leaves_no_visible_version(
    store_uri: str, tmp_path: Path, cleanup_fails: bool, request: pytest.FixtureRequest
) -> None:
    good = Registry(open_store(store_uri), cache_dir=tmp_path / "cache")
    publish(good, "partial", make_adapter(tmp_path / "v1"))

    broken = Registry(failing(open_store(store_uri), also_fail_cleanup=cleanup_fails), cache_dir=tmp_path / "cache")
    with pytest.raises(StorageError, match="injected failure"):
        publish(broken, "partial", make_adapter(tmp_path / "v2", seed=2))

    assert good.versions("partial") == [1]
    assert good.resolve("partial").version == 1
    assert [m.ref for m in good.list(all_versions=True)] == ["partial@1"]
    assert not good.store.exists("registry/partial/2/manifest.json")
    with pytest.raises(NotFound, match=r"partial@2 is not published.*published versions: 1"):
        good.resolve("partial@2")
    assert _same_tree(good.download("partial"), tmp_path / "v1")
    if cleanup_fails:
        assert good.store.list("registry/partial/2")  # leftovers stay invisible; the number is skipped
    else:
        assert good.store.list("registry/partial/2") == []
    next_version = publish(good, "partial", make_adapter(tmp_path / "v3", seed=3)).version
    assert next_version == (3 if cleanup_fails else 2)
    if store_uri.startswith("s3://"):
        store = good.store
        assert isinstance(store, S3Store)
        assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def test_failure_in_multipart_part_mid_publish(s3_uri: str, s3_bucket: str, s3_server: S3Server, tmp_path: Path) -> None:
    options = S3Options(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_attempts=1)
    good = Registry(open_store(s3_uri, s3_options=options), cache_dir=tmp_path / "cache")
    publish(good, "large", make_adapter(tmp_path / "v1"))

    store = open_store(s3_uri, s3_options=options)
    assert isinstance(store, S3Store)

    def fail_second_part(request: Any, **_: Any) -> None:
        if "partNumber=2" in request.url:
            raise ConnectionClosedError(endpoint_url=request.url)

    store.client.meta.events.register("before-send.s3.UploadPart", fail_second_part)
    with pytest.raises(StorageError, match="big.safetensors"):
        publish(Registry(store, cache_dir=tmp_path / "cache"), "large", make_adapter(tmp_path / "v2", seed=2, extra_mib=7))

    client = s3_server.client()
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert good.versions("large") == [1]
    assert good.store.list("registry/large/2") == []
    assert good.resolve("large").version == 1


def test_concurrent_publishers_get_distinct_versions(registry: Registry, tmp_path: Path) -> None:
    sources = [make_adapter(tmp_path / f"src{i}", seed=i) for i in range(3)]
    results: list[Manifest] = []
    errors: list[BaseException] = []

    def run(source: Path) -> None:
        try:
            results.append(publish(Registry(registry.store, cache_dir=tmp_path / "cache"), "race", source))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(source,)) for source in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(m.version for m in results) == [1, 2, 3]
    for manifest in results:
        seed = json.loads((registry.download(manifest.ref) / "adapter_config.json").read_text())["seed"]
        assert _same_tree(registry.download(manifest.ref), sources[seed])


def test_list_latest_and_all_versions(registry: Registry, tmp_path: Path) -> None:
    assert registry.list() == []
    publish(registry, "b-model", make_adapter(tmp_path / "b"), kind="model")
    publish(registry, "a-adapter", make_adapter(tmp_path / "a1"))
    publish(registry, "a-adapter", make_adapter(tmp_path / "a2", seed=2))
    registry.store.put_bytes(b"{}", "registry/c/1/files/only-files-no-manifest")
    assert [m.ref for m in registry.list()] == ["a-adapter@2", "b-model@1"]
    assert [m.ref for m in registry.list(all_versions=True)] == ["a-adapter@1", "a-adapter@2", "b-model@1"]


def test_delete(registry: Registry, tmp_path: Path) -> None:
    publish(registry, "gone", make_adapter(tmp_path / "a"))
    publish(registry, "gone", make_adapter(tmp_path / "b", seed=1))
    deleted = registry.delete("gone")
    assert deleted.version == 2
    assert registry.versions("gone") == [1]
    assert registry.resolve("gone").version == 1
    assert [key for key in registry.store.list("registry/gone/2")] == ["registry/gone/2/.claim"]
    with pytest.raises(NotFound):
        registry.download("gone@2")
    assert publish(registry, "gone", make_adapter(tmp_path / "c", seed=2)).version == 3  # numbers never reused
    registry.delete("gone@1")
    registry.delete("gone@3")
    with pytest.raises(NotFound, match="no published version of 'gone'"):
        registry.resolve("gone")
    with pytest.raises(NotFound):
        registry.delete("gone@3")


def test_resolve_unknown(registry: Registry) -> None:
    with pytest.raises(NotFound, match="no published version of 'nothing'"):
        registry.resolve("nothing")
    with pytest.raises(NotFound, match=r"nothing@4 is not published.*no version is published"):
        registry.resolve("nothing@4")


def _plant_manifest(registry: Registry, name: str, body: dict[str, Any] | bytes) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    registry.store.put_bytes(data, f"registry/{name}/1/manifest.json")


def _valid_manifest_dict(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "version": 1,
        "kind": "adapter",
        "base_model": "b",
        "base_config_digest": DIGEST,
        "method": "lora",
        "params": {},
        "metrics": {},
        "lineage": {},
        "created_at": "2026-01-01T00:00:00Z",
        "files": [{"path": "a.json", "sha256": "0" * 64, "size": 1}],
    }


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m["files"].__setitem__(0, {"path": "../../etc/passwd", "sha256": "0" * 64, "size": 1}), "files.0.path"),
        (lambda m: m["files"].__setitem__(0, {"path": "/abs", "sha256": "0" * 64, "size": 1}), "files.0.path"),
        (lambda m: m.__setitem__("surprise", 1), "surprise"),
        (lambda m: m.__setitem__("version", 7), "describes hostile@7"),
        (lambda m: m["files"].append(dict(m["files"][0])), "more than once"),
        (lambda m: m.__setitem__("created_at", "2026-01-01T00:00:00"), "created_at"),
    ],
)
def test_tampered_manifest_is_rejected(registry: Registry, mutate: Any, message: str) -> None:
    manifest = _valid_manifest_dict("hostile")
    mutate(manifest)
    _plant_manifest(registry, "hostile", manifest)
    with pytest.raises(IntegrityError, match=message):
        registry.download("hostile@1")


def test_unparseable_manifest_is_rejected(registry: Registry) -> None:
    _plant_manifest(registry, "garbage", b"\x00not json")
    with pytest.raises(IntegrityError, match="garbage@1.*malformed"):
        registry.resolve("garbage")


def test_bad_publish_input_reports_every_problem_before_storage(tmp_path: Path) -> None:
    store = recording(open_store(str(tmp_path / "store")))
    registry = Registry(store, cache_dir=tmp_path / "cache")
    source = make_adapter(tmp_path / "a")
    with pytest.raises(InvalidArtifact) as info:
        publish(
            registry,
            "bad",
            source,
            kind="checkpoint",
            base_config_digest="not-a-digest",
            base_model="",
            metrics={"when": object()},
        )
    message = str(info.value)
    for field in ("kind", "base_config_digest", "base_model", "metrics.when"):
        assert field in message
    with pytest.raises(InvalidArtifact, match="is not a directory"):
        publish(registry, "bad", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArtifact, match="is empty"):
        publish(registry, "bad", tmp_path / "empty")
    assert store.events == []  # type: ignore[attr-defined]


def test_open_registry_defaults_to_local_home(rayft_home: Path, tmp_path: Path) -> None:
    registry = open_registry()
    assert isinstance(registry.store, LocalStore)
    assert registry.store.root == (rayft_home / "storage").resolve()
    assert registry.cache_dir == rayft_home / "cache"


# --------------------------------------------------------------------------- base config digest


def test_base_config_digest_matches_saved_copy(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128
    )
    config.save_pretrained(tmp_path / "base")
    reloaded = LlamaConfig.from_pretrained(tmp_path / "base")
    reloaded.use_cache = False  # training flips it
    reloaded.dtype = "bfloat16"  # a bf16 copy of the same model
    reloaded.save_pretrained(tmp_path / "copy")

    digest = base_config_digest(config.to_dict())
    assert len(digest) == 64
    assert base_config_digest(config.to_diff_dict()) == digest
    assert base_config_digest(reloaded.to_dict()) == digest
    assert base_config_digest_of_dir(tmp_path / "base") == digest
    assert base_config_digest_of_dir(tmp_path / "copy") == digest

    different = LlamaConfig.from_pretrained(tmp_path / "base", hidden_size=64)
    assert base_config_digest(different.to_dict()) != digest


def test_base_config_digest_ignores_volatile_keys() -> None:
    base = {"model_type": "llama", "hidden_size": 8, "architectures": ["B", "A"], "rope_parameters": {"rope_theta": 1.0}}
    noisy = {
        **base,
        "architectures": ["A", "B"],
        "transformers_version": "9.9",
        "_name_or_path": "/somewhere",
        "torch_dtype": "float16",
        "use_cache": False,
        "id2label": {0: "LABEL_0", 1: "LABEL_1"},
    }
    assert base_config_digest(noisy) == base_config_digest(base)
    assert base_config_digest({**base, "rope_parameters": {"rope_theta": 2.0}}) != base_config_digest(base)


def test_cache_repairs_a_damaged_artifact_dir_without_downloading(local_uri: str, tmp_path: Path) -> None:
    store = recording(open_store(local_uri))
    registry = Registry(store, cache_dir=tmp_path / "cache")
    source = make_adapter(tmp_path / "a")
    publish(registry, "repair", source)
    local = registry.download("repair")
    (local / "tokenizer" / "vocab.json").unlink()
    store.events.clear()  # type: ignore[attr-defined]
    assert registry.download("repair") == local
    assert _same_tree(local, source)
    assert [op for op, _ in store.events if op == "get"] == []  # type: ignore[attr-defined]


def test_concurrent_downloads_share_one_directory(registry: Registry, tmp_path: Path) -> None:
    source = make_adapter(tmp_path / "a")
    publish(registry, "shared", source)
    results: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(registry.download("shared"))
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(results)) == 1
    assert _same_tree(results[0], source)
    assert [p.name for p in results[0].parent.iterdir()] == [results[0].name]  # no staging left behind
