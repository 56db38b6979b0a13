"""One artifact store addressed by URI: `s3://bucket/prefix` (boto3) or a local directory.

This module is the interface callers use: `open_store(uri)` gives a `Store` (the interface,
`storage.store_base`) backed by `LocalStore` (`storage.local_store`) or `S3Store`
(`storage.s3_store`); `pyarrow_filesystem(uri)` gives Ray Train the same location. S3
endpoint, region and credentials come only from the standard AWS configuration boto3 reads,
never from a job file, so the same URI works against AWS S3, MinIO, Ceph, R2 or the embedded
server. Keys are validated before any I/O; local writes are atomic; S3 uploads are multipart
with retries and leave nothing behind when they fail.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from storage.errors import InvalidURI
from storage.local_store import LocalStore
from storage.s3_store import S3Options, S3Store, configured_endpoint_url, parse_s3_uri, s3_pyarrow_filesystem
from storage.store_base import MiB, Store, sha256_file

if TYPE_CHECKING:
    import pyarrow.fs

__all__ = [
    "LocalStore", "MiB", "S3Options", "S3Store", "Store", "configured_endpoint_url", "default_cache_dir",
    "default_storage_uri", "open_store", "pyarrow_filesystem", "rayft_home", "sha256_file",
]


def rayft_home() -> Path:
    """`$RAYFT_HOME`, else `~/.rayft`: where the default store and the cache live."""
    return Path(os.environ.get("RAYFT_HOME") or Path.home() / ".rayft").expanduser()


def default_storage_uri() -> str:
    """`$RAYFT_STORAGE` (any URI `open_store` takes), else the local directory `$RAYFT_HOME/storage`."""
    return os.environ.get("RAYFT_STORAGE") or str(rayft_home() / "storage")


def default_cache_dir() -> Path:
    """Local content-addressed download cache: `$RAYFT_HOME/cache`."""
    return rayft_home() / "cache"


def _local_root(uri: str) -> Path:
    if uri.startswith("file:"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidURI(f"invalid storage URI {uri!r}: file:// URIs must be local (file:///abs/path)")
        return Path(unquote(parsed.path))
    return Path(uri).expanduser()


def open_store(uri: str, *, s3_options: S3Options | None = None) -> Store:
    """Open the store at `uri`: `s3://bucket[/prefix]`, `file:///dir`, or a plain local path.

    No request is made here; S3 problems (unreachable endpoint, missing bucket, bad
    credentials) surface as StorageError on first use, naming the variables to set.
    """
    if not isinstance(uri, str) or not uri.strip() or "\x00" in uri:
        raise InvalidURI(f"invalid storage URI {uri!r}: expected s3://bucket[/prefix], file:///dir or a local path")
    scheme = urlparse(uri).scheme.lower()
    if scheme == "s3":
        bucket, prefix = parse_s3_uri(uri)
        return S3Store(bucket, prefix, options=s3_options)
    if scheme in ("", "file"):
        return LocalStore(_local_root(uri))
    raise InvalidURI(
        f"unsupported storage URI scheme {scheme!r} in {uri!r}: use s3://bucket[/prefix] (any "
        "S3-compatible endpoint via AWS_ENDPOINT_URL), file:///dir or a local path"
    )


def pyarrow_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem + path for `uri`, for Ray Train's RunConfig(storage_path, storage_filesystem).

    For S3 the endpoint, region and credentials are resolved now from the same AWS
    configuration boto3 uses and passed explicitly, so the pickled filesystem works on
    workers that lack the AWS environment.
    """
    import pyarrow.fs

    store = open_store(uri)  # validates the URI the same way the store does
    if isinstance(store, LocalStore):
        return pyarrow.fs.LocalFileSystem(), str(store.root)
    return s3_pyarrow_filesystem(uri)
