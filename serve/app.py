"""The OpenAI-compatible HTTP API on Ray Serve, and `build_app`, the application builder.

Routes: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/completions,
POST /v1/chat/completions (both with `stream: true` as server-sent events). The web console
(/console) is the top floor's (service/console.py), added by service.app.

Every request is checked here, in this order, before any model or storage is touched:
bearer token (if configured) → body size → JSON → request schema → limits → model id.
`model` names the base model, a merged model, or an adapter `name[@version]`; adapter
names are validated (`storage.safety.parse_ref`) before the registry is asked, and the
registry's answer is cached for `adapters.resolve_ttl_s`. An adapter request is sent to
the base deployment with `multiplexed_model_id=name@version`, so Serve routes it to a
replica that already holds that adapter.

`build_app` builds the inference-only application (a RayService may name
`import_path: serve.app:build_app`; `rayft serve` runs service.app's, which adds the console); Serve validates the RayService `args` against its `ServeSpec` annotation, which is
why this module must not use `from __future__ import annotations`.

The routes are an `APIRouter` (`inference_router()`) whose endpoints call methods of the
replica's ingress object (`InferenceIngress`), and `ingress_api(routers)` puts routers
together with OpenAI-shaped errors: a top-floor package builds ONE application with these
inference routes beside its own (the console and fine-tuning API in `service/`) by subclassing
`InferenceIngress` and listing its routers. This module never imports upward.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.deployments import BaseModelServer, MergedModelServer
from serve.metrics import ApiMetrics, count_s3_requests
from serve.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    error_from,
    validation_error,
)
from serve.spec import DEFAULT_TENANT, ServeSpec, parse_serve_spec
from storage.errors import IntegrityError, InvalidName, NotFound, RayftError
from storage.registry import Manifest, Registry, open_registry
from storage.safety import parse_ref
from storage.store import default_storage_uri

logger = logging.getLogger("ray.serve")

def _error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.http_status == 401 else None
    return JSONResponse(err.body(), status_code=err.http_status, headers=headers)


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error_response(exc)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods, in the OpenAI error shape too.
    return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))


def ingress_api(routers: list[APIRouter]) -> FastAPI:
    """One ingress's FastAPI app: the given routers, with every error in OpenAI's shape."""
    app = FastAPI(title="rayft", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    for router in routers:
        app.include_router(router)
    return app


def current_ingress() -> Any:
    """The ingress object of the replica serving this request (a FastAPI dependency)."""
    return serve.get_replica_context().servable_object


def inference_router() -> APIRouter:
    """GET /health, /v1/models[/{id}], POST /v1/completions, /v1/chat/completions: each calls the replica's ingress."""
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/v1/models")
    async def list_models(request: Request, ingress: Any = Depends(current_ingress)) -> Response:
        return await ingress._timed("models", ingress._models_response(request))

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request, ingress: Any = Depends(current_ingress)) -> Response:
        return await ingress._timed("models", ingress._models_response(request, model_id))

    @router.post("/v1/completions")
    async def completions(request: Request, ingress: Any = Depends(current_ingress)) -> Response:
        return await ingress._timed("completions", ingress._generate(request, "completions", chat=False))

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request, ingress: Any = Depends(current_ingress)) -> Response:
        return await ingress._timed("chat.completions", ingress._generate(request, "chat.completions", chat=True))

    return router


def build_inference_api() -> FastAPI:
    """serve/'s own inference-only app (`serve.app:build_app`); built in each replica. The top floor's application
    (service.app:build_app, what `rayft serve` runs) adds the web console and the fine-tuning API to these routes."""
    return ingress_api([inference_router()])


