"""`VllmServer`: Ray Serve LLM's `LLMServer` (placement, engine start, health checks, `serve.multiplexed`
adapter routing, vLLM's LoRA loading) with rayft's parts added (see serve.vllm_engine for the design):

- it answers `generate(request)` with the same event stream as serve.deployments' replicas, so the
  ingress, its checks, errors and response shapes do not change with the engine; prompts are
  tokenized by `serve.deployments.prompt_ids`, as there, and handed to vLLM as token ids;
- adapters are fetched by rayft's verified path (`load_adapter`), not from a bucket vLLM lists.

Importing this module imports Ray Serve LLM and vLLM's protocol modules (seconds).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve
from ray.llm._internal.common.callbacks.base import CallbackBase  # Ray Serve LLM's start-up hook type
from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment

from serve.adapters import AdapterNotServable, adapter_problems, fetch_adapter
from serve.deployments import merge_at_load, prompt_ids, refusal
from serve.metrics import ModelMetrics, count_registry_downloads
from serve.protocol import ApiError, GenerateRequest
from serve.spec import DeploymentSpec, ServeSpec
from serve.vllm_engine import (
    engine_kwargs_for,
    materialize_adapter,
    registry_lora_ranks,
    require_cpu_lora_fix,
    spec_entry,
    weight_shapes,
)
from storage.errors import RayftError
from storage.models import read_model_config, resolve_model_dir
from storage.registry import base_config_digest, open_registry
from storage.store import default_storage_uri

logger = logging.getLogger("ray.serve")


class _RegistryLoraLoader:
    """What Ray Serve LLM calls to fetch an adapter (in place of its bucket loader): rayft's verified path."""

    def __init__(self, *, server: VllmServer, download_timeout_s: float | None = None, max_tries: int = 1):
        self.server = server

    async def load_model_from_config(self, lora_model_id: str, llm_config: Any) -> Any:
        return await self.server.load_adapter(lora_model_id)


