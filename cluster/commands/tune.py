"""`rayft tune JOB.yaml`: search LoRA rank / alpha / target modules on Ray Tune, publish the best adapter.

`rayft tune --resume RUN` finishes a search whose driver died (or shows a finished one).
"""

from __future__ import annotations

import argparse

STATUS_ORDER = ("running", "pending", "completed", "stopped", "errored")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="search rank/alpha/target modules as the job's tune: section says; publish the best adapter")
    p.add_argument("job", nargs="?", help="job YAML file with a tune: section (optional with --resume: gives the storage)")
    p.add_argument("--resume", metavar="RUN", default=None, help="resume (or show) the search with this run id")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--storage", default=None, help="override storage.uri (s3://bucket/prefix or a local path)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.cli import UserError
    from cluster.client.ray_connect import prepare
    from trainers.inputs import resolve_inputs
    from trainers.spec import load_job_spec

    if args.resume:
        from trainers.tune import resume_search

        storage = args.storage or (load_job_spec(args.job).storage.uri if args.job else None)
        prepare(args.address)
        result, resumed = resume_search(args.resume, storage_uri=storage, address=args.address)
        if not resumed:
            print(f"[rayft] search {result.run_id} already finished; nothing to resume")
        print_result(result)
        return 0
    if not args.job:
        raise UserError("give a job YAML file (rayft tune JOB.yaml), or --resume RUN")
    spec = load_job_spec(args.job, {"storage.uri": args.storage} if args.storage else None)  # the flag validated with the file
    spec = resolve_inputs(spec).spec  # model, data, storage and output name, before Ray starts
    from trainers.tune import run_search

    prepare(args.address)
    result = run_search(spec, address=args.address, on_progress=show_progress, source=args.job)
    print_result(result)
    return 0


def show_progress(records: list, event: str) -> None:
    """The live view: one line per event; the whole table whenever a trial changes status."""
    print(f"[rayft] {event}", flush=True)
    if " step " not in event:
        print(format_table(records), flush=True)


def format_table(records: list) -> str:
    """Trials as a text table: status, config, progress, last and best eval loss."""
    header = ("trial", "status", "method", "r", "alpha", "targets", "lr", "dropout", "step", "eval loss", "best")
    rows = [header]
    for t in records:
        rows.append((
            t.trial_id, t.status, t.method, str(t.r), f"{t.alpha:g}", _short(t.target_modules, 24), f"{t.lr:.1e}",
            f"{t.dropout:g}", str(t.steps), _loss(t.eval_loss), _loss(t.best_eval_loss),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    counts = {s: sum(t.status == s for t in records) for s in STATUS_ORDER}
    lines.append("  " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def print_result(result) -> None:
    from trainers.tune import describe_config

    trials = result.trials
    counts = {s: sum(t.status == s for t in trials) for s in ("completed", "stopped", "errored")}
    print("")
    print(format_table(trials))
    print(
        f"[rayft] search {result.run_id} finished in {result.wall_s:.1f}s: {len(trials)} trials "
        f"({counts['completed']} completed, {counts['stopped']} stopped early by ASHA, {counts['errored']} errored); "
        f"ASHA saved {result.steps_saved} of {result.steps_run + result.steps_saved} steps"
    )
    for t in trials:
        if t.status == "errored":
            print(f"  errored          : trial {t.trial_id}: {t.error}")
    if result.winner:
        w = result.trial(result.winner)
        print(f"  winner           : trial {w.trial_id}: {describe_config(w)}, eval loss {w.eval_loss:.4f} at step {w.steps}")
    for ref in result.published:
        print(f"  published        : {ref}")
    for uri in result.files:
        print(f"  results          : {uri}")
    print(f"  resume / show    : rayft tune --resume {result.run_id} --storage {result.storage_uri}")
