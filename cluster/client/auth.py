"""The Ray cluster's auth token, found where Ray itself looks for it, and the errors naming the fix.

Ray 2.60 clusters run with token authentication on. Every way rayft reaches a cluster (the Jobs API
of `rayft submit`/`rayft jobs`, `ray.init` of `rayft train|tune|serve --address`) sends the same
token, looked up in Ray's own order: `RAY_AUTH_TOKEN`, then the file named by `RAY_AUTH_TOKEN_PATH`,
then `~/.ray/auth_token`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from storage.errors import RayftError, first_line

class ClusterAuthError(RayftError):
    """The cluster wants a token that was not found, or refused the one sent."""

    http_status = 401


class ClusterUnreachable(RayftError):
    """Nothing answers as a Ray Jobs API at the address."""

    http_status = 503


@dataclass(frozen=True)
class AuthToken:
    value: str
    source: str  # where it came from, for error messages ("RAY_AUTH_TOKEN", a file path)


def find_auth_token(environ: Mapping[str, str] = os.environ, home: Path | None = None) -> AuthToken | None:
    """The cluster token, looked up in Ray's own order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return AuthToken(environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        value = _read_token_file(path)
        if not value:
            raise ClusterAuthError(f"RAY_AUTH_TOKEN_PATH={path}: file is missing or empty; put the cluster's token in it")
        return AuthToken(value, f"RAY_AUTH_TOKEN_PATH ({path})")
    path = (home or Path(environ.get("HOME") or Path.home())) / ".ray" / "auth_token"
    value = _read_token_file(path)
    return AuthToken(value, str(path)) if value else None


def _read_token_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def missing_token_error(address: str) -> ClusterAuthError:
    """The cluster asked for a token and none was found here."""
    return ClusterAuthError(
        f"the Ray cluster at {address} requires an auth token and none was found here: set "
        "RAY_AUTH_TOKEN to the cluster's token, or write it to ~/.ray/auth_token (or a file named by "
        "RAY_AUTH_TOKEN_PATH); get it from the cluster (`ray get-auth-token` on the head, or the Secret "
        "it was created from)"
    )


def refused_token_error(address: str, token: AuthToken, detail: str) -> ClusterAuthError:
    """The cluster refused the token found here."""
    return ClusterAuthError(
        f"the Ray cluster at {address} refused the auth token from {token.source} "
        f"({first_line(detail)}); it is not this cluster's token: set RAY_AUTH_TOKEN to the right one "
        "(`ray get-auth-token` on the head prints it)"
    )
