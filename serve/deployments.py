"""Ray Serve deployments that hold models.

`BaseModelServer`: one base model; adapters from the registry are loaded on demand,
multiplexed by Serve (`serve.multiplexed`: a request goes to a replica that already holds
its adapter; each replica keeps at most `adapters.max_per_replica`, LRU beyond) and
decoded together in mixed-adapter batches (`serve.generation.Engine`).

`MergedModelServer`: a plain transformers model, either published merged or merged from
an adapter at load with peft's `merge_and_unload`: no adapter code on its path.

Both answer `generate(request)` with a stream of small dicts (see `_respond`); refusals
are the first item, `{"error": {...}}`, so the API turns them into a 4xx and the replica
keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import torch
from ray import serve

from serve.generation import BASE_ADAPTER, Engine, Sequence, SamplingParams
from serve.metrics import ModelMetrics, count_s3_requests
from serve.protocol import ApiError, GenerateRequest, error_from
from serve.spec import AdapterPolicy, BatchSpec, ServeSpec
from storage.errors import RayftError
from storage.models import read_model_config, resolve_model_dir
from storage.registry import Manifest, Registry, base_config_digest, open_registry
from storage.safety import load_safetensors

logger = logging.getLogger("ray.serve")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _prompt_learning(peft_type: str) -> bool:
    """peft's own word (its configs' `is_prompt_learning`, true exactly for PromptLearningConfig subclasses): the
    method lives in the prompt, not in the weights, so there is nothing to merge or multiplex."""
    from peft import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return issubclass(PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type, object), PromptLearningConfig)


class AdapterNotServable(RayftError):
    """An adapter that this deployment refuses to load (wrong base, unsupported method, bad files)."""

    http_status = 422


# --------------------------------------------------------------------------- model loading


def _torch_dtype(name: str, on_gpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, name)


def load_model(model_dir: str, dtype: str, gpus: float) -> tuple[Any, Any]:
    """(model in eval mode on its device, tokenizer) from a transformers directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    on_gpu = gpus > 0 and torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_torch_dtype(dtype, on_gpu))
    model.to("cuda" if on_gpu else "cpu").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def _set_threads(cpus: float, gpus: float) -> None:
    """A CPU replica uses as many torch threads as CPUs it reserved, so replicas do not oversubscribe a node."""
    if gpus == 0 and cpus >= 1:
        torch.set_num_threads(max(1, int(cpus)))


def linear_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """Module path → (in_features, out_features) of every linear layer of a plain transformers model."""
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
) -> list[str]:
    """Why this adapter cannot be served on this base (empty if it can).

    `policy` None checks for a merge at load (any weight-based peft method); otherwise
    for multiplexing (LoRA family only, within the policy's limits).
    """
    problems = []
    if manifest.base_config_digest != base_digest:
        problems.append(
            f"it was trained on base model {manifest.base_model!r} (config digest {manifest.base_config_digest[:12]}), "
            f"but this deployment serves {base_name!r} (digest {base_digest[:12]}): serve it from a deployment of its own base"
        )
    peft_type = str(config.get("peft_type", "")).upper()
    method = manifest.method or peft_type.lower() or "unknown"
    if _prompt_learning(peft_type):
        problems.append(f"method {method} ({peft_type}) works through the prompt and cannot be merged or multiplexed")
    elif policy is not None and peft_type != "LORA":
        problems.append(
            f"method {method} ({peft_type or 'no peft_type'}) cannot be multiplexed (peft mixes LoRA-family adapters only): "
            "publish it merged (`rayft train --merge`) and serve it under `merged:`"
        )
    if policy is not None and peft_type == "LORA":
        ranks = [config.get("r", 0)] + list((config.get("rank_pattern") or {}).values())
        if max(int(r) for r in ranks) > policy.max_rank:
            problems.append(f"LoRA rank {max(ranks)} is above adapters.max_rank ({policy.max_rank}) of this deployment")
        if config.get("use_dora") and not policy.allow_dora:
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
        self.solo = solo  # DoRA: decoded in a group of its own
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
            adapter = LoadedAdapter(self, manifest.ref, f"adapter{next(self._names)}", solo=bool(config.get("use_dora")))
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
    if model.active_adapter not in model.peft_config:
        model.set_adapter(next(iter(model.peft_config)))
    return model


# --------------------------------------------------------------------------- replicas


