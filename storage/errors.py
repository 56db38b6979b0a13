"""User-facing errors shared by every layer.

`storage/` imports nothing above it, so the base class lives here and the CLI and
the HTTP layer map any `RayftError` to one clear line / a 4xx response.
"""

from __future__ import annotations


class RayftError(Exception):
    """Base of every error that is the caller's to fix. `str(err)` is the one-line message."""

    #: HTTP status the serve layer answers with for this kind of error.
    http_status: int = 400


class InvalidName(RayftError):
    """A model/adapter name or version that does not match the allowed pattern."""


class NotFound(RayftError):
    """A name, version or object that does not exist (or has no manifest)."""

    http_status = 404


class IntegrityError(RayftError):
    """A stored file whose sha256 or size differs from its manifest."""

    http_status = 422


class UnsafeArtifact(RayftError):
    """An artifact holding a pickle-based weight file (.bin/.pt/...), which is never loaded."""

    http_status = 422


class StorageError(RayftError):
    """The storage backend failed (unreachable endpoint, bad credentials, missing bucket)."""

    http_status = 503


class InvalidKey(InvalidName):
    """A storage key or prefix that could escape the store ('..', absolute, NUL, backslash)."""


class InvalidURI(RayftError):
    """A storage URI that is neither `s3://bucket[/prefix]`, `file://...` nor a plain path."""


class InvalidArtifact(RayftError):
    """Publish input that cannot become an artifact (empty directory, malformed digest, ...)."""


class AlreadyExists(RayftError):
    """An exclusive write (a version claim, a manifest) found its target already there."""

    http_status = 409
