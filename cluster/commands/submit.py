"""`rayft submit JOB.yaml --address http://HEAD:8265`: run a rayft command on a Ray cluster.

Uploads the working dir through the Ray Jobs API (with the cluster's auth token), then streams
the job's log and status until it ends: exit 0 when it SUCCEEDED, 1 when it FAILED or was
STOPPED. `--no-wait` prints the job id and returns; `rayft jobs status|logs|stop ID` follow up.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", help="run `rayft train|tune|serve FILE` on a Ray cluster through the Jobs API",
        description="Upload the working dir and run `rayft COMMAND FILE` on a Ray cluster, streaming its log. "
        "The cluster's auth token is read from RAY_AUTH_TOKEN, the file in RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token.",
    )
    p.add_argument("job", help="job YAML (or serve config) file, inside the working dir")
    p.add_argument("--address", default=None, help="the head's Jobs API URL, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument("--command", choices=["train", "tune", "serve"], default="train", help="rayft command run on the cluster (default: train)")
    p.add_argument("--working-dir", default=None, help="directory uploaded as the job's cwd (default: the current directory)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="also leave out of the upload (.gitignore syntax; repeatable). .venv, .git, caches and outputs always are")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set a variable for the job (repeatable)")
    p.add_argument("--no-forward-env", action="store_true",
                   help="do not copy RAYFT_STORAGE, AWS_ENDPOINT_URL(_S3), AWS_REGION, AWS_DEFAULT_REGION from this shell "
                   "(the cluster's own settings apply)")
    p.add_argument("--env-from-local", action="append", default=[], metavar="NAME",
                   help="copy a variable from this shell into the job (repeatable)")
    p.add_argument("--aws-credentials", action="store_true",
                   help="copy AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN into the job (visible in its details: "
                   "prefer cluster-side credentials)")
    p.add_argument("--pip", action="append", default=[], metavar="REQ",
                   help="pip requirement to install for the job, or a requirements .txt file (repeatable)")
    p.add_argument("--image-uri", default=None, help="container image to run the job in (no working dir upload; podman on the nodes)")
    p.add_argument("--storage", default=None, help="storage URI passed to the command (--storage)")
    p.add_argument("--merge", action="store_true", help="train: also publish the merged model")
    p.add_argument("--force", action="store_true", help="train: start even when the pre-flight plan says it will not fit")
    p.add_argument("--args", default="", metavar="'ARGS'", help="further arguments for the command, as one string: --args='--resume RUN'")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following the job")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.client import console
    from cluster.client.jobs_client import JobsClient
    from cluster.client.submission import SubmitOptions, endpoint_notes, prepare_submission, submit_job

    extra = shlex.split(args.args) + (["--merge"] if args.merge else []) + (["--force"] if args.force else [])
    extra += ["--verbose"] if args.verbose else []
    job = prepare_submission(SubmitOptions(
        command=args.command, job=args.job, args=extra, working_dir=args.working_dir, excludes=args.exclude,
        env=args.env, env_from_local=args.env_from_local, aws_credentials=args.aws_credentials, forward_env=not args.no_forward_env, pip=args.pip,
        image_uri=args.image_uri, storage=args.storage,
    ), check_storage=True)
    client = JobsClient.connect(args.address)
    console.quiet_ray_driver()  # Ray's INFO lines about uploads
    for note in [*job.notes, *endpoint_notes(job.env_vars, client.address)]:
        print(f"[rayft] note: {note}", flush=True)
    job_id = submit_job(client, job)
    print(f"[rayft] submitted job {job_id} to {client.address}: {job.command_line()}", flush=True)
    if args.no_wait:
        print(job_id)
        return 0
    return follow_and_report(client, job_id)


def follow_and_report(client, job_id: str, command: str = "submit") -> int:
    """Stream the job to the end and print its outcome; Ctrl-C stops following, not the job."""
    from cluster.client.follow import follow_job

    try:
        outcome = follow_job(client, job_id)
    except KeyboardInterrupt:
        print(f"\n[rayft] stopped following; job {job_id} keeps running (rayft jobs stop {job_id} stops it)", file=sys.stderr)
        return 130
    if outcome.status == "SUCCEEDED":
        print(f"[rayft] job {job_id} SUCCEEDED", flush=True)
    else:
        # One line: the job's own error when its log has one (rayft's error line on the cluster), else Ray's message.
        why = _ERROR_PREFIX.sub("", outcome.error_line) if outcome.error_line else outcome.message
        print(f"rayft {command}: error: job {job_id} {outcome.status}: {why}", file=sys.stderr, flush=True)
    return outcome.exit_code


_ERROR_PREFIX = re.compile(r"^rayft \w+: error: ")