class _ModelReplica:
    """What base and merged replicas share: prompt building, limits, the response stream."""

    spec: ServeSpec
    engine: Engine
    tokenizer: Any
    metrics: ModelMetrics
    model_name: str

    def _start_engine(self, model: Any, tokenizer: Any, batch: BatchSpec) -> None:
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer, max_batch_size=batch.max_batch_size, max_wait_s=batch.max_wait_ms / 1000)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    def _prompt_ids(self, req: GenerateRequest) -> list[int]:
        limits = self.spec.api
        if req.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ApiError(400, f"model {req.model!r} has no chat template: use /v1/completions", param="messages")
            try:
                ids = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            except Exception as err:  # jinja errors from the template (e.g. a role it does not allow)
                raise ApiError(400, f"the chat template of {req.model!r} rejected the messages: {err}", param="messages") from None
        else:
            ids = self.tokenizer(req.prompt or "", add_special_tokens=False)["input_ids"]
            if not ids and self.tokenizer.bos_token_id is not None:
                ids = [self.tokenizer.bos_token_id]
        ids = list(ids)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server accepts at most {limits.max_prompt_tokens}",
                           param="messages" if req.messages is not None else "prompt", code="context_length_exceeded")
        if self.max_positions and len(ids) + req.max_tokens > self.max_positions:
            raise ApiError(
                400, f"the prompt ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) exceeds the context of "
                f"{req.model!r} ({self.max_positions} tokens): shorten the prompt or lower max_tokens",
                param="max_tokens", code="context_length_exceeded",
            )
        return ids

    @staticmethod
    def _params(req: GenerateRequest) -> SamplingParams:
        return SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                              stop=tuple(req.stop), seed=req.seed)

    async def _respond(self, seq: Sequence, req: GenerateRequest, label: str, cold: bool, started: float) -> AsyncIterator[dict]:
        """`{"start"}`, then `{"delta"}` per step (streaming) or one at the end, then `{"end"}` (or `{"error"}`)."""
        status, text, token_ids = "ok", [], []
        try:
            yield {"start": {"prompt_tokens": len(seq.prompt_ids), "cold": cold}}
            async for event in self.engine.generate(seq):
                if event.error is not None:
                    status = "error"
                    yield {"error": ApiError(500, event.error, code="generation_failed").body()["error"] | {"status": 500}}
                    return
                if req.stream:
                    yield {"delta": {"text": event.text, "token_ids": [event.token_id]}}
                else:
                    text.append(event.text)
                    token_ids.append(event.token_id)
            if not req.stream:
                yield {"delta": {"text": "".join(text), "token_ids": token_ids}}
            yield {"end": {"finish_reason": seq.finish_reason, "completion_tokens": len(seq.generated)}}
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            if not seq.submitted:
                seq.done()
            self.metrics.request_done(label, status, time.perf_counter() - started, cold, len(seq.generated))

    def _refusal(self, err: RayftError, model: str, started: float, cold: bool) -> dict:
        api_error = error_from(err, param="model" if not isinstance(err, ApiError) else None)
        self.metrics.request_done(model, str(api_error.http_status), time.perf_counter() - started, cold, 0)
        return {"error": api_error.body()["error"] | {"status": api_error.http_status}}

    def stats(self) -> dict[str, Any]:
        """Counters of this replica (a handle call; not on HTTP)."""
        replica_id = serve.get_replica_context().replica_id
        return {
            "replica": replica_id.unique_id,
            "actor_name": replica_id.to_full_id_str(),
            "pid": os.getpid(),
            "engine": vars(self.engine.stats),
            **self.metrics.snapshot(),
        }

    def check_health(self) -> None:
        error = self.engine.loop_error()
        if error is not None:  # Serve replaces a replica whose health check raises
            raise RuntimeError(f"the decoding loop stopped: {error!r}")


def _storage_uri(spec: ServeSpec) -> str:
    from storage.store import default_storage_uri

    return spec.storage or default_storage_uri()