class VllmServer(LLMServer):
    """A Ray Serve LLM deployment for one model of the spec (the base with adapters, or a merged model)."""

    async def __init__(self, llm_config: LLMConfig, spec: dict[str, Any], name: str):
        from transformers import AutoTokenizer

        self.spec = ServeSpec.model_validate(spec)
        self.model_name = name
        self.is_base = name == self.spec.base.name
        entry = spec_entry(self.spec, name)
        storage_uri = self.spec.storage or default_storage_uri()
        self.metrics = ModelMetrics()
        self.registry = open_registry(storage_uri)
        count_registry_downloads(self.registry.store, self.metrics)
        self.lora_root = Path(self.registry.cache_dir) / "vllm-adapters"
        self._warm: set[str] = set()
        self._lora_locks: dict[str, asyncio.Lock] = {}
        model_dir = await asyncio.to_thread(self._model_dir, entry, storage_uri)
        config = read_model_config(model_dir)
        self.base_digest = base_config_digest(config)
        ranks = await asyncio.to_thread(registry_lora_ranks, self.registry, self.base_digest) if self.is_base else []
        self.shapes = weight_shapes(model_dir) if self.is_base else {}
        self.settings = engine_kwargs_for(self.spec, name, config, ranks)
        require_cpu_lora_fix(self.settings)
        self.max_lora_rank = self.settings.get("max_lora_rank")
        self.max_model_len = self.settings["max_model_len"]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # The engine is configured here, in the replica, where the model directory and the registry are.
        config = make_llm_config(self.spec, name, model_dir, self.settings)
        logger.info("vLLM engine for %s: %s", name, self.settings)
        await super().__init__(config, model_downloader=functools.partial(_RegistryLoraLoader, server=self))

    def _model_dir(self, entry: Any, storage_uri: str) -> str:
        """A local, verified model directory: the base, a published merged model, or the base merged with an adapter."""
        if self.is_base or entry.source is not None:
            return resolve_model_dir(entry.source, storage_uri)
        manifest = self.registry.resolve(entry.adapter)
        target = Path(self.registry.cache_dir) / "vllm-merged" / f"{self.spec.base.name}+{manifest.name}--v{manifest.version}"
        if not (target / "config.json").is_file():
            model, tokenizer = merge_at_load(self.spec, self.model_name, storage_uri, entry.dtype, 0)
            staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            del model
            try:
                staging.rename(target)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
        return str(target)

    async def load_adapter(self, ref: str) -> Any:
        """Fetch (verified), check and lay out `ref` for vLLM; AdapterNotServable etc. if it cannot be served."""
        from ray.llm._internal.common.models import global_id_manager
        from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig

        started = time.perf_counter()
        try:
            directory, manifest, config = await asyncio.to_thread(fetch_adapter, self.registry, ref)
            problems = adapter_problems(
                manifest, config, directory, base_name=self.spec.base.name, base_digest=self.base_digest,
                shapes=self.shapes, policy=None, vllm_max_rank=self.max_lora_rank,
            )
            if problems:
                raise AdapterNotServable(f"adapter {manifest.ref} cannot be served by vLLM: " + "; ".join(problems))
            folder = await asyncio.to_thread(materialize_adapter, directory, manifest, self.lora_root)
        except RayftError as err:
            self.metrics.refused(ref, type(err).__name__)
            raise
        self.metrics.adapter_loaded(ref, time.perf_counter() - started)
        return DiskMultiplexConfig(model_id=ref, max_total_tokens=None, local_path=str(folder),
                                   lora_assigned_int_id=global_id_manager.next())

    async def _lora_request(self, ref: str) -> Any:
        """vLLM's LoRARequest for `ref`, loading the adapter into vLLM (through Serve's multiplexing) if needed."""
        # One at a time per adapter: Ray Serve LLM checks "loaded?" and loads across an await, so two first
        # requests for one adapter both load it and vLLM refuses the second ("has already been loaded").
        async with self._lora_locks.setdefault(ref, asyncio.Lock()):
            try:
                await self._maybe_resolve_lora_from_multiplex()
            except ValueError as err:  # vLLM refused the files (Ray Serve LLM wraps its error in a ValueError)
                self.metrics.refused(ref, "VllmRefused")
                raise AdapterNotServable(f"adapter {ref} cannot be served by vLLM: {err}") from None
        return self.engine._oai_models.lora_requests[ref]

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict]:
        """The same event stream as serve.deployments' replicas: start, deltas, end (or one error)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        started = time.perf_counter()
        req = GenerateRequest.model_validate(request)
        ref = serve.get_multiplexed_model_id() if self.is_base else ""
        label, cold, lora = ref or self.model_name, False, None
        try:
            if ref:
                cold = ref not in self._warm
                self.metrics.cache_event(ref, "miss" if cold else "hit")
                lora = await self._lora_request(ref)
                self._warm.add(ref)
            ids = prompt_ids(self.tokenizer, req, self.spec.api, self.max_model_len)
        except RayftError as err:
            yield refusal(self.metrics, err, label, started, cold)
            return
        # A streamed request gets vLLM's per-step deltas; any other only its final output (one await per
        # request instead of one per generated token).
        params = SamplingParams(
            n=1, max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
            stop=list(req.stop) or None, skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY,
        )
        status, text, token_ids, finish = "ok", [], [], None
        start = {"prompt_tokens": len(ids), "cold": cold}
        try:
            if req.stream:
                yield {"start": start}
            # The engine client is Ray Serve LLM's vLLM AsyncLLM: token ids in, deltas out.
            stream = self.engine._engine_client.generate(
                {"prompt_token_ids": ids}, params, f"rayft-{uuid.uuid4().hex}", lora_request=lora)
            async for output in stream:
                out = output.outputs[0]
                token_ids.extend(out.token_ids)
                if req.stream:
                    if out.text or out.token_ids:
                        yield {"delta": {"text": out.text, "token_ids": list(out.token_ids)}}
                else:
                    text.append(out.text)
                finish = out.finish_reason or finish
            end = {"finish_reason": "stop" if finish == "stop" else "length", "completion_tokens": len(token_ids)}
            if req.stream:
                yield {"end": end}
            else:  # the whole answer as one item: it crosses the handle once
                yield {"start": start, "delta": {"text": "".join(text), "token_ids": token_ids}, "end": end}
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        except Exception as err:  # the engine failed this request: a 500 for it, the replica's health check decides the rest
            status = "error"
            logger.exception("vLLM generation failed")
            yield {"error": ApiError(500, f"generation failed ({type(err).__name__}: {err})", code="generation_failed").body()["error"]
                   | {"status": 500}}
        finally:
            self.metrics.request_done(label, status, time.perf_counter() - started, cold, len(token_ids))

    def describe(self) -> dict[str, Any]:
        return {"name": self.model_name, "engine": "vllm", "base_config_digest": self.base_digest, "settings": self.settings}

    def stats(self) -> dict[str, Any]:
        """Counters of this replica (a handle call; not on HTTP)."""
        replica_id = serve.get_replica_context().replica_id
        return {"replica": replica_id.unique_id, "actor_name": replica_id.to_full_id_str(), "pid": os.getpid(),
                "engine": "vllm", "settings": self.settings, "adapters": {"live": sorted(self._warm)},
                **self.metrics.snapshot()}


class LocalModelCallback(CallbackBase):
    """The replica already holds the verified model directory: skip Ray Serve LLM's node-init task (a process
    that imports vLLM only to find nothing to download) when every bundle is on this node."""

    async def on_before_node_init(self) -> None:
        import ray

        table = ray.util.placement_group_table(self.ctx.placement_group)
        nodes = set(table.get("bundles_to_node_id", {}).values())
        if nodes == {ray.get_runtime_context().get_node_id()}:
            self.ctx.run_init_node = False


# --------------------------------------------------------------------------- building


def _env_vars(spec: ServeSpec, deployment: DeploymentSpec) -> dict[str, str]:
    """What the replica (and vLLM's worker processes) need in their environment."""
    env = {name: os.environ[name] for name in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
                                               "AWS_SECRET_ACCESS_KEY", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                                               "RAYFT_HOME", "RAYFT_STORAGE") if os.environ.get(name)}
    if deployment.gpus == 0:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(spec.vllm.cpu_kv_cache_gib))))
    return env


