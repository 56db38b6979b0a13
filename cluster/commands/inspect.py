"""`rayft inspect REF`: what a fine-tune changed, per layer and module, from its weights alone (evaluation/inspect.py)."""

from __future__ import annotations

import argparse
import re

from evaluation.inspect import DEFAULT_ENERGY, DEFAULT_EPSILON, DEFAULT_TOP_K

#: How the console line names the modules of a report's kind (an adapter adapts them, a fine-tune changes them).
_MODULES_WORD = {"lora": "adapted", "full": "changed"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="per layer and module: norm, spectrum, effective rank and intruder dimensions of a fine-tune",
        description="Inspect a LoRA adapter (ΔW = B·A·scale) or a fully fine-tuned model (ΔW = W - W_base): "
        "Frobenius norm, singular values, effective rank (fewest singular values holding --energy of ‖ΔW‖²) and "
        "intruder dimensions (arXiv:2410.21228: top-k singular vectors of W+ΔW whose |cosine| with every singular "
        "vector of W is below --epsilon). Prints a table and writes a PNG heatmap (layer × module).",
    )
    p.add_argument("ref", help="registry NAME[@VERSION], or a local peft adapter / transformers model directory")
    p.add_argument("--base", default=None, metavar="SOURCE",
                   help="base model: registry:NAME[@V], a local or s3:// model directory (default: the manifest's base model, "
                   "else the adapter config's base_model_name_or_path)")
    p.add_argument("--storage", default=None, help="storage URI (default: $RAYFT_STORAGE or ~/.rayft/storage)")
    p.add_argument("--energy", type=float, default=DEFAULT_ENERGY, help=f"share of ‖ΔW‖² the effective rank keeps (default {DEFAULT_ENERGY})")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help=f"top singular directions of W+ΔW checked for intruders (default {DEFAULT_TOP_K})")
    p.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON,
                   help=f"|cosine| below which a direction is an intruder (default {DEFAULT_EPSILON})")
    p.add_argument("--png", default=None, metavar="FILE", help="heatmap file (default: inspect-<name>.png in the current directory)")
    p.add_argument("--no-png", action="store_true", help="print the table only")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from evaluation.inspect import inspect_target

    report = inspect_target(args.ref, base=args.base, storage_uri=args.storage, energy=args.energy,
                            top_k=args.top_k, epsilon=args.epsilon)
    if args.json:
        print(report.model_dump_json(indent=1))
    else:
        print(f"[rayft] {report.target}: {report.kind}, {len(report.modules)} {_MODULES_WORD.get(report.kind, 'changed')} module(s), base {report.base or '-'}")
        print(report.table())
    for note in report.notes:
        print(f"[rayft] note: {note}")
    if not args.no_png:
        png = report.heatmap(args.png or f"inspect-{re.sub(r'[^A-Za-z0-9._-]+', '-', report.target).strip('-')[-60:]}.png")
        if not args.json:
            print(f"[rayft] heatmap: {png}")
    return 0
