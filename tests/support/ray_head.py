"""A Ray head of its own for tests: `ray start --head --block` on 127.0.0.1 with token auth, free ports,
its own temp dir and token, separate from the session's in-process Ray; and how to run the CLI as a
user would against it (a subprocess with a user's environment).

The head gets no storage or AWS variables of its own, and rayft is not on its PATH (as for a head
started as `.venv/bin/ray start` without activating the venv): a job reaches the S3 API server only
through what `rayft submit` gives it, and runs rayft only through the cluster's own Python.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.client.auth import AuthToken
from cluster.client.jobs_client import JobsClient

VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Head:
    address: str  # the Jobs API (dashboard) URL
    token: str
    gcs_address: str  # what `ray.init(address=...)` takes

    def client(self) -> JobsClient:
        return JobsClient(self.address, AuthToken(self.token, "test"))

    def env(self, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
        """An environment for a process that connects to this head as a driver."""
        env = {k: v for k, v in (base or os.environ).items() if not k.startswith("RAY_")}
        # A loaded CI machine can take more than Ray's default 60 s to answer a new driver.
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_gcs_server_request_timeout_seconds="300", **extra)
        return env


def _free_ports(count: int) -> list[int]:
    """`count` distinct free ports: all held open at once, so the OS cannot hand out one twice."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return _free_ports(1)[0]


def _free_port_range(count: int) -> tuple[int, int]:
    """`count` consecutive free ports for the head's workers, away from the session Ray's default range."""
    for _ in range(50):
        base = random.randrange(20000, 29000)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base, base + count - 1
        except OSError:
            continue
    raise RuntimeError("no free port range for the Ray head's workers")


_PORT_FLAGS = ("--port", "--node-manager-port", "--object-manager-port", "--ray-client-server-port",
               "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
               "--metrics-export-port", "--dashboard-port")


def _head_command(temp_dir: Path, ports: dict[str, int], num_cpus: int) -> list[str]:
    low, high = _free_port_range(60)
    assert not any(low <= port <= high for port in ports.values())
    return [
        str(VENV_BIN / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}", "--object-store-memory=100000000",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", *(f"{flag}={port}" for flag, port in ports.items()),
        f"--min-worker-port={low}", f"--max-worker-port={high}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]



def _head_env(token: str, home: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """The head's own environment: auth on with its token, no storage or AWS settings but `extra`, no venv on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "RAYFT_", "VIRTUAL_ENV"))}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != VENV_BIN.resolve()]
    env.update(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAYFT_HOME=str(home), PATH=os.pathsep.join(path),
        AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true",
        RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
        # The head's own node is its only node: on a loaded 2-core machine the GCS must not declare its raylet
        # dead after Ray's default ~15 s without an answer (which ends the whole head).
        RAY_health_check_timeout_ms="30000", RAY_health_check_failure_threshold="20",
        # Nor may its dashboard and raylet exit after Ray's default 60 s without reaching the GCS: a dashboard
        # that exits takes the Jobs API away in the middle of a test (and `ray start --block` the whole head).
        RAY_gcs_rpc_server_reconnect_timeout_s="600",
    )
    env.update(extra)
    return env


def _answers(head: Head, timeout_s: float) -> bool:
    import requests

    try:
        return requests.get(f"{head.address}/api/version", headers={"Authorization": f"Bearer {head.token}"},
                            timeout=timeout_s).ok
    except requests.RequestException:
        return False


def _start_failure(head: Head, proc: subprocess.Popen, log: Path, timeout_s: float = 150) -> str | None:
    """None once `ray start` has finished starting the node and the Jobs API answers; else why not.

    The dashboard answers before the node has finished starting, and on a loaded machine the start can still
    fail after that (Ray gives the raylet 30 s to register, and the raylet its agents about as long): a head is
    up only when `ray start` says so."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"ray start exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
        if "Ray runtime started." in log.read_text(errors="replace") and _answers(head, 2):
            return None
        time.sleep(0.5)
    return f"Ray head did not start within {timeout_s:.0f}s:\n{log.read_text(errors='replace')[-3000:]}"


def _stop_head(proc: subprocess.Popen, token: str) -> None:
    """Stop this head and only it: `ray stop` would kill every Ray on the machine, the session's too.

    `ray start --block` shuts its processes down on SIGTERM; anything left is found by the
    session the head was started in, or by the head's unique token in a job's environment.
    """
    import psutil

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=8)
    except subprocess.TimeoutExpired:
        pass
    leftovers = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and (os.getsid(p.pid) == proc.pid or p.environ().get("RAY_AUTH_TOKEN") == token):
                leftovers.append(p)
        except (psutil.Error, OSError):
            continue
    for p in leftovers:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(leftovers, timeout=10)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)



