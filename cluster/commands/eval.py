"""`rayft eval REF [REF ...] --data FILE`: generate for a held-out set with each ref, score, compare side by side;
`--lm-eval-tasks DIR --tasks NAME`: lm-evaluation-harness tasks from local files (optional extra), same refs."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score registry adapters / models (or local dirs) on a held-out JSONL file, side by side")
    p.add_argument("refs", nargs="+", metavar="REF",
                   help="registry name[@version] (adapter, merged or base model) or a local adapter/model directory; "
                   "the first is the baseline of the paired differences")
    p.add_argument("--data", default=None, help="JSONL rows: {prompt, completion}, {messages}, {prompt, choices, answer} or {text}")
    p.add_argument("--lm-eval-tasks", default=None, metavar="DIR",
                   help="also run lm-evaluation-harness tasks whose YAML files (and local data) are in DIR; nothing is "
                   "downloaded; needs the optional extra: pip install 'rayft[lm-eval]'")
    p.add_argument("--tasks", default=None, metavar="NAME[,NAME]", help="with --lm-eval-tasks: the harness task names to run")
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
    p.add_argument("--engine", choices=["transformers", "vllm"], default=None,
                   help="what decodes: transformers (default; every peft method) or vllm (plain LoRA adapters, continuous batching)")
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
             "max_rows": args.max_rows, "actors": args.actors, "batch_size": args.batch_size, "engine": args.engine}
    raw |= {k: v for k, v in flags.items() if v is not None}
    try:
        return EvalSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(args.config or "rayft eval", validation_problems(exc.errors(), "see `rayft eval --help`")) from None


def run(args: argparse.Namespace) -> int:
    from cluster.cli import UserError
    from evaluation.data import load_rows
    from evaluation.runner import check_engine, evaluate, resolve_target
    from storage.registry import open_registry
    from storage.store import default_storage_uri
    from trainers.run import ensure_ray

    spec = eval_spec_from_args(args)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if tasks and not args.lm_eval_tasks:
        raise UserError("--tasks names lm-evaluation-harness tasks: give the folder of their YAML files with --lm-eval-tasks DIR")
    if not spec.data and not args.lm_eval_tasks:
        raise UserError("give the evaluation rows with --data FILE (or data: in --config), or harness tasks with --lm-eval-tasks DIR --tasks NAME")
    storage = args.storage or default_storage_uri()
    # Bad refs, bad rows and missing harness tasks are reported before Ray starts.
    if spec.data:
        load_rows(spec.data, spec.max_rows)
    if args.lm_eval_tasks:
        from evaluation.harness import load_tasks

        load_tasks(args.lm_eval_tasks, tasks)
    registry = open_registry(storage)
    targets = [resolve_target(ref, registry, args.base) for ref in args.refs]
    check_engine(targets, spec.engine)
    ensure_ray(args.address)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import json

    results: dict = {}
    written = []
    if spec.data:
        report = evaluate(args.refs, spec, storage_uri=storage, targets=targets)
        results = report.to_json()
        (out / "answers.jsonl").write_text(report.answers_jsonl())
        written += [report.plot(out / "eval.png"), out / "answers.jsonl"]
        print("")
        print(report.table())
    if args.lm_eval_tasks:
        from evaluation.harness import run_harness

        harness = run_harness(targets, args.lm_eval_tasks, tasks, spec, storage_uri=storage)
        results["lm_eval"] = harness.to_json()
        (out / "lm-eval-samples.jsonl").write_text(harness.samples_jsonl())
        written.append(out / "lm-eval-samples.jsonl")
        print("")
        print(harness.table())
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"[rayft] eval finished: {', '.join(str(p) for p in [out / 'results.json', *written])}")
    return 0
