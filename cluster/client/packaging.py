"""The working dir a job takes to the cluster: what Ray would pack, and whether it fits Ray's upload limit.

The same walk, excludes and .gitignore/.rayignore rules as Ray's packager, measured here before
anything leaves the machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from storage.errors import RayftError

# Never worth uploading: environments, VCS metadata, caches, build and run outputs. Patterns
# are .gitignore syntax relative to the working dir, as Ray applies `excludes`; without a
# trailing slash a pattern matches the directory itself, so the walk does not enter it.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".venv", "venv", ".git", ".hg", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", ".tox", ".ipynb_checkpoints", "*.egg-info", "build", "dist", ".rayft",
    "demo-out", "bench/results",
)

# Not secret, and what a job needs to find its storage: forwarded whenever set locally.

class WorkingDirTooLarge(RayftError):
    """The working dir would exceed Ray's upload limit; nothing was uploaded."""


@dataclass(frozen=True)
class PackageSize:
    total: int  # bytes of the zip Ray would build (file bytes + zip headers)
    files: int
    biggest_files: list[tuple[str, int]]
    biggest_dirs: list[tuple[str, int]]  # top-level directories by the bytes they add


def package_size_limit() -> int:
    """Ray's limit on an uploaded package (its gRPC message size), as Ray computes it."""
    from ray._private.ray_constants import GRPC_CPP_MAX_MESSAGE_SIZE

    return int(os.environ.get("RAY_max_grpc_message_size", GRPC_CPP_MAX_MESSAGE_SIZE))


def _include_gitignore() -> bool:
    return os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"


def packed_paths(working_dir: Path, excludes: list[str]) -> dict[str, int]:
    """Every path Ray would pack (files, and empty dirs as 0) with its size: the same walk, excludes
    and .gitignore/.rayignore rules as Ray's packager."""
    import logging

    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = working_dir.resolve()
    excludes = [*get_runtime_env_default_excludes(), *excludes]  # Ray adds its own (.git, .venv, ...) too
    sizes: dict[str, int] = {}

    def visit(path: Path) -> None:
        if path.is_file():
            sizes[path.relative_to(root).as_posix()] = path.stat().st_size
        elif path.is_dir() and path != root and next(path.iterdir(), None) is None:
            sizes[path.relative_to(root).as_posix() + "/"] = 0

    _dir_travel(root, [_get_excludes(root, list(excludes))], visit, include_gitignore=_include_gitignore(),
                logger=logging.getLogger("rayft.submit.quiet"))
    return sizes


def measure_package(working_dir: Path, excludes: list[str]) -> PackageSize:
    """The size of the zip Ray would upload (stored, not compressed) and where the bytes are."""
    # Per entry: local header (30) + central directory entry (46) + the name in both.
    sizes = {rel: n + 76 + 2 * len(rel.encode()) for rel, n in packed_paths(working_dir, excludes).items()}
    dirs: dict[str, int] = {}
    for rel, size in sizes.items():
        if "/" in rel.rstrip("/"):
            top = rel.split("/", 1)[0] + "/"
            dirs[top] = dirs.get(top, 0) + size
    by_size = sorted(sizes.items(), key=lambda kv: -kv[1])
    return PackageSize(
        total=sum(sizes.values()) + 22, files=len(sizes), biggest_files=by_size[:5],
        biggest_dirs=sorted(dirs.items(), key=lambda kv: -kv[1])[:5],
    )


def is_excluded(working_dir: Path, relative: str, excludes: list[str]) -> bool:
    """Whether Ray's packager would leave `relative` (a path under working_dir) out."""
    import logging

    from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

    root = working_dir.resolve()
    matchers = [_get_excludes(root, list(excludes))]
    quiet = logging.getLogger("rayft.submit.quiet")
    path = root
    matchers += get_excludes_from_ignore_files(root, include_gitignore=_include_gitignore(), logger=quiet)
    for part in Path(relative).parts:
        path = path / part
        if any(match(path) for match in matchers):
            return True
        if path.is_dir():
            matchers += get_excludes_from_ignore_files(path, include_gitignore=_include_gitignore(), logger=quiet)
    return False


def check_package_size(working_dir: Path, excludes: list[str]) -> PackageSize:
    """Refuse, before any upload, a working dir Ray would reject; name the biggest offenders."""
    size, limit = measure_package(working_dir, excludes), package_size_limit()
    if size.total < limit:
        return size
    offenders = ", ".join(f"{name} {mib(n)}" for name, n in _offenders(size))
    raise WorkingDirTooLarge(
        f"working dir {working_dir} would upload {mib(size.total)} ({size.files:,} files), over Ray's limit of "
        f"{mib(limit)}; biggest: {offenders}; leave them out with --exclude PATTERN or a .rayignore file, or put "
        "large data and models in s3:// and point the job at them"
    )


def _offenders(size: PackageSize) -> list[tuple[str, int]]:
    entries = dict(size.biggest_dirs)
    for name, n in size.biggest_files:
        if not any(name.startswith(d) for d in entries):
            entries[name] = n
    return sorted(entries.items(), key=lambda kv: -kv[1])[:5]


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
