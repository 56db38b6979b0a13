"""`rayft merge A B [...] --into NEW`: combine registered adapters into one adapter (or, --full, one model)."""

from __future__ import annotations

import argparse

from trainers.merge import COMBINATION_TYPES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge registered adapters (TIES, DARE, linear, SVD, ...) into one adapter or model",
        description="Combine adapters trained on the same base with peft's add_weighted_adapter and publish the "
        "result with its lineage. Adapters that peft cannot combine are refused and nothing is published.",
    )
    p.add_argument("sources", nargs="+", metavar="ADAPTER", help="registered adapters, NAME or NAME@VERSION (two or more)")
    p.add_argument("--into", required=True, metavar="NAME", help="registry name of the result (published as its next version)")
    p.add_argument("--method", choices=COMBINATION_TYPES, default="svd", metavar="METHOD",
                   help=f"peft combination type: {', '.join(COMBINATION_TYPES)} (default: svd); "
                   "linear, ties, dare_linear, dare_ties and magnitude_prune need equal ranks")
    p.add_argument("--weights", nargs="+", type=float, default=None, metavar="W",
                   help="one weight per adapter, in order (default: 1.0 each; negative subtracts a task)")
    p.add_argument("--density", type=float, default=None,
                   help="share of each update kept, in (0, 1]: required by ties, dare_* and magnitude_prune")
    p.add_argument("--majority-sign", choices=["total", "frequency"], default=None,
                   help="sign election of ties / dare_ties (default: total)")
    p.add_argument("--svd-rank", type=int, default=None, help="rank of the result for the *svd methods (default: largest source rank)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random masks of the dare methods (default: 0)")
    p.add_argument("--full", action="store_true", help="publish base + merged adapter as one transformers model (kind model)")
    p.add_argument("--storage", default=None, help="storage URI (default: $RAYFT_STORAGE or ~/.rayft/storage)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from storage.registry import open_registry
    from trainers.merge import merge_adapters, parse_merge_options

    options = parse_merge_options({
        "sources": args.sources, "into": args.into, "method": args.method, "weights": args.weights,
        "density": args.density, "majority_sign": args.majority_sign, "svd_rank": args.svd_rank,
        "seed": args.seed, "full": args.full,
    })
    result = merge_adapters(options, open_registry(args.storage))
    print(summary(result))
    return 0


def summary(result) -> str:
    """What was merged and published, in two lines."""
    m, lineage = result.manifest, result.manifest.lineage
    parts = [f"{s['ref']}×{s['weight']:g}" for s in lineage["merged_from"]]
    how = lineage["combination_type"] + (f", density {lineage['density']:g}" if lineage["density"] is not None else "")
    shape = f"r={result.rank}, " if result.rank is not None and m.kind == "adapter" else ""
    return (
        f"merged {' + '.join(parts)} ({how}) in {result.wall_s:.1f}s\n"
        f"published {m.ref} ({m.kind}, {shape}{len(m.files)} files, {m.total_size:,} bytes)"
    )
