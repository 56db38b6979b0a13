"""Per-adapter serving metrics, exported through Ray Serve's metrics (Prometheus).

Ray adds the application, deployment and replica tags; the names below are what a
dashboard queries (Ray prefixes them with `ray_`). Each replica also keeps the same counts
in memory so `stats()` on a deployment handle can report them without a Prometheus
scrape (tests and the demo read them that way).
"""

from __future__ import annotations

import collections
import threading
from typing import Any

_LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class ModelMetrics:
    """Metrics of a model replica: adapter loads, cache hits/misses/evictions, requests and latency by model."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self._lock = threading.Lock()  # evictions are counted from Serve's executor thread
        self.counts: collections.Counter[str] = collections.Counter()
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)  # "<model>|cold" → seconds (last 1000)
        self.load_times: dict[str, list[float]] = collections.defaultdict(list)
        self._load_seconds = metrics.Histogram(
            "rayft_adapter_load_seconds", description="Time to fetch, verify and attach an adapter.",
            boundaries=_LATENCY_BUCKETS_S, tag_keys=("adapter",),
        )
        self._cache = metrics.Counter(
            "rayft_adapter_cache_total", description="Adapter lookups in a replica: hit, miss, eviction.",
            tag_keys=("adapter", "event"),
        )
        self._downloads = metrics.Counter(
            "rayft_adapter_file_downloads_total", description="Files of an adapter fetched from storage (blobs the local content cache did not hold).",
            tag_keys=("adapter",),
        )
        self._refusals = metrics.Counter(
            "rayft_adapter_refusals_total", description="Adapters refused at load (integrity, base mismatch, unsupported).",
            tag_keys=("adapter", "reason"),
        )
        self._requests = metrics.Counter(
            "rayft_model_requests_total", description="Generation requests by model (base, adapter or merged) and outcome.",
            tag_keys=("model", "status"),
        )
        self._latency = metrics.Histogram(
            "rayft_model_request_latency_seconds", description="Request latency in the replica, by model and cold/warm adapter.",
            boundaries=_LATENCY_BUCKETS_S, tag_keys=("model", "start"),
        )
        self._tokens = metrics.Counter(
            "rayft_generated_tokens_total", description="Completion tokens generated, by model.", tag_keys=("model",),
        )

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def adapter_loaded(self, adapter: str, seconds: float) -> None:
        self._load_seconds.observe(seconds, tags={"adapter": adapter})
        self._count("adapter_loads")
        with self._lock:
            self.load_times[adapter] = (self.load_times[adapter] + [seconds])[-1000:]

    def cache_event(self, adapter: str, event: str) -> None:
        """event: hit | miss | eviction."""
        self._cache.inc(tags={"adapter": adapter, "event": event})
        self._count(f"cache_{event}")
        self._count(f"cache_{event}:{adapter}")

    def file_downloaded(self, adapter: str, path: str) -> None:
        self._downloads.inc(tags={"adapter": adapter})
        self._count(f"downloads:{adapter}")
        self._count(f"downloads:{adapter}:{path}")

    def refused(self, adapter: str, reason: str) -> None:
        self._refusals.inc(tags={"adapter": adapter, "reason": reason})
        self._count(f"refused:{reason}")

    def request_done(self, model: str, status: str, seconds: float, cold: bool, tokens: int) -> None:
        start = "cold" if cold else "warm"
        self._requests.inc(tags={"model": model, "status": status})
        self._latency.observe(seconds, tags={"model": model, "start": start})
        if tokens:
            self._tokens.inc(tokens, tags={"model": model})
        self._count(f"requests:{status}")
        with self._lock:
            key = f"{model}|{start}"
            self.latencies[key] = (self.latencies[key] + [seconds])[-1000:]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "counts": dict(self.counts),
                "latency_s": {k: list(v) for k, v in self.latencies.items()},
                "load_s": {k: list(v) for k, v in self.load_times.items()},
            }


class ApiMetrics:
    """Metrics of the HTTP front: requests by route and status, and storage calls it made."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self._requests = metrics.Counter(
            "rayft_http_requests_total", description="HTTP requests by route and status code.", tag_keys=("route", "status"),
        )
        self._latency = metrics.Histogram(
            "rayft_http_request_latency_seconds", description="HTTP request latency by route (to the last byte for streams).",
            boundaries=_LATENCY_BUCKETS_S, tag_keys=("route",),
        )

    def request(self, route: str, status: int, seconds: float) -> None:
        self._requests.inc(tags={"route": route, "status": str(status)})
        self._latency.observe(seconds, tags={"route": route})
        with self._lock:
            self.counts[f"http:{status}"] += 1

    def storage_call(self, operation: str) -> None:
        with self._lock:
            self.counts["storage_requests"] += 1
            self.counts[f"storage:{operation}"] += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"counts": dict(self.counts)}


def count_s3_requests(store: Any, callback: Any) -> None:
    """Call `callback(operation, key)` before every S3 request `store` makes (no-op for local stores).

    Hooked on the store's own botocore client, so it counts what really goes over the wire.
    """
    client = getattr(store, "client", None)
    if client is None:
        return

    def before(params: dict, model: Any, **_: Any) -> None:
        callback(model.name, params.get("Key", ""))

    client.meta.events.register("before-parameter-build.s3", before)


def count_registry_downloads(store: Any, metrics: ModelMetrics) -> None:
    """Count every file of a published version a replica fetches from S3 (`metrics.file_downloaded`)."""

    def on_request(operation: str, key: str) -> None:
        # registry/<name>/<version>/files/<path>: a file of a published version (what "a download" means).
        parts = key.split("/")
        if operation == "GetObject" and "files" in parts:
            at = parts.index("files")
            if at >= 3 and parts[at - 3] == "registry":
                metrics.file_downloaded(f"{parts[at - 2]}@{parts[at - 1]}", "/".join(parts[at + 1 :]))

    count_s3_requests(store, on_request)
