"""Bring artifacts made outside rayft into the registry (push), and take them out again (pull).

`push_directory` accepts the formats everyone writes: a peft adapter directory
(`adapter_config.json` + `adapter_model.safetensors`) or a transformers model directory
(`config.json` + `*.safetensors`). It reads what the files say (peft type, rank, targets,
base model), records the base model's config digest, so the adapter later loads only onto
that base (serving and merging check it), and refuses pickle weights and formats rayft
does not load before anything is uploaded. `pull_directory` writes a published version
back out as the same plain directory, every file checked against the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from storage.errors import InvalidArtifact, NotFound, RayftError
from storage.models import REGISTRY_PREFIX, read_model_config, resolve_model_dir
from storage.registry import ArtifactKind, ArtifactTraits, Manifest, Registry, base_config_digest
from storage.safety import check_weight_files
from storage.store import sha256_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"
#: Weight formats rayft does not load (not pickle, but not safetensors either): refused at push.
OTHER_WEIGHT_SUFFIXES = frozenset({".gguf", ".ggml", ".h5", ".msgpack", ".onnx", ".npz", ".npy", ".tflite", ".ot", ".pb"})
#: adapter_config.json fields recorded as the manifest's params (what the adapter is, not how it was trained).
_ADAPTER_PARAM_KEYS = (
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora",
    "rank_pattern", "alpha_pattern", "modules_to_save", "init_r", "target_r", "num_virtual_tokens", "feedforward_modules",
)
_CONVERT = "convert the weights to safetensors (`save_pretrained(dir, safe_serialization=True)`) and push again"


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidArtifact(f"{str(path.parent)!r} has no {path.name}: it is not {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidArtifact(f"{str(path)!r} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise InvalidArtifact(f"{str(path)!r} must hold a JSON object")
    return data


def _check_formats(root: Path) -> list[Path]:
    """Refuse pickle and unknown weight formats; returns the safetensors files (headers checked)."""
    check_weight_files(root)  # pickle: refused by name, never opened
    files = sorted(p for p in root.rglob("*") if p.is_file())
    other = [p.relative_to(root).as_posix() for p in files if p.suffix.lower() in OTHER_WEIGHT_SUFFIXES]
    if other:
        raise InvalidArtifact(f"{str(root)!r} holds weights in a format rayft does not load ({', '.join(other[:5])}); {_CONVERT}")
    tensors = [p for p in files if p.suffix.lower() == ".safetensors"]
    from safetensors import safe_open  # reads the header only: a renamed or truncated file fails here

    for path in tensors:
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as err:  # safetensors raises its own error types for malformed headers
            raise InvalidArtifact(f"{str(path)!r} is not a valid safetensors file ({type(err).__name__}: {err}); {_CONVERT}") from None
    return tensors


def adapter_params(config: dict[str, Any]) -> dict[str, Any]:
    """What an adapter_config.json says the adapter is (peft type, rank, alpha, targets, ...), JSON-ready."""
    params = {}
    for key in _ADAPTER_PARAM_KEYS:
        value = config.get(key)
        if value in (None, {}, []):
            continue
        params[key] = sorted(value) if isinstance(value, (list, set, tuple)) else value
    return params


def adapter_config_traits(config: dict[str, Any]) -> ArtifactTraits:
    """What an adapter made elsewhere is, from its adapter_config.json alone: the one place outside trainers/methods/
    that reads a method's serving rules off the files (storage cannot ask trainers/methods/, and a pushed adapter
    names no rayft method). peft's prompt-learning family (its PromptLearningConfig subclasses) lives in the prompt
    and serves not at all; peft multiplexes the LoRA family, a DoRA one in a batch of its own; any other
    weight-based type serves merged into its base."""
    from peft import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    peft_type = str(config.get("peft_type", "")).upper()
    if issubclass(PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type, object), PromptLearningConfig):
        return ArtifactTraits(serving="none", mixes_in_batch=False, prompt_learning=True)
    if peft_type == "LORA":
        return ArtifactTraits(serving="multiplexed", mixes_in_batch=not config.get("use_dora"))
    return ArtifactTraits(serving="merged", mixes_in_batch=False)


def artifact_traits(manifest: Manifest | None, config: dict[str, Any]) -> ArtifactTraits:
    """The traits of an adapter: the ones its manifest records (the method's, written by the publisher), else (an
    adapter pushed from elsewhere, a manifest from before traits were recorded, a local directory: `manifest` None)
    what `adapter_config_traits` reads from its adapter_config.json `config`."""
    if manifest is not None and manifest.traits is not None:
        return manifest.traits
    return adapter_config_traits(config)


def check_adapter_dir(root: Path) -> dict[str, Any]:
    """The adapter_config.json of a peft adapter directory, after checking its files; InvalidArtifact otherwise."""
    config = _read_json_object(root / ADAPTER_CONFIG, "a peft adapter directory (adapter_config.json + adapter_model.safetensors)")
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        raise InvalidArtifact(f"{str(root / ADAPTER_CONFIG)!r} has no peft_type: save the adapter with peft's save_pretrained")
    tensors = _check_formats(root)
    if root / ADAPTER_WEIGHTS not in tensors:
        raise InvalidArtifact(f"{str(root)!r} has no {ADAPTER_WEIGHTS} (peft's safetensors weights file); {_CONVERT}")
    return config


def check_model_dir(root: Path) -> dict[str, Any]:
    """The config.json of a transformers model directory, after checking its files; InvalidArtifact otherwise."""
    config = _read_json_object(root / MODEL_CONFIG, "a transformers model directory (config.json + *.safetensors)")
    if not config.get("model_type"):
        raise InvalidArtifact(f"{str(root / MODEL_CONFIG)!r} has no model_type: save the model with transformers' save_pretrained")
    if (root / ADAPTER_CONFIG).exists():
        raise InvalidArtifact(f"{str(root)!r} holds {ADAPTER_CONFIG}: it is a peft adapter, push it with --kind adapter")
    if not _check_formats(root):
        raise InvalidArtifact(f"{str(root)!r} has no *.safetensors weights; {_CONVERT}")
    index = root / "model.safetensors.index.json"
    if index.exists():
        shards = set(_read_json_object(index, "a safetensors index").get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (root / s).is_file())
        if missing:
            raise InvalidArtifact(f"{str(index)!r} lists shards that are not in the directory: {', '.join(missing[:5])}")
    return config


def resolve_base(registry: Registry, source: str) -> tuple[str, str]:
    """(base_model as recorded, config digest) of `registry:NAME[@V]` (pinned to its version), a local model
    directory (absolute path), an s3:// model directory or a hub id."""
    if source.startswith(REGISTRY_PREFIX):
        manifest = registry.resolve(source[len(REGISTRY_PREFIX):])
        if manifest.kind != "model":
            raise InvalidArtifact(f"base model {source!r} is {manifest.ref}, an adapter: the base must be a published model")
        config = json.loads(registry.read_file(manifest.ref, MODEL_CONFIG))
        return f"{REGISTRY_PREFIX}{manifest.ref}", base_config_digest(config)
    local = Path(source).expanduser()
    if local.exists():
        if not (local / MODEL_CONFIG).is_file():
            raise NotFound(f"base model {source!r} has no {MODEL_CONFIG}: pass a transformers model directory or registry:NAME[@V]")
        return str(local.resolve()), base_config_digest(read_model_config(str(local)))
    model_dir = resolve_model_dir(source, registry.store.uri)
    return source, base_config_digest(read_model_config(model_dir))