class AdapterResolver:
    """`name` / `name@version` → manifest, cached for `ttl_s`; concurrent lookups of one ref share one registry call."""

    _MAX_ENTRIES = 10_000

    def __init__(self, registry: Registry, ttl_s: float):
        self.registry = registry
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Manifest | RayftError]] = {}
        self._inflight: dict[str, asyncio.Future] = {}

    async def resolve(self, ref: str) -> Manifest:
        cached = self._cache.get(ref)
        if cached is not None and cached[0] > time.monotonic():
            value = cached[1]
        else:
            future = self._inflight.get(ref)
            if future is None:
                future = asyncio.ensure_future(self._lookup(ref))
                self._inflight[ref] = future
                future.add_done_callback(lambda _: self._inflight.pop(ref, None))
            value = await asyncio.shield(future)
        if isinstance(value, RayftError):
            raise type(value)(str(value))
        return value

    async def _lookup(self, ref: str) -> Manifest | RayftError:
        try:
            value: Manifest | RayftError = await asyncio.to_thread(self.registry.resolve, ref)
        except (NotFound, IntegrityError) as err:  # remembered too: unknown names must not hammer storage
            value = err
        if len(self._cache) >= self._MAX_ENTRIES:
            self._cache.clear()
        self._cache[ref] = (time.monotonic() + self.ttl_s, value)
        return value


def _token_digests(token_env: str | None, token_sha256: list[str], where: str) -> list[str]:
    digests = list(token_sha256)
    if token_env is not None:
        token = os.environ.get(token_env, "")
        if not token:
            raise RayftError(
                f"{where}.token_env: environment variable {token_env} is empty or not set in the API replicas; "
                f"set it (e.g. from a Kubernetes Secret) or use {where}.token_sha256"
            )
        digests.append(hashlib.sha256(token.encode()).hexdigest())
    return digests


def accepted_tokens(spec: ServeSpec) -> list[tuple[str, str]]:
    """(sha256 of an accepted token, the tenant it authenticates): `api.auth` tokens are the default tenant's."""
    auth = spec.api.auth
    accepted = [(d, DEFAULT_TENANT) for d in _token_digests(auth.token_env, auth.token_sha256, "api.auth")]
    for i, tenant in enumerate(auth.tenants):
        accepted += [(d, tenant.name) for d in _token_digests(tenant.token_env, tenant.token_sha256, f"api.auth.tenants[{i}]")]
    return accepted


# Helpers are defined before the deployment class: Serve serializes the class when it is
# decorated, with the module globals that exist at that moment.

class _Reply:
    """The response being built for one request, in completions or chat shape."""

    def __init__(self, req: CompletionRequest | ChatCompletionRequest, chat: bool, prompt_tokens: int):
        self.req = req
        self.chat = chat
        self.prompt_tokens = prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    def add(self, delta: dict[str, Any]) -> None:
        self.text.append(delta["text"])
        self.token_ids.extend(delta["token_ids"])

    def finish(self, end: dict[str, Any]) -> None:
        self.finish_reason = end["finish_reason"]
        self.completion_tokens = end["completion_tokens"]

    def _usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _head(self, suffix: str = "") -> dict[str, Any]:
        obj = ("chat.completion" if self.chat else "text_completion") + suffix
        return {"id": self.id, "object": obj, "created": self.created, "model": self.req.model}

    def body(self) -> dict[str, Any]:
        text = "".join(self.text)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": self.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if self.req.return_token_ids:
            choice["token_ids"] = self.token_ids
        return {**self._head(), "choices": [choice], "usage": self._usage()}

    def chunk(self, delta: dict[str, Any] | None) -> dict[str, Any]:
        """A streaming chunk: new text (`delta`), or the final one (None) carrying finish_reason."""
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": None if delta is not None else self.finish_reason}
        text = delta.get("text", "") if delta else ""
        if self.chat:
            choice["delta"] = ({"role": delta["role"], "content": ""} if delta and "role" in delta else
                               {"content": text} if delta else {})
        else:
            choice["text"] = text
        if delta and self.req.return_token_ids and "token_ids" in delta:
            choice["token_ids"] = delta["token_ids"]
        return {**self._head(".chunk" if self.chat else ""), "choices": [choice]}

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._head(".chunk" if self.chat else ""), "choices": [], "usage": self._usage()}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (by its header, or while reading)."""
    too_big = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _replica_error(error: dict[str, Any]) -> ApiError:
    return ApiError(error["status"], error["message"], param=error.get("param"), code=error.get("code"))


def _unavailable(err: BaseException) -> ApiError:
    """A 503 for a replica that died or is restarting, a 500 (logged) for anything else."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    if isinstance(err, RayTaskError) and isinstance(err.cause, RayftError):
        return error_from(err.cause)
    if isinstance(err, (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)):
        return ApiError(503, "the model replica is restarting or unavailable; retry shortly", code="replica_unavailable")
    if isinstance(err, BackPressureError):
        return ApiError(503, "the model deployment is overloaded; retry shortly", code="overloaded")
    logger.exception("unexpected error from a model replica", exc_info=err)
    return ApiError(500, f"internal error ({type(err).__name__}); see the Serve logs", code="internal_error")


