"""An S3 API server on loopback (moto's ThreadedMotoServer) for tests and the demo.

It speaks the real S3 REST protocol, so the same boto3/pyarrow code paths that talk to
AWS S3, MinIO or R2 are exercised. State lives in this process's memory and is shared
by every server started in it. Pointing clients at it is explicit: `s3_env()` returns
the variables to set, and the caller decides where to set them.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from storage.errors import StorageError

#: Dummy credentials the embedded server accepts (it does not check them by default).
DUMMY_ACCESS_KEY = "rayft-local"
DUMMY_SECRET_KEY = "rayft-local-secret"
DEFAULT_REGION = "us-east-1"


def s3_env(endpoint_url: str) -> dict[str, str]:
    """The standard AWS variables that point boto3 and `pyarrow_filesystem` at `endpoint_url`.

    Both endpoint variables are set because AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL
    when present. Callers should also drop AWS_PROFILE / AWS_SESSION_TOKEN if set.
    """
    return {
        "AWS_ENDPOINT_URL": endpoint_url,
        "AWS_ENDPOINT_URL_S3": endpoint_url,
        "AWS_ACCESS_KEY_ID": DUMMY_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET_KEY,
        "AWS_DEFAULT_REGION": DEFAULT_REGION,
        "AWS_REGION": DEFAULT_REGION,
        # Skip the EC2 metadata probe when no other credentials exist.
        "AWS_EC2_METADATA_DISABLED": "true",
    }


class S3Server:
    """A running embedded S3 server; use as a context manager or call `stop()`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, quiet: bool = True):
        from moto.server import ThreadedMotoServer

        if quiet:
            # werkzeug logs every request at INFO to stderr unless its logger has a level.
            logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server = ThreadedMotoServer(ip_address=host, port=port, verbose=not quiet)
        try:
            self._server.start()
        except OSError as err:
            raise StorageError(f"cannot start the embedded S3 server on {host}:{port}: {err}") from None
        bound_host, bound_port = self._server.get_host_and_port()
        #: Base URL of the server, e.g. http://127.0.0.1:40123
        self.endpoint_url = f"http://{bound_host}:{bound_port}"
        self._running = True

    def client(self) -> Any:
        """A boto3 S3 client bound to this server with the dummy credentials (no environment needed)."""
        return _client(self.endpoint_url)

    def ensure_bucket(self, name: str) -> None:
        """Create bucket `name` on this server unless it exists."""
        _create_bucket(self.client(), name)

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._running:
            self._running = False
            self._server.stop()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def start_s3_server(host: str = "127.0.0.1", port: int = 0, *, quiet: bool = True) -> S3Server:
    """Start an S3 API server on `host:port` (0 = a free port) in a background thread."""
    return S3Server(host, port, quiet=quiet)


def ensure_bucket(name: str, endpoint_url: str | None = None) -> None:
    """Create bucket `name` unless it exists, on `endpoint_url` with the dummy credentials, or,
    when None, wherever the standard AWS variables point (AWS_ENDPOINT_URL, credentials, region)."""
    _create_bucket(_client(endpoint_url), name)


def _client(endpoint_url: str | None) -> Any:
    import boto3
    from botocore.config import Config

    path_style = Config(s3={"addressing_style": "path"})
    if endpoint_url is None:
        return boto3.client("s3", config=path_style)
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=DUMMY_ACCESS_KEY,
        aws_secret_access_key=DUMMY_SECRET_KEY,
        region_name=DEFAULT_REGION,
        config=path_style,
    )


def _create_bucket(client: Any, name: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.create_bucket(Bucket=name)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
            raise StorageError(f"cannot create bucket {name!r} at {client.meta.endpoint_url}: {err}") from None
    except BotoCoreError as err:
        raise StorageError(f"cannot create bucket {name!r} at {client.meta.endpoint_url}: {err}") from None
