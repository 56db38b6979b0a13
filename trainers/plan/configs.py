"""A model's config for planning: read from wherever the model lives (`storage.models`), never its weights."""

from __future__ import annotations

import os

from storage.errors import RayftError
from storage.models import source_config
from trainers.plan.models import PlanError


def load_model_config(source: str, storage_uri: str | None = None):
    """The model's `PretrainedConfig` from a config.json, a model directory, s3://, registry:NAME (in `storage_uri`,
    default storage when None) or a hub id. Only the config is read: weights are never downloaded."""
    from transformers import AutoConfig

    try:
        data = source_config(source, storage_uri)
    except RayftError as exc:
        raise PlanError(f"{exc}; pass a local config.json or model directory" if "no such file" in str(exc) else str(exc)) from None
    if data is not None:
        return _config_from_dict(data, source)
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True)  # the local hub cache, if it has it
    except Exception:
        pass
    offline = _hub_unreachable()
    if offline:
        raise PlanError(f"model {source!r}: the hub is not reachable ({offline}); pass a local config.json path or model directory instead")
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as exc:  # unknown id, gated repo, network failure: all end the same way for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError(
            f"model {source!r}: cannot fetch its config from the hub ({first[:120]}); "
            "pass a local config.json path or model directory instead"
        ) from None


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached, or None: a quick check instead of huggingface_hub's ~30 s of retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a proxy decides; let the real request try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as exc:
        return f"offline: {exc.strerror or exc}"
    return None


def _config_from_dict(data: dict, source: str):
    from transformers import AutoConfig

    if not isinstance(data, dict) or "model_type" not in data:
        raise PlanError(f"model config {source!r}: no `model_type` key; it must be a transformers config.json")
    data = dict(data)
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as exc:
        raise PlanError(f"model config {source!r}: transformers does not know model_type {model_type!r} ({exc})") from None
