"""Small job specs, registries and buckets for tests."""

from __future__ import annotations

import uuid
from pathlib import Path

from storage.local_s3 import S3Server
from storage.registry import base_config_digest_of_dir, open_registry
from trainers.spec import JobSpec, parse_job_spec


def registry_with_base(storage: str, model_dir: Path, name: str = "tiny"):
    """A registry at `storage` holding `model_dir` published as the base model `name`@1 (what a serve spec's
    `source: registry:NAME` and adapters trained on it point at). Returns the registry."""
    registry = open_registry(storage)
    registry.publish(name, model_dir, kind="model", base_model=name, base_config_digest=base_config_digest_of_dir(model_dir),
                     method=None, params={}, metrics={}, lineage={})
    return registry


def fresh_bucket(s3_server: S3Server, prefix: str) -> str:
    """A new bucket on the embedded S3 server; returns the storage URI `s3://<bucket>/store` in it."""
    bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
    s3_server.ensure_bucket(bucket)
    return f"s3://{bucket}/store"


def make_job(model_dir, train_path, storage_uri, method: dict, name: str = "test-adapter", **sections) -> JobSpec:
    """A small job spec for tests; `sections` override whole spec sections by key (e.g. training={...})."""
    raw = {
        "model": {"source": str(model_dir)},
        "data": {"train": str(train_path), "eval_fraction": 0.15, "max_seq_len": 48},
        "method": method,
        "training": {"max_steps": 12, "micro_batch_size": 8, "lr": 0.01, "eval_every": 12,
                     "checkpoint_every": 12, "log_every": 6, "seed": 0},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "output": {"name": name},
        "storage": {"uri": storage_uri},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_job_spec(raw, "<test>")
