"""`rayft demo`: the whole flow on local Ray against an embedded S3 server.

Builds a tiny base model, publishes it, fine-tunes two adapters on Ray Train, scores them against
the base on held-out rows (`rayft eval`), shows the registry, then serves both adapters multiplexed
and queries them through the OpenAI client.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end-to-end demo on local Ray with an embedded S3 server")
    p.add_argument("--workdir", default="demo-out", help="where the demo writes its local files")
    p.add_argument("--steps", type=int, default=400, help="training steps per adapter")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate of the demo adapters")
    p.add_argument("--no-serve", action="store_true", help="stop after training")
    p.add_argument("--keep-serving", action="store_true",
                   help="after the queries, keep the application (and its web console) up until Ctrl-C")
    p.set_defaults(func=run)


DEMO_BASE = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def run(args: argparse.Namespace) -> int:
    from storage.local_s3 import S3Server, s3_env
    from storage.registry import open_registry
    from trainers.tiny import build_tiny_model_dir

    t0 = time.perf_counter()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    with S3Server() as s3:
        os.environ.update(s3_env(s3.endpoint_url))
        s3.ensure_bucket("rayft-demo")
        storage = "s3://rayft-demo/store"
        os.environ["RAYFT_STORAGE"] = storage
        os.environ["RAYFT_HOME"] = str(work / "home")
        banner(f"1. embedded S3 API server at {s3.endpoint_url}, storage {storage}")

        # Width 128 (~0.3M parameters, not the tests' 64): wide enough that a rank-8 q+v adapter learns to
        # reverse or upper-case the demo's 20 words in a few hundred steps (64 wide: about half of them).
        base_dir = build_tiny_model_dir(work / "tiny-llama", **DEMO_BASE)
        registry = open_registry(storage)
        from cluster.commands.registry import format_table, push_directory

        base = push_directory(registry, str(base_dir), "tiny-llama", "model", None)
        banner(f"2. tiny base model published as {base.name}@{base.version} ({base.total_size:,} bytes)")

        adapters = train_demo_adapters(storage, args.steps, args.lr)
        eval_demo_adapters(storage, base.ref, [m.ref for m in adapters], work)
        merged = merge_demo_adapters(registry, [m.name for m in adapters])
        banner("6. registry")
        print(format_table(registry.list()), flush=True)
        if not args.no_serve:
            serve_and_query(storage, [m.name for m in adapters] + [merged.name], keep_serving=args.keep_serving)
    banner(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return 0


def train_demo_adapters(storage: str, steps: int, lr: float):
    from cluster.client.ray_connect import prepare
    from trainers.run import run_training
    from trainers.spec import JobSpec, load_job_spec

    prepare(None)  # a local Ray; only rayft's lines of what its workers print reach the console

    manifests = []
    for job in ("examples/lora.yaml", "examples/upper-lora.yaml"):
        raw = load_job_spec(job).model_dump(mode="json")
        # warmup must stay below max_steps when --steps is small (a 4-step smoke run)
        raw["training"].update(max_steps=steps, lr=lr, eval_every=max(1, steps // 2), checkpoint_every=max(1, steps // 2),
                               log_every=max(1, steps // 4), warmup_steps=min(raw["training"]["warmup_steps"], steps // 10))
        raw["storage"]["uri"] = storage
        spec = JobSpec.model_validate(raw)  # the edited spec is validated like the file was
        banner(f"3. fine-tuning {spec.output.name} ({spec.method.name}) on Ray Train: {job}")
        result = run_training(spec)
        from cluster.commands.train import print_summary

        print_summary(result)
        manifests.append(result.manifests[0])
    return manifests


def eval_demo_adapters(storage: str, base: str, adapters: list[str], work: Path) -> None:
    """The base and both adapters on the same held-out rows (half reverse, half upper): one actor, one base load."""
    from evaluation.runner import evaluate
    from trainers.eval_spec import EvalSpec

    data = "examples/data/demo-heldout.jsonl"
    banner(f"4. rayft eval: {base} vs {' vs '.join(adapters)} on {data}")
    spec = EvalSpec.model_validate({"data": data, "metrics": ["exact_match", "chrf"], "max_tokens": 8})
    report = evaluate([base, *adapters], spec, storage_uri=storage)
    print(report.table(), flush=True)
    print(f"(each adapter knows its own task: half the rows; plot: {report.plot(work / 'eval.png')})", flush=True)


def merge_demo_adapters(registry, names: list[str]):
    from trainers.merge import merge_adapters, parse_merge_options

    banner(f"5. merging {' + '.join(names)} with TIES into one adapter")
    options = parse_merge_options({"sources": names, "into": "reverse-upper-ties", "method": "ties", "density": 0.5})
    result = merge_adapters(options, registry)
    print(f"published {result.manifest.name}@{result.manifest.version} (r={result.rank})", flush=True)
    return result.manifest


def serve_and_query(storage: str, adapter_names: list[str], keep_serving: bool = False) -> None:
    from cluster.serve_demo import run_demo_queries

    banner("7. Ray Serve: base model + multiplexed adapters behind the OpenAI API")
    run_demo_queries(storage, base="tiny-llama", adapters=adapter_names, keep_serving=keep_serving)
