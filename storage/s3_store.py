"""The S3 backend of `storage.store`: objects under `s3://bucket/prefix` on any S3-compatible endpoint.

Endpoint, region and credentials come only from the standard AWS configuration that boto3 reads
itself (`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`, `AWS_PROFILE`, ~/.aws/...), never from a job file. Uploads go through
s3transfer (multipart above a threshold, botocore retries with backoff); a failed upload leaves no
object and no dangling multipart upload.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from pydantic import BaseModel, ConfigDict, Field
from s3transfer.manager import TransferConfig, TransferManager

from storage.errors import AlreadyExists, InvalidKey, InvalidURI, NotFound, StorageError
from storage.safety import normalize_prefix
from storage.store_base import MiB, Store, temp_beside

if TYPE_CHECKING:
    import pyarrow.fs

# Variables boto3 reads for a custom endpoint, most specific first.
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary "
    "credentials), or AWS_PROFILE naming a profile in ~/.aws/credentials"
)
_ENDPOINT_HINT = (
    "set AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) to a reachable S3 API server "
    "(e.g. http://127.0.0.1:9000), or unset it to use AWS S3, and check the server is running"
)


class S3Options(BaseModel):
    """Transfer and retry tuning for S3 stores (endpoint and credentials are not here: see module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    multipart_threshold: int = Field(
        64 * MiB, ge=5 * MiB, description="Files at least this large (bytes) upload/download in parts."
    )
    multipart_chunksize: int = Field(
        16 * MiB, ge=5 * MiB, description="Part size in bytes; S3 requires >= 5 MiB for all but the last part."
    )
    max_concurrency: int = Field(8, ge=1, le=64, description="Parallel part transfers per file.")
    max_attempts: int = Field(
        5, ge=1, le=20, description="Attempts per request (botocore 'standard' retries, exponential backoff)."
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="TCP connect timeout per attempt, seconds.")
    read_timeout_s: float = Field(120.0, gt=0, description="Socket read timeout per attempt, seconds.")


def configured_endpoint_url() -> str | None:
    """The custom S3 endpoint from the standard variables boto3 reads, or None for AWS S3."""
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    for variable in _ENDPOINT_VARS:
        if os.environ.get(variable):
            return os.environ[variable]
    return None


def _s3_client(options: S3Options) -> Any:
    config = Config(
        retries={"mode": "standard", "total_max_attempts": options.max_attempts},
        connect_timeout=options.connect_timeout_s,
        read_timeout=options.read_timeout_s,
        max_pool_connections=max(10, options.max_concurrency + 2),
        # Custom endpoints (MinIO, Ceph, a server on loopback) rarely resolve bucket
        # subdomains (bucket.host); path-style requests work on all of them.
        s3={"addressing_style": "path"} if configured_endpoint_url() else None,
    )
    try:
        return boto3.session.Session().client("s3", config=config)
    except BotoCoreError as err:  # e.g. ProfileNotFound, an invalid endpoint URL
        raise StorageError(f"cannot configure the S3 client: {err}; check AWS_PROFILE and {_ENDPOINT_VARS[1]}") from None


class S3Store(Store):
    """Objects under `s3://bucket/prefix` on any S3-compatible endpoint."""

    def __init__(self, bucket: str, prefix: str = "", *, options: S3Options | None = None, client: Any = None):
        self.bucket = bucket
        self.prefix = normalize_prefix(prefix)
        self.options = options or S3Options()
        #: The boto3 S3 client (public so callers can hook botocore events, e.g. to count requests).
        self.client = client if client is not None else _s3_client(self.options)
        self.endpoint_url: str = self.client.meta.endpoint_url
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._bucket_checked = False

    # -- key mapping and errors

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    def _uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}".rstrip("/")

    def _transfer_config(self) -> Any:
        return TransferConfig(
            multipart_threshold=self.options.multipart_threshold,
            multipart_chunksize=self.options.multipart_chunksize,
            max_request_concurrency=self.options.max_concurrency,
        )

    def _error(self, err: BaseException, action: str, key: str) -> Exception:
        """Translate a botocore/s3transfer failure into one actionable RayftError."""
        where = self._uri_for(key)
        if isinstance(err, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError)):
            return StorageError(
                f"cannot {action} {where}: S3 endpoint {self.endpoint_url} is unreachable "
                f"({type(err).__name__}); {_ENDPOINT_HINT}"
            )
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(f"cannot {action} {where}: no usable AWS credentials; {_CREDENTIALS_HINT}")
        if isinstance(err, ClientError):
            error = err.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                return self._missing_bucket_error(action, where)
            if code in ("NoSuchKey", "404", "NotFound"):
                return NotFound(f"{where} does not exist")
            if code in ("PreconditionFailed", "412") or status == 412:
                return AlreadyExists(f"{where} already exists")
            if code in (
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "AccessDenied",
                "ExpiredToken",
                "InvalidToken",
                "403",
                "Forbidden",
            ):
                return StorageError(
                    f"cannot {action} {where}: S3 endpoint {self.endpoint_url} rejected the "
                    f"credentials ({code}); {_CREDENTIALS_HINT}"
                )
            return StorageError(f"cannot {action} {where}: S3 error {code or status}: {error.get('Message', err)}")
        return StorageError(f"cannot {action} {where}: {type(err).__name__}: {err}")

    def _missing_bucket_error(self, action: str, where: str) -> StorageError:
        return StorageError(
            f"cannot {action} {where}: bucket {self.bucket!r} does not exist at {self.endpoint_url}; "
            f"create it (e.g. `aws s3 mb s3://{self.bucket}`) or fix the storage URI / AWS_ENDPOINT_URL"
        )

    @contextmanager
    def _translated(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except (BotoCoreError, ClientError) as err:
            raise self._error(err, action, key) from err

    def _not_found(self, key: str) -> NotFound | StorageError:
        """A HEAD 404 cannot tell a missing key from a missing bucket: ask once per store."""
        if not self._bucket_checked:

            try:
                self.client.head_bucket(Bucket=self.bucket)
            except ClientError as err:
                if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
                    return self._missing_bucket_error("read", self._uri_for(key))
                raise self._error(err, "read", key) from err
            except BotoCoreError as err:
                raise self._error(err, "read", key) from err
            self._bucket_checked = True
        return NotFound(f"{self._uri_for(key)} does not exist")

    # -- operations

    def _put_file(self, local_path: Path, key: str) -> None:
        if not local_path.is_file():
            raise NotFound(f"local file {str(local_path)!r} does not exist")

        full_key = self._full(key)
        upload_ids: list[str] = []

        def remember_upload(parsed: dict[str, Any], **_: Any) -> None:
            if parsed.get("Key") == full_key and parsed.get("UploadId"):
                upload_ids.append(parsed["UploadId"])

        # Record multipart upload ids so a failed transfer can be aborted explicitly
        # even where s3transfer's own failure cleanup did not run or failed.
        handler_id = f"rayft-mpu-{uuid.uuid4().hex}"
        events = self.client.meta.events
        events.register("after-call.s3.CreateMultipartUpload", remember_upload, unique_id=handler_id)
        try:
            with self._translated("upload to", key):
                with TransferManager(self.client, self._transfer_config()) as manager:
                    manager.upload(str(local_path), self.bucket, full_key).result()
        except BaseException:
            self._abort_uploads(full_key, upload_ids)
            raise
        finally:
            events.unregister("after-call.s3.CreateMultipartUpload", unique_id=handler_id)

    def _abort_uploads(self, full_key: str, upload_ids: list[str]) -> None:
        for upload_id in upload_ids:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)
            except (ClientError, BotoCoreError):
                pass  # already aborted (NoSuchUpload) or server gone: the original failure is what to report

    def _put_bytes(self, data: bytes, key: str, *, overwrite: bool) -> None:
        extra: dict[str, Any] = {}
        if not overwrite:
            # Servers without conditional writes ignore IfNoneMatch: check first as well.
            if self._exists(key):
                raise AlreadyExists(f"{self._uri_for(key)} already exists")
            extra["IfNoneMatch"] = "*"
        with self._translated("write", key):
            self.client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data, **extra)

    def _get_file(self, key: str, local_path: Path) -> None:
        with temp_beside(local_path) as temp:
            try:
                with self._translated("download", key):
                    with TransferManager(self.client, self._transfer_config()) as manager:
                        manager.download(self.bucket, self._full(key), str(temp)).result()
            except NotFound:
                raise self._not_found(key) from None
            os.replace(temp, local_path)

    def _get_bytes(self, key: str) -> bytes:
        with self._translated("read", key):
            response = self.client.get_object(Bucket=self.bucket, Key=self._full(key))
            return response["Body"].read()

    def _head(self, key: str) -> dict[str, Any] | None:
        """HEAD `key`; None if it does not exist (StorageError if the bucket does not)."""
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                error = self._not_found(key)
                if isinstance(error, NotFound):
                    return None
                raise error from None
            raise self._error(err, "read", key) from err
        except BotoCoreError as err:
            raise self._error(err, "read", key) from err

    def _exists(self, key: str) -> bool:
        return self._head(key) is not None

    def _size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise NotFound(f"{self._uri_for(key)} does not exist")
        return int(head["ContentLength"])

    def _list(self, prefix: str) -> list[str]:
        full_prefix = self._full(prefix)
        listing_prefix = f"{full_prefix}/" if full_prefix else ""
        root = f"{self.prefix}/" if self.prefix else ""
        keys: list[str] = []
        with self._translated("list", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=listing_prefix):
                keys.extend(item["Key"][len(root):] for item in page.get("Contents", []))
        return keys

    def _delete(self, key: str) -> None:
        with self._translated("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._full(key))

    def _delete_prefix(self, prefix: str) -> int:
        keys = self._list(prefix)
        with self._translated("delete", prefix):
            for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
                batch = [{"Key": self._full(key)} for key in keys[start : start + 1000]]
                response = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                if response.get("Errors"):
                    first = response["Errors"][0]
                    raise StorageError(
                        f"cannot delete s3://{self.bucket}/{first.get('Key')}: {first.get('Code')}: {first.get('Message')}"
                    )
        return len(keys)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    bucket = parsed.netloc
    problems = []
    if not (3 <= len(bucket) <= 63) or not all(ch.islower() or ch.isdigit() or ch in ".-" for ch in bucket) or not bucket.isascii():
        problems.append(f"bucket {bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, digits, '.', '-')")
    if parsed.query or parsed.fragment or parsed.params:
        problems.append("no '?query' or '#fragment' is allowed")
    if problems:
        raise InvalidURI(f"invalid storage URI {uri!r}: {'; '.join(problems)}; expected s3://bucket[/prefix]")
    try:
        prefix = normalize_prefix(unquote(parsed.path).lstrip("/"))
    except InvalidKey as err:
        raise InvalidURI(f"invalid storage URI {uri!r}: {err}") from None
    return bucket, prefix


def s3_pyarrow_filesystem(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """pyarrow's S3FileSystem + `bucket/prefix` for an s3:// URI, with endpoint, region and credentials
    resolved now from the AWS configuration boto3 reads, so the pickled filesystem works on workers
    that lack the AWS environment."""
    import pyarrow.fs

    bucket, prefix = parse_s3_uri(uri)
    session = boto3.session.Session()
    credentials = session.get_credentials()
    if credentials is None:
        raise StorageError(f"cannot open {uri}: no usable AWS credentials; {_CREDENTIALS_HINT}")
    frozen = credentials.get_frozen_credentials()
    kwargs: dict[str, Any] = {
        "access_key": frozen.access_key,
        "secret_key": frozen.secret_key,
        "session_token": frozen.token,
        "region": session.region_name or "us-east-1",
    }
    endpoint = configured_endpoint_url()
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(f"AWS_ENDPOINT_URL {endpoint!r} is not an http(s) URL; {_ENDPOINT_HINT}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme
    path = f"{bucket}/{prefix}" if prefix else bucket
    return pyarrow.fs.S3FileSystem(**kwargs), path
