"""`rayft ft ...`: the fine-tuning API of a rayft server (service/), from a laptop with no cluster access.

A thin client over the `openai` package: the same calls an application makes. The server is
`--base-url` or RAYFT_API_URL (default http://127.0.0.1:8000/v1), the token RAYFT_API_TOKEN.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from storage.errors import RayftError

TERMINAL = ("succeeded", "failed", "cancelled")


class ApiCallFailed(RayftError):
    """The server answered with an error (its message is shown as is)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ft", help="upload files and run fine-tuning jobs through a rayft server's OpenAI-compatible API")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", default=None, help="the server's /v1 URL (default: RAYFT_API_URL, else http://127.0.0.1:8000/v1)")
    fsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    upload = fsub.add_parser("upload", parents=[common], help="upload a JSONL training file; prints its id")
    upload.add_argument("file")
    fsub.add_parser("files", parents=[common], help="your uploaded files")
    create = fsub.add_parser("create", parents=[common], help="start a fine-tuning job; prints the job")
    create.add_argument("--model", required=True, help="base model (the served base, or a registry model)")
    create.add_argument("--training-file", required=True, help="a file id, or a local JSONL file (uploaded first)")
    create.add_argument("--validation-file", default=None, help="a file id, or a local JSONL file")
    create.add_argument("--suffix", default=None)
    create.add_argument("--seed", type=int, default=None)
    create.add_argument("--epochs", default=None, help='n_epochs: a number or "auto"')
    create.add_argument("--batch-size", default=None, help='batch_size: a number or "auto"')
    create.add_argument("--lr-multiplier", default=None, help='learning_rate_multiplier: a number or "auto"')
    create.add_argument("--rayft", default=None, help='rayft\'s own settings as JSON, e.g. \'{"method": {"name": "dora", "r": 16}}\'')
    create.add_argument("--follow", "-f", action="store_true", help="print events until the job ends (exit 1 unless it succeeded)")
    fsub.add_parser("list", parents=[common], help="your fine-tuning jobs, newest first")
    for action, text in (("get", "one job"), ("cancel", "cancel a job"), ("events", "a job's events, oldest first"),
                         ("checkpoints", "a job's checkpoints and their models"), ("follow", "print events until the job ends")):
        q = fsub.add_parser(action, parents=[common], help=text)
        q.add_argument("job_id")
    p.set_defaults(func=run)


def client(base_url: str | None):
    from openai import OpenAI

    url = base_url or os.environ.get("RAYFT_API_URL") or "http://127.0.0.1:8000/v1"
    return OpenAI(base_url=url, api_key=os.environ.get("RAYFT_API_TOKEN") or "unused", max_retries=2)


def run(args: argparse.Namespace) -> int:
    import openai

    api = client(args.base_url)
    try:
        return _run(api, args)
    except openai.APIStatusError as err:
        raise ApiCallFailed(f"HTTP {err.status_code}: {err.message}") from None
    except openai.APIConnectionError as err:
        raise ApiCallFailed(f"cannot reach {api.base_url} ({err}); pass --base-url or set RAYFT_API_URL") from None


def _file_id(api, value: str | None) -> str | None:
    """A file id as is; a local path is uploaded first."""
    if value is None or value.startswith("file-"):
        return value
    path = Path(value)
    if not path.is_file():
        raise ApiCallFailed(f"{value}: neither a file id (file-...) nor a local file")
    with open(path, "rb") as fh:
        uploaded = api.files.create(file=(path.name, fh.read()), purpose="fine-tune")
    print(f"[rayft] uploaded {value} as {uploaded.id}", file=sys.stderr)
    return uploaded.id


def _number(value: str | None) -> Any:
    if value is None or value == "auto":
        return value
    return float(value) if "." in value or "e" in value else int(value)


def _run(api, args: argparse.Namespace) -> int:
    jobs = api.fine_tuning.jobs
    if args.action == "upload":
        print(_file_id(api, args.file))
    elif args.action == "files":
        for f in api.files.list():
            print(f"{f.id}  {f.bytes:>10,d} B  {f.filename}")
    elif args.action == "create":
        hyper = {k: _number(v) for k, v in (("n_epochs", args.epochs), ("batch_size", args.batch_size),
                                            ("learning_rate_multiplier", args.lr_multiplier)) if v is not None}
        extra = {"rayft": json.loads(args.rayft)} if args.rayft else None
        fields: dict[str, Any] = {"hyperparameters": hyper} if hyper else {}
        for name in ("suffix", "seed"):
            if getattr(args, name) is not None:
                fields[name] = getattr(args, name)
        validation = _file_id(api, args.validation_file)
        if validation:
            fields["validation_file"] = validation
        job = jobs.create(model=args.model, training_file=_file_id(api, args.training_file), extra_body=extra, **fields)
        print(format_job(job))
        if args.follow:
            return follow(api, job.id)
    elif args.action == "list":
        for job in jobs.list():
            print(f"{job.id}  {job.status:<16} {job.model:<20} {job.fine_tuned_model or '-'}")
    elif args.action == "get":
        print(format_job(jobs.retrieve(args.job_id)))
    elif args.action == "cancel":
        print(format_job(jobs.cancel(args.job_id)))
    elif args.action == "events":
        for event in reversed(list(jobs.list_events(args.job_id, limit=1000))):
            print(format_event(event))
    elif args.action == "checkpoints":
        for c in jobs.checkpoints.list(args.job_id):
            print(f"step {c.step_number:>6}  train_loss {c.metrics.train_loss}  valid_loss {c.metrics.valid_loss}  "
                  f"model {c.fine_tuned_model_checkpoint or '-'}")
    elif args.action == "follow":
        return follow(api, args.job_id)
    return 0


def format_job(job) -> str:
    rows = [("job", job.id), ("status", job.status), ("model", job.model), ("fine_tuned_model", job.fine_tuned_model or "-"),
            ("training_file", job.training_file), ("trained_tokens", str(job.trained_tokens or "-"))]
    if job.error is not None and job.error.message:
        rows.append(("error", job.error.message))
    return "\n".join(f"{k:<17}{v}" for k, v in rows)


def format_event(event) -> str:
    return f"{time.strftime('%H:%M:%S', time.localtime(event.created_at))} {event.level:<5} {event.message}"


def follow(api, job_id: str, poll_s: float = 2.0) -> int:
    """Print new events until the job ends; 0 if it succeeded."""
    seen: set[str] = set()
    while True:
        job = api.fine_tuning.jobs.retrieve(job_id)
        for event in reversed(list(api.fine_tuning.jobs.list_events(job_id, limit=1000))):
            if event.id not in seen:
                seen.add(event.id)
                print(format_event(event), flush=True)
        if job.status in TERMINAL:
            print(format_job(job))
            return 0 if job.status == "succeeded" else 1
        time.sleep(poll_s)
