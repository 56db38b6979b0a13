"""storage.safety: names, refs and keys are checked before any storage call; pickle is never loaded."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from storage.errors import InvalidKey, InvalidName, UnsafeArtifact
from storage.registry import Manifest, Registry
from storage.safety import (
    NAME_PATTERN,
    check_weight_files,
    load_safetensors,
    parse_ref,
    validate_key,
    validate_name,
)
from storage.store import Store, open_store

HOSTILE_REFS = [
    "../x",
    "..",
    "a..b",
    "/etc/passwd",
    "%2e%2e%2f",
    "a/b",
    "a\\b",
    "a\x00b",
    "x" * 1024,
    "\u0430dapter",  # Cyrillic 'а' look-alike
    "s3://other/bucket",
    "file:///etc/passwd",
    "Adapter",
    "",
    " a",
    "a ",
    "a\n",
    "-a",
    ".a",
    "_a",
    "a@0",
    "a@03",
    "a@-1",
    "a@1.5",
    "a@",
    "a@@1",
    "a@1@2",
    "a@latest",
    "a@1\n",
    "a@\uff11",  # full-width digit one
    "../x@1",
]


class ForbiddenStore(Store):
    """A store on which every call fails the test: proves validation happens before storage."""

    uri = "forbidden://"
    calls: list[str]

    def __init__(self) -> None:
        self.calls = []

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(repr(args))
        raise AssertionError(f"storage was called: {args!r}")

    _put_file = _put_bytes = _get_file = _get_bytes = _exists = _size = _list = _delete = _delete_prefix = _uri_for = _fail


def _registry_operations(registry: Registry, ref: str, tmp_path: Path) -> list[Any]:
    return [
        lambda: registry.resolve(ref),
        lambda: registry.download(ref, cache_dir=tmp_path / "cache"),
        lambda: registry.show(ref),
        lambda: registry.delete(ref),
        lambda: registry.versions(ref),
    ]


@pytest.mark.parametrize("ref", HOSTILE_REFS, ids=lambda r: repr(r)[:30])
def test_hostile_refs_rejected_before_any_storage_call(ref: str, tmp_path: Path) -> None:
    store = ForbiddenStore()
    registry = Registry(store, cache_dir=tmp_path / "cache")
    for operation in _registry_operations(registry, ref, tmp_path):
        with pytest.raises(InvalidName):
            operation()
    with pytest.raises(InvalidName):
        registry.publish(
            ref,
            tmp_path,
            kind="adapter",
            base_model="b",
            base_config_digest="0" * 64,
            method="lora",
            params={},
            metrics={},
            lineage={},
        )
    assert store.calls == []


def test_hostile_refs_send_no_request_to_s3(s3_uri: str, tmp_path: Path) -> None:
    store = open_store(s3_uri)
    sent: list[str] = []
    store.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.url))
    registry = Registry(store, cache_dir=tmp_path / "cache")
    for ref in HOSTILE_REFS:
        for operation in _registry_operations(registry, ref, tmp_path):
            with pytest.raises(InvalidName):
                operation()
    assert sent == []
    registry.store.exists("probe")  # control: the hook does see real requests
    assert sent


def test_name_error_names_value_and_pattern() -> None:
    with pytest.raises(InvalidName) as info:
        validate_name("x" * 1024)
    message = str(info.value)
    assert NAME_PATTERN in message
    assert "'xxxx" in message
    assert len(message) < 400  # the 1 KB value is truncated, not echoed


def test_ref_error_explains_version_syntax() -> None:
    with pytest.raises(InvalidName, match=r"positive integer.*my-adapter@3"):
        parse_ref("good@03")


@pytest.mark.parametrize(
    ("ref", "expected"),
    [("a", ("a", None)), ("my-adapter_v1.2", ("my-adapter_v1.2", None)), ("m@1", ("m", 1)), ("0abc@42", ("0abc", 42))],
)
def test_valid_refs_parse(ref: str, expected: tuple[str, int | None]) -> None:
    assert parse_ref(ref) == expected


def test_name_length_limit() -> None:
    assert validate_name("a" * 64) == "a" * 64
    with pytest.raises(InvalidName):
        validate_name("a" * 65)


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "a/../b", "..", "a/./b", "a//b", "a/", "a\\b", "a\x00b", "a\nb", "k" * 1000],
    ids=lambda k: repr(k)[:20],
)
def test_hostile_keys_rejected(key: str) -> None:
    with pytest.raises(InvalidKey):
        validate_key(key)


def test_valid_keys_accepted() -> None:
    for key in ["a", "a/b/c.json", ".gitattributes", "x/.claim", "weird name/ü.txt"]:
        assert validate_key(key) == key


@pytest.mark.parametrize("filename", ["adapter_model.bin", "m.pt", "m.PTH", "s/x.pkl", "x.pickle", "last.ckpt", "training_args.bin"])
def test_check_weight_files_refuses_pickle_formats(filename: str, tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    target = tmp_path / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"not read")
    with pytest.raises(UnsafeArtifact) as info:
        check_weight_files(tmp_path)
    assert filename in str(info.value)
    assert "safe_serialization=True" in str(info.value)


def test_check_weight_files_accepts_safetensors_dir(tmp_path: Path) -> None:
    (tmp_path / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "adapter_config.json").write_text("{}")
    check_weight_files(tmp_path)


class _WritesMarker:
    """Unpickling this object writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.write_text, (self.marker, "unpickled"))


