"""Everything a job reads or writes outside itself, resolved before Ray starts or a job is submitted.

A missing model, a registry typo, a data file that is not there, storage that cannot be reached or
refuses the credentials, an output name that cannot be published: each would otherwise surface
only after Ray has started and a worker has failed. `resolve_inputs` asks storage directly (a
listing or a HEAD per input, with few retries), collects every problem, and raises one
`InputError` naming each input, what is wrong with it and the fix.

It reads no weights: a registry model is resolved to its manifest, an s3:// model to its
config.json, a local one to its directory.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path

from storage.errors import NotFound, RayftError
from storage.models import REGISTRY_PREFIX
from storage.registry import Registry
from storage.safety import validate_name
from storage.store import S3Options, default_storage_uri, open_store
from trainers.methods import traits
from trainers.spec import JobSpec

# A check, not a transfer: fail in seconds when an endpoint does not answer.
CHECK_S3_OPTIONS = S3Options(max_attempts=2, connect_timeout_s=3.0, read_timeout_s=15.0)

#: Suffix of the merged model `output.merge` publishes beside the adapter.
MERGED_SUFFIX = "-merged"


class InputError(RayftError):
    """One or more inputs of a job cannot be resolved; `problems` lists each as one line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(problems[0])
        else:
            super().__init__(f"{len(problems)} problems with the job's inputs:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class ResolvedInputs:
    """What the job's inputs resolved to."""

    spec: JobSpec  # the spec with local data/model paths made absolute (workers do not run in this cwd)
    storage_uri: str
    model_kind: str  # "local", "s3", "registry" or "hub"
    model_ref: str | None = None  # registry: the NAME@VERSION the source resolves to now
    notes: list[str] = field(default_factory=list)  # what could not be checked from here, and why


def resolve_inputs(spec: JobSpec, *, local_paths: bool = True, storage_required: bool = True) -> ResolvedInputs:
    """Check every input of `spec` against the world; raise one InputError listing each problem.

    `local_paths=False` skips local files (a job submitted to a cluster reads them from its uploaded
    working dir, checked by `rayft submit` itself). `storage_required=False` turns "storage cannot be
    reached from here" into a note (a cluster may reach storage this machine cannot).
    """
    problems: list[str] = []
    notes: list[str] = []
    storage_uri = spec.storage.uri or default_storage_uri()
    registry = _reachable_registry(spec, storage_uri, problems if storage_required else notes)

    model_kind, model_ref, source = _check_model(spec.model.source, registry, local_paths, problems, notes)
    data = {}
    for name, value in (("train", spec.data.train), ("eval", spec.data.eval)):
        data[name] = _check_data(f"data.{name}", value, local_paths, problems, notes) if value is not None else None
    if registry is not None:
        _check_output(spec, registry, problems)
    if problems:
        raise InputError(problems)
    resolved = spec.model_copy(update={
        "model": spec.model.model_copy(update={"source": source}),
        "data": spec.data.model_copy(update={"train": data["train"], "eval": data["eval"]}),
    })
    return ResolvedInputs(spec=resolved, storage_uri=storage_uri, model_kind=model_kind, model_ref=model_ref, notes=notes)


def _reachable_registry(spec: JobSpec, storage_uri: str, problems: list[str]) -> Registry | None:
    """The job's registry, after one listing proved storage answers with these credentials."""
    try:
        registry = Registry(open_store(storage_uri, s3_options=CHECK_S3_OPTIONS))
        registry.versions(spec.output.name)  # a listing: endpoint, credentials and bucket in one call
        return registry
    except RayftError as err:
        where = "storage.uri" if spec.storage.uri else "storage (RAYFT_STORAGE or ~/.rayft/storage)"
        problems.append(f"{where} {storage_uri}: {err}")
        return None


def _check_model(source: str, registry: Registry | None, local_paths: bool, problems: list[str], notes: list[str]) -> tuple[str, str | None, str]:
    """(kind, registry ref, source with a local path made absolute)."""
    where = "model.source"
    if source.startswith(REGISTRY_PREFIX):
        if registry is None:
            return "registry", None, source  # storage's own problem is already reported
        try:
            manifest = registry.resolve(source[len(REGISTRY_PREFIX):])
        except RayftError as err:
            problems.append(f"{where} {source}: {err}")
            return "registry", None, source
        if manifest.kind != "model":
            problems.append(f"{where} {source}: {manifest.ref} is an adapter, not a model; train on its base model "
                            f"({manifest.base_model}) or on a merged model")
        return "registry", manifest.ref, source
    if source.startswith("s3://"):
        try:
            if not open_store(source, s3_options=CHECK_S3_OPTIONS).exists("config.json"):
                problems.append(f"{where} {source}: no config.json there; it must be a transformers model directory")
        except RayftError as err:
            problems.append(f"{where} {source}: {err}")
        return "s3", None, source
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            problems.append(f"{where} {source!r}: no config.json in it; it must be a transformers model directory")
        return "local", None, str(path.resolve())
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        if local_paths:
            problems.append(f"{where}: local path {source!r} does not exist (relative paths are taken from {Path.cwd()})")
        return "local", None, source
    notes.append(f"{where} {source!r} is read as a hub id: it is fetched when the run starts")
    return "hub", None, source


def _check_data(where: str, value: str, local_paths: bool, problems: list[str], notes: list[str]) -> str:
    """The data URI with a local path made absolute; a problem when nothing is there."""
    if value.startswith("s3://"):
        parent, _, key = value.rstrip("/").rpartition("/")
        try:
            store = open_store(parent, s3_options=CHECK_S3_OPTIONS)
            if not (store.exists(key) or store.list(key + "/")):
                problems.append(f"{where}: {value} does not exist; check the bucket and key (`aws s3 ls {parent}/`)")
        except RayftError as err:
            problems.append(f"{where}: {err}")
        return value
    if "://" in value:
        notes.append(f"{where} {value}: not checked here (scheme {value.split('://', 1)[0]}://)")
        return value
    if not local_paths:
        return value
    path = Path(value).expanduser()
    if glob.has_magic(str(path)):
        if not glob.glob(str(path)):
            problems.append(f"{where}: no file matches {value!r} (relative paths are taken from {Path.cwd()})")
        return str(path.absolute())
    if not path.exists():
        problems.append(f"{where}: {value!r} does not exist (relative paths are taken from {Path.cwd()})")
        return value
    return str(path.resolve())


def _check_output(spec: JobSpec, registry: Registry, problems: list[str]) -> None:
    """The names the run will publish: valid, and not already names of another kind of artifact."""
    is_adapter = traits(spec.method.name).is_adapter
    wanted = [(spec.output.name, "adapter" if is_adapter else "model", "output.name")]
    if spec.output.merge and is_adapter:
        wanted.append((spec.output.name + MERGED_SUFFIX, "model", "output.merge"))
    for name, kind, where in wanted:
        try:
            validate_name(name)
            existing = registry.resolve(name)
        except NotFound:
            continue
        except RayftError as err:
            problems.append(f"{where}: {name!r}: {err}; choose another output.name")
            continue
        if existing.kind != kind:
            problems.append(f"{where}: {name!r} is already published as a {existing.kind} ({existing.ref}); "
                            f"{'an' if kind == 'adapter' else 'a'} {kind} cannot be its next version: choose another output.name")
