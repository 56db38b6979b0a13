"""`rayft validate FILE`: check any spec rayft reads (job, job with `tune:`, serve); print OK or every problem (exit 2).

The kind is recognised from the file's top-level sections (a serve spec has `base`/`merged`/`api`,
a job `model`/`data`/`method`/`output`, a tune job also `tune`) unless `--kind` names it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from storage.configs import ConfigError, read_yaml

KINDS = ("job", "tune", "serve")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="validate a job, tune or serve spec file")
    p.add_argument("file", help="job YAML, job YAML with a tune: section, or serve YAML")
    p.add_argument("--kind", choices=("auto",) + KINDS, default="auto",
                   help="what the file is (default auto: recognised from its top-level sections)")
    p.set_defaults(func=run)


def spec_kind(raw: Any) -> str:
    """`serve`, `tune` or `job`: the spec kind whose sections the mapping shares most (a job when unsure, so
    pydantic's problems name what is missing)."""
    from service.spec import ServiceSpec as ServeSpec  # the serve spec with the fine_tuning: section
    from trainers.spec import JobSpec

    if not isinstance(raw, dict):
        return "job"
    keys = set(raw)
    serve_only = set(ServeSpec.model_fields) - set(JobSpec.model_fields)
    job_only = set(JobSpec.model_fields) - set(ServeSpec.model_fields)
    if len(keys & serve_only) > len(keys & job_only):
        return "serve"
    return "tune" if "tune" in keys else "job"


def run(args: argparse.Namespace) -> int:
    raw = read_yaml(args.file, ConfigError, "a job or serve YAML file")
    kind = spec_kind(raw) if args.kind == "auto" else args.kind
    print(f"OK: {args.file}: {describe(raw, kind, str(Path(args.file)))}")
    return 0


def describe(raw: Any, kind: str, source: str) -> str:
    """Validate `raw` as `kind` (raising its ConfigError with every problem); a one-line summary of what it is."""
    if kind == "serve":
        from service.spec import parse_service_spec

        spec = parse_service_spec(raw, source)  # what `rayft serve` reads: a serve spec, with or without fine_tuning:
        return (f"serve spec: base {spec.base.name!r} from {spec.base.source} with adapters from the registry"
                f"{', merged ' + ', '.join(m.name for m in spec.merged) if spec.merged else ''}"
                f"{', fine-tuning API on' if spec.api_enabled() else ''}")
    from cluster.cli import UserError
    from trainers.spec import parse_job_spec

    spec = parse_job_spec(raw, source)
    what = (f"{spec.method.name} on {spec.resources.num_workers} worker(s), strategy {spec.resolved_strategy()}, "
            f"publishes {spec.output.name!r}")
    if kind == "job":
        return f"job spec: {what}"
    if spec.tune is None:
        raise UserError(f"{source}: validated as a tune job, but it has no tune: section (see examples/tune-lora.yaml)")
    searched = ", ".join(spec.tune.space.model_dump(exclude_unset=True)) or "defaults"
    samples = f"{spec.tune.num_samples} samples" if spec.tune.num_samples is not None else "the whole grid"
    return (f"tune job: {spec.tune.searcher} search over {searched} ({samples}, scheduler {spec.tune.scheduler}) "
            f"of the job: {what}")
