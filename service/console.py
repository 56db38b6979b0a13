"""The web console: `/console` on the service application, beside the OpenAI API and behind the same tokens.

Two kinds of routes:

- `/console`, `/console/...`: one HTML page and its static script and style (`service/console_static/`). They hold
  no data and need no token: the page asks for the token, keeps it in the browser session (sessionStorage,
  never in a URL) and sends it as `Authorization: Bearer` on every data request.
- `/console/api/...`: JSON read from storage (runs, registry, tune searches), each behind the API's token check.
  Every id in a path is validated (run ids: `storage.runs.validate_run_id`; registry names and versions:
  `storage.safety`) before any storage call: a hostile id is a 400 that never reached storage, an unknown one a
  404 naming what exists. Storage is read off the event loop.

The playground and compare pages need nothing here: they call the app's own `/v1/...` routes.
It reads storage only, through storage.runs' names for the layout of runs, checkpoints and searches; a tune
search's results are read as plain JSON. It lives on the top floor (service/) and adds its routes to serve/'s
inference ingress, which knows nothing of it.
No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request, Depends) at runtime.
"""

import asyncio
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from serve.protocol import ApiError, error_from
from serve.spec import DEFAULT_TENANT
from storage.errors import InvalidName, NotFound, RayftError
from storage.registry import REGISTRY_ROOT, Manifest, Registry
from storage.runs import (
    PROGRESS_FILE,
    RECORD_FILE,
    SEARCH_JOB_FILE,
    SEARCH_RESULTS_FILE,
    STATE_FILES,
    checkpoint_key,
    checkpoint_step,
    read_progress,
    read_record,
    run_ids,
    search_files,
    search_job_key,
    search_of_trial,
    search_results_key,
    trial_run_id,
    validate_run_id,
)
from storage.safety import VERSION_PATTERN, validate_name

STATIC = Path(__file__).with_name("console_static")
#: The static files the page loads, by the name in its URL (nothing else under /console/static is served).
STATIC_FILES = {"console.js": "text/javascript", "console.css": "text/css"}
#: The registry's manifests are re-read at most this often (every page lists them for lineage and run links).
REGISTRY_TTL_S = 3.0
#: Checkpoint history read as a fallback for runs without a progress record (older rayft, tune trials).
STATE_JSON = STATE_FILES[0]
_VERSION_RE = re.compile(VERSION_PATTERN)
# No script or style but the page's own files; data comes from this origin only.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'self'; form-action 'none'; frame-ancestors 'none'")


def current_ingress() -> Any:
    """The ingress object of the replica serving this request (a FastAPI dependency)."""
    from ray import serve

    return serve.get_replica_context().servable_object


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _bad_id(err: RayftError) -> ApiError:
    return ApiError(400, str(err), code="invalid_id")


def checked_run_id(run_id: str) -> str:
    try:
        return validate_run_id(run_id)
    except InvalidName as err:
        raise _bad_id(err) from None


def checked_ref(name: str, version: str) -> tuple[str, int]:
    try:
        validate_name(name)
    except InvalidName as err:
        raise _bad_id(err) from None
    if not _VERSION_RE.fullmatch(version):
        raise ApiError(400, f"invalid version {version[:40]!r}: must match {VERSION_PATTERN}", code="invalid_id")
    return name, int(version)