@serve.deployment(name="BaseModel")
class BaseModelServer(_ModelReplica):
    """The base model, with adapters from the registry multiplexed on it."""

    def __init__(self, spec: dict[str, Any]):
        import peft  # noqa: F401  (imported now, so the first adapter load does not pay for it)

        self.spec = ServeSpec.model_validate(spec)
        base = self.spec.base
        _set_threads(base.deployment.cpus, base.deployment.gpus)
        storage_uri = _storage_uri(self.spec)
        self.model_name = base.name
        self.metrics = ModelMetrics()
        self.registry = open_registry(storage_uri)
        count_s3_requests(self.registry.store, self._on_storage_request)
        model_dir = resolve_model_dir(base.source, storage_uri)
        model, tokenizer = load_model(model_dir, base.dtype, base.deployment.gpus)
        self.base_digest = base_config_digest(read_model_config(model_dir))
        self._start_engine(model, tokenizer, base.batch)
        self.pool = AdapterPool(
            self.engine, self.registry, base_name=base.name, base_digest=self.base_digest,
            reload_base=lambda: load_model(model_dir, base.dtype, base.deployment.gpus)[0],
            shapes=linear_shapes(model), policy=base.adapters, metrics=self.metrics,
        )
        pool = self.pool

        async def load_adapter(model_id: str) -> LoadedAdapter:
            return await pool.load(model_id)

        # Built here, not as a decorator, because the limit comes from the spec.
        self._get_adapter = serve.multiplexed(max_num_models_per_replica=base.adapters.max_per_replica)(load_adapter)

    def _on_storage_request(self, operation: str, key: str) -> None:
        # registry/<name>/<version>/files/<path>: a file of a published version (what "a download" means).
        parts = key.split("/")
        if operation == "GetObject" and "files" in parts:
            at = parts.index("files")
            if at >= 3 and parts[at - 3] == "registry":
                self.metrics.file_downloaded(f"{parts[at - 2]}@{parts[at - 1]}", "/".join(parts[at + 1 :]))

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict]:
        started = time.perf_counter()
        req = GenerateRequest.model_validate(request)
        ref = serve.get_multiplexed_model_id()
        adapter, cold = None, False
        try:
            if ref:
                cold = not self.pool.is_live(ref)
                self.metrics.cache_event(ref, "miss" if cold else "hit")
                adapter = await self._get_adapter(ref)
                self.pool.acquire(adapter)
            prompt_ids = self._prompt_ids(req)
        except RayftError as err:
            if adapter is not None:
                self.pool.release(adapter)
            yield self._refusal(err, ref or self.model_name, started, cold)
            return
        seq = Sequence(
            prompt_ids, self._params(req),
            adapter=adapter.peft_name if adapter else BASE_ADAPTER,
            solo=adapter.solo if adapter else False,
            on_done=(lambda: self.pool.release(adapter)) if adapter else None,
        )
        async for item in self._respond(seq, req, ref or self.model_name, cold, started):
            yield item

    def describe(self) -> dict[str, Any]:
        return {"name": self.model_name, "base_config_digest": self.base_digest, "adapters": self.pool.describe()}

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "adapters": self.pool.describe()}


@serve.deployment(name="MergedModel")
class MergedModelServer(_ModelReplica):
    """A plain model: published merged, or an adapter merged into the base at load."""

    def __init__(self, spec: dict[str, Any], name: str):
        self.spec = ServeSpec.model_validate(spec)
        (entry,) = [m for m in self.spec.merged if m.name == name]
        _set_threads(entry.deployment.cpus, entry.deployment.gpus)
        storage_uri = _storage_uri(self.spec)
        self.model_name = name
        self.metrics = ModelMetrics()
        if entry.source is not None:
            model, tokenizer = load_model(resolve_model_dir(entry.source, storage_uri), entry.dtype, entry.deployment.gpus)
        else:
            model, tokenizer = self._merge_at_load(entry.adapter, storage_uri, entry.dtype, entry.deployment.gpus)
        self._start_engine(model, tokenizer, entry.batch)

    def _merge_at_load(self, ref: str, storage_uri: str, dtype: str, gpus: float) -> tuple[Any, Any]:
        import peft

        base = self.spec.base
        base_dir = resolve_model_dir(base.source, storage_uri)
        model, tokenizer = load_model(base_dir, dtype, gpus)
        directory, manifest, config = fetch_adapter(open_registry(storage_uri), ref)
        problems = adapter_problems(
            manifest, config, directory, base_name=base.name, base_digest=base_config_digest(read_model_config(base_dir)),
            shapes=linear_shapes(model), policy=None,
        )
        if problems:
            raise AdapterNotServable(f"merged model {self.model_name!r}: adapter {manifest.ref} cannot be merged: " + "; ".join(problems))
        merged = peft.PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
        logger.info("merged %s into %s for %s", manifest.ref, base.name, self.model_name)
        return merged.eval(), tokenizer

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict]:
        started = time.perf_counter()
        req = GenerateRequest.model_validate(request)
        try:
            prompt_ids = self._prompt_ids(req)
        except RayftError as err:
            yield self._refusal(err, self.model_name, started, False)
            return
        async for item in self._respond(Sequence(prompt_ids, self._params(req)), req, self.model_name, False, started):
            yield item

    def describe(self) -> dict[str, Any]:
        return {"name": self.model_name}
