"""Run rayft commands on a Ray cluster through the Jobs API, and follow them.

`rayft submit JOB.yaml --address http://HEAD:8265` packs the working directory (minus
virtualenvs, git metadata, caches and outputs), checks its size against Ray's upload limit
before anything leaves the machine, submits `rayft train JOB.yaml` with a runtime env built
for it (working dir, storage/endpoint variables, optional pip packages or container image),
then streams the driver's log and the job's status until it ends.

Ray 2.60 clusters run with token authentication on. The client sends the cluster's token as
`Authorization: Bearer ...`, found where Ray itself looks for it: `RAY_AUTH_TOKEN`, then the
file named by `RAY_AUTH_TOKEN_PATH`, then `~/.ray/auth_token`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from pydantic import BaseModel, ConfigDict, Field

from storage.errors import NotFound, RayftError

# What `rayft submit` can run on the cluster; each is `rayft <command> FILE [ARGS]` there.
Command = Literal["train", "tune", "serve"]

# Never worth uploading: environments, VCS metadata, caches, build and run outputs. Patterns
# are .gitignore syntax relative to the working dir, as Ray applies `excludes`; without a
# trailing slash a pattern matches the directory itself, so the walk does not enter it.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".venv", "venv", ".git", ".hg", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", ".tox", ".ipynb_checkpoints", "*.egg-info", "build", "dist", ".rayft",
    "demo-out", "bench/results",
)

# Not secret, and what a job needs to find its storage: forwarded whenever set locally.
FORWARDED_ENV_VARS: tuple[str, ...] = (
    "RAYFT_STORAGE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
)

# Secret: forwarded only with --aws-credentials (they end up readable in the job's details).
AWS_CREDENTIAL_VARS: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class SubmitError(RayftError):
    """What was asked cannot be submitted (bad option, file outside the working dir, ...)."""


class WorkingDirTooLarge(RayftError):
    """The working dir would exceed Ray's upload limit; nothing was uploaded."""


class ClusterAuthError(RayftError):
    """The cluster wants a token that was not found, or refused the one sent."""

    http_status = 401


class ClusterUnreachable(RayftError):
    """Nothing answers as a Ray Jobs API at the address."""

    http_status = 503


class JobNotFound(NotFound):
    """No job with that id on the cluster."""


# --------------------------------------------------------------------------- connection


@dataclass(frozen=True)
class AuthToken:
    value: str
    source: str  # where it came from, for error messages ("RAY_AUTH_TOKEN", a file path)


