"""What `rayft submit` sends: the job's entrypoint and runtime env, checked here before anything is uploaded.

`prepare_submission` turns the CLI's options into a `JobSubmission` (working dir, storage/endpoint
variables, optional pip packages or container image), reporting every problem at once;
`submit_job` size-checks the working dir and hands it to the Jobs API.
"""

from __future__ import annotations

import os
import re
import shlex
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.client.jobs_client import JobsClient, SubmitError
from cluster.client.packaging import DEFAULT_EXCLUDES, check_package_size, is_excluded
from trainers.inputs import InputError, resolve_inputs
from trainers.spec import SpecError, load_job_spec


# What `rayft submit` can run on the cluster; each is `rayft <command> FILE [ARGS]` there.
Command = Literal["train", "tune", "serve"]

FORWARDED_ENV_VARS: tuple[str, ...] = (
    "RAYFT_STORAGE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
)

# Secret: forwarded only with --aws-credentials (they end up readable in the job's details).
AWS_CREDENTIAL_VARS: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


#: Printed by the entrypoint when the cluster's Python cannot import rayft; `rayft submit` shows it as the job's error.
NOT_INSTALLED = (
    "rayft is not importable by the cluster's Python ({python}): install rayft there (the k8s/Dockerfile image, "
    "the setup_commands of cluster/ray-cluster.yaml, or --pip 'rayft @ URL' for this job)"
)


def cluster_python_entrypoint(python_args: list[str]) -> str:
    """A shell entrypoint running `PYTHON ARGS` with the interpreter Ray runs on in the cluster.

    The Jobs API runs an entrypoint with `/bin/sh -c` in the environment of its job supervisor,
    whose PATH need not hold that interpreter (a head started as `.venv/bin/ray start` without
    activating the venv) and no variable names it. The interpreter is, in order: the job's
    virtualenv (Ray activates one for `--pip`), the one the node's raylet starts Python workers
    with (its `--python_worker_command`; the job supervisor is a worker, the raylet its parent),
    else python3 on PATH (a container image). If rayft does not import there, one line says so
    and the job fails with status 3.
    """
    find = (
        'py="${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}"; '
        '[ -x "$py" ] || py=$(tr "\\0" "\\n" < "/proc/$(awk \'/^PPid:/{print $2}\' /proc/$PPID/status 2>/dev/null)/cmdline" '
        '2>/dev/null | sed -n "s/^--python_worker_command=\\([^ ]*\\).*/\\1/p"); '
        '[ -x "$py" ] || py=$(command -v python3 || command -v python); '
    )
    missing = shlex.quote("rayft setup: error: " + NOT_INSTALLED.replace("{python}", "%s")) + ' "$py"'
    check = f'"$py" -c "import cluster.cli" 2>/dev/null || {{ printf {missing} >&2; echo >&2; exit 3; }}; '
    return find + check + 'exec "$py" ' + shlex.join(python_args)


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

    def command_line(self) -> str:
        """What runs on the cluster, as a person would type it."""
        return shlex.join(["rayft", self.command, self.job_file, *self.args])

    def entrypoint(self) -> str:
        """The job's shell entrypoint: `python -m cluster.cli COMMAND ...` with the Python Ray runs on there."""
        return cluster_python_entrypoint(["-m", "cluster.cli", self.command, self.job_file, *self.args])

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
        return {"rayft_command": self.command, "rayft_job": self.job_file, "rayft_command_line": self.command_line()}


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


def prepare_submission(
    opts: SubmitOptions, environ: Mapping[str, str] = os.environ, cwd: Path | None = None, *, check_storage: bool = False
) -> JobSubmission:
    """Check everything that can be checked here; raise one SubmitError listing every problem.

    With `check_storage`, the job's registry model and output name are also looked up in its S3
    storage from here (`trainers.inputs`), so a typo fails before anything is uploaded; storage this
    machine cannot reach is only a note (the cluster may reach it).
    """
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
    if check_storage and spec is not None and storage and storage.startswith("s3://"):
        notes += _inputs_from_here(spec, storage)
    if opts.image_uri:
        notes.append(f"nothing is uploaded with --image-uri: {opts.job} and the files it names must be in the image")
    args = [*opts.args, *(["--storage", opts.storage] if opts.storage else [])]
    name = spec.output.name if spec is not None else Path(opts.job).stem
    return JobSubmission(
        command=opts.command, job_file=job_file or opts.job, args=args, working_dir=working_dir, excludes=excludes,
        env_vars=env_vars, pip=pip, image_uri=opts.image_uri, submission_id=new_submission_id(opts.command, name),
        notes=notes,
    )


def _inputs_from_here(spec, storage: str) -> list[str]:
    """The job's storage-side inputs, checked from this machine: notes for what could not be checked."""
    spec = spec.model_copy(update={"storage": spec.storage.model_copy(update={"uri": storage})})
    try:
        inputs = resolve_inputs(spec, local_paths=False, storage_required=False)
    except InputError as err:
        raise SubmitError("cannot submit: " + "; ".join(err.problems)) from None
    return [f"not checked from here: {note}" for note in inputs.notes]


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


def submit_job(client: JobsClient, job: JobSubmission) -> str:
    """Size-check the working dir, then submit; returns the job id."""
    if job.working_dir is not None:
        check_package_size(job.working_dir, job.excludes)
    return client.submit(job.entrypoint(), job.runtime_env(), job.submission_id, job.metadata())