def pickle_bomb(marker: Path) -> bytes:
    """Bytes of an `adapter_model.bin` whose unpickling writes `marker`."""
    return pickle.dumps({"weights": _WritesMarker(marker)})


def test_pickle_bomb_is_live(tmp_path: Path) -> None:
    """Control: the payload used below really executes when unpickled (so its absence means something)."""
    marker = tmp_path / "control-marker"
    pickle.loads(pickle_bomb(marker))
    assert marker.read_text() == "unpickled"


def test_publish_refuses_pickle_and_never_unpickles(tmp_path: Path, local_uri: str) -> None:
    marker = tmp_path / "marker"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(pickle_bomb(marker))
    store = open_store(local_uri)
    registry = Registry(store, cache_dir=tmp_path / "cache")
    with pytest.raises(UnsafeArtifact, match=r"adapter_model\.bin.*safe_serialization=True"):
        registry.publish(
            "evil",
            adapter,
            kind="adapter",
            base_model="b",
            base_config_digest="0" * 64,
            method="lora",
            params={},
            metrics={},
            lineage={},
        )
    assert not marker.exists()
    assert store.list() == []


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_download_refuses_planted_pickle(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A version planted straight into the store (bypassing publish) with a pickle file is refused on download."""
    uri = request.getfixturevalue("local_uri" if backend == "local" else "s3_uri")
    store = open_store(uri)
    marker = tmp_path / "marker"
    bomb = pickle_bomb(marker)
    config = b"{}"
    store.put_bytes(bomb, "registry/evil/1/files/adapter_model.bin")
    store.put_bytes(config, "registry/evil/1/files/adapter_config.json")
    import hashlib
    from datetime import UTC, datetime

    manifest = Manifest(
        name="evil",
        version=1,
        kind="adapter",
        base_model="b",
        base_config_digest="0" * 64,
        method="lora",
        params={},
        metrics={},
        lineage={},
        created_at=datetime.now(UTC),
        files=[
            {"path": "adapter_model.bin", "sha256": hashlib.sha256(bomb).hexdigest(), "size": len(bomb)},
            {"path": "adapter_config.json", "sha256": hashlib.sha256(config).hexdigest(), "size": len(config)},
        ],
    )
    store.put_bytes(manifest.model_dump_json().encode(), "registry/evil/1/manifest.json")
    fetched: list[str] = []
    if backend == "s3":
        store.client.meta.events.register("before-send.s3.GetObject", lambda request, **_: fetched.append(request.url))
    registry = Registry(store, cache_dir=tmp_path / "cache")
    with pytest.raises(UnsafeArtifact, match=r"evil@1.*adapter_model\.bin.*safe_serialization=True"):
        registry.download("evil")
    assert not marker.exists()
    assert not (tmp_path / "cache" / "artifacts").exists()
    if backend == "s3":
        assert [url for url in fetched if "adapter_model.bin" in url] == []  # never even downloaded


def test_load_safetensors_roundtrip_and_refuses_other_formats(tmp_path: Path) -> None:
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    loaded = load_safetensors(tmp_path / "adapter_model.safetensors")
    assert torch.equal(loaded["w"], tensors["w"])

    marker = tmp_path / "marker"
    (tmp_path / "adapter_model.bin").write_bytes(pickle_bomb(marker))
    with pytest.raises(UnsafeArtifact, match="only .safetensors"):
        load_safetensors(tmp_path / "adapter_model.bin")
    assert not marker.exists()