def find_auth_token(environ: Mapping[str, str] = os.environ, home: Path | None = None) -> AuthToken | None:
    """The cluster token, looked up in Ray's own order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return AuthToken(environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        value = _read_token_file(path)
        if not value:
            raise ClusterAuthError(f"RAY_AUTH_TOKEN_PATH={path}: file is missing or empty; put the cluster's token in it")
        return AuthToken(value, f"RAY_AUTH_TOKEN_PATH ({path})")
    path = (home or Path(environ.get("HOME") or Path.home())) / ".ray" / "auth_token"
    value = _read_token_file(path)
    return AuthToken(value, str(path)) if value else None


def _read_token_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


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
        with self.errors(), _env_removed("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            self._client = JobSubmissionClient(address, headers=headers)

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
        except ConnectionError as exc:
            raise ClusterUnreachable(
                f"cannot reach a Ray Jobs API at {self.address} ({_first_line(exc)}); pass the head's dashboard "
                "URL (port 8265), reachable from here, e.g. through `kubectl port-forward` or `ray dashboard`"
            ) from None
        except RuntimeError as exc:
            if job_id and "404" in str(exc):
                raise JobNotFound(f"no job {job_id!r} on the cluster at {self.address}; `rayft jobs list` shows them") from None
            raise

    def _auth_error(self, detail: str) -> ClusterAuthError:
        if self.token is None:
            return ClusterAuthError(
                f"the Ray cluster at {self.address} requires an auth token and none was found here: set "
                "RAY_AUTH_TOKEN to the cluster's token, or write it to ~/.ray/auth_token (or a file named by "
                "RAY_AUTH_TOKEN_PATH); get it from the cluster (`ray get-auth-token` on the head, or the Secret "
                "it was created from)"
            )
        return ClusterAuthError(
            f"the Ray cluster at {self.address} refused the auth token from {self.token.source} "
            f"({_first_line(detail)}); it is not this cluster's token: set RAY_AUTH_TOKEN to the right one"
        )

    def submit(self, entrypoint: str, runtime_env: dict, submission_id: str, metadata: dict[str, str]) -> str:
        import logging

        # Ray warns on every upload that it now skips .venv/.git by default; so do we, on purpose.
        logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)
        with self.errors():
            return self._client.submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id, metadata=metadata
            )

    def info(self, job_id: str):
        """Ray's JobDetails (status, message, entrypoint, start/end times, ...)."""
        with self.errors(job_id):
            return self._client.get_job_info(job_id)

    def status(self, job_id: str) -> str:
        return str(self.info(job_id).status)

    def logs(self, job_id: str) -> str:
        with self.errors(job_id):
            return self._client.get_job_logs(job_id)

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; False when it had already ended."""
        with self.errors(job_id):
            return self._client.stop_job(job_id)

    def list(self) -> list:
        with self.errors():
            return self._client.list_jobs()

    def tail(self, job_id: str):
        """Async iterator over chunks of the driver's log, from the start, until the job ends."""
        return self._client.tail_job_logs(job_id)


