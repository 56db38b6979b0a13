"""Adapters from the registry in a model replica: can this deployment serve one, and the pool
that attaches them to the transformers engine's model.

`fetch_adapter` downloads through the registry's verified cache (checksums, no pickle);
`adapter_problems` says why an adapter cannot be served on a base (wrong base, a method the
engine cannot run, files that do not parse or do not fit the base's layers); `AdapterPool`
attaches adapters to one shared `PeftModel` and unloads the ones Serve's LRU evicted once no
request uses them. The vLLM engine (`serve.vllm_engine`) uses the same checks, with the
limits of vLLM's LoRA kernels (`vllm_max_rank`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve.metrics import ModelMetrics
from serve.spec import AdapterPolicy
from storage.artifacts import artifact_traits
from storage.errors import RayftError
from storage.registry import ArtifactTraits, Manifest, Registry
from storage.safety import load_safetensors

if TYPE_CHECKING:
    from serve.generation import Engine

logger = logging.getLogger("ray.serve")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterNotServable(RayftError):
    """An adapter that this deployment refuses to load (wrong base, unsupported method, bad files)."""

    http_status = 422


def linear_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """Module path → (in_features, out_features) of every linear layer of a plain transformers model."""
    import torch

    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


# --------------------------------------------------------------------------- servability


def fetch_adapter(registry: Registry, ref: str) -> tuple[Path, Manifest, dict[str, Any]]:
    """Download (through the verified local cache) and read an adapter; returns (dir, manifest, adapter_config)."""
    manifest = registry.resolve(ref)
    if manifest.kind != "adapter":
        raise AdapterNotServable(
            f"{manifest.ref} is a published model, not an adapter: serve it as a merged model "
            f"(merged: [{{name: ..., source: 'registry:{manifest.name}'}}] in the serve spec)"
        )
    directory = registry.download(manifest.ref)
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise AdapterNotServable(f"{manifest.ref} has no {ADAPTER_CONFIG}: it is not a peft adapter directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterNotServable(f"{manifest.ref}: {ADAPTER_CONFIG} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise AdapterNotServable(f"{manifest.ref}: {ADAPTER_CONFIG} must hold a JSON object")
    return directory, manifest, config


def adapter_problems(
    manifest: Manifest,
    config: dict[str, Any],
    directory: Path,
    *,
    base_name: str,
    base_digest: str,
    shapes: dict[str, tuple[int, int]],
    policy: AdapterPolicy | None,
    vllm_max_rank: int | None = None,
) -> list[str]:
    """Why this adapter cannot be served on this base (empty if it can).

    `policy` None checks for a merge at load (any weight-based peft method); otherwise
    for multiplexing (LoRA family only, within the policy's limits). `vllm_max_rank` set:
    for vLLM's LoRA kernels instead (plain LoRA up to that rank; `policy` is then unused).
    """
    problems = []
    if manifest.base_config_digest != base_digest:
        problems.append(
            f"it was trained on base model {manifest.base_model!r} (config digest {manifest.base_config_digest[:12]}), "
            f"but this deployment serves {base_name!r} (digest {base_digest[:12]}): serve it from a deployment of its own base"
        )
    traits = artifact_traits(manifest, config)  # the method's, from the manifest (or read off the files)
    peft_type = str(config.get("peft_type", "")).upper()
    method = manifest.method or peft_type.lower() or "unknown"
    if traits.serving == "none":
        how = "works through the prompt and " if traits.prompt_learning else ""
        problems.append(f"method {method} ({peft_type}) {how}cannot be merged or multiplexed")
    elif vllm_max_rank is not None:
        problems += _vllm_problems(config, traits, method, vllm_max_rank, manifest.ref)
    elif policy is not None and traits.serving != "multiplexed":
        problems.append(
            f"method {method} ({peft_type or 'no peft_type'}) cannot be multiplexed (peft mixes LoRA-family adapters only): "
            "publish it merged (`rayft train --merge`) and serve it under `merged:`"
        )
    if policy is not None and vllm_max_rank is None and traits.serving == "multiplexed":
        rank = lora_rank(config)
        if rank > policy.max_rank:
            problems.append(f"LoRA rank {rank} is above adapters.max_rank ({policy.max_rank}) of this deployment")
        if not traits.mixes_in_batch and not policy.allow_dora:  # the multiplexed method that decodes alone: DoRA
            problems.append("it is a DoRA adapter and this deployment has adapters.allow_dora: false")
        if config.get("modules_to_save"):
            problems.append(
                f"it carries full copies of {config['modules_to_save']} (modules_to_save), which are not multiplexed: serve it merged"
            )
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        problems.append(f"it has no {ADAPTER_WEIGHTS} (only safetensors weights are loaded)")
    elif manifest.base_config_digest == base_digest:  # on another base, shape mismatches only repeat that
        problems += _weight_problems(weights, shapes)
    return problems


def lora_rank(config: dict[str, Any]) -> int:
    """The largest LoRA rank of an adapter_config.json (its `r`, or a larger one in `rank_pattern`)."""
    ranks = [config.get("r", 0)] + list((config.get("rank_pattern") or {}).values())
    try:
        return max(int(r) for r in ranks)
    except (TypeError, ValueError):
        return 0


def vllm_unsupported(traits: ArtifactTraits, config: dict[str, Any]) -> list[tuple[str, Any]]:
    """What of an adapter vLLM's LoRA kernels cannot run, as (what, detail): ("type", peft_type) for a method that is
    not multiplexed, ("dora", None) for one that cannot share a batch (DoRA), ("modules_to_save", the modules) from
    its adapter_config.json `config`. Serving and evaluation word them."""
    if traits.serving != "multiplexed":
        return [("type", str(config.get("peft_type", "")).upper())]
    found: list[tuple[str, Any]] = [] if traits.mixes_in_batch else [("dora", None)]
    return found + ([("modules_to_save", config["modules_to_save"])] if config.get("modules_to_save") else [])


def _vllm_problems(config: dict[str, Any], traits: ArtifactTraits, method: str, max_rank: int, ref: str) -> list[str]:
    """What vLLM's LoRA kernels cannot run (it refuses these itself, later and less clearly), with the alternatives."""
    problems = []
    for what, detail in vllm_unsupported(traits, config):
        problems.append({
            "type": f"method {method} ({detail or 'no peft_type'}) is not served by vLLM, which runs LoRA adapters only",
            "dora": "it is a DoRA adapter, which vLLM does not serve",
            "modules_to_save": f"it carries full copies of {detail} (modules_to_save), which vLLM does not serve",
        }[what])
    if traits.serving == "multiplexed":
        rank = lora_rank(config)
        if rank > max_rank:
            problems.append(f"its LoRA rank {rank} is above vllm.max_lora_rank ({max_rank}) of this deployment "
                            "(set vllm.max_lora_rank, at most 512, and redeploy)")
    if problems:
        problems.append(
            f"to serve it anyway: the transformers engine (`engine: transformers`) serves it as it is, or serve it merged "
            f"into the base (`merged: [{{name: ..., adapter: '{ref}'}}]` in the serve spec, or a model published by "
            "`rayft merge --full` / `rayft train --merge`)"
        )
    return problems


def _weight_problems(weights: Path, shapes: dict[str, tuple[int, int]]) -> list[str]:
    """Tensors that do not parse, or LoRA factors that do not fit the base model's layers."""
    try:
        tensors = load_safetensors(weights)
    except Exception as err:  # safetensors raises its own error types for malformed headers / truncation
        return [f"{ADAPTER_WEIGHTS} is not a valid safetensors file ({type(err).__name__}: {err})"]
    problems: list[str] = []
    for key, tensor in tensors.items():
        for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
            if not key.endswith(part):
                continue
            path = key[: -len(part)].removeprefix("base_model.model.")
            if path not in shapes:
                problems.append(f"it adapts layer {path!r}, which the base model does not have")
            else:
                expected = shapes[path][0 if dim == 1 else 1]
                if tensor.ndim != 2 or tensor.shape[dim] != expected:
                    problems.append(f"{key} has shape {tuple(tensor.shape)}, which does not fit layer {path!r} ({expected} features)")
        if len(problems) >= 5:
            break
    if not tensors:
        problems.append(f"{ADAPTER_WEIGHTS} holds no tensors")
    return problems


# --------------------------------------------------------------------------- adapters in a replica


class LoadedAdapter:
    """An adapter attached to this replica's model. Serve's LRU evicts it by calling `__del__`."""

    def __init__(self, pool: AdapterPool, ref: str, peft_name: str, solo: bool):
        self.pool = pool
        self.ref = ref
        self.peft_name = peft_name
        self.solo = solo  # a method that does not mix in a batch (DoRA): decoded in a group of its own
        self.in_use = 0
        self.evicted = False

    def __del__(self) -> None:
        # Serve calls this when it evicts the adapter, and the garbage collector calls it
        # again later: eviction is idempotent (STACK-NOTES).
        pool = self.__dict__.get("pool")
        if pool is not None:
            pool.evict(self)


class AdapterPool:
    """Loads adapters onto the engine's model and unloads evicted ones once no request uses them."""

    def __init__(self, engine: Engine, registry: Registry, *, base_name: str, base_digest: str,
                 reload_base: Callable[[], Any], shapes: dict[str, tuple[int, int]], policy: AdapterPolicy,
                 metrics: ModelMetrics):
        self.engine = engine
        self.registry = registry
        self.base_name = base_name
        self.base_digest = base_digest
        self.reload_base = reload_base  # a fresh base model, if a failed attach left the base half-wrapped
        self.shapes = shapes
        self.policy = policy
        self.metrics = metrics
        self._lock = threading.Lock()  # in_use / evicted / live / retired; eviction comes from Serve's executor thread
        self.live: dict[str, LoadedAdapter] = {}
        self.retired: list[LoadedAdapter] = []
        self._names = itertools.count(1)
        engine.maintenance.append(self.unload_retired)

    def is_live(self, ref: str) -> bool:
        with self._lock:
            return ref in self.live

    def acquire(self, adapter: LoadedAdapter) -> None:
        with self._lock:
            adapter.in_use += 1

    def release(self, adapter: LoadedAdapter) -> None:
        with self._lock:
            adapter.in_use -= 1

    def evict(self, adapter: LoadedAdapter) -> None:
        with self._lock:
            if adapter.evicted:
                return
            adapter.evicted = True
            if self.live.get(adapter.ref) is adapter:
                del self.live[adapter.ref]
            self.retired.append(adapter)
        self.metrics.cache_event(adapter.ref, "eviction")

    async def load(self, ref: str) -> LoadedAdapter:
        """Fetch, check and attach `ref` (`name@version`); AdapterNotServable etc. if it cannot be served."""
        started = time.perf_counter()
        try:
            directory, manifest, config = await asyncio.to_thread(fetch_adapter, self.registry, ref)
            problems = adapter_problems(
                manifest, config, directory, base_name=self.base_name, base_digest=self.base_digest,
                shapes=self.shapes, policy=self.policy,
            )
            if problems:
                raise AdapterNotServable(f"adapter {manifest.ref} cannot be served: " + "; ".join(problems))
            solo = not artifact_traits(manifest, config).mixes_in_batch
            adapter = LoadedAdapter(self, manifest.ref, f"adapter{next(self._names)}", solo=solo)
            await asyncio.to_thread(self.engine.run_locked, lambda: self._attach(adapter, directory))
        except RayftError as err:
            self.metrics.refused(ref, type(err).__name__)
            raise
        with self._lock:
            self.live[ref] = adapter
        self.metrics.adapter_loaded(ref, time.perf_counter() - started)
        return adapter

    def _attach(self, adapter: LoadedAdapter, directory: Path) -> None:
        """Under the engine lock: add the adapter to the model (wrapping the base in a PeftModel first)."""
        import peft

        model = self.unload_retired(self.engine.model)
        try:
            if isinstance(model, peft.PeftModel):
                model.load_adapter(str(directory), adapter_name=adapter.peft_name, is_trainable=False)
            else:
                model = peft.PeftModel.from_pretrained(model, str(directory), adapter_name=adapter.peft_name, is_trainable=False)
        except Exception as err:
            model = self._recover(model, adapter.peft_name)
            self.engine.model = model
            raise AdapterNotServable(f"adapter {adapter.ref} cannot be served: peft could not load it ({type(err).__name__}: {err})") from None
        model.eval()
        self.engine.model = model

    def _recover(self, model: Any, peft_name: str) -> Any:
        """After a failed attach: drop the half-added adapter, or reload a base peft may have half-wrapped."""
        import peft

        if isinstance(model, peft.PeftModel):
            if peft_name in model.peft_config:
                return _delete_adapter(model, peft_name)
            return model
        logger.warning("reloading the base model after a failed adapter attach")
        return self.reload_base()

    def unload_retired(self, model: Any) -> Any:
        """Under the engine lock: delete evicted adapters no request uses any more; returns the (maybe unwrapped) model."""
        with self._lock:
            ready = [a for a in self.retired if a.in_use <= 0]
            self.retired = [a for a in self.retired if a.in_use > 0]
        for adapter in ready:
            if hasattr(model, "peft_config") and adapter.peft_name in model.peft_config:
                model = _delete_adapter(model, adapter.peft_name)
        return model

    def describe(self) -> dict[str, Any]:
        with self._lock:
            return {
                "live": sorted(self.live),
                "retired": [a.ref for a in self.retired],
                "attached": sorted(getattr(self.engine.model, "peft_config", {}).keys()),
            }


def _delete_adapter(model: Any, peft_name: str) -> Any:
    """Remove one adapter; the last one unwraps the PeftModel (peft cannot run one with no adapters)."""
    if len(model.peft_config) == 1:
        return model.unload()
    model.delete_adapter(peft_name)
    # Deleting the active adapter lets each layer pick its own successor (the first name *it* holds), so
    # q/v layers could run one adapter and MLP layers another while the model reports the first: the
    # engine's single-adapter pass trusts `active_adapter`, so every layer is set to the same one here.
    model.set_adapter(model.active_adapter if model.active_adapter in model.peft_config else next(iter(model.peft_config)))
    return model
