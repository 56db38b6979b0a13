"""A local content-addressed cache for downloaded artifact files.

Blobs live at `<root>/blobs/<sha[:2]>/<sha256>`, written only after their sha256 and size
were verified, so a blob's name is its proof. An artifact is materialized as a directory
of hard links to blobs (`<root>/artifacts/<name>/<version>-<manifest digest>/...`), built
in a temp directory and renamed into place, so a directory that exists is complete. A
second download of the same content (any version, any artifact) transfers nothing.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from storage.errors import IntegrityError
from storage.safety import check_weight_files
from storage.store import Store, sha256_file

_READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


class ContentCache:
    """Verified blobs keyed by sha256, and artifact directories made of links to them."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser()

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this digest lives (whether or not it is there)."""
        return self.root / "blobs" / sha256[:2] / sha256

    def has_blob(self, sha256: str, size: int) -> bool:
        """Whether a blob with this digest (and size) is cached."""
        path = self.blob_path(sha256)
        return path.is_file() and path.stat().st_size == size

    def fetch_blob(self, store: Store, key: str, sha256: str, size: int, *, label: str) -> Path:
        """Download `key` unless its blob is cached; verify size and sha256 (IntegrityError naming `label`)."""
        if self.has_blob(sha256, size):
            return self.blob_path(sha256)
        temp_dir = self.root / "tmp"
        temp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="blob-", dir=temp_dir)
        os.close(fd)
        temp = Path(name)
        try:
            store.get_file(key, temp)
            actual_sha, actual_size = sha256_file(temp)
            if actual_size != size or actual_sha != sha256:
                raise IntegrityError(
                    f"integrity check failed for {label} ({store.uri_for(key)}): manifest says "
                    f"sha256 {sha256[:16]}... size {size}, stored object has sha256 "
                    f"{actual_sha[:16]}... size {actual_size}; the object is corrupted or was "
                    "modified after publish: re-publish the artifact"
                )
            target = self.blob_path(sha256)
            target.parent.mkdir(parents=True, exist_ok=True)
            temp.chmod(_READ_ONLY)  # blobs are shared by hard links: keep them read-only
            os.replace(temp, target)
            return target
        finally:
            temp.unlink(missing_ok=True)

    def artifact_dir(self, name: str, version: int, manifest_digest: str) -> Path:
        """The materialized directory of one published version (digest guards against reused numbers)."""
        return self.root / "artifacts" / name / f"{version}-{manifest_digest[:16]}"

    def is_complete(self, directory: Path, files: Iterable[tuple[str, str, int]]) -> bool:
        """Whether `directory` exists and holds every (path, sha256, size) file at its size."""
        if not directory.is_dir():
            return False
        for path, _sha, size in files:
            file = directory.joinpath(*path.split("/"))
            if not file.is_file() or file.stat().st_size != size:
                return False
        return True

    def materialize(self, directory: Path, files: Sequence[tuple[str, str, int]]) -> Path:
        """Build `directory` from cached blobs (hard links, else copies), atomically; returns it."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.staging-", dir=directory.parent))
        try:
            for path, sha256, _size in files:
                target = staging.joinpath(*path.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(self.blob_path(sha256), target)
            check_weight_files(staging)
            if self.is_complete(directory, files):  # a concurrent download finished first
                return directory
            if directory.exists():  # partial (e.g. a file removed by hand): rebuild it
                shutil.rmtree(directory)
            try:
                os.rename(staging, directory)
            except OSError:
                if not self.is_complete(directory, files):  # not a concurrent winner: a real failure
                    raise
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        return directory


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # filesystems without hard links
        shutil.copyfile(source, target)

