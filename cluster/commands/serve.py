"""`rayft serve SERVE.yaml`: deploy the OpenAI-compatible Serve application a serve spec describes
(inference, and with a `fine_tuning:` section the files and fine-tuning jobs API too: service/)."""

from __future__ import annotations

import argparse
import os
import signal
import threading

from storage.errors import RayftError, RunFailed, root_cause


class DeployFailed(RunFailed):
    """The Serve application did not come up (a replica failed to start); the message says why."""


class ServeUsageError(RayftError):
    """A serve option that cannot work (a port in use, --detach without a cluster)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a base model, its adapters and merged models behind an OpenAI-compatible API")
    p.add_argument("spec", help="serve YAML file (see examples/serve.yaml)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host for Serve's proxy when this command starts Serve")
    p.add_argument("--port", type=int, default=8000, help="HTTP port for Serve's proxy when this command starts Serve")
    p.add_argument("--name", default="rayft", help="Serve application name")
    p.add_argument("--detach", action="store_true", help="return once deployed; the application stays on the cluster")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.spec import load_service_spec

    spec = load_service_spec(args.spec)  # every problem in the file, before Ray is touched
    address = args.address or os.environ.get("RAY_ADDRESS")
    if args.detach and not address:
        raise ServeUsageError(
            "--detach leaves the application on a running Ray cluster, and a local Ray ends with this command: "
            "pass --address (or set RAY_ADDRESS), or drop --detach"
        )
    if not address:
        # Only for a local Ray: a cluster's replicas may see storage this machine cannot.
        preflight(spec)
        check_port_free(args.host, args.port)  # a local Ray starts Serve's proxy here: its port must be free
    from cluster.client.ray_connect import connect

    # Fine-tuning jobs are Ray jobs: a local Ray needs its dashboard, which serves the Jobs API.
    connect(address, dashboard=spec.api_enabled())
    url = deploy(spec, host=args.host, port=args.port, name=args.name)
    print(f"[rayft] serving on {url}/v1", flush=True)
    if spec.api_enabled():
        print(f"[rayft] fine-tuning API: {url}/v1/files, {url}/v1/fine_tuning/jobs", flush=True)
    print(f"[rayft] models: {', '.join(spec.model_names())} + adapters of {spec.base.name} from the registry "
          f"(GET {url}/v1/models)", flush=True)
    print(f"[rayft] console: {url}/console (`rayft console` opens it)", flush=True)
    if args.detach:
        print(f"[rayft] detached: `serve shutdown` or `serve delete {args.name}` on the cluster stops it", flush=True)
        return 0
    print("[rayft] Ctrl-C to stop", flush=True)
    wait_for_stop_signal()
    from ray import serve

    serve.delete(args.name)
    print("[rayft] stopped", flush=True)
    return 0


def wait_for_stop_signal() -> None:
    """Block until SIGINT (Ctrl-C) or SIGTERM (a process manager stopping us)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass


def preflight(spec) -> None:
    """Check that every model and adapter the spec names exists in storage, before any replica starts.

    A replica that cannot find its model fails only after Serve's retries; this names the
    problem at once. (Checksums, base match and method are checked by the replicas at load.)
    """
    from pathlib import Path

    from storage.models import REGISTRY_PREFIX
    from storage.registry import open_registry

    registry = open_registry(spec.storage)
    problems = []
    sources = [("base.source", spec.base.source)] + [
        (f"merged[{i}].source", m.source) for i, m in enumerate(spec.merged) if m.source is not None
    ]
    for where, source in sources:
        try:
            if source.startswith(REGISTRY_PREFIX):
                registry.resolve(source[len(REGISTRY_PREFIX):])
            elif not source.startswith("s3://") and source.startswith((".", "/", "~")) and not Path(source).expanduser().is_dir():
                problems.append(f"{where}: local directory {source!r} does not exist")
        except RayftError as err:
            problems.append(f"{where}: {err}")
    for i, m in enumerate(spec.merged):
        if m.adapter is not None:
            try:
                registry.resolve(m.adapter)
            except RayftError as err:
                problems.append(f"merged[{i}].adapter: {err}")
    if problems:
        raise ServeUsageError("the serve spec names what storage does not hold:\n" + "\n".join(f"  - {p}" for p in problems))


def check_port_free(host: str, port: int) -> None:
    """Refuse a --port something already listens on: Serve's proxy would fail to bind, with a traceback."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise port_in_use(host, port) from None
            raise ServeUsageError(f"--host {host} --port {port}: cannot listen there ({err.strerror}); choose another") from None


def port_in_use(host: str, port: int) -> ServeUsageError:
    return ServeUsageError(f"port {port} on {host} is already in use (another server, or another rayft serve); "
                           "choose a free one with --port")


def deploy(spec, *, host: str = "127.0.0.1", port: int = 8000, name: str = "rayft") -> str:
    """Start Serve's HTTP proxy (if it is not running) and deploy the spec's application at `/`; returns its base URL.

    Waits until every replica is up; a replica that cannot start (missing model, bad
    adapter for a merged deployment) raises DeployFailed with its reason.
    """
    from ray import serve

    from cluster.client import console
    from service.app import build_app

    console.quiet_ray_driver()
    logging_config = console.serve_logging_config()
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
        serve.run(build_app(spec), name=name, route_prefix="/", blocking=False, logging_config=logging_config)
    except RuntimeError as exc:
        if "Failed to bind to address" in str(exc):
            raise port_in_use(host, port) from exc
        serve.delete(name)
        raise DeployFailed(f"application {name!r} did not start: {root_cause(exc)}") from exc
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"