async def _next_item(stream: Any) -> dict[str, Any]:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        raise ApiError(500, "the model replica ended the response early", code="internal_error") from None
    except asyncio.CancelledError:
        raise
    except Exception as err:
        raise _unavailable(err) from None


class InferenceIngress:
    """The HTTP front: checks requests, picks the deployment, speaks OpenAI's format.

    Plain class: `OpenAIIngress` below (and a top-floor application) wraps it as a Serve ingress.
    """

    def __init__(self, spec: dict[str, Any], base: DeploymentHandle, merged: dict[str, DeploymentHandle]):
        self.spec = ServeSpec.model_validate(spec)
        self.base = base
        self.merged = merged
        self.metrics = ApiMetrics()
        self.token_digests = accepted_tokens(self.spec)
        self.registry = open_registry(self.spec.storage or default_storage_uri())
        count_s3_requests(self.registry.store, lambda operation, key: self.metrics.storage_call(operation))
        self.resolver = AdapterResolver(self.registry, self.spec.base.adapters.resolve_ttl_s)
        self._adapter_list: tuple[float, list[Manifest]] = (0.0, [])
        self._base_digest: str | None = None

    def stats(self) -> dict[str, Any]:
        """Counters of this API replica (a handle call; not on HTTP)."""
        return self.metrics.snapshot()

    # -- request checks

    async def _timed(self, route: str, work: Any) -> Response:
        started = time.perf_counter()
        try:
            response = await work
        except ApiError as err:
            response = _error_response(err)
        except Exception as err:  # a bug: still an OpenAI-shaped 500, and logged with its traceback
            logger.exception("request failed")
            response = _error_response(ApiError(500, f"internal error ({type(err).__name__}); see the Serve logs", code="internal_error"))
        if not isinstance(response, StreamingResponse):  # streams count themselves when they end
            self.metrics.request(route, response.status_code, time.perf_counter() - started)
        return response

    def _authorize(self, request: Request) -> str:
        """The caller's tenant (`DEFAULT_TENANT` when auth is off or the token has none); 401 without a valid token."""
        if not self.token_digests:
            return DEFAULT_TENANT
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing bearer token: send the header `Authorization: Bearer <token>`", code="missing_api_key")
        digest = hashlib.sha256(token.encode()).hexdigest()
        tenant = None
        for accepted, owner in self.token_digests:  # no early exit: the time taken says nothing about which token
            if hmac.compare_digest(digest, accepted):
                tenant = owner
        if tenant is None:
            raise ApiError(401, "invalid bearer token", code="invalid_api_key")
        return tenant

    def model_visible(self, model: str, tenant: str) -> bool:
        """Whether `tenant` may list and call the adapter `model` (a valid ref). Inference alone shares every
        adapter; an application that gives tenants their own models overrides this (checked before storage)."""
        return True

    async def _read_json(self, request: Request, limit: int | None = None) -> dict[str, Any]:
        body = await read_body(request, limit or self.spec.api.max_body_bytes)
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
        return data

    async def _route(self, model: str, tenant: str = DEFAULT_TENANT) -> tuple[DeploymentHandle, str]:
        """(deployment, multiplexed model id) for a `model` field; 400 for a malformed id, 404 for an unknown one
        (or one the tenant may not use: the same answer, so ids of others cannot be probed)."""
        if model == self.spec.base.name:
            return self.base, ""
        if model in self.merged:
            return self.merged[model], ""
        try:
            parse_ref(model)
        except InvalidName as err:
            raise ApiError(400, f"model: {err}", param="model", code="invalid_model") from None
        try:
            if not self.model_visible(parse_ref(model)[0], tenant):
                raise NotFound(model)
            manifest = await self.resolver.resolve(model)
        except NotFound:
            raise ApiError(
                404, f"model {model!r} does not exist: it is neither a deployed model ({', '.join(self.spec.model_names())}) "
                "nor a published adapter; GET /v1/models lists what is served", param="model", code="model_not_found",
            ) from None
        except RayftError as err:
            raise error_from(err, param="model") from None
        if manifest.kind != "adapter":
            raise ApiError(
                404, f"{manifest.ref} is a published model but is not deployed: add it under `merged:` in the serve spec",
                param="model", code="model_not_deployed",
            )
        return self.base, manifest.ref

    # -- generation

    def _replica_request(self, req: CompletionRequest | ChatCompletionRequest, chat: bool) -> GenerateRequest:
        limits = self.spec.api
        max_tokens = req.requested_max_tokens() or limits.default_max_tokens
        if max_tokens > limits.max_tokens_limit:
            raise ApiError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens_limit}",
                           param="max_tokens", code="invalid_max_tokens")
        stop = req.stop_list()
        if len(stop) > limits.max_stop_sequences:
            raise ApiError(400, f"stop has {len(stop)} strings; at most {limits.max_stop_sequences} are allowed", param="stop")
        fields: dict[str, Any] = {}
        if chat:
            # Chat templates know system/user/assistant; OpenAI's newer "developer" role is a system prompt.
            fields["messages"] = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
            ]
        else:
            fields["prompt"] = req.prompt_text()
        return GenerateRequest(
            model=req.model, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
            stop=stop, seed=req.seed, stream=req.stream, **fields,
        )

    async def _generate(self, request: Request, route: str, chat: bool) -> Response:
        started = time.perf_counter()
        tenant = self._authorize(request)
        data = await self._read_json(request)
        try:
            req = (ChatCompletionRequest if chat else CompletionRequest).model_validate(data)
        except ValidationError as err:
            raise validation_error(err) from None
        payload = self._replica_request(req, chat)
        handle, multiplexed_id = await self._route(req.model, tenant)
        stream = handle.options(multiplexed_model_id=multiplexed_id, stream=True).generate.remote(payload.model_dump())
        first = await _next_item(stream)
        if "error" in first:
            raise _replica_error(first["error"])
        reply = _Reply(req, chat, first["start"]["prompt_tokens"])
        if req.stream:
            return StreamingResponse(
                self._events(stream, reply, route, started), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        item = first  # a non-streamed answer comes as one item (start, delta and end together)
        while True:
            if "error" in item:
                raise _replica_error(item["error"])
            if "delta" in item:
                reply.add(item["delta"])
            if "end" in item:
                reply.finish(item["end"])
                return JSONResponse(reply.body())
            item = await _next_item(stream)

    async def _events(self, stream: Any, reply: _Reply, route: str, started: float) -> AsyncIterator[str]:
        """Server-sent events: one chunk per step with new text, the finish chunk, usage (if asked), [DONE]."""
        status, done = 200, False
        try:
            if reply.chat:
                yield _sse(reply.chunk({"role": "assistant", "content": ""}))
            while not done:
                item = await _next_item(stream)
                if "error" in item:
                    raise _replica_error(item["error"])
                if "delta" in item:
                    reply.add(item["delta"])
                    if item["delta"]["text"] or reply.req.return_token_ids:
                        yield _sse(reply.chunk(item["delta"]))
                if "end" in item:
                    reply.finish(item["end"])
                    yield _sse(reply.chunk(None))
                    if reply.req.stream_options is not None and reply.req.stream_options.include_usage:
                        yield _sse(reply.usage_chunk())
                    done = True
            yield "data: [DONE]\n\n"
        except ApiError as err:  # headers are sent: the error goes in the stream, as OpenAI does
            status = err.http_status
            yield _sse(err.body())
        finally:
            if not done:
                stream.cancel()
            self.metrics.request(route, status, time.perf_counter() - started)

    # -- models

    async def _models_response(self, request: Request, model_id: str | None = None) -> Response:
        tenant = self._authorize(request)
        now = int(time.time())
        entries = [{"id": self.spec.base.name, "object": "model", "created": now, "owned_by": "rayft", "kind": "base"}]
        entries += [{"id": name, "object": "model", "created": now, "owned_by": "rayft", "kind": "merged"} for name in self.merged]
        digest = await self._base_config_digest()
        for manifest in await self._adapters():
            if manifest.kind == "adapter" and manifest.base_config_digest == digest and self.model_visible(manifest.name, tenant):
                entries.append({
                    "id": manifest.name, "object": "model", "created": int(manifest.created_at.timestamp()),
                    "owned_by": "rayft", "kind": "adapter", "parent": self.spec.base.name, "root": manifest.ref,
                    "method": manifest.method,
                })
        if model_id is None:
            return JSONResponse({"object": "list", "data": entries})
        for entry in entries:
            if model_id in (entry["id"], entry.get("root")):
                return JSONResponse(entry)
        raise ApiError(404, f"model {model_id!r} is not served here; GET /v1/models lists what is", param="model",
                       code="model_not_found")

    async def _adapters(self) -> list[Manifest]:
        expires, manifests = self._adapter_list
        if expires < time.monotonic():
            try:
                manifests = await asyncio.to_thread(self.registry.list)
            except RayftError as err:
                raise error_from(err) from None
            self._adapter_list = (time.monotonic() + self.spec.base.adapters.resolve_ttl_s, manifests)
        return manifests

    async def _base_config_digest(self) -> str:
        if self._base_digest is None:
            try:
                info = await self.base.describe.remote()
            except Exception as err:
                raise _unavailable(err) from None
            self._base_digest = info["base_config_digest"]
        return self._base_digest


@serve.deployment(name="OpenAIIngress")
@serve.ingress(build_inference_api)
class OpenAIIngress(InferenceIngress):
    """The inference-only ingress that `build_app` deploys."""


def model_deployments(spec: ServeSpec) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(the spec as JSON, the bound base deployment, the bound merged deployments): an ingress's arguments.

    `engine` picks what decodes behind the ingress (serve.deployments' transformers replicas, or
    serve.vllm_engine's Ray Serve LLM deployments)."""
    raw = spec.model_dump(mode="json")
    if spec.engine == "vllm":
        from serve.vllm_server import build_vllm_deployments  # Ray Serve LLM and vLLM: seconds to import

        base, merged = build_vllm_deployments(spec, raw)
    else:
        base = BaseModelServer.options(**spec.base.deployment.serve_options()).bind(raw)
        merged = {
            m.name: MergedModelServer.options(name=f"MergedModel-{m.name}", **m.deployment.serve_options()).bind(raw, m.name)
            for m in spec.merged
        }
    return raw, base, merged


def build_app(spec: ServeSpec) -> Application:
    """The Serve application for a spec: API ingress → base deployment (+ merged deployments). Binds only.
    The ingress is the same for both engines."""
    if not isinstance(spec, ServeSpec):
        spec = parse_serve_spec(spec, "serve args")
    return OpenAIIngress.options(**spec.api.deployment.serve_options()).bind(*model_deployments(spec))
