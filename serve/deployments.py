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
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve

# The adapter checks and pool live in serve.adapters; their names stay importable from here.
from serve.adapters import (  # noqa: F401
    AdapterNotServable,
    AdapterPool,
    LoadedAdapter,
    adapter_problems,
    fetch_adapter,
    linear_shapes,
)
from serve.generation import BASE_ADAPTER, Engine, Sequence, SamplingParams
from serve.metrics import ModelMetrics, count_registry_downloads
from serve.protocol import ApiError, GenerateRequest, error_from
from serve.spec import ApiSpec, BatchSpec, ServeSpec
from storage.errors import RayftError
from storage.models import read_model_config, resolve_model_dir
from storage.registry import base_config_digest, open_registry
from storage.store import default_storage_uri

logger = logging.getLogger("ray.serve")

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


def merge_at_load(spec: ServeSpec, name: str, storage_uri: str, dtype: str, gpus: float) -> tuple[Any, Any]:
    """(base + the `adapter` of merged entry `name`, merged with peft's merge_and_unload; tokenizer). The adapter is
    fetched verified and checked against the base first: AdapterNotServable names what is wrong."""
    import peft

    (entry,) = [m for m in spec.merged if m.name == name]
    base = spec.base
    base_dir = resolve_model_dir(base.source, storage_uri)
    model, tokenizer = load_model(base_dir, dtype, gpus)
    directory, manifest, config = fetch_adapter(open_registry(storage_uri), entry.adapter)
    problems = adapter_problems(
        manifest, config, directory, base_name=base.name, base_digest=base_config_digest(read_model_config(base_dir)),
        shapes=linear_shapes(model), policy=None,
    )
    if problems:
        raise AdapterNotServable(f"merged model {name!r}: adapter {manifest.ref} cannot be merged: " + "; ".join(problems))
    merged = peft.PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
    logger.info("merged %s into %s for %s", manifest.ref, base.name, name)
    return merged.eval(), tokenizer


def _set_threads(cpus: float, gpus: float) -> None:
    """A CPU replica uses as many torch threads as CPUs it reserved, so replicas do not oversubscribe a node."""
    if gpus == 0 and cpus >= 1:
        torch.set_num_threads(max(1, int(cpus)))


# --------------------------------------------------------------------------- replicas


def refusal(metrics: ModelMetrics, err: RayftError, model: str, started: float, cold: bool) -> dict:
    """The `{"error": ...}` event a replica answers a refused request with (counted in `metrics`)."""
    api_error = error_from(err, param="model" if not isinstance(err, ApiError) else None)
    metrics.request_done(model, str(api_error.http_status), time.perf_counter() - started, cold, 0)
    return {"error": api_error.body()["error"] | {"status": api_error.http_status}}


def prompt_ids(tokenizer: Any, req: GenerateRequest, limits: ApiSpec, max_positions: int | None) -> list[int]:
    """The prompt's token ids (chat template for messages, no special tokens for a prompt, as in training),
    checked against the API's prompt limit and the model's context; ApiError 400 otherwise. Both engines use it,
    so a prompt means the same tokens whichever engine answers."""
    if req.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"model {req.model!r} has no chat template: use /v1/completions", param="messages")
        try:
            ids = tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        except Exception as err:  # jinja errors from the template (e.g. a role it does not allow)
            raise ApiError(400, f"the chat template of {req.model!r} rejected the messages: {err}", param="messages") from None
    else:
        ids = tokenizer(req.prompt or "", add_special_tokens=False)["input_ids"]
        if not ids and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id]
    ids = list(ids)
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    if len(ids) > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this server accepts at most {limits.max_prompt_tokens}",
                       param="messages" if req.messages is not None else "prompt", code="context_length_exceeded")
    if max_positions and len(ids) + req.max_tokens > max_positions:
        raise ApiError(
            400, f"the prompt ({len(ids)} tokens) plus max_tokens ({req.max_tokens}) exceeds the context of "
            f"{req.model!r} ({max_positions} tokens): shorten the prompt or lower max_tokens",
            param="max_tokens", code="context_length_exceeded",
        )
    return ids




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
        return prompt_ids(self.tokenizer, req, self.spec.api, self.max_positions)

    @staticmethod
    def _params(req: GenerateRequest) -> SamplingParams:
        return SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                              stop=tuple(req.stop), seed=req.seed)

    async def _respond(self, seq: Sequence, req: GenerateRequest, label: str, cold: bool, started: float) -> AsyncIterator[dict]:
        """Streaming: `{"start"}`, a `{"delta"}` per step, `{"end"}`. Otherwise one item holding all three, so a
        non-streamed answer crosses the handle once. A failure is one `{"error"}` item."""
        status, text, token_ids = "ok", [], []
        start = {"prompt_tokens": len(seq.prompt_ids), "cold": cold}
        try:
            if req.stream:
                yield {"start": start}
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
            end = {"finish_reason": seq.finish_reason, "completion_tokens": len(seq.generated)}
            if req.stream:
                yield {"end": end}
            else:
                yield {"start": start, "delta": {"text": "".join(text), "token_ids": token_ids}, "end": end}
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        finally:
            if not seq.submitted:
                seq.done()
            self.metrics.request_done(label, status, time.perf_counter() - started, cold, len(seq.generated))

    def _refusal(self, err: RayftError, model: str, started: float, cold: bool) -> dict:
        return refusal(self.metrics, err, model, started, cold)

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
        count_registry_downloads(self.registry.store, self.metrics)
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
            model, tokenizer = merge_at_load(self.spec, name, storage_uri, entry.dtype, entry.deployment.gpus)
        self._start_engine(model, tokenizer, entry.batch)

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
