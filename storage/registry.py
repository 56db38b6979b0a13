"""The registry of published models and adapters, on top of any `Store`.

Layout under the store root:

    registry/<name>/<version>/.claim          version number taken (exclusive create)
    registry/<name>/<version>/files/...       the model / peft adapter directory
    registry/<name>/<version>/manifest.json   written LAST: sha256 + size of every file

A version exists for readers only once its manifest exists. Version numbers are
positive integers assigned at publish: the publisher claims the next free number with
an exclusive create (IfNoneMatch='*' on S3, a hard link locally), so concurrent
publishers never share a directory; a failed publish removes its claim and files when
the store is still reachable (its number is then reused), otherwise the number is
skipped. Deleting a version keeps its claim, so a deleted number is never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator, model_validator

from storage.cache import ContentCache
from storage.errors import AlreadyExists, IntegrityError, InvalidArtifact, InvalidKey, InvalidName, NotFound
from storage.safety import VERSION_PATTERN, check_weight_files, check_weight_names, parse_ref, validate_key, validate_name
from storage.store import Store, default_cache_dir, default_storage_uri, open_store, sha256_file

ArtifactKind = Literal["adapter", "model"]
REGISTRY_ROOT = "registry"
MANIFEST_FORMAT = "rayft.manifest.v1"
_MAX_CLAIM_ATTEMPTS = 100


class FileEntry(BaseModel):
    """One file of an artifact, as the manifest records it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="'/'-separated path relative to the artifact directory.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Lowercase hex sha256 of the content.")
    size: int = Field(ge=0, description="Size in bytes.")

    @field_validator("path")
    @classmethod
    def _safe_path(cls, value: str) -> str:
        try:
            return validate_key(value)
        except InvalidKey as err:
            raise ValueError(str(err)) from None


ServingMode = Literal["multiplexed", "merged", "none"]


class ArtifactTraits(BaseModel):
    """What an adapter's method is to whoever serves or evaluates it. trainers/methods/ declares it for each method
    and the publisher records it; for an adapter made elsewhere (or a manifest older than this field),
    storage.artifacts.artifact_traits derives it from adapter_config.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    serving: ServingMode = Field(
        description="multiplexed beside other adapters on one base, only merged into the base first, or not at all."
    )
    mixes_in_batch: bool = Field(description="Shares one forward batch with other adapters (else decodes in a group of its own).")
    prompt_learning: bool = Field(False, description="Trains virtual tokens in the prompt rather than weights.")


class Manifest(BaseModel):
    """What a published version is: its files with checksums, base model, method and provenance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["rayft.manifest.v1"] = Field(MANIFEST_FORMAT, description="Manifest schema id.")
    name: str = Field(description="Artifact name (see storage.safety.NAME_PATTERN).")
    version: int = Field(ge=1, description="Immutable version number assigned at publish.")
    kind: ArtifactKind = Field(description="'adapter' (peft adapter dir) or 'model' (transformers model dir).")
    base_model: str = Field(min_length=1, max_length=1024, description="Base model the artifact was trained from (name, path or URI).")
    base_config_digest: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="base_config_digest() of the base model's config: adapters load only onto a matching base."
    )
    method: str | None = Field(description="Fine-tuning method (lora, qlora, full, ...), None if not trained here.")
    params: dict[str, JsonValue] = Field(description="Method parameters (rank, alpha, target modules, ...).")
    metrics: dict[str, JsonValue] = Field(description="Final training/eval metrics.")
    lineage: dict[str, JsonValue] = Field(description="Where it came from: job spec, run id, parent artifacts.")
    traits: ArtifactTraits | None = Field(
        None, description="How the method serves (adapters); None: not recorded (older manifests, models), see storage.artifacts.artifact_traits."
    )
    created_at: AwareDatetime = Field(description="Publish time, UTC.")
    files: list[FileEntry] = Field(min_length=1, description="Every file of the artifact directory.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        try:
            return validate_name(value)
        except InvalidName as err:
            raise ValueError(str(err)) from None

    @model_validator(mode="after")
    def _distinct_paths(self) -> Manifest:
        paths = [entry.path for entry in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("files lists a path more than once")
        as_dirs = {p + "/" for p in paths}
        clashes = [p for p in paths if any(p.startswith(d) for d in as_dirs)]
        if clashes:
            raise ValueError(f"files uses {clashes[0]!r} both as a file and below another file")
        return self

    @property
    def ref(self) -> str:
        """`name@version`."""
        return f"{self.name}@{self.version}"

    @property
    def total_size(self) -> int:
        """Sum of the file sizes, bytes."""
        return sum(entry.size for entry in self.files)


# --------------------------------------------------------------------------- config digest

# Keys that differ between a model config and a saved copy without changing the model.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "name_or_path",
        "_commit_hash",
        "torch_dtype",
        "dtype",
        "use_cache",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_attn_implementation_internal",
        "attn_implementation",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "quantization_config",  # how the base was loaded (e.g. 4-bit), not which base it is
        "chunk_size_feed_forward",
    }
)
# Generic keys `config.to_dict()` carries but `save_pretrained` omits at their defaults.
_GENERIC_DEFAULTS: dict[str, Any] = {
    "is_encoder_decoder": False,
    "problem_type": None,
    "architectures": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
}


