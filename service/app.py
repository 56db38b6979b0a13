"""ONE Serve application for inference and fine-tuning: `build_app(ServiceSpec)`.

The ingress (`ServiceIngress`) is serve/'s `InferenceIngress` with the files and fine-tuning
jobs API added: same base_url, same bearer tokens and tenants, same error shape. Its routes
are the routers listed in `service_routers()`: serve/'s inference routes, then /v1/files,
then /v1/fine_tuning, then the web console (service/console.py). A spec without the fine-tuning
API gets serve/'s inference routes and the console (`ConsoleIngress`).

`build_app` is what `rayft serve` and a RayService (`import_path: service.app:build_app`)
call. A spec without `fine_tuning` (or with `enabled: false`) gets serve/'s inference ingress with the
console beside it.
Serve validates RayService `args` against the `ServiceSpec` annotation, so this module must
not use `from __future__ import annotations`.
"""

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import Application
from starlette.requests import Request as StarletteRequest

from serve.app import InferenceIngress, current_ingress, inference_router, ingress_api, model_deployments, read_body
from serve.protocol import ApiError, error_from
from serve.spec import ServeSpec
from service.console import console_router
from service.files import FILE_ID, PURPOSE, FileStore, page
from service.jobs import JobService, model_owner
from service.spec import FineTuningApiSpec, ServiceSpec, parse_service_spec
from storage.errors import RayftError

logger = logging.getLogger("ray.serve")

#: Multipart framing allowed on top of the file itself in an upload.
_MULTIPART_OVERHEAD = 64 * 1024


def _limit(value: str | None, default: int, most: int, name: str) -> int:
    if value is None:
        return default
    if not value.isdigit() or not 1 <= int(value) <= most:
        raise ApiError(400, f"{name}: got {value!r}, must be an integer from 1 to {most}", param=name)
    return int(value)


def _router(metric: str, routes: list[tuple[str, str, str]]) -> APIRouter:
    """An APIRouter whose (HTTP method, path, ingress method) routes call `ingress.<method>(request, **path params)`."""
    router = APIRouter()

    def endpoint_for(handler: str) -> Any:
        async def endpoint(request: Request, ingress: Any = Depends(current_ingress)) -> Response:
            work = getattr(ingress, handler)(request, **request.path_params)
            return await ingress._timed(metric, ingress.api_call(work))

        endpoint.__name__ = handler
        return endpoint

    for method, path, handler in routes:
        router.add_api_route(path, endpoint_for(handler), methods=[method])
    return router


def files_router() -> APIRouter:
    """POST/GET /v1/files, GET/DELETE /v1/files/{id}, GET /v1/files/{id}/content."""
    return _router("files", [
        ("POST", "/v1/files", "upload_file"),
        ("GET", "/v1/files", "list_files"),
        ("GET", "/v1/files/{file_id}", "get_file"),
        ("GET", "/v1/files/{file_id}/content", "file_content"),
        ("DELETE", "/v1/files/{file_id}", "delete_file"),
    ])


def fine_tuning_router() -> APIRouter:
    """/v1/fine_tuning/jobs: create, list, retrieve, cancel, events, checkpoints."""
    return _router("fine_tuning", [
        ("POST", "/v1/fine_tuning/jobs", "create_job"),
        ("GET", "/v1/fine_tuning/jobs", "list_jobs"),
        ("GET", "/v1/fine_tuning/jobs/{job_id}", "get_job"),
        ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel", "cancel_job"),
        ("GET", "/v1/fine_tuning/jobs/{job_id}/events", "job_events"),
        ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints", "job_checkpoints"),
    ])


def service_routers() -> list[APIRouter]:
    """Every route of the application, in order."""
    return [inference_router(), files_router(), fine_tuning_router(), console_router()]


def build_service_api() -> FastAPI:
    """The application's FastAPI app (built in each replica)."""
    return ingress_api(service_routers())


def build_console_api() -> FastAPI:
    """The app of a spec without the fine-tuning API: inference, then the web console (built in each replica)."""
    return ingress_api([inference_router(), console_router()])


@serve.deployment(name="OpenAIIngress")
@serve.ingress(build_console_api)
class ConsoleIngress(InferenceIngress):
    """The ingress of the inference-only application, with the web console."""