class KeptHead:
    """The session's head, started again if it has died since a test last used it.

    A head that lives for a whole `make test` (an hour on a slow CI machine) is one process tree among
    many on two cores; if it dies, the tests after it would fail for a reason that is not theirs. A restart
    is reported as a warning with the end of the dead head's log, so it is seen, not hidden.
    """

    def __init__(self) -> None:
        self._running = contextlib.ExitStack()
        self.head: Head | None = None
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None

    def alive(self) -> Head:
        if self.head is not None and self.proc is not None and self.proc.poll() is None and _answers(self.head, 60):
            return self.head
        if self.head is not None:
            import warnings

            warnings.warn(f"the session's Ray head at {self.head.gcs_address} died (ray start exited with "
                          f"{self.proc.poll() if self.proc else None}); starting a new one.\n{self._log_tails()}")
            self.stop()
        self.head = self._running.enter_context(running_head(on_start=self._started))
        return self.head

    def report(self) -> str:
        """For a failing test's message: whether the head is still up, and the ends of its logs."""
        if self.head is None or self.proc is None:
            return "(no head)"
        state = "running" if self.proc.poll() is None else f"exited with {self.proc.returncode}"
        return f"ray start {state}; Jobs API answers: {_answers(self.head, 10)}\n{self._log_tails()}"

    def _log_tails(self) -> str:
        """The ends of `ray start`'s output and of the GCS's and raylet's logs: where a dead head says why."""
        if self.log is None:
            return "(no log)"
        import re

        logs = self.log.parent / "ray" / "session_latest" / "logs"
        parts = [f"--- ray start:\n{self.log.read_text(errors='replace')[-1500:]}"]
        for path in (logs / "ray_process_exit.log", logs / "dashboard.log", logs / "gcs_server.out", logs / "raylet.out"):
            if path.exists():  # their warnings and errors; the rest is periodic event statistics
                worst = [line for line in path.read_text(errors="replace").splitlines()
                         if re.match(r"\[[^\]]* [WECF] \d+ \d+\]", line) or re.search(r"\t(WARNING|ERROR|CRITICAL) ", line)
                         or path.name == "ray_process_exit.log"]
                worst = [line for line in worst if "DeprecationWarning" not in line]
                parts.append(f"--- {path.name} (warnings and errors):\n" + "\n".join(worst[-12:]))
        return "\n".join(parts)

    def _started(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, log

    def stop(self) -> None:
        self._running.close()
        self.head = self.proc = self.log = None


#: Tries to start a head: a start that fails on a loaded machine (see `_start_failure`) is tried again, after a
#: pause for the load to pass. In a full CI run here (2026-11-30, load average ~20), two starts in a row failed.
START_ATTEMPTS = 5
RETRY_PAUSE_S = 15.0


@contextlib.contextmanager
def running_head(num_cpus: int = 2, env: Mapping[str, str] | None = None,
                 on_start: Callable[[subprocess.Popen, Path], None] | None = None) -> Iterator[Head]:
    """A running head (token auth, dashboard with the Jobs API); `env` is added to the head's environment
    (e.g. storage settings, which a real cluster holds in its pods' environment)."""
    for attempt in range(1, START_ATTEMPTS + 1):
        # Short temp dir: Ray's unix socket paths live under it and must stay under ~107 characters.
        temp_dir = Path(tempfile.mkdtemp(prefix="rayft-head-", dir="/tmp"))
        token = secrets.token_hex(32)
        ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
        head = Head(f"http://127.0.0.1:{ports['--dashboard-port']}", token, f"127.0.0.1:{ports['--port']}")
        log = temp_dir / "ray-start.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(_head_command(temp_dir / "ray", ports, num_cpus), env=_head_env(token, temp_dir / "home", env or {}),
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if on_start is not None:
            on_start(proc, log)
        try:
            failure = _start_failure(head, proc, log)
        except BaseException:
            _stop_head(proc, token)
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        if failure is None:
            break
        _stop_head(proc, token)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if attempt == START_ATTEMPTS:
            pytest.fail(f"no Ray head started in {START_ATTEMPTS} tries; the last: {failure}")
        import warnings

        warnings.warn(f"a Ray head failed to start (try {attempt} of {START_ATTEMPTS}); starting another. {failure}")
        time.sleep(RETRY_PAUSE_S)
    try:
        yield head
    finally:
        _stop_head(proc, token)
        shutil.rmtree(temp_dir, ignore_errors=True)


def rayft(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """A user's shell: this session's S3 settings (endpoint, test credentials), no Ray variables, its own HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), **extra)
    return env


