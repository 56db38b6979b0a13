"""`rayft jobs list|status|logs|stop`: jobs on a Ray cluster (those of `rayft submit` and any other)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="list, inspect, follow or stop jobs on a Ray cluster")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=None, help="the head's Jobs API URL, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")
    jsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    jsub.add_parser("list", parents=[common], help="every job on the cluster, newest last")
    status = jsub.add_parser("status", parents=[common], help="status, times and message of one job")
    status.add_argument("job_id")
    logs = jsub.add_parser("logs", parents=[common], help="the job's log (--follow: until it ends; exit 1 unless it SUCCEEDED)")
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    stop = jsub.add_parser("stop", parents=[common], help="stop a job (its driver and everything it started)")
    stop.add_argument("job_id")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.client import console
    from cluster.client.jobs_client import JobsClient

    client = JobsClient.connect(args.address)
    console.quiet_ray_driver()  # Ray's INFO lines about uploads
    if args.action == "list":
        print(format_jobs(client.list()))
    elif args.action == "status":
        print(format_status(client.info(args.job_id)))
    elif args.action == "logs":
        if args.follow:
            from cluster.commands.submit import follow_and_report

            return follow_and_report(client, args.job_id, "jobs")
        sys.stdout.write(client.logs(args.job_id))
    elif args.action == "stop":
        if client.stop(args.job_id):
            print(f"[rayft] stop requested for job {args.job_id}")
        else:
            print(f"[rayft] job {args.job_id} had already ended ({client.status(args.job_id)})")
    return 0


def format_status(info) -> str:
    from cluster.client.jobs_client import format_time

    rows = [
        ("job", info.submission_id or info.job_id or "-"),
        ("status", str(info.status)),
        ("entrypoint", info.entrypoint),
        ("started", format_time(info.start_time)),
        ("ended", format_time(info.end_time)),
        ("message", (info.message or "-").strip().splitlines()[0] if (info.message or "").strip() else "-"),
    ]
    if info.driver_exit_code is not None:
        rows.append(("exit code", str(info.driver_exit_code)))
    return "\n".join(f"{k:<11}{v}" for k, v in rows)


def format_jobs(jobs) -> str:
    from cluster.client.jobs_client import format_time

    if not jobs:
        return "(no jobs)"
    rows = [("JOB", "STATUS", "STARTED", "ENTRYPOINT")]
    for info in sorted(jobs, key=lambda j: j.start_time or 0):
        rows.append((info.submission_id or info.job_id or "-", str(info.status), format_time(info.start_time), info.entrypoint[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r[:3], widths)), r[3]]).rstrip() for r in rows)
