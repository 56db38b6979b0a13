"""Every check on untrusted names, keys and weight files, in one place.

Names and refs come from job files, CLI arguments and HTTP requests (`model: ...`), so
they are validated here before anything touches storage. Weight files are refused
unless they are safetensors: a pickle-based file (`.bin`, `.pt`, ...) can run code
when loaded, so it is rejected by name and never opened.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from storage.errors import InvalidKey, InvalidName, UnsafeArtifact

if TYPE_CHECKING:
    import torch

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
VERSION_PATTERN = r"^[1-9][0-9]{0,8}$"
_VERSION_RE = re.compile(VERSION_PATTERN)

#: Suffixes of pickle-based weight/checkpoint formats; loading any of them can execute code.
UNSAFE_WEIGHT_SUFFIXES: frozenset[str] = frozenset(
    {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
)

_SAFE_FIX = (
    "re-save the weights with safetensors, e.g. "
    "`model.save_pretrained(dir, safe_serialization=True)`, and drop the pickle files"
)
#: S3 allows 1024-byte keys; the store root prefix takes part of that.
_MAX_KEY_BYTES = 900


def _show(value: object, limit: int = 60) -> str:
    """repr() of an untrusted value, cut so a 1 KB input does not flood the error line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_name(name: str) -> str:
    """Return `name` if it is a valid model/adapter name, else raise InvalidName.

    ASCII only (so Cyrillic look-alikes fail), no path separators, no `..`.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"invalid name {_show(name)}: must match {NAME_PATTERN} "
            "(lowercase ASCII letters, digits, '.', '_', '-'; starts with a letter or "
            "digit; at most 64 characters; no '..')"
        )
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """Split `name` or `name@N` into (name, N or None for latest), validating both parts."""
    if not isinstance(ref, str):
        raise InvalidName(f"invalid ref {_show(ref)}: expected a string 'name' or 'name@N'")
    name, sep, version_text = ref.partition("@")
    if not sep:
        return validate_name(ref), None
    try:
        validate_name(name)
    except InvalidName as err:
        raise InvalidName(f"invalid ref {_show(ref)}: {err}") from None
    if not _VERSION_RE.fullmatch(version_text):
        raise InvalidName(
            f"invalid ref {_show(ref)}: the version after '@' must be a positive integer "
            "without leading zeros (e.g. 'my-adapter@3'), or omit '@N' for the latest"
        )
    return name, int(version_text)


def validate_key(key: str, *, allow_empty: bool = False) -> str:
    """Return a '/'-separated relative storage key, or raise InvalidKey.

    Refused: absolute keys, '.'/'..'/empty segments, NUL and other control characters,
    backslashes, and keys over the length S3 allows. A trailing '/' is not part of a key.
    """
    problem = _key_problem(key, allow_empty=allow_empty)
    if problem:
        raise InvalidKey(f"invalid storage key {_show(key)}: {problem}")
    return key


def _key_problem(key: object, *, allow_empty: bool) -> str | None:
    if not isinstance(key, str):
        return "expected a string"
    if key == "":
        return None if allow_empty else "must not be empty"
    if len(key.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES:
        return f"longer than {_MAX_KEY_BYTES} bytes"
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        return "contains NUL or another control character"
    if "\\" in key:
        return "contains a backslash; use '/' as separator"
    if key.startswith("/"):
        return "must be relative, not start with '/'"
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        return "must not contain empty, '.' or '..' segments"
    return None


def normalize_prefix(prefix: str) -> str:
    """Validate a listing/deletion prefix; returns it without a trailing '/' ('' = everything)."""
    stripped = prefix.rstrip("/") if isinstance(prefix, str) else prefix
    return validate_key(stripped, allow_empty=True)


def unsafe_weight_names(paths: Iterable[str]) -> list[str]:
    """The paths among `paths` whose suffix is a pickle-based weight format."""
    return sorted(p for p in paths if Path(p).suffix.lower() in UNSAFE_WEIGHT_SUFFIXES)


def check_weight_names(paths: Iterable[str], *, where: str) -> None:
    """Raise UnsafeArtifact naming every pickle-based file among `paths` (checked by name only)."""
    unsafe = unsafe_weight_names(paths)
    if unsafe:
        listed = ", ".join(unsafe[:10]) + (f" (+{len(unsafe) - 10} more)" if len(unsafe) > 10 else "")
        raise UnsafeArtifact(
            f"{where} holds pickle-based weight files, which are never loaded: {listed}; {_SAFE_FIX}"
        )


def check_weight_files(directory: str | os.PathLike[str]) -> None:
    """Refuse a directory holding any pickle-based weight file (.bin, .pt, .pth, .pkl, .pickle, .ckpt).

    Files are judged by name only; none of them is opened.
    """
    root = Path(directory)
    relative = [
        (Path(dirpath) / filename).relative_to(root).as_posix()
        for dirpath, _dirs, filenames in os.walk(root)
        for filename in filenames
    ]
    check_weight_names(relative, where=str(root))


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a `.safetensors` file onto the CPU; the only weight loader rayft uses."""
    file = Path(path)
    if file.suffix.lower() != ".safetensors":
        raise UnsafeArtifact(f"refusing to load {str(file)!r}: only .safetensors files are loaded; {_SAFE_FIX}")
    from safetensors.torch import load_file  # torch is heavy: import only when weights are loaded

    return load_file(str(file), device="cpu")