class ConsoleData:
    """What the console reads from one registry's store, with a short cache of the registry's manifests."""

    def __init__(self, registry: Registry):
        self.registry = registry
        self.store = registry.store
        self._manifests: tuple[float, list[Manifest]] = (0.0, [])

    # -- registry

    def manifests(self) -> list[Manifest]:
        expires, manifests = self._manifests
        if expires < time.monotonic():
            manifests = self.registry.list(all_versions=True)
            self._manifests = (time.monotonic() + REGISTRY_TTL_S, manifests)
        return manifests

    def published_by_run(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for m in self.manifests():
            run_id = m.lineage.get("run_id")
            if isinstance(run_id, str):
                found.setdefault(run_id, []).append(m.ref)
        return found

    def registry_list(self) -> dict[str, Any]:
        names: dict[str, list[dict[str, Any]]] = {}
        for m in self.manifests():
            names.setdefault(m.name, []).append(version_summary(m))
        return {"as_of": _now(), "storage": self.store.uri,
                "names": [{"name": n, "versions": sorted(v, key=lambda x: x["version"])} for n, v in sorted(names.items())]}

    def registry_version(self, name: str, version: int) -> dict[str, Any]:
        manifest = self._manifest(name, version)
        history = None
        if any(f.path == "history.json" for f in manifest.files):
            try:
                history = json.loads(self.registry.read_file(manifest.ref, "history.json"))
            except (RayftError, ValueError):
                history = None
        by_ref = {m.ref: m for m in self.manifests()}
        return {"as_of": _now(), **self.registry.show(manifest.ref), "lineage_tree": lineage_tree(manifest, by_ref),
                "history": history if isinstance(history, list) else None,
                "used_by": sorted(m.ref for m in by_ref.values() if manifest.ref in parent_refs(m))}

    def _manifest(self, name: str, version: int) -> Manifest:
        published = self.registry.versions(name)
        if version not in published:
            have = f"published versions: {', '.join(map(str, published))}" if published else "nothing is published under that name"
            raise NotFound(f"{name}@{version} is not in the registry ({have})")
        return self.registry.resolve(f"{name}@{version}")

    # -- runs

    def runs(self) -> dict[str, Any]:
        published = self.published_by_run()
        searches = self.search_ids()
        rows = []
        for run_id, entries in run_ids(self.store).items():
            if not any(e in (RECORD_FILE, PROGRESS_FILE) or checkpoint_step(e) >= 0 for e in entries):
                continue  # Ray's own bookkeeping of something that is not a rayft run
            rows.append(self._run_summary(run_id, entries, published.get(run_id, []), searches=searches))
        rows.sort(key=lambda r: r.get("started_at") or r.get("updated_at") or "", reverse=True)
        return {"as_of": _now(), "storage": self.store.uri, "runs": rows}

    def run(self, run_id: str) -> dict[str, Any]:
        entries = run_ids(self.store, run_id).get(run_id)
        if not entries:
            raise NotFound(f"run {run_id!r} does not exist in {self.store.uri} (the Runs page lists every run)")
        summary = self._run_summary(run_id, entries, self.published_by_run().get(run_id, []), full=True,
                                    searches=self.search_ids())
        return {"as_of": _now(), **summary}

    def _run_summary(self, run_id: str, entries: list[str], published: list[str], full: bool = False,
                     searches: set[str] = frozenset()) -> dict[str, Any]:
        record = read_record(self.store, run_id) if RECORD_FILE in entries else None
        progress = read_progress(self.store, run_id) if PROGRESS_FILE in entries else None
        checkpoints = sorted(checkpoint_step(e) for e in entries if e.endswith("/") and checkpoint_step(e) >= 0)
        history = progress.history if progress else []
        if not history and checkpoints and full:
            history = self._checkpoint_history(run_id, checkpoints[-1])
        last = lambda key: next((h[key] for h in reversed(history) if h.get(key) is not None), None)  # noqa: E731
        # A tune trial's driver is Tune's, not run_training: it has progress and checkpoints but no run record.
        search = search_of_trial(run_id, searches) if record is None else None
        out: dict[str, Any] = {
            "run_id": run_id,
            "state": record.state if record else ("tune trial" if search else "unknown"),
            "search_id": search,
            "name": record.name if record else None,
            "method": record.method if record else None,
            "objective": record.objective if record else None,
            "base": record.base if record else None,
            "source": record.source if record else None,
            "step": progress.step if progress else (checkpoints[-1] if checkpoints else None),
            "max_steps": record.max_steps if record else (progress.max_steps if progress else None),
            "eta_s": progress.eta_s if progress and (record is None or record.state == "running") else None,
            "train_loss": last("train_loss"),
            "eval_loss": last("eval_loss"),
            "started_at": record.started_at.isoformat() if record else None,
            "finished_at": record.finished_at.isoformat() if record and record.finished_at else None,
            "updated_at": progress.updated_at.isoformat() if progress else None,
            "error": record.error if record else None,
            "published": published,
            "checkpoints": checkpoints,
        }
        if full:
            out.update(history=history, log_tail=progress.log_tail if progress else [],
                       spec=record.spec if record else None, metrics=record.metrics if record else {})
        return out

    def _checkpoint_history(self, run_id: str, step: int) -> list[dict[str, Any]]:
        try:
            state = json.loads(self.store.get_bytes(checkpoint_key(run_id, step, STATE_JSON)))
        except (RayftError, ValueError):
            return []
        history = state.get("history") if isinstance(state, dict) else None
        return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []

    # -- tune searches

    def search_ids(self) -> set[str]:
        return {search_id for search_id, files in search_files(self.store).items() if SEARCH_JOB_FILE in files}

    def searches(self) -> dict[str, Any]:
        rows = []
        for search_id, files in sorted(search_files(self.store).items(), reverse=True):
            if SEARCH_JOB_FILE not in files:
                continue
            finished = SEARCH_RESULTS_FILE in files
            row: dict[str, Any] = {"search_id": search_id, "state": "finished" if finished else "running or interrupted"}
            if finished:
                results = self._results(search_id)
                row.update(trials=len(results.get("trials", [])), winner=results.get("winner"),
                           published=results.get("published", []), searcher=results.get("searcher"),
                           best_eval_loss=_winner_loss(results))
            rows.append(row)
        return {"as_of": _now(), "storage": self.store.uri, "searches": rows}

    def search(self, search_id: str) -> dict[str, Any]:
        if not self.store.exists(search_job_key(search_id)):
            raise NotFound(f"tune search {search_id!r} does not exist in {self.store.uri} (the Search page lists every search)")
        job = json.loads(self.store.get_bytes(search_job_key(search_id)))
        if not self.store.exists(search_results_key(search_id)):
            trials = [r for r in self.runs()["runs"] if r["run_id"].startswith(trial_run_id(search_id, ""))]
            return {"as_of": _now(), "search_id": search_id, "state": "running or interrupted", "job": job,
                    "trial_runs": trials}
        return {"as_of": _now(), "search_id": search_id, "state": "finished", "job": job, **self._results(search_id)}

    def _results(self, search_id: str) -> dict[str, Any]:
        try:
            data = json.loads(self.store.get_bytes(search_results_key(search_id)))
        except (NotFound, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def _winner_loss(results: dict[str, Any]) -> float | None:
    winner = results.get("winner")
    return next((t.get("eval_loss") for t in results.get("trials", []) if t.get("trial_id") == winner), None)


def version_summary(m: Manifest) -> dict[str, Any]:
    metrics = m.metrics
    return {
        "ref": m.ref, "name": m.name, "version": m.version, "kind": m.kind, "method": m.method, "base_model": m.base_model,
        "size": m.total_size, "files": len(m.files), "created_at": m.created_at.isoformat(),
        "eval_loss": metrics.get("eval_loss"), "train_loss": metrics.get("train_loss"), "step": metrics.get("step"),
        "has_eval": isinstance(metrics.get("eval"), dict), "run_id": m.lineage.get("run_id"),
        "parents": parent_refs(m),
    }


def parent_refs(m: Manifest) -> list[str]:
    """The registry versions `m` was made from: the adapters merged into it (`rayft merge`, `--merge`)."""
    merged = m.lineage.get("merged_from")
    if isinstance(merged, str):
        return [merged]
    if isinstance(merged, list):
        return [s["ref"] for s in merged if isinstance(s, dict) and isinstance(s.get("ref"), str)]
    return []


def lineage_tree(m: Manifest, by_ref: dict[str, Manifest], depth: int = 0) -> dict[str, Any]:
    """`m` and, recursively, what it was made from: parent versions, the run and the data it was trained on."""
    spec = m.lineage.get("job_spec") if isinstance(m.lineage.get("job_spec"), dict) else {}
    data = spec.get("data") if isinstance(spec.get("data"), dict) else {}
    node: dict[str, Any] = {
        "ref": m.ref, "kind": m.kind, "method": m.method, "run_id": m.lineage.get("run_id"),
        "base_model": m.base_model, "data": data.get("train"),
        "combination": m.lineage.get("combination_type"), "weights": m.lineage.get("weights"),
        "pushed_from": m.lineage.get("pushed_from"), "parents": [],
    }
    for ref in parent_refs(m):
        parent = by_ref.get(ref)
        if parent is None or depth >= 8:
            node["parents"].append({"ref": ref, "missing": parent is None, "parents": []})
        else:
            node["parents"].append(lineage_tree(parent, by_ref, depth + 1))
    return node


# --------------------------------------------------------------------------- routes


def _data(ingress: Any) -> ConsoleData:
    data = getattr(ingress, "_console_data", None)
    if data is None:
        data = ingress._console_data = ConsoleData(ingress.registry)
    return data


def _authorize_operator(ingress: Any, request: Request) -> None:
    """The console shows every run and registry entry in storage: it is for `api.auth` tokens (or no auth),
    not for the named tenants of `api.auth.tenants`, who see only their own files, jobs and models."""
    if ingress._authorize(request) != DEFAULT_TENANT:
        raise ApiError(403, "the console shows every run and model in storage, so it is open to api.auth tokens only, "
                       "not to a tenant's token; use /v1/fine_tuning/jobs and /v1/models for your own", code="forbidden")


async def _answer(ingress: Any, request: Request, route: str, work: Any) -> Response:
    """Token check, then `work(data)` in a thread; errors in the API's shape (404 unknown id, 503 storage down)."""
    async def run() -> Response:
        _authorize_operator(ingress, request)
        try:
            return JSONResponse(await asyncio.to_thread(work, _data(ingress)), headers={"Cache-Control": "no-store"})
        except RayftError as err:
            raise error_from(err) from None

    return await ingress._timed(route, run())


def shell(request: Request) -> HTMLResponse:
    """The page: the same for every console path; the script reads the path and asks for the data."""
    root = request.scope.get("root_path", "").rstrip("/")
    html = (STATIC / "console.html").read_text(encoding="utf-8").replace("{{ROOT}}", _attr(root))
    return HTMLResponse(html, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store",
                                       "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


def _attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


def console_router() -> APIRouter:
    """Every /console route; endpoints call the replica's ingress for its token check, storage and metrics."""
    router = APIRouter()

    @router.get("/console/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise ApiError(404, f"no console file {name[:60]!r}", code="not_found")
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    @router.get("/console/api/session")
    async def session(request: Request, ingress: Any = Depends(current_ingress)) -> Response:
        spec = ingress.spec
        return await _answer(ingress, request, "console", lambda data: {
            "as_of": _now(), "auth": bool(ingress.token_digests), "storage": data.store.uri, "base": spec.base.name,
            "merged": [m.name for m in spec.merged], "max_tokens_limit": spec.api.max_tokens_limit,
            "default_max_tokens": spec.api.default_max_tokens})

    @router.get("/console/api/runs")
    async def runs(request: Request, ingress: Any = Depends(current_ingress)) -> Response:
        return await _answer(ingress, request, "console", lambda data: data.runs())

    @router.get("/console/api/runs/{run_id}")
    async def run(run_id: str, request: Request, ingress: Any = Depends(current_ingress)) -> Response:
        _authorize_operator(ingress, request)
        run_id = checked_run_id(run_id)
        return await _answer(ingress, request, "console", lambda data: data.run(run_id))

    @router.get("/console/api/registry")
    async def registry(request: Request, ingress: Any = Depends(current_ingress)) -> Response:
        return await _answer(ingress, request, "console", lambda data: data.registry_list())

    @router.get("/console/api/registry/{name}/{version}")
    async def registry_version(name: str, version: str, request: Request, ingress: Any = Depends(current_ingress)) -> Response:
        _authorize_operator(ingress, request)
        checked = checked_ref(name, version)
        return await _answer(ingress, request, "console", lambda data: data.registry_version(*checked))

    @router.get("/console/api/searches")
    async def searches(request: Request, ingress: Any = Depends(current_ingress)) -> Response:
        return await _answer(ingress, request, "console", lambda data: data.searches())

    @router.get("/console/api/searches/{search_id}")
    async def search(search_id: str, request: Request, ingress: Any = Depends(current_ingress)) -> Response:
        _authorize_operator(ingress, request)
        search_id = checked_run_id(search_id)
        return await _answer(ingress, request, "console", lambda data: data.search(search_id))

    @router.get("/console/api/{rest:path}")
    async def unknown_api(rest: str) -> Response:
        raise ApiError(404, f"no console data at /console/api/{rest[:80]}", code="not_found")

    @router.get("/console")
    async def page_root(request: Request) -> Response:
        return shell(request)

    @router.get("/console/{rest:path}")
    async def page(rest: str, request: Request) -> Response:
        return shell(request)

    return router
