"""`rayft eval REF [REF ...] --data FILE`: generate for a held-out set with each ref, score, compare side by side."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score registry adapters / models (or local dirs) on a held-out JSONL file, side by side")
    p.add_argument("refs", nargs="+", metavar="REF",
                   help="registry name[@version] (adapter, merged or base model) or a local adapter/model directory; "
                   "the first is the baseline of the paired differences")
    p.add_argument("--data", default=None, help="JSONL rows: {prompt, completion}, {messages}, {prompt, choices, answer} or {text}")
    p.add_argument("--config", default=None, help="YAML with the fields of a job's eval: section (metrics with options, ...)")
    p.add_argument("--metric", action="append", default=None, metavar="NAME",
                   help="exact_match, contains, regex, choice_accuracy, bleu, chrf, rouge_l, perplexity or module:function "
                   "(repeat the flag; default exact_match)")
    p.add_argument("--normalize", default=None, help="comma list for exact_match/contains: strip,lower,punctuation,whitespace,articles")
    p.add_argument("--max-tokens", type=int, default=None, help="most tokens per answer (default 32)")
    p.add_argument("--stop", action="append", default=None, help="a string that ends an answer (repeatable)")
    p.add_argument("--temperature", type=float, default=None, help="0 (default) is greedy")
    p.add_argument("--max-rows", type=int, default=None, help="only the first N rows")
    p.add_argument("--actors", type=int, default=None, help="model actors per base model (default 1)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per batch (default 32)")
    p.add_argument("--base", default=None, help="base model of local adapter directories (default: the adapter's own record)")
    p.add_argument("--out", default="eval-out", help="folder for eval.png, results.json and answers.jsonl (default eval-out)")
    p.add_argument("--storage", default=None, help="storage URI of the registry (default: $RAYFT_STORAGE or ~/.rayft/storage)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(func=run)


def eval_spec_from_args(args: argparse.Namespace):
    """The EvalSpec the flags (over an optional --config file) describe; SpecError lists every problem."""
    from pydantic import ValidationError

    from storage.configs import read_yaml, validation_problems
    from trainers.eval_spec import EvalSpec
    from trainers.spec import SpecError

    raw = dict(read_yaml(args.config, SpecError, "an eval YAML file") or {}) if args.config else {}
    normalize = args.normalize.split(",") if args.normalize else None
    if args.metric:
        raw["metrics"] = [{"name": m, **({"normalize": normalize} if normalize else {})} for m in args.metric]
    elif normalize:
        raw["metrics"] = [{"name": "exact_match", "normalize": normalize}]
    flags = {"data": args.data, "max_tokens": args.max_tokens, "stop": args.stop, "temperature": args.temperature,
             "max_rows": args.max_rows, "actors": args.actors, "batch_size": args.batch_size}
    raw |= {k: v for k, v in flags.items() if v is not None}
    try:
        return EvalSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(args.config or "rayft eval", validation_problems(exc.errors(), "see `rayft eval --help`")) from None


def run(args: argparse.Namespace) -> int:
    from cluster.cli import UserError
    from evaluation.data import load_rows
    from evaluation.runner import evaluate, resolve_target
    from storage.registry import open_registry
    from storage.store import default_storage_uri
    from trainers.run import ensure_ray

    spec = eval_spec_from_args(args)
    if not spec.data:
        raise UserError("give the evaluation rows with --data FILE (or data: in --config)")
    storage = args.storage or default_storage_uri()
    # Bad refs and bad rows are reported before Ray starts.
    load_rows(spec.data, spec.max_rows)
    registry = open_registry(storage)
    targets = [resolve_target(ref, registry, args.base) for ref in args.refs]
    ensure_ray(args.address)
    report = evaluate(args.refs, spec, storage_uri=storage, targets=targets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import json

    (out / "results.json").write_text(json.dumps(report.to_json(), indent=1))
    (out / "answers.jsonl").write_text(report.answers_jsonl())
    png = report.plot(out / "eval.png")
    print("")
    print(report.table())
    print(f"[rayft] eval finished in {report.wall_s:.1f}s: {png}, {out / 'results.json'}, {out / 'answers.jsonl'}")
    return 0
