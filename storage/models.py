"""Where a base model comes from: a local directory, an s3:// prefix, the registry, or a hub id.

Shared by training and serving, so it lives with storage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from storage.errors import NotFound, RayftError
from storage.safety import check_weight_files

REGISTRY_PREFIX = "registry:"


def resolve_model_dir(source: str, storage_uri: str | None = None) -> str:
    """A local directory holding the model (downloaded if needed), or a hub id to pass through."""
    if source.startswith(REGISTRY_PREFIX):
        from storage.registry import Registry
        from storage.store import default_storage_uri, open_store

        registry = Registry(open_store(storage_uri or default_storage_uri()))
        return str(registry.download(source[len(REGISTRY_PREFIX):]))
    if source.startswith("s3://"):
        return str(_download_s3_dir(source))
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise NotFound(f"model.source: {source!r} has no config.json; it must be a transformers model directory")
        check_weight_files(path)
        return str(path)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise NotFound(f"model.source: local path {source!r} does not exist")
    return source  # a hub id such as "meta-llama/Llama-3.2-1B": from_pretrained fetches it


def _download_s3_dir(uri: str) -> Path:
    from storage.store import default_cache_dir, open_store

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
