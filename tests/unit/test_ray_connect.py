"""`--address` probes (cluster.client.ray_connect): a refused port and a host that never answers get different words."""

from __future__ import annotations

import socket

from cluster.client.ray_connect import _unreachable, probe_gcs


def test_a_closed_port_and_a_silent_listener_are_told_apart() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused_at = f"127.0.0.1:{closed.getsockname()[1]}"  # bound, not listening: connections are refused
        refused = probe_gcs(refused_at, None, timeout_s=2)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts connections, never speaks gRPC
        silent_at = f"127.0.0.1:{silent.getsockname()[1]}"
        timed_out = probe_gcs(silent_at, None, timeout_s=1)

    assert (refused, timed_out) == ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert "(nothing answers there)" in str(_unreachable(refused_at, refused))
    assert "(no answer within 20 s)" in str(_unreachable(silent_at, timed_out))