@contextlib.contextmanager
def _env_removed(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _first_line(exc: BaseException | str) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# --------------------------------------------------------------------------- what to submit


class JobSubmission(BaseModel):
    """One job for the Jobs API, checked on this machine before anything is uploaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: Command = Field(description="The rayft command run on the cluster.")
    job_file: str = Field(description="The job/config file as the cluster sees it: relative to the working dir.")
    args: list[str] = Field(default_factory=list, description="Further arguments of the command.")
    working_dir: Path | None = Field(description="Local directory uploaded as the job's cwd; None with an image.")
    excludes: list[str] = Field(default_factory=list, description="Patterns (.gitignore syntax) left out of the upload.")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Environment of the driver and every worker of the job.")
    pip: list[str] = Field(default_factory=list, description="pip requirements installed for the job on the cluster.")
    image_uri: str | None = Field(None, description="Container image the job runs in (needs podman on the nodes).")
    submission_id: str = Field(description="The job id on the cluster.")
    notes: list[str] = Field(default_factory=list, description="Things the user should know before it runs.")
    launcher: list[str] = Field(
        default_factory=lambda: ["rayft"],
        description="How the cluster starts the CLI: `rayft` on its PATH, or e.g. [python, -m, cluster.cli] for a known interpreter.",
    )

    def entrypoint(self) -> str:
        return shlex.join([*self.launcher, self.command, self.job_file, *self.args])

    def runtime_env(self) -> dict:
        env: dict = {"env_vars": dict(self.env_vars)}
        if self.working_dir is not None:
            env["working_dir"] = str(self.working_dir)
            env["excludes"] = list(self.excludes)
        if self.pip:
            env["pip"] = list(self.pip)
        if self.image_uri:
            env["image_uri"] = self.image_uri
        return env

    def metadata(self) -> dict[str, str]:
        return {"rayft_command": self.command, "rayft_job": self.job_file}


class SubmitOptions(BaseModel):
    """What the user asked `rayft submit` for (the CLI's options, validated by `prepare_submission`)."""

    model_config = ConfigDict(extra="forbid")

    command: Command = Field("train", description="rayft command to run on the cluster.")
    job: str = Field(description="Job/config file, as given on the command line (relative to the cwd).")
    args: list[str] = Field(default_factory=list, description="Further arguments for the command on the cluster.")
    working_dir: str | None = Field(None, description="Directory to upload (default: the cwd).")
    excludes: list[str] = Field(default_factory=list, description="Extra patterns to leave out of the upload.")
    env: list[str] = Field(default_factory=list, description="KEY=VALUE pairs for the job's environment.")
    env_from_local: list[str] = Field(default_factory=list, description="Names of local variables copied into the job's environment.")
    aws_credentials: bool = Field(False, description="Copy AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN from here into the job.")
    forward_env: bool = Field(True, description="Copy the storage settings in FORWARDED_ENV_VARS from here when set.")
    pip: list[str] = Field(default_factory=list, description="pip requirements (or a requirements .txt file) for the job.")
    image_uri: str | None = Field(None, description="Container image for the job instead of a working dir and pip.")
    storage: str | None = Field(None, description="Storage URI passed to the command as --storage.")


def prepare_submission(opts: SubmitOptions, environ: Mapping[str, str] = os.environ, cwd: Path | None = None) -> JobSubmission:
    """Check everything that can be checked here; raise one SubmitError listing every problem."""
    cwd = (cwd or Path.cwd()).resolve()
    problems: list[str] = []
    notes: list[str] = []
    if opts.image_uri and (opts.pip or opts.working_dir):
        problems.append("--image-uri: Ray runs an image alone; drop --pip/--working-dir and bake them into the image")
    working_dir = None if opts.image_uri else (cwd / (opts.working_dir or ".")).resolve()
    if working_dir is not None and not working_dir.is_dir():
        problems.append(f"--working-dir: {working_dir} is not a directory")
        working_dir = None
    excludes = [*DEFAULT_EXCLUDES, *opts.excludes]
    job_file = _job_file_on_cluster(opts, cwd, working_dir, excludes, problems)
    spec = _load_spec(opts, cwd, problems) if opts.command in ("train", "tune") else None
    if spec is not None and working_dir is not None:
        _check_spec_paths(spec, working_dir, excludes, problems, notes)
    env_vars = _job_env_vars(opts, environ, problems, notes)
    pip = _pip_requirements(opts.pip, cwd, problems)
    if problems:
        raise SubmitError("cannot submit: " + "; ".join(problems))
    storage = opts.storage or (spec.storage.uri if spec is not None else None) or env_vars.get("RAYFT_STORAGE")
    notes += _storage_notes(storage)
    if opts.image_uri:
        notes.append(f"nothing is uploaded with --image-uri: {opts.job} and the files it names must be in the image")
    args = [*opts.args, *(["--storage", opts.storage] if opts.storage else [])]
    name = spec.output.name if spec is not None else Path(opts.job).stem
    return JobSubmission(
        command=opts.command, job_file=job_file or opts.job, args=args, working_dir=working_dir, excludes=excludes,
        env_vars=env_vars, pip=pip, image_uri=opts.image_uri, submission_id=new_submission_id(opts.command, name),
        notes=notes,
    )


def new_submission_id(command: str, name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "job"
    return f"rayft-{command}-{slug}-{uuid.uuid4().hex[:8]}"


def _job_file_on_cluster(opts: SubmitOptions, cwd: Path, working_dir: Path | None, excludes: list[str], problems: list[str]) -> str | None:
    """The job file's path relative to the working dir (what the cluster's cwd will be)."""
    local = (cwd / opts.job).resolve()
    if working_dir is None:  # inside an image: the path is the image's business
        return opts.job
    if not local.is_file():
        problems.append(f"{opts.job}: no such file (paths are taken from {cwd})")
        return None
    if not local.is_relative_to(working_dir):
        problems.append(f"{opts.job}: outside the working dir {working_dir}, so it would not be uploaded; "
                        "move it under it or pass --working-dir")
        return None
    relative = local.relative_to(working_dir).as_posix()
    if is_excluded(working_dir, relative, excludes):
        problems.append(f"{opts.job}: excluded from the upload (by the default excludes, --exclude, .gitignore or .rayignore)")
    return relative


def _load_spec(opts: SubmitOptions, cwd: Path, problems: list[str]):
    from trainers.spec import SpecError, load_job_spec

    try:
        return load_job_spec(cwd / opts.job)
    except SpecError as exc:
        if (cwd / opts.job).is_file():  # a missing file is already reported
            problems.append(str(exc))
        return None


def _check_spec_paths(spec, working_dir: Path, excludes: list[str], problems: list[str], notes: list[str]) -> None:
    """Local files the job reads must travel with the working dir: the cluster resolves them from there."""
    for field, value, required in (
        ("data.train", spec.data.train, True),
        ("data.eval", spec.data.eval, True),
        ("model.source", spec.model.source, False),  # a name that is no file is a hub id
    ):
        if value is None or "://" in value or value.startswith("registry:"):
            continue
        if Path(value).is_absolute() or value.startswith("~"):
            notes.append(f"{field} is the absolute path {value}: it must exist on the cluster's nodes")
            continue
        target = (working_dir / value).resolve()
        if not target.exists():
            if required:
                problems.append(f"{field}: {value!r} does not exist under the working dir {working_dir}")
            continue
        if not target.is_relative_to(working_dir):
            problems.append(f"{field}: {value!r} is outside the working dir {working_dir}, so it would not be uploaded")
        elif is_excluded(working_dir, target.relative_to(working_dir).as_posix(), excludes):
            problems.append(f"{field}: {value!r} is excluded from the upload (default excludes, --exclude, "
                            ".gitignore or .rayignore); put it elsewhere or in s3://")


def _job_env_vars(opts: SubmitOptions, environ: Mapping[str, str], problems: list[str], notes: list[str]) -> dict[str, str]:
    env = {name: environ[name] for name in FORWARDED_ENV_VARS if opts.forward_env and environ.get(name)}
    if opts.aws_credentials:
        missing = [n for n in AWS_CREDENTIAL_VARS[:2] if not environ.get(n)]
        if missing:
            problems.append(f"--aws-credentials: {' and '.join(missing)} not set here")
        env.update({n: environ[n] for n in AWS_CREDENTIAL_VARS if environ.get(n)})
        notes.append("AWS credentials travel in the job's runtime env: anyone holding this cluster's token can read "
                     "them in the job's details; prefer an instance profile / workload identity on the cluster")
    for name in opts.env_from_local:
        if name in environ:
            env[name] = environ[name]
        else:
            problems.append(f"--env-from-local {name}: not set in this environment")
    for pair in opts.env:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            problems.append(f"--env {pair!r}: must be KEY=VALUE with KEY a variable name")
        else:
            env[key] = value
    # The driver's prints reach the streamed log as they happen, not when a buffer fills.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _pip_requirements(values: list[str], cwd: Path, problems: list[str]) -> list[str]:
    """--pip values; one naming a local .txt file stands for its lines (read here, installed there)."""
    out: list[str] = []
    for value in values:
        path = cwd / value
        if value.endswith(".txt") and path.is_file():
            out += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
        elif value.endswith(".txt"):
            problems.append(f"--pip {value}: no such requirements file")
        else:
            out.append(value)
    return out


def _storage_notes(storage: str | None) -> list[str]:
    if not storage:
        return ["no storage given (storage.uri, --storage or RAYFT_STORAGE): the cluster's RAYFT_STORAGE or its "
                "~/.rayft/storage is used"]
    if "://" not in storage:
        return [f"storage {storage} is a local path: on the cluster that is each node's own disk; "
                "use s3://bucket/prefix for a multi-node cluster"]
    return []


def endpoint_notes(env_vars: Mapping[str, str], cluster_address: str) -> list[str]:
    """A storage endpoint on this machine's loopback is not reachable from a remote cluster."""
    from urllib.parse import urlparse

    def loopback(url: str) -> bool:
        return (urlparse(url).hostname or "") in ("localhost", "127.0.0.1", "::1")

    if loopback(cluster_address):
        return []
    return [f"{name}={env_vars[name]} is this machine's loopback: the cluster's nodes will not reach it; "
            "pass --env with an address they can reach" for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
            if env_vars.get(name) and loopback(env_vars[name])]


# --------------------------------------------------------------------------- package size


@dataclass(frozen=True)
class PackageSize:
    total: int  # bytes of the zip Ray would build (file bytes + zip headers)
    files: int
    biggest_files: list[tuple[str, int]]
    biggest_dirs: list[tuple[str, int]]  # top-level directories by the bytes they add


def package_size_limit() -> int:
    """Ray's limit on an uploaded package (its gRPC message size), as Ray computes it."""
    from ray._private.ray_constants import GRPC_CPP_MAX_MESSAGE_SIZE

    return int(os.environ.get("RAY_max_grpc_message_size", GRPC_CPP_MAX_MESSAGE_SIZE))


def _include_gitignore() -> bool:
    return os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"


def packed_paths(working_dir: Path, excludes: list[str]) -> dict[str, int]:
    """Every path Ray would pack (files, and empty dirs as 0) with its size: the same walk, excludes
    and .gitignore/.rayignore rules as Ray's packager."""
    import logging

    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = working_dir.resolve()
    excludes = [*get_runtime_env_default_excludes(), *excludes]  # Ray adds its own (.git, .venv, ...) too
    sizes: dict[str, int] = {}

    def visit(path: Path) -> None:
        if path.is_file():
            sizes[path.relative_to(root).as_posix()] = path.stat().st_size
        elif path.is_dir() and path != root and next(path.iterdir(), None) is None:
            sizes[path.relative_to(root).as_posix() + "/"] = 0

    _dir_travel(root, [_get_excludes(root, list(excludes))], visit, include_gitignore=_include_gitignore(),
                logger=logging.getLogger("rayft.submit.quiet"))
    return sizes


def measure_package(working_dir: Path, excludes: list[str]) -> PackageSize:
    """The size of the zip Ray would upload (stored, not compressed) and where the bytes are."""
    # Per entry: local header (30) + central directory entry (46) + the name in both.
    sizes = {rel: n + 76 + 2 * len(rel.encode()) for rel, n in packed_paths(working_dir, excludes).items()}
    dirs: dict[str, int] = {}
    for rel, size in sizes.items():
        if "/" in rel.rstrip("/"):
            top = rel.split("/", 1)[0] + "/"
            dirs[top] = dirs.get(top, 0) + size
    by_size = sorted(sizes.items(), key=lambda kv: -kv[1])
    return PackageSize(
        total=sum(sizes.values()) + 22, files=len(sizes), biggest_files=by_size[:5],
        biggest_dirs=sorted(dirs.items(), key=lambda kv: -kv[1])[:5],
    )


def is_excluded(working_dir: Path, relative: str, excludes: list[str]) -> bool:
    """Whether Ray's packager would leave `relative` (a path under working_dir) out."""
    import logging

    from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

    root = working_dir.resolve()
    matchers = [_get_excludes(root, list(excludes))]
    quiet = logging.getLogger("rayft.submit.quiet")
    path = root
    matchers += get_excludes_from_ignore_files(root, include_gitignore=_include_gitignore(), logger=quiet)
    for part in Path(relative).parts:
        path = path / part
        if any(match(path) for match in matchers):
            return True
        if path.is_dir():
            matchers += get_excludes_from_ignore_files(path, include_gitignore=_include_gitignore(), logger=quiet)
    return False


def check_package_size(working_dir: Path, excludes: list[str]) -> PackageSize:
    """Refuse, before any upload, a working dir Ray would reject; name the biggest offenders."""
    size, limit = measure_package(working_dir, excludes), package_size_limit()
    if size.total < limit:
        return size
    offenders = ", ".join(f"{name} {mib(n)}" for name, n in _offenders(size))
    raise WorkingDirTooLarge(
        f"working dir {working_dir} would upload {mib(size.total)} ({size.files:,} files), over Ray's limit of "
        f"{mib(limit)}; biggest: {offenders}; leave them out with --exclude PATTERN or a .rayignore file, or put "
        "large data and models in s3:// and point the job at them"
    )


def _offenders(size: PackageSize) -> list[tuple[str, int]]:
    entries = dict(size.biggest_dirs)
    for name, n in size.biggest_files:
        if not any(name.startswith(d) for d in entries):
            entries[name] = n
    return sorted(entries.items(), key=lambda kv: -kv[1])[:5]


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


# --------------------------------------------------------------------------- following a job


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    status: str  # SUCCEEDED, FAILED or STOPPED
    message: str  # Ray's message for the job (first line)
    error_line: str | None  # the last error line of the driver's log, if it failed

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "SUCCEEDED" else 1


def submit_job(client: JobsClient, job: JobSubmission) -> str:
    """Size-check the working dir, then submit; returns the job id."""
    if job.working_dir is not None:
        check_package_size(job.working_dir, job.excludes)
    return client.submit(job.entrypoint(), job.runtime_env(), job.submission_id, job.metadata())


def follow_job(client: JobsClient, job_id: str, out: IO[str] = sys.stdout, poll_s: float = 1.0) -> JobOutcome:
    """Stream the job's log and its status changes to `out` until it ends."""
    return asyncio.run(_follow(client, job_id, out, poll_s))


async def _follow(client: JobsClient, job_id: str, out: IO[str], poll_s: float) -> JobOutcome:
    printed: list[str] = []
    watcher = asyncio.create_task(_watch_status(client, job_id, out, poll_s))
    try:
        try:
            async for chunk in client.tail(job_id):
                out.write(chunk)
                out.flush()
                printed.append(chunk)
        except Exception as exc:  # websocket dropped (proxy, port-forward): poll the log instead
            _say(out, f"log stream interrupted ({_first_line(exc)}); polling instead")
            await _poll_logs(client, job_id, out, printed, poll_s)
        await watcher  # its last line is the terminal status
    finally:
        watcher.cancel()
    info = await asyncio.to_thread(client.info, job_id)
    status = str(info.status)
    message = _first_line(info.message or status)
    error = None if status == "SUCCEEDED" else last_error_line("".join(printed) or await asyncio.to_thread(client.logs, job_id))
    return JobOutcome(job_id, status, message, error)


async def _watch_status(client: JobsClient, job_id: str, out: IO[str], poll_s: float) -> str:
    """Print each status change; return the terminal status."""
    last = None
    while True:
        status = await asyncio.to_thread(client.status, job_id)
        if status != last:
            _say(out, f"job {job_id}: {status}")
            last = status
        if status in TERMINAL_STATUSES:
            return status
        await asyncio.sleep(poll_s)


async def _poll_logs(client: JobsClient, job_id: str, out: IO[str], printed: list[str], poll_s: float) -> None:
    while True:
        done = await asyncio.to_thread(client.status, job_id) in TERMINAL_STATUSES
        text = await asyncio.to_thread(client.logs, job_id)
        seen = sum(len(c) for c in printed)
        if len(text) > seen:
            out.write(text[seen:])
            out.flush()
            printed.append(text[seen:])
        if done:
            return
        await asyncio.sleep(poll_s)


_ERROR_LINE = re.compile(r"^(rayft \w+: error: .*|[\w.]*(Error|Exception)\b.*)$")


def last_error_line(logs: str) -> str | None:
    """The last line of a driver log that reads as an error (`rayft train: error: ...`, `ValueError: ...`)."""
    for line in reversed(logs.splitlines()):
        line = line.strip()
        if _ERROR_LINE.match(line):
            return line
    return None


def _say(out: IO[str], text: str) -> None:
    out.write(f"[rayft] {text}\n")
    out.flush()


def format_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"
