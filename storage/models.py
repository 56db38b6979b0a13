"""Where a base model comes from: a local directory, an s3:// prefix, the registry, or a hub id.

Shared by training and serving, so it lives with storage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from storage.errors import NotFound, RayftError
from storage.registry import Registry
from storage.safety import check_weight_files
from storage.store import default_cache_dir, default_storage_uri, open_store

REGISTRY_PREFIX = "registry:"


def source_kind(source: str) -> str:
    """Where `source` lives: `registry`, `s3`, `local` (an existing path) or `hub` (an id such as
    "meta-llama/Llama-3.2-1B"); a path-like source that does not exist is NotFound."""
    if source.startswith(REGISTRY_PREFIX):
        return "registry"
    if source.startswith("s3://"):
        return "s3"
    if Path(source).expanduser().exists():
        return "local"
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith(".json"):
        raise NotFound(f"model.source: local path {source!r} does not exist (no such file or directory)")
    return "hub"


def resolve_model_dir(source: str, storage_uri: str | None = None) -> str:
    """A local directory holding the model (downloaded if needed), or a hub id to pass through."""
    kind = source_kind(source)
    if kind == "registry":
        registry = _registry(storage_uri)
        return str(registry.download(source[len(REGISTRY_PREFIX):]))
    if kind == "s3":
        return str(_download_s3_dir(source))
    if kind == "local":
        path = Path(source).expanduser()
        if not (path / "config.json").exists():
            raise NotFound(f"model.source: {source!r} has no config.json; it must be a transformers model directory")
        check_weight_files(path)
        return str(path)
    return source  # a hub id: from_pretrained fetches it


def source_config(source: str, storage_uri: str | None = None) -> dict | None:
    """The model's config.json as a dict, reading that file alone (never the weights): from a local model directory
    or config.json file, an s3:// model prefix or a registry ref; None for a hub id (transformers reads those)."""
    kind = source_kind(source)
    if kind == "hub":
        return None
    if kind == "local":
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / "config.json"
            if not path.is_file():
                raise NotFound(f"model.source: {source!r} has no config.json; pass a transformers model directory or its config.json")
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RayftError(f"model config {str(path)!r}: not readable JSON ({exc})") from None
    try:
        if kind == "registry":
            registry = _registry(storage_uri)
            store = open_store(registry.files_uri(registry.resolve(source[len(REGISTRY_PREFIX):])))
        else:
            store = open_store(source)
        data = store.get_bytes("config.json")
    except RayftError as exc:
        raise RayftError(f"model {source!r}: cannot read its config.json ({exc})") from None
    try:
        return json.loads(data)
    except ValueError as exc:
        raise RayftError(f"model {source!r}: its config.json is not JSON ({exc})") from None


def _registry(storage_uri: str | None):
    return Registry(open_store(storage_uri or default_storage_uri()))


def _download_s3_dir(uri: str) -> Path:
    store = open_store(uri)
    keys = store.list("")
    if "config.json" not in keys:
        raise NotFound(f"model.source: {uri} holds no config.json; it must be a transformers model directory")
    dest = Path(default_cache_dir()) / "s3-models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    for key in keys:
        target = dest / key
        if not target.exists() or target.stat().st_size != store.size(key):
            target.parent.mkdir(parents=True, exist_ok=True)
            store.get_file(key, target)
    check_weight_files(dest)
    return dest


#: Non-weight files of a base model that a model directory written from it (a merged or fine-tuned model) also needs.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def copy_tokenizer_files(base_dir: str | Path, out: Path, keep_existing: bool = False) -> None:
    """Copy the base model's `TOKENIZER_FILES` it has into `out` (`keep_existing`: leave files `out` already has)."""
    import shutil

    for name in TOKENIZER_FILES:
        if (Path(base_dir) / name).exists() and not (keep_existing and (out / name).exists()):
            shutil.copy2(Path(base_dir) / name, out / name)


def read_model_config(model_dir: str) -> dict:
    """The model's config.json as a dict (through transformers for hub ids)."""
    path = Path(model_dir) / "config.json"
    if path.exists():
        return json.loads(path.read_text())
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_dir).to_dict()
    except OSError as exc:
        raise RayftError(f"model.source: cannot load config for {model_dir!r}: {exc}") from None