class FineTuningIngress(InferenceIngress):
    """Inference plus files and fine-tuning jobs; every record lives in storage, none in the replica."""

    def __init__(self, spec: dict[str, Any], base: Any, merged: dict[str, Any], fine_tuning: dict[str, Any]):
        super().__init__(spec, base, merged)
        self.ft = FineTuningApiSpec.model_validate(fine_tuning)
        self.files = FileStore(self.registry.store)
        self.jobs = JobService(self.ft, self.spec, self.registry, self.files)
        self._scheduler: asyncio.Task | None = None
        try:
            self._scheduler = asyncio.get_running_loop().create_task(self._schedule())
        except RuntimeError:  # not in an event loop (a unit test building the object): no background refresh
            pass

    async def _schedule(self) -> None:
        """Refresh running jobs and start queued ones, every poll interval, for as long as the replica lives."""
        while True:
            try:
                await asyncio.to_thread(self.jobs.tick)
            except Exception:  # a storage or cluster hiccup must not end the loop
                logger.exception("fine-tuning scheduler tick failed")
            await asyncio.sleep(self.ft.poll_interval_s)

    def model_visible(self, model: str, tenant: str) -> bool:
        owner = model_owner(model)
        return owner is None or owner == tenant

    async def api_call(self, work: Any) -> Response:
        """Run a route's work; rayft errors become their OpenAI-shaped status (404 for unknown ids, ...)."""
        try:
            return await work
        except ApiError:
            raise
        except RayftError as err:
            raise error_from(err) from None

    # -- files

    async def upload_file(self, request: Request) -> Response:
        tenant = self._authorize(request)
        limit = self.ft.max_file_bytes
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "send the file as multipart/form-data with the fields `file` and `purpose`", code="invalid_request")
        body = await read_body(request, limit + _MULTIPART_OVERHEAD)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await StarletteRequest(request.scope, receive).form(max_files=1, max_fields=8)
        except Exception as err:  # malformed multipart
            raise ApiError(400, f"the multipart body cannot be read: {err}", code="invalid_request") from None
        purpose, upload = form.get("purpose"), form.get("file")
        problems = []
        if purpose != PURPOSE:
            problems.append(f"purpose: got {purpose!r}, this server accepts only {PURPOSE!r}")
        if upload is None or isinstance(upload, str):
            problems.append("file: missing; send the JSONL file in the multipart field `file`")
        if problems:
            raise ApiError(400, "; ".join(problems), param="purpose" if purpose != PURPOSE else "file", code="invalid_request")
        data = await upload.read()
        if len(data) > limit:
            raise ApiError(413, f"the file is {len(data)} bytes; this server accepts at most {limit}", param="file", code="file_too_large")
        filename = (upload.filename or "upload.jsonl").replace("/", "_").replace("\\", "_")[:255]
        obj = await asyncio.to_thread(self.files.add, tenant, filename, data)
        return JSONResponse(obj.model_dump())

    async def list_files(self, request: Request) -> Response:
        tenant = self._authorize(request)
        params = request.query_params
        purpose = params.get("purpose")
        limit = _limit(params.get("limit"), 10_000, 10_000, "limit")
        after = params.get("after")
        if after is not None and not FILE_ID.fullmatch(after):
            raise ApiError(400, f"after: got {after[:40]!r}, must be a file id (file-...)", param="after")
        files = [] if purpose not in (None, PURPOSE) else await asyncio.to_thread(self.files.list, tenant)
        items = [f.model_dump() for f in files]
        if params.get("order") == "asc":
            items.reverse()
        return JSONResponse(page(items, after, limit))

    async def get_file(self, request: Request, file_id: str) -> Response:
        tenant = self._authorize(request)
        return JSONResponse((await asyncio.to_thread(self.files.get, tenant, file_id)).model_dump())

    async def file_content(self, request: Request, file_id: str) -> Response:
        tenant = self._authorize(request)
        data = await asyncio.to_thread(self.files.content, tenant, file_id)
        return Response(data, media_type="application/jsonl")

    async def delete_file(self, request: Request, file_id: str) -> Response:
        tenant = self._authorize(request)
        await asyncio.to_thread(self.files.delete, tenant, file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    # -- fine-tuning jobs

    async def create_job(self, request: Request) -> Response:
        tenant = self._authorize(request)
        body = await self._read_json(request, self.ft.max_request_bytes)
        return JSONResponse(await asyncio.to_thread(self.jobs.create, tenant, body))

    async def list_jobs(self, request: Request) -> Response:
        tenant = self._authorize(request)
        params = request.query_params
        limit = _limit(params.get("limit"), 20, 100, "limit")
        return JSONResponse(await asyncio.to_thread(self.jobs.list, tenant, params.get("after"), limit))

    async def get_job(self, request: Request, job_id: str) -> Response:
        tenant = self._authorize(request)
        return JSONResponse(await asyncio.to_thread(self.jobs.retrieve, tenant, job_id))

    async def cancel_job(self, request: Request, job_id: str) -> Response:
        tenant = self._authorize(request)
        return JSONResponse(await asyncio.to_thread(self.jobs.cancel, tenant, job_id))

    async def job_events(self, request: Request, job_id: str) -> Response:
        tenant = self._authorize(request)
        params = request.query_params
        limit = _limit(params.get("limit"), 20, 1000, "limit")
        return JSONResponse(await asyncio.to_thread(self.jobs.events, tenant, job_id, params.get("after"), limit))

    async def job_checkpoints(self, request: Request, job_id: str) -> Response:
        tenant = self._authorize(request)
        params = request.query_params
        limit = _limit(params.get("limit"), 10, 100, "limit")
        return JSONResponse(await asyncio.to_thread(self.jobs.checkpoints, tenant, job_id, params.get("after"), limit))


@serve.deployment(name="OpenAIIngress")
@serve.ingress(build_service_api)
class ServiceIngress(FineTuningIngress):
    """The ingress of the inference + fine-tuning application."""


def build_app(spec: ServiceSpec) -> Application:
    """The Serve application for a service spec (binds only): inference alone, or with the fine-tuning API."""
    if isinstance(spec, ServeSpec) and not isinstance(spec, ServiceSpec):  # a plain serve spec: inference only
        spec = spec.model_dump(mode="json")
    if not isinstance(spec, ServiceSpec):
        spec = parse_service_spec(spec, "serve args")
    raw, base, merged = model_deployments(spec.serve_spec())
    options = spec.api.deployment.serve_options()
    if not spec.api_enabled():
        return ConsoleIngress.options(**options).bind(raw, base, merged)
    return ServiceIngress.options(**options).bind(raw, base, merged, spec.fine_tuning.model_dump(mode="json"))
