"""User-facing errors shared by every layer.

`storage/` imports nothing above it, so the base class lives here and the CLI and
the HTTP layer map any `RayftError` to one clear line / a 4xx response.
"""

from __future__ import annotations


class RayftError(Exception):
    """Base of every error that is the caller's to fix. `str(err)` is the one-line message."""

    #: HTTP status the serve layer answers with for this kind of error.
    http_status: int = 400
    #: Exit status of the CLI: 2 for bad input or usage (the caller's to fix before running), 1 for a run
    #: that failed while running (`RunFailed`).
    exit_code: int = 2


class RunFailed(RayftError):
    """Work that had started failed (a training run, a deployment); the message carries the original error."""

    http_status = 500
    exit_code = 1


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


# Exception class names end with one of these; a line starting with such a name (optionally dotted,
# `ray.exceptions.RayTaskError: ...`) is an error line.
_ERROR_NAME_ENDINGS = ("Error", "Exception", "Failed", "Interrupt", "NotFound", "NotServable")


def root_cause(error: BaseException | str) -> str:
    """The innermost error line of a wrapped error (a Ray Train worker's, a Serve replica's, a Tune trial's):
    e.g. `DataError: file:3: ...` out of Ray's multi-line wrapping with its tracebacks."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.rsplit(".", 1)[-1].endswith(_ERROR_NAME_ENDINGS) or head.startswith("trainers."):
            return line
    return lines[-1] if lines else repr(error)


def first_line(error: BaseException | str) -> str:
    """The first non-empty line of an error's message (its type name when it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