def make_llm_config(spec: ServeSpec, name: str, model_source: str, engine_kwargs: dict[str, Any]) -> Any:
    """Ray Serve LLM's LLMConfig for deployment `name`: resources, replicas, environment, engine arguments."""
    deployment = spec_entry(spec, name).deployment
    options = {k: v for k, v in deployment.serve_options().items() if k != "ray_actor_options"}
    if deployment.gpus == 0:
        # On CPU the engine's placement group holds the replica's CPUs; the replica actor adds none.
        placement = {"placement_group_config": {"bundles": [{"CPU": deployment.cpus}]}}
        options["ray_actor_options"] = {"num_cpus": 0}
    else:
        placement = {}  # Ray Serve LLM reserves one GPU bundle per tensor-parallel rank
        options["ray_actor_options"] = {"num_cpus": deployment.cpus}
    return LLMConfig(
        model_loading_config={"model_id": name, "model_source": model_source},
        engine_kwargs=engine_kwargs,
        lora_config={"max_num_adapters_per_replica": spec.base.adapters.max_per_replica} if name == spec.base.name else None,
        deployment_config=options,
        runtime_env={"env_vars": _env_vars(spec, deployment)},
        callback_config={"callback_class": LocalModelCallback},
        **placement,
    )


def build_vllm_deployments(spec: ServeSpec, raw: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(base deployment, {merged name: deployment}) for `engine: vllm`, bound and ready for the ingress."""
    def bind(name: str, deployment_name: str) -> Any:
        # Settings that need the model and the registry are derived in the replica; these sizes only place it.
        config = make_llm_config(spec, name, spec_entry(spec, name).source or spec.base.source,
                             {"tensor_parallel_size": spec.vllm.tensor_parallel_size})
        return build_llm_deployment(config, deployment_cls=VllmServer, bind_kwargs={"spec": raw, "name": name},
                                    name_prefix="", override_serve_options={"name": deployment_name})

    base = bind(spec.base.name, "BaseModel")
    merged = {m.name: bind(m.name, f"MergedModel-{m.name}") for m in spec.merged}
    return base, merged
