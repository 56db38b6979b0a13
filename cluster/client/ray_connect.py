"""Connecting this process to Ray: a local instance, or the cluster at --address / RAY_ADDRESS.

Ray 2.60 sends its auth token to an explicitly named cluster only when `RAY_AUTH_MODE=token` is set
in the client's environment; without it, a token-auth head refuses the connection and `ray.init`
retries for ~20 s before a traceback. rayft asks the head first (one gRPC call to its GCS, a few
milliseconds): if it wants a token, the token is looked up where `rayft submit` looks
(`cluster.client.auth.find_auth_token`) and checked, so a missing or wrong one is one line naming the
token tried and where to put the right one; then Ray is told to send it.
"""

from __future__ import annotations

import os

from cluster.client import console
from cluster.client.auth import (
    AuthToken,
    ClusterUnreachable,
    find_auth_token,
    missing_token_error,
    refused_token_error,
)
from storage.errors import RayftError, first_line

# A busy head can take seconds to answer; a closed port is refused at once, so only a silent host waits this long.
PROBE_TIMEOUT_S = 20.0


class AddressError(RayftError):
    """An --address / RAY_ADDRESS that `ray.init` cannot use."""


def prepare(address: str | None = None) -> str | None:
    """Everything before `ray.init`: the cluster's auth checked and its token set up, the console quieted.

    Returns the address to pass to `ray.init` (None: start a local Ray). Raises in seconds when the
    cluster cannot be reached or refuses this machine's token. Whoever then calls `ray.init`
    (`connect` below, or the trainers' own `ensure_ray`) gets the token sent and rayft's console.
    """
    import ray

    address = (address or os.environ.get("RAY_ADDRESS") or "").strip() or None
    if ray.is_initialized():
        return address
    # Each ray.train.report() waits for the controller's poll; a short interval keeps reports cheap.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if address not in (None, "local"):
        prepare_auth(address)
    # (A new local instance gets Ray's default, token auth on; Ray's note saying so is kept off the console.)
    console.quiet_ray_driver()
    console.keep_rayft_lines_only()
    return address


def connect(address: str | None = None, dashboard: bool = False) -> None:
    """Connect to `address` / RAY_ADDRESS (checking its auth first), or start a local Ray instance.

    A local instance lives as long as this process; it runs the dashboard (which serves the Ray
    Jobs API) only when asked, e.g. by `rayft serve` with the fine-tuning API on.
    """
    import ray

    if ray.is_initialized():
        return
    address = prepare(address)
    if address in (None, "local"):
        ray.init(include_dashboard=dashboard, log_to_driver=True)
        return
    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError as exc:
        raise ClusterUnreachable(f"cannot connect to the Ray cluster at {address}: {first_line(exc)}") from exc


def prepare_auth(address: str) -> AuthToken | None:
    """Make `ray.init(address)` send the cluster's token when the cluster wants one; returns the token used.

    Raises ClusterAuthError (no token here, or the cluster refuses it) or ClusterUnreachable, in seconds.
    """
    if address.startswith(("http://", "https://")):
        raise AddressError(
            f"--address {address}: that is the head's dashboard / Jobs API URL, which `rayft submit` and `rayft jobs` "
            "use; this command connects to the head's GCS: --address HEAD:6379 (or ray://HEAD:10001 for Ray Client)"
        )
    if address == "auto" or address.startswith("ray://") or ":" not in address:
        # Ray Client and "the local cluster" have no GCS to ask here: send the token whenever there is one.
        token = find_auth_token()
        if token is not None and not os.environ.get("RAY_AUTH_MODE"):
            _send_token(token)
        return token
    status = probe_gcs(address, None)
    if status is None:
        return None  # the cluster does not check tokens
    if status != "UNAUTHENTICATED":
        raise _unreachable(address, status)
    token = find_auth_token()
    if token is None:
        raise missing_token_error(address)
    status = probe_gcs(address, token)
    if status == "UNAUTHENTICATED":
        raise refused_token_error(address, token, "InvalidAuthToken")
    if status is not None:
        raise _unreachable(address, status)
    _send_token(token)
    return token


def probe_gcs(address: str, token: AuthToken | None, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Ask the GCS at `address` for its cluster id; None when it answers, else the gRPC status name."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = [("authorization", f"Bearer {token.value}")] if token else []
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as err:
            return err.code().name
    return None


def _send_token(token: AuthToken) -> None:
    """Tell Ray (this process and what it starts) to send `token` with every call."""
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ["RAY_AUTH_MODE"] = "token"
    # Ray reads the token from the same places in the same order; naming it makes sure it is this one.
    os.environ["RAY_AUTH_TOKEN"] = token.value
    Config.initialize("")  # Ray caches its config (and so the auth mode) per process
    AuthenticationTokenLoader.instance().reset_cache()


def _unreachable(address: str, status: str) -> ClusterUnreachable:
    why = {"UNAVAILABLE": "nothing answers there", "DEADLINE_EXCEEDED": f"no answer within {PROBE_TIMEOUT_S:.0f} s"}.get(
        status, f"it answered {status}")
    return ClusterUnreachable(
        f"cannot reach a Ray cluster at {address} ({why}); pass the head's GCS address HEAD:6379 (the port of "
        "`ray start --head --port`), reachable from here, or unset RAY_ADDRESS to start a local Ray"
    )

