"""The `Store` interface every storage backend implements, and helpers the backends share.

Callers use `storage.store` (open_store, Store, LocalStore, S3Store, ...); the backends live in
`storage.local_store` and `storage.s3_store`. Keys are '/'-separated relative keys, validated by
`storage.safety.validate_key` before any backend method runs.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.errors import StorageError
from storage.safety import normalize_prefix, validate_key

MiB = 1024 * 1024
#: Marks a backend's in-flight temp files, which listings skip.
TMP_MARK = ".rayft-tmp-"


class Store(ABC):
    """A flat key → bytes store. Public methods validate keys, then call the backend's `_...` methods."""

    #: Root URI of the store (`s3://bucket/prefix` or `file:///abs/dir`).
    uri: str

    def put_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        """Upload a local file to `key` (replaces an existing object)."""
        self._put_file(Path(local_path), validate_key(key))

    def put_bytes(self, data: bytes, key: str, *, overwrite: bool = True) -> None:
        """Write `data` to `key`. With overwrite=False, raise AlreadyExists if `key` exists (atomic where the backend allows)."""
        self._put_bytes(bytes(data), validate_key(key), overwrite=overwrite)

    def get_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        """Download `key` to `local_path` atomically (a temp file renamed into place); NotFound if absent."""
        destination = Path(local_path)
        destination.parent.mkdir(parents=True, exist_ok=True)
        self._get_file(validate_key(key), destination)

    def get_bytes(self, key: str) -> bytes:
        """The whole content of `key`; NotFound if absent."""
        return self._get_bytes(validate_key(key))

    def exists(self, key: str) -> bool:
        """Whether an object exists at exactly `key`."""
        return self._exists(validate_key(key))

    def size(self, key: str) -> int:
        """Size of `key` in bytes; NotFound if absent."""
        return self._size(validate_key(key))

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys under the directory `prefix` (recursive; '' lists the whole store)."""
        return sorted(self._list(normalize_prefix(prefix)))

    def delete(self, key: str) -> None:
        """Delete `key`; deleting a missing key is not an error."""
        self._delete(validate_key(key))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under the directory `prefix`; returns how many were deleted."""
        normalized = normalize_prefix(prefix)
        if not normalized:
            raise StorageError("refusing to delete an empty prefix (the whole store); name a directory")
        return self._delete_prefix(normalized)

    def uri_for(self, key: str) -> str:
        """The URI of `key` (or of a directory prefix) inside this store."""
        return self._uri_for(normalize_prefix(key))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    @abstractmethod
    def _put_file(self, local_path: Path, key: str) -> None: ...

    @abstractmethod
    def _put_bytes(self, data: bytes, key: str, *, overwrite: bool) -> None: ...

    @abstractmethod
    def _get_file(self, key: str, local_path: Path) -> None: ...

    @abstractmethod
    def _get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _size(self, key: str) -> int: ...

    @abstractmethod
    def _list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    @abstractmethod
    def _delete_prefix(self, prefix: str) -> int: ...

    @abstractmethod
    def _uri_for(self, key: str) -> str: ...


@contextmanager
def temp_beside(target: Path) -> Iterator[Path]:
    """A temp path in `target`'s directory (same filesystem, so a rename is atomic); removed if left over."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name[:40]}{TMP_MARK}", dir=target.parent)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
    finally:
        temp.unlink(missing_ok=True)


def fsync(path: Path) -> None:
    """Flush a written file to disk before it is renamed into place."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 4 * MiB) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a local file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