def _canonical_config(value: Any) -> Any:
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            if key in _VOLATILE_CONFIG_KEYS:
                continue
            if key in _GENERIC_DEFAULTS and item == _GENERIC_DEFAULTS[key]:
                continue
            if key == "architectures" and isinstance(item, list):
                item = sorted(item)
            result[key] = _canonical_config(item)
        return result
    if isinstance(value, list):
        return [_canonical_config(item) for item in value]
    return value


def base_config_digest(config: Mapping[str, Any]) -> str:
    """sha256 (hex) of a transformers config dict's canonical JSON, ignoring volatile keys.

    A base model's `config.json`, `config.to_dict()` / `to_diff_dict()` and the config of a
    saved or reloaded copy give the same digest; a different architecture does not.
    """
    # The JSON round trip turns int dict keys (id2label) into strings and dtypes into names.
    plain = json.loads(json.dumps(dict(config), default=str))
    canonical = json.dumps(_canonical_config(plain), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def base_config_digest_of_dir(model_dir: str | os.PathLike[str]) -> str:
    """base_config_digest() of `<model_dir>/config.json`."""
    path = Path(model_dir) / "config.json"
    try:
        return base_config_digest(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise NotFound(f"{str(path)!r} does not exist: is {str(model_dir)!r} a transformers model directory?") from None


# --------------------------------------------------------------------------- registry


def _format_validation(err: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or '<manifest>'}: {item['msg']}" for item in err.errors()
    )


def _local_files(root: Path) -> list[tuple[str, Path]]:
    found = []
    for dirpath, _dirs, filenames in os.walk(root):
        for filename in filenames:
            path = Path(dirpath) / filename
            found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


class Registry:
    """Publish, resolve, download, list and delete versioned models/adapters in a store."""

    def __init__(self, store: Store, *, cache_dir: str | os.PathLike[str] | None = None):
        self.store = store
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def __repr__(self) -> str:
        return f"Registry({self.store.uri!r})"

    # -- layout

    @staticmethod
    def _version_prefix(name: str, version: int) -> str:
        return f"{REGISTRY_ROOT}/{name}/{version}"

    def _manifest_key(self, name: str, version: int) -> str:
        return f"{self._version_prefix(name, version)}/manifest.json"

    def _file_key(self, name: str, version: int, path: str) -> str:
        return f"{self._version_prefix(name, version)}/files/{path}"

    def files_uri(self, manifest: Manifest) -> str:
        """URI of the directory holding a published version's files."""
        return self.store.uri_for(f"{self._version_prefix(manifest.name, manifest.version)}/files")

    # -- reading

    def versions(self, name: str) -> list[int]:
        """Published (manifest-bearing) versions of `name`, ascending."""
        validate_name(name)
        versions = []
        for key in self.store.list(f"{REGISTRY_ROOT}/{name}"):
            parts = key.split("/")
            if len(parts) == 4 and parts[3] == "manifest.json" and _is_version(parts[2]):
                versions.append(int(parts[2]))
        return sorted(versions)

    def resolve(self, ref: str) -> Manifest:
        """The manifest of `name@N`, or of the latest version for plain `name`; NotFound if unpublished."""
        name, version = parse_ref(ref)
        if version is None:
            published = self.versions(name)
            if not published:
                raise NotFound(f"no published version of {name!r} in {self.store.uri}; {self._name_hint(name)}")
            version = published[-1]
        return self._read_manifest(name, version)

    def names(self) -> list[str]:
        """Every name with at least one published version, sorted."""
        return sorted(self._published())

    def _name_hint(self, name: str) -> str:
        """What to do about an unknown name: the closest published names, if any is close (a typo)."""
        import difflib

        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.6)
        if close:
            return f"did you mean {' or '.join(repr(c) for c in close)}? (`rayft registry list` shows what is published)"
        return "publish one or check the name (`rayft registry list` shows what is published)"

    def _read_manifest(self, name: str, version: int) -> Manifest:
        key = self._manifest_key(name, version)
        try:
            data = self.store.get_bytes(key)
        except NotFound:
            published = self.versions(name)
            available = f"published versions: {', '.join(map(str, published))}" if published else "no version is published"
            raise NotFound(f"{name}@{version} is not published in {self.store.uri} ({available})") from None
        try:
            manifest = Manifest.model_validate_json(data)
        except ValidationError as err:
            raise IntegrityError(f"manifest of {name}@{version} ({self.store.uri_for(key)}) is malformed: {_format_validation(err)}") from None
        if (manifest.name, manifest.version) != (name, version):
            raise IntegrityError(
                f"manifest at {self.store.uri_for(key)} describes {manifest.ref}, not {name}@{version}: the registry was modified by hand"
            )
        return manifest

    def list(self, *, all_versions: bool = False) -> list[Manifest]:
        """Manifests of the latest version of every name (or of every version), sorted by name, version."""
        found = self._published()
        manifests = []
        for name in sorted(found):
            chosen = sorted(found[name]) if all_versions else [max(found[name])]
            manifests.extend(self._read_manifest(name, version) for version in chosen)
        return manifests

    def _published(self) -> dict[str, list[int]]:
        """Published versions by name, from one listing of the registry."""
        found: dict[str, list[int]] = {}
        for key in self.store.list(REGISTRY_ROOT):
            parts = key.split("/")
            if len(parts) == 4 and parts[3] == "manifest.json" and _is_version(parts[2]) and _is_name(parts[1]):
                found.setdefault(parts[1], []).append(int(parts[2]))
        return found

    def show(self, ref: str) -> dict[str, Any]:
        """A JSON-ready description of one version: the manifest plus ref, files URI and total size."""
        manifest = self.resolve(ref)
        return {
            "ref": manifest.ref,
            "uri": self.files_uri(manifest),
            "total_size": manifest.total_size,
            **manifest.model_dump(mode="json"),
        }

    def read_file(self, ref: str, path: str) -> bytes:
        """One small file of a published version (e.g. its config.json), checked against the manifest;
        NotFound if the version has no such file."""
        manifest = self.resolve(ref)
        entry = next((e for e in manifest.files if e.path == path), None)
        if entry is None:
            raise NotFound(f"{manifest.ref} has no file {path!r}")
        data = self.store.get_bytes(self._file_key(manifest.name, manifest.version, path))
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise IntegrityError(
                f"integrity check failed for {manifest.ref} file {path!r}: it does not match its manifest sha256; re-publish the artifact"
            )
        return data

    def download(self, ref: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
        """A local, verified directory of the artifact (model or peft adapter dir), via the content cache.

        Pickle-based files are refused by name before anything is downloaded; every file is
        checked against its manifest sha256 (IntegrityError naming the file). Files already
        in the cache, from any artifact, are not downloaded again.
        """
        manifest = self.resolve(ref)
        check_weight_names([entry.path for entry in manifest.files], where=f"{manifest.ref} ({self.files_uri(manifest)})")
        cache = ContentCache(cache_dir if cache_dir is not None else self.cache_dir)
        manifest_digest = hashlib.sha256(manifest.model_dump_json().encode()).hexdigest()
        directory = cache.artifact_dir(manifest.name, manifest.version, manifest_digest)
        files = [(entry.path, entry.sha256, entry.size) for entry in manifest.files]
        if cache.is_complete(directory, files):
            return directory
        for entry in manifest.files:
            cache.fetch_blob(
                self.store,
                self._file_key(manifest.name, manifest.version, entry.path),
                entry.sha256,
                entry.size,
                label=f"{manifest.ref} file {entry.path!r}",
            )
        return cache.materialize(directory, files)

    # -- writing

    def publish(
        self,
        name: str,
        local_dir: str | os.PathLike[str],
        *,
        kind: ArtifactKind,
        base_model: str,
        base_config_digest: str,
        method: str | None,
        params: Mapping[str, Any],
        metrics: Mapping[str, Any],
        lineage: Mapping[str, Any],
        traits: ArtifactTraits | None = None,
    ) -> Manifest:
        """Publish every file of `local_dir` as the next version of `name`; the manifest is written last.

        Input is validated before any storage call. If an upload fails, no manifest is
        written, so readers never see the version; the previous version is untouched.
        """
        validate_name(name)
        root = Path(local_dir)
        if not root.is_dir():
            raise InvalidArtifact(f"cannot publish {name!r}: {str(root)!r} is not a directory")
        check_weight_files(root)
        local_files = _local_files(root)
        if not local_files:
            raise InvalidArtifact(f"cannot publish {name!r}: directory {str(root)!r} is empty")
        entries = []
        for relative, path in local_files:
            sha256, size = sha256_file(path)
            entries.append({"path": relative, "sha256": sha256, "size": size})
        fields = {
            "name": name,
            "kind": kind,
            "base_model": base_model,
            "base_config_digest": base_config_digest,
            "method": method,
            "params": dict(params),
            "metrics": dict(metrics),
            "lineage": dict(lineage),
            "traits": traits,
            "files": entries,
        }
        self._build_manifest(fields, version=1)  # validate everything before touching storage

        version = self._claim_version(name)
        prefix = self._version_prefix(name, version)
        manifest = self._build_manifest(fields, version=version)
        try:
            for relative, path in local_files:
                self.store.put_file(path, self._file_key(name, version, relative))
        except BaseException:
            self._remove_unpublished(prefix)
            raise
        # Past this point a failure may have stored the manifest (e.g. a timeout after
        # the write), so nothing is cleaned up: files of a published version must stay.
        self.store.put_bytes(manifest.model_dump_json(indent=2).encode(), self._manifest_key(name, version), overwrite=False)
        return manifest

    def _build_manifest(self, fields: dict[str, Any], *, version: int) -> Manifest:
        try:
            return Manifest(version=version, created_at=datetime.now(UTC), **fields)
        except ValidationError as err:
            raise InvalidArtifact(f"cannot publish {fields['name']!r}: {_format_validation(err)}") from None

    def _claim_version(self, name: str) -> int:
        taken = [int(key.split("/")[2]) for key in self.store.list(f"{REGISTRY_ROOT}/{name}") if _is_version(key.split("/")[2])]
        candidate = max(taken, default=0) + 1
        claim = json.dumps(
            {"publisher": uuid.uuid4().hex, "host": socket.gethostname(), "claimed_at": datetime.now(UTC).isoformat()}
        ).encode()
        for _ in range(_MAX_CLAIM_ATTEMPTS):
            try:
                claim_key = f"{self._version_prefix(name, candidate)}/.claim"
                self.store.put_bytes(claim, claim_key, overwrite=False)
                # Read back: S3-compatible servers whose conditional writes are not atomic (moto under load)
                # can let two publishers "create" the same claim; the one whose bytes stayed owns the version.
                if self.store.get_bytes(claim_key) == claim:
                    return candidate
                candidate += 1
            except AlreadyExists:
                candidate += 1
        raise AlreadyExists(f"could not claim a version number for {name!r} after {_MAX_CLAIM_ATTEMPTS} tries (too many concurrent publishers?)")

    def _remove_unpublished(self, prefix: str) -> None:
        """Best effort: drop files and claim of a version whose publish failed before its manifest."""
        try:
            self.store.delete_prefix(prefix)
        except Exception:  # the store may be the thing that failed; the version stays invisible anyway
            pass

    def delete(self, ref: str) -> Manifest:
        """Delete one version: manifest first (readers stop seeing it), then its files. Returns its manifest."""
        manifest = self.resolve(ref)
        self.store.delete(self._manifest_key(manifest.name, manifest.version))
        self.store.delete_prefix(f"{self._version_prefix(manifest.name, manifest.version)}/files")
        return manifest


def _is_version(text: str) -> bool:
    return re.fullmatch(VERSION_PATTERN, text) is not None


def _is_name(text: str) -> bool:
    try:
        validate_name(text)
    except InvalidName:
        return False
    return True


def open_registry(uri: str | None = None, *, cache_dir: str | os.PathLike[str] | None = None) -> Registry:
    """A Registry over `open_store(uri)`; `uri` defaults to default_storage_uri()."""
    return Registry(open_store(uri or default_storage_uri()), cache_dir=cache_dir)
