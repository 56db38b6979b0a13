"""The vLLM engine (`engine: vllm`): settings, adapter folders and deployment building, without importing
vLLM or Ray Serve LLM (they take seconds to import; the deployment class is in serve.vllm_server).

Models are decoded by vLLM in Ray Serve LLM deployments (`serve.vllm_server.VllmServer`) behind the
same rayft API (serve.app's ingress) as the transformers engine. Adapters come from the registry:
`name@version` is downloaded through the verified cache (checksums, no pickle), checked against the
base and against what vLLM's LoRA kernels can run (`adapter_problems(..., vllm_max_rank=)`), and only
then copied into its own immutable folder `<name>--v<N>` that vLLM loads (`materialize_adapter`). A
new version is a new folder and a new vLLM LoRA id, never masked by a cached old one; "latest" is
resolved by the ingress, not by vLLM. Engine settings come from the spec's `vllm` section, with
defaults derived from the base model and the registry (`engine_kwargs_for`). Building the deployments (Ray Serve
LLM's configs) is serve.vllm_server's, beside the deployment class.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

from serve.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_rank
from serve.spec import VLLM_LORA_RANKS, ServeSpec
from storage.errors import IntegrityError, RayftError
from storage.registry import Manifest, Registry
from storage.store import sha256_file

#: Smallest max_lora_rank rayft derives: vLLM's kernels are sized for it; tiny ranks gain nothing.
_MIN_DERIVED_RANK = 8
#: Most registry adapters whose config is read to derive max_lora_rank when a replica starts.
_RANK_SCAN_LIMIT = 512


# --------------------------------------------------------------------------- engine settings


def _derived_rank(ranks: list[int]) -> int:
    """The smallest rank vLLM accepts that covers every rank (at least 8; at most 512, larger ones are refused at load)."""
    need = max([_MIN_DERIVED_RANK, *ranks])
    return next((r for r in VLLM_LORA_RANKS if r >= need), VLLM_LORA_RANKS[-1])


def engine_kwargs_for(spec: ServeSpec, name: str, model_config: dict[str, Any], adapter_ranks: list[int]) -> dict[str, Any]:
    """vLLM engine arguments for deployment `name` (the base or a merged model): the spec's `vllm` settings,
    defaults derived from the model config and the adapters of this base in the registry, then `engine_kwargs`."""
    settings = spec.vllm
    entry = spec.base if name == spec.base.name else next(m for m in spec.merged if m.name == name)
    gpus = entry.deployment.gpus
    positions = model_config.get("max_position_embeddings") or model_config.get("n_positions")
    max_len = settings.max_model_len or min(
        [n for n in (positions, spec.api.max_prompt_tokens + spec.api.max_tokens_limit) if n]
    )
    dtype = entry.dtype if entry.dtype != "auto" else ("bfloat16" if gpus > 0 else "float32")
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "max_model_len": max_len,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "enforce_eager": settings.enforce_eager,
    }
    if gpus > 0:
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
    if name == spec.base.name:
        per_replica = spec.base.adapters.max_per_replica
        max_loras = settings.max_loras or per_replica
        kwargs.update(
            enable_lora=True,
            max_lora_rank=settings.max_lora_rank or _derived_rank(adapter_ranks),
            max_loras=max_loras,
            max_cpu_loras=max(settings.max_cpu_loras or per_replica, max_loras),
        )
    return {**kwargs, **settings.engine_kwargs}


def registry_lora_ranks(registry: Registry, base_digest: str) -> list[int]:
    """LoRA ranks of the adapters published for this base (latest versions), read from their verified adapter_config.json."""
    import json

    ranks = []
    adapters = [m for m in registry.list() if m.kind == "adapter" and m.base_config_digest == base_digest]
    for manifest in adapters[:_RANK_SCAN_LIMIT]:
        entry = next((f for f in manifest.files if f.path == ADAPTER_CONFIG), None)
        if entry is None:
            continue
        try:
            data = registry.store.get_bytes(registry._file_key(manifest.name, manifest.version, entry.path))
            if _sha256(data) != entry.sha256:  # a tampered config does not size the engine; it is refused at load
                continue
            ranks.append(lora_rank(json.loads(data)))
        except (RayftError, ValueError):
            continue
    return ranks


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def weight_shapes(model_dir: str) -> dict[str, tuple[int, int]]:
    """Module path → (in_features, out_features) of every 2-D weight in a model directory's safetensors files,
    read from their headers: the layer shapes an adapter must fit, without loading the model in torch."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                if key.endswith(".weight") and len(shape) == 2:
                    shapes[key[: -len(".weight")]] = (shape[1], shape[0])
    return shapes


# --------------------------------------------------------------------------- adapters as immutable folders


def adapter_folder(manifest: Manifest) -> str:
    """`<name>--v<N>`: one folder per published version, so a new version never meets an old one's files."""
    return f"{manifest.name}--v{manifest.version}"


def materialize_adapter(directory: Path, manifest: Manifest, root: Path) -> Path:
    """The folder vLLM loads `manifest`'s adapter from: only its config and safetensors weights, copied from the
    verified download. An existing folder is reused only if both files still match the manifest's checksums."""
    target = root / adapter_folder(manifest)
    wanted = {entry.path: entry.sha256 for entry in manifest.files if entry.path in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
    if target.is_dir() and all((target / p).is_file() and sha256_file(target / p)[0] == sha for p, sha in wanted.items()):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{target.name}.{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    for path, sha in wanted.items():
        shutil.copyfile(directory / path, staging / path)
        if sha256_file(staging / path)[0] != sha:
            shutil.rmtree(staging, ignore_errors=True)
            raise IntegrityError(f"{manifest.ref}: {path} changed while it was copied for vLLM; retry the request")
    if target.exists():  # stale or tampered: replace it whole
        shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:  # another replica on this node made it first: its copy was verified the same way
        shutil.rmtree(staging, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- base rows on CPU (a vLLM CPU bug)


def require_cpu_lora_fix(settings: dict[str, Any]) -> None:
    """On CPU with LoRA on, vLLM must load rayft's plugin (`serve.vllm_cpu_lora`): without it, a base-model row
    batched with adapter rows gets the last slot's adapter (wrong answers, status 200). vLLM finds the plugin through
    rayft's installed entry points, so rayft must be installed as a package where the replica runs."""
    if not settings.get("enable_lora"):
        return
    from vllm.platforms import current_platform

    from serve.vllm_cpu_lora import is_registered

    if current_platform.is_cpu() and not is_registered():
        raise RayftError("engine: vllm on CPU with adapters needs rayft installed as a package where the replicas run "
                         "(`pip install .` or the Makefile's install; rayft's vLLM plugin `serve.vllm_cpu_lora` fixes "
                         "base-model rows in vLLM's CPU LoRA kernels); or serve with engine: transformers")


def spec_entry(spec: ServeSpec, name: str) -> Any:
    return spec.base if name == spec.base.name else next(m for m in spec.merged if m.name == name)
