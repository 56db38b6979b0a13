"""`rayft validate JOB.yaml`: check a job spec; print OK or every problem (exit 2)."""

from __future__ import annotations

import argparse

from trainers.spec import load_job_spec


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="validate a job spec file")
    p.add_argument("job", help="job YAML file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = load_job_spec(args.job)
    print(f"OK: {args.job} ({spec.method.name} on {spec.resources.num_workers} worker(s), "
          f"strategy {spec.resolved_strategy()}, publishes {spec.output.name!r})")
    return 0
