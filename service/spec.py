"""The service spec: a serve spec (serve/spec.py) plus the `fine_tuning:` section that turns on
the OpenAI-compatible files and fine-tuning jobs API on the same application.

`ServiceSpec` is the argument type of `service.app:build_app`, so Ray Serve validates a
RayService's `args` against it, and `rayft serve SERVE.yaml` reads every serve file with it:
a file without `fine_tuning` (or with `enabled: false`) deploys exactly what serve/ alone does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.spec import ServeSpec, load_serve_spec, parse_serve_spec

MiB = 1 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobDefaults(_Strict):
    """What a fine-tuning job gets for each setting the request leaves out or sets to "auto"."""

    n_epochs: int = Field(3, ge=1, le=100, description='Epochs over the training file for n_epochs "auto".')
    batch_size: int = Field(8, ge=1, le=1024, description='Examples per optimizer step for batch_size "auto" (fewer if the file is smaller).')
    learning_rate: float = Field(2e-4, gt=0, le=1, description="The learning rate that learning_rate_multiplier 1.0 (and \"auto\") stands for.")
    method: dict[str, Any] = Field(
        default_factory=lambda: {"name": "lora", "r": 8, "alpha": 16},
        description="The job spec's `method:` section (trainers/spec.py) when the request's `rayft.method` is unset.",
    )
    max_seq_len: int = Field(256, ge=8, le=131072, description="Tokens per example (longer rows are truncated).")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of the training file held out when no validation_file is given.")
    checkpoints: int = Field(2, ge=1, le=100, description="Checkpoints written per job (evenly spaced); each is listed with its metrics.")
    num_workers: int = Field(1, ge=1, le=4096, description="Ray Train workers per job.")
    use_gpu: bool | Literal["auto"] = Field("auto", description="Train on GPUs; auto = if the cluster has them.")
    cpus_per_worker: float | None = Field(None, gt=0, description="CPUs per worker (unset: as `rayft train` decides).")
    max_failures: int = Field(2, ge=-1, description="Worker-group restarts from the newest checkpoint before a job fails.")
    max_steps_limit: int = Field(100_000, ge=1, description="Jobs whose epochs would need more optimizer steps are refused.")


class FineTuningApiSpec(_Strict):
    """POST /v1/files and /v1/fine_tuning/jobs on the serving application (OpenAI's shapes)."""

    enabled: bool = Field(True, description="Serve the files and fine-tuning routes (false: inference only).")
    max_file_bytes: int = Field(64 * MiB, ge=1024, le=16 << 30, description="Largest training/validation file accepted (413 beyond).")
    max_request_bytes: int = Field(1 * MiB, ge=1024, le=64 * MiB, description="Largest JSON body of a fine-tuning request.")
    max_concurrent_jobs: int = Field(
        2, ge=1, le=10_000, description="Ray jobs running at once over all tenants; further jobs wait as `queued`, in order."
    )
    jobs_address: str | None = Field(
        None, description="Ray Jobs API URL jobs are submitted to (default: this cluster's dashboard, found through Ray). "
        "The API sends the cluster's token from RAY_AUTH_TOKEN or ~/.ray/auth_token; keep the Jobs API private."
    )
    forward_aws_credentials: bool = Field(
        False, description="Put the API replica's AWS_ACCESS_KEY_ID/SECRET into each job's runtime env (visible to anyone "
        "holding the cluster token); leave false when the nodes have their own credentials (instance/pod identity, Secrets)."
    )
    job_env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for every job's driver and workers.")
    poll_interval_s: float = Field(3.0, gt=0, le=600, description="How often an API replica refreshes running jobs and starts queued ones.")
    defaults: JobDefaults = Field(default_factory=JobDefaults, description="Settings of jobs that the request leaves out.")


class ServiceSpec(ServeSpec):
    """What `rayft serve` deploys: the serve spec's inference application, and with `fine_tuning` the files and
    fine-tuning jobs API on the same routes, tokens and tenants."""

    fine_tuning: FineTuningApiSpec | None = Field(
        None, description="The OpenAI-compatible files + fine-tuning jobs API (absent: inference only)."
    )

    def api_enabled(self) -> bool:
        return self.fine_tuning is not None and self.fine_tuning.enabled

    def serve_spec(self) -> ServeSpec:
        """The inference part, as serve/ reads it."""
        return ServeSpec.model_validate(self.model_dump(mode="json", exclude={"fine_tuning"}))


def parse_service_spec(raw: Any, source: str = "<serve spec>") -> ServiceSpec:
    """Validate a mapping as a ServiceSpec; raise one ServeSpecError listing every problem."""
    return parse_serve_spec(raw, source, ServiceSpec)


def load_service_spec(path: str | Path) -> ServiceSpec:
    """Read and validate a serve YAML file (with or without `fine_tuning`)."""
    return load_serve_spec(path, ServiceSpec)
