"""What reaches the console: rayft's own lines, its summary and real errors; Ray's internals only with --verbose.

Without `--verbose`, the driver keeps only the `[rayft] ...` lines of what Ray streams from its
workers and actors (Ray Train's controller and checkpoint bookkeeping, Serve's access log, library
warnings and progress bars stay in Ray's log files under the session directory,
`/tmp/ray/session_latest/logs` for a local Ray), and quiets the libraries that log at import time
in this process. A worker's error still reaches the user: as the one-line message of the error the
run raises (with --verbose: its traceback, and everything Ray printed).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

RAYFT_PREFIX = "[rayft]"

_verbose = False


def verbose() -> bool:
    """Whether the user asked for everything (`--verbose`)."""
    return _verbose


def configure(verbose: bool) -> None:
    """Set the console mode for this command; call before anything heavy is imported."""
    global _verbose
    _verbose = verbose
    if verbose:
        return
    # Progress bars of transformers/huggingface_hub ("Loading weights", "Writing model shards").
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Ray Data's execution plans and logged progress (read when ray.data is first imported).
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))
    # transformers' deprecation notices are for rayft's developers, not its users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    # bitsandbytes warns at import that its optional hub kernels are absent (the fallback works);
    # DeepSpeed announces the accelerator it picked. Filters on the loggers survive the libraries
    # resetting their levels when they configure themselves.
    for name in ("bitsandbytes", "DeepSpeed"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        logger.addFilter(_errors_only)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_ray_driver() -> None:
    """Ray's own INFO lines in this process ("Started a local Ray instance", Serve's deploy steps)."""
    if _verbose:
        return
    # Some Ray modules pin their own logger at INFO (the Jobs SDK's "Uploading package ..."): every Ray
    # logger that exists by now is lowered, not only the parent.
    names = {"ray", "ray.serve", "ray.train", "ray.tune", "ray.data"}
    names |= {name for name in logging.root.manager.loggerDict if name.startswith("ray.")}
    for name in names:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)
    # "Token authentication is enabled for this Ray cluster": Ray's default for a new local instance,
    # announced at every start. rayft keeps it on; nothing for the user to do.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def keep_rayft_lines_only() -> None:
    """Of what Ray streams from workers and actors, print only rayft's own lines.

    Call before `ray.init`: Ray binds its printer when it connects. (Ray has no public switch for
    this; `ray._private.worker.print_to_stdstream` is the printer in Ray 2.60.)
    """
    if _verbose:
        return
    from ray._private import worker

    worker.print_to_stdstream = print_rayft_lines


def print_rayft_lines(data: dict, ignore_prefix: bool = False) -> None:
    """One batch of streamed lines: the `[rayft] ...` ones, without Ray's `(Actor pid=...)` prefix."""
    sink = sys.stderr if data.get("is_err") else sys.stdout
    kept = [line[line.index(RAYFT_PREFIX):] for line in data.get("lines", []) if RAYFT_PREFIX in line]
    if kept:
        sink.write("\n".join(kept) + "\n")
        sink.flush()


def serve_logging_config() -> dict | None:
    """Serve's logging for its proxy, controller and replicas: no access log line per request unless --verbose."""
    return None if _verbose else {"log_level": "WARNING", "enable_access_log": False}
