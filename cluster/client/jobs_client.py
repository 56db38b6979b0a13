"""A client of a Ray cluster's Jobs API: the user's address, the cluster's token, errors as one line."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

from cluster.client.auth import AuthToken, ClusterUnreachable, find_auth_token, missing_token_error, refused_token_error
from storage.errors import NotFound, RayftError, first_line

TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})

# A busy head's dashboard (or a kubectl port-forward) sometimes closes a connection without answering.
# Each call is tried again over about this long before the user sees an error.
RETRY_BUDGET_S = 30.0

T = TypeVar("T")


class SubmitError(RayftError):
    """What was asked cannot be submitted (bad option, file outside the working dir, ...)."""


class JobNotFound(NotFound):
    """No job with that id on the cluster."""


def jobs_api_address(address: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """The Jobs API URL from --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS; `host:port` gets http://."""
    chosen = address or environ.get("RAY_API_SERVER_ADDRESS") or environ.get("RAY_ADDRESS")
    if not chosen:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS to it")
    chosen = chosen.strip().rstrip("/")
    if chosen.startswith("ray://") or chosen == "auto":
        raise SubmitError(
            f"address {chosen!r} is a Ray Client / local address; the Jobs API is the head's dashboard "
            "URL, e.g. http://HEAD:8265"
        )
    if "://" not in chosen:
        chosen = f"http://{chosen}"
    if not chosen.startswith(("http://", "https://")):
        raise SubmitError(f"address {chosen!r}: must be an http(s):// URL of the head's dashboard, e.g. http://HEAD:8265")
    return chosen


class JobsClient:
    """Ray's JobSubmissionClient with the cluster's token, its errors turned into one-line RayftErrors."""

    def __init__(self, address: str, token: AuthToken | None):
        self.address = address
        self.token = token
        headers = {"Authorization": f"Bearer {token.value}"} if token else {}
        from ray.job_submission import JobSubmissionClient

        # Ray lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given;
        # the address the user chose must win.
        with _env_removed("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            self._client = self._call(lambda: JobSubmissionClient(address, headers=headers), reached=False)

    @classmethod
    def connect(cls, address: str | None) -> "JobsClient":
        """A client for --address / RAY_ADDRESS with the token from the environment or ~/.ray/auth_token."""
        return cls(jobs_api_address(address), find_auth_token())

    @contextlib.contextmanager
    def errors(self, job_id: str | None = None) -> Iterator[None]:
        """Ray's exceptions for auth, connection and unknown jobs, as RayftErrors naming the fix."""
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as exc:
            raise self._auth_error(str(exc)) from None
        except (ConnectionError, _requests_connection_error()) as exc:
            raise ClusterUnreachable(
                f"cannot reach a Ray Jobs API at {self.address} ({first_line(exc)}); pass the head's dashboard "
                "URL (port 8265), reachable from here, e.g. through `kubectl port-forward` or `ray dashboard`"
            ) from None
        except RuntimeError as exc:
            if job_id and "404" in str(exc):
                raise JobNotFound(f"no job {job_id!r} on the cluster at {self.address}; `rayft jobs list` shows them") from None
            raise

    def _call(self, call: Callable[[], T], job_id: str | None = None, reached: bool = True) -> T:
        """`call()`, tried again for up to RETRY_BUDGET_S when the connection drops; errors as RayftErrors.

        Once the cluster has answered (`reached`), a refused connection is a restarting dashboard, so it is
        tried again too; before that it is a wrong address, reported at once.
        """
        deadline, pause = time.monotonic() + RETRY_BUDGET_S, 0.5
        while True:
            try:
                with self.errors(job_id):
                    return call()
            except ClusterUnreachable as exc:
                cause = exc.__context__
                if time.monotonic() + pause > deadline or not (reached or _dropped(cause)):
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 8.0)

    def _auth_error(self, detail: str) -> RayftError:
        return missing_token_error(self.address) if self.token is None else refused_token_error(self.address, self.token, detail)

    def submit(self, entrypoint: str, runtime_env: dict, submission_id: str, metadata: dict[str, str]) -> str:
        import logging

        # Ray warns on every upload that it now skips .venv/.git by default; so do we, on purpose.
        logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)

        def submit_once() -> str:
            # A retried submission whose first try reached the head must not start the job twice.
            if self._exists(submission_id):
                return submission_id
            return self._client.submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id, metadata=metadata
            )

        return self._call(submit_once)

    def _exists(self, job_id: str) -> bool:
        try:
            self._client.get_job_info(job_id)
            return True
        except RuntimeError as exc:
            if "404" in str(exc):
                return False
            raise

    def info(self, job_id: str):
        """Ray's JobDetails (status, message, entrypoint, start/end times, ...)."""
        return self._call(lambda: self._client.get_job_info(job_id), job_id)

    def status(self, job_id: str) -> str:
        return str(self.info(job_id).status)

    def logs(self, job_id: str) -> str:
        return self._call(lambda: self._client.get_job_logs(job_id), job_id)

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; False when it had already ended."""
        return self._call(lambda: self._client.stop_job(job_id), job_id)

    def list(self) -> list:
        return self._call(self._client.list_jobs)

    def tail(self, job_id: str):
        """Async iterator over chunks of the driver's log, from the start, until the job ends."""
        return self._client.tail_job_logs(job_id)


def _requests_connection_error() -> type[Exception]:
    import requests

    return requests.exceptions.ConnectionError


def _dropped(exc: BaseException | None) -> bool:
    """Whether the server accepted the connection and closed it without an answer (not: nothing listens)."""
    import urllib3

    while exc is not None:
        if isinstance(exc, _requests_connection_error()):
            return any(isinstance(arg, urllib3.exceptions.ProtocolError) for arg in exc.args)
        exc = exc.__context__
    return False


@contextlib.contextmanager
def _env_removed(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def format_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"