def push_directory(
    registry: Registry, directory: str | os.PathLike[str], name: str, kind: ArtifactKind, base_model: str | None
) -> Manifest:
    """Publish a plain peft adapter or transformers model directory as the next version of `name`.

    An adapter needs its base: `base_model` (`registry:NAME[@V]`, a local model directory, s3:// or a
    hub id), else the `base_model_name_or_path` its adapter_config.json names. A model is its own
    base (its config digest is recorded); `base_model` then only names where it came from.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise InvalidArtifact(f"cannot push {name!r}: {str(directory)!r} is not a directory")
    lineage: dict[str, Any] = {"pushed_from": str(root.resolve())}
    if kind == "adapter":
        config = check_adapter_dir(root)
        named = config.get("base_model_name_or_path")
        source = base_model or named
        if not source:
            raise InvalidArtifact(
                f"cannot push {name!r}: {ADAPTER_CONFIG} names no base model; pass --base-model registry:NAME[@V] or a local model directory"
            )
        try:
            recorded, digest = resolve_base(registry, source)
        except RayftError as err:
            how = "" if base_model else f" ({ADAPTER_CONFIG} names it); pass --base-model registry:NAME[@V] or a local model directory"
            raise InvalidArtifact(f"cannot push {name!r}: base model {source!r}: {err}{how}") from None
        params = adapter_params(config)
        traits: ArtifactTraits | None = adapter_config_traits(config)
        if named:
            lineage["adapter_config_base_model"] = named
    else:
        config = check_model_dir(root)
        digest = base_config_digest(config)
        recorded = base_model or name
        params = {"model_type": config["model_type"], "architectures": config.get("architectures") or []}
        traits = None  # a model serves as a base of its own
    # method None: the manifest says "not trained here"; params say what the files are.
    return registry.publish(
        name, root, kind=kind, base_model=recorded, base_config_digest=digest,
        method=None, params=params, metrics={}, lineage=lineage, traits=traits,
    )


def pull_directory(registry: Registry, ref: str, destination: str | os.PathLike[str]) -> tuple[Manifest, Path]:
    """Write a published version's files to `destination` (a new or empty directory), each checked against the
    manifest's sha256; returns (manifest, destination). Nothing is left at `destination` if a check fails."""
    dest = Path(destination).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InvalidArtifact(f"cannot pull {ref}: {str(dest)!r} exists and is not an empty directory; pick a new directory")
    manifest = registry.resolve(ref)
    cached = registry.download(manifest.ref)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.pull-", dir=dest.parent))
    try:
        for entry in manifest.files:
            target = staging.joinpath(*entry.path.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached.joinpath(*entry.path.split("/")), target)  # a copy: cache blobs are read-only links
            sha256, size = sha256_file(target)
            if (sha256, size) != (entry.sha256, entry.size):
                raise InvalidArtifact(
                    f"cannot pull {manifest.ref}: {entry.path} has sha256 {sha256[:16]}... but the manifest says "
                    f"{entry.sha256[:16]}...; the local cache is damaged: delete it ($RAYFT_HOME/cache) and pull again"
                )
        if dest.exists():
            dest.rmdir()
        os.rename(staging, dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest, dest
