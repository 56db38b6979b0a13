"""Following a job on the cluster: its log streamed as it is written, its status changes, its outcome."""

from __future__ import annotations

import asyncio
import re
import sys
from dataclasses import dataclass
from typing import IO

from cluster.client.jobs_client import TERMINAL_STATUSES, JobsClient
from storage.errors import first_line

@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    status: str  # SUCCEEDED, FAILED or STOPPED
    message: str  # Ray's message for the job (first line)
    error_line: str | None  # the last error line of the driver's log, if it failed

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "SUCCEEDED" else 1


def follow_job(client: JobsClient, job_id: str, out: IO[str] = sys.stdout, poll_s: float = 1.0) -> JobOutcome:
    """Stream the job's log and its status changes to `out` until it ends."""
    return asyncio.run(_follow(client, job_id, out, poll_s))


async def _follow(client: JobsClient, job_id: str, out: IO[str], poll_s: float) -> JobOutcome:
    printed: list[str] = []
    watcher = asyncio.create_task(_watch_status(client, job_id, out, poll_s))
    try:
        try:
            async for chunk in client.tail(job_id):
                out.write(chunk)
                out.flush()
                printed.append(chunk)
        except Exception as exc:  # websocket dropped (proxy, port-forward): poll the log instead
            _say(out, f"log stream interrupted ({first_line(exc)}); polling instead")
            await _poll_logs(client, job_id, out, printed, poll_s)
        await watcher  # its last line is the terminal status
    finally:
        watcher.cancel()
    info = await asyncio.to_thread(client.info, job_id)
    status = str(info.status)
    message = first_line(info.message or status)
    error = None if status == "SUCCEEDED" else last_error_line("".join(printed) or await asyncio.to_thread(client.logs, job_id))
    return JobOutcome(job_id, status, message, error)


async def _watch_status(client: JobsClient, job_id: str, out: IO[str], poll_s: float) -> str:
    """Print each status change; return the terminal status."""
    last = None
    while True:
        status = await asyncio.to_thread(client.status, job_id)
        if status != last:
            _say(out, f"job {job_id}: {status}")
            last = status
        if status in TERMINAL_STATUSES:
            return status
        await asyncio.sleep(poll_s)


async def _poll_logs(client: JobsClient, job_id: str, out: IO[str], printed: list[str], poll_s: float) -> None:
    while True:
        done = await asyncio.to_thread(client.status, job_id) in TERMINAL_STATUSES
        text = await asyncio.to_thread(client.logs, job_id)
        seen = sum(len(c) for c in printed)
        if len(text) > seen:
            out.write(text[seen:])
            out.flush()
            printed.append(text[seen:])
        if done:
            return
        await asyncio.sleep(poll_s)


_ERROR_LINE = re.compile(r"^(rayft \w+: error: .*|[\w.]*(Error|Exception)\b.*)$")


def last_error_line(logs: str) -> str | None:
    """The last line of a driver log that reads as an error (`rayft train: error: ...`, `ValueError: ...`)."""
    for line in reversed(logs.splitlines()):
        line = line.strip()
        if _ERROR_LINE.match(line):
            return line
    return None


def _say(out: IO[str], text: str) -> None:
    out.write(f"[rayft] {text}\n")
    out.flush()
