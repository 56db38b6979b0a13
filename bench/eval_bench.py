"""Evaluation benchmark: rows/s of `rayft eval` with 1, 4 and 8 adapters of one base, against plain peft loops.

    python -m bench.eval_bench [--rows 2000] [--adapters 1 4 8] [--max-tokens 16] ...

`--rows` generations in all, split evenly over the N adapters (each adapter answers rows/N
distinct prompts), greedy, at most `--max-tokens` tokens each. Three ways to produce them:
  (a) rayft eval: Ray Data over one model actor holding the base once, on each engine of `--engines`:
      transformers (the N adapters attached by serve's adapter pool, rows grouped by adapter, a batch
      holding one adapter, `--batch` rows a batch) and vllm (vLLM's offline engine in the actor, the N
      LoRA adapters multiplexed by its kernels, `--vllm-batch` rows a batch scheduled together);
      wall time includes Ray Data start and the model load;
  (b) a plain loop of peft `generate` with batch size 1, `set_adapter` per adapter (measured on the
      first `--bs1-rows` rows and reported as a rate: it does not depend on the row count);
  (c) the same loop batched (`--batch` prompts per `generate`, left-padded), one adapter per batch
      (peft's generate takes one adapter per call).
Target (issue 17): (a) >= 3x (c) at 8 adapters. Prints a table and writes
bench/results/eval_bench.{json,md,png} (`_quick` with --quick).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_common_args, machine, markdown_table, pyplot, report, say

TARGET = 3.0
# hidden 128 / 2 heads: vLLM's CPU attention needs a head size of 64
QUICK = {"rows": 48, "adapters": [1, 4], "hidden": 128, "layers": 2, "bs1_rows": 8, "max_tokens": 8, "vllm_batch": 16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.eval_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2000, help="generations in all, split over the adapters")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 8], help="adapter counts to measure")
    p.add_argument("--max-tokens", type=int, default=16, help="most generated tokens per row")
    p.add_argument("--batch", type=int, default=32, help="rows per batch: rayft eval's batch_size and the batched loop's")
    p.add_argument("--bs1-rows", type=int, default=200, help="rows the batch-size-1 loop is timed on")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the random Llama model")
    p.add_argument("--layers", type=int, default=4, help="layers of the random Llama model")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the model actor and torch threads of the plain loops")
    p.add_argument("--engines", nargs="+", choices=["transformers", "vllm"], default=None,
                   help="rayft eval's engines to measure (default: both, vllm where it is installed)")
    p.add_argument("--vllm-batch", type=int, default=256, help="rows per batch with engine vllm (its scheduler batches them)")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.engines is None:
        from serve.spec import vllm_installed

        args.engines = ["transformers"] + (["vllm"] if vllm_installed() else [])
    return args


def plain_loop(base_dir: Path, adapter_dirs: list[Path], prompts: list[list[str]], max_tokens: int, batch: int,
               limit: int | None = None) -> tuple[float, int]:
    """(seconds, rows) of peft generate over each adapter's prompts, `batch` at a time (one adapter per call)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.padding_side = "left"
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dirs[0]), adapter_name="a0")
    for i, directory in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(str(directory), adapter_name=f"a{i}")
    model.eval()
    jobs = [(i, p) for i, chunk in enumerate(prompts) for p in chunk]
    if limit is not None:
        jobs = jobs[:limit]
    t0 = time.perf_counter()
    for i in range(len(adapter_dirs)):
        mine = [p for a, p in jobs if a == i]
        if not mine:
            continue
        model.set_adapter(f"a{i}")
        for start in range(0, len(mine), batch):
            enc = tokenizer(mine[start : start + batch], add_special_tokens=False, return_tensors="pt", padding=True)
            with torch.inference_mode():
                model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return time.perf_counter() - t0, len(jobs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAYFT_HOME", tempfile.mkdtemp(prefix="rayft-eval-bench-home-"))
    import ray
    import torch

    from storage.registry import base_config_digest_of_dir, open_registry
    from trainers.eval_spec import EvalSpec
    from trainers.tiny import build_random_lora_dir, build_tiny_model_dir, task_examples, write_jsonl

    from evaluation.runner import evaluate

    torch.set_num_threads(args.cpus)
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="rayft-eval-bench-"))
    base_dir = build_tiny_model_dir(work / "base", hidden_size=args.hidden, num_layers=args.layers,
                                    num_heads=max(2, args.hidden // 64), num_kv_heads=max(1, args.hidden // 128))
    storage = str(work / "store")
    registry = open_registry(storage)
    from cluster.commands.registry import push_directory

    push_directory(registry, str(base_dir), "bench-base", "model", None)
    digest = base_config_digest_of_dir(base_dir)
    most = max(args.adapters)
    adapter_dirs = []
    for i in range(most):
        directory = build_random_lora_dir(base_dir, work / f"lora{i}", seed=i, r=8, targets="all-linear", b_std=0.05)
        registry.publish(f"bench-lora{i}", directory, kind="adapter", base_model="registry:bench-base", base_config_digest=digest,
                         method="lora", params={}, metrics={}, lineage={})
        adapter_dirs.append(directory)
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in task_examples("reverse", args.rows, seed=3)]
    data = write_jsonl(rows, work / "rows.jsonl")

    ray.init(num_cpus=max(args.cpus, 2), include_dashboard=False, log_to_driver=False)
    results = []
    for n in args.adapters:
        per = args.rows // n
        refs = [f"bench-lora{i}" for i in range(n)]
        prompts = [[r["prompt"] for r in rows[:per]] for _ in range(n)]
        say(f"[bench] plain peft generate, batch {args.batch}")
        batched_s, batched_rows = plain_loop(base_dir, adapter_dirs[:n], prompts, args.max_tokens, args.batch)
        say("[bench] plain peft generate, batch 1")
        bs1_s, bs1_rows = plain_loop(base_dir, adapter_dirs[:n], [p[: max(1, args.bs1_rows // n)] for p in prompts],
                                     args.max_tokens, 1)
        for engine in args.engines:
            batch = args.vllm_batch if engine == "vllm" else args.batch
            spec = EvalSpec.model_validate({"data": str(data), "max_rows": per, "max_tokens": args.max_tokens, "batch_size": batch,
                                            "cpus_per_actor": args.cpus, "bootstrap": 0, "metrics": ["exact_match"],
                                            "engine": engine})
            say(f"[bench] rayft eval ({engine}): {n} adapter(s) × {per} rows")
            t0 = time.perf_counter()
            timings = evaluate(refs, spec, storage_uri=storage, quiet=True).timings
            rayft_s = time.perf_counter() - t0
            # After the first batch arrives (actors up, model loaded): the rate a long evaluation runs at.
            steady = (per * n - batch) / max(timings["last_result_s"] - timings["first_result_s"], 1e-9)
            results.append({
                "adapters": n, "engine": engine, "batch": batch, "rows": per * n, "rayft_eval_s": rayft_s,
                "rayft_rows_per_s": per * n / rayft_s, "rayft_startup_s": timings["first_result_s"],
                "rayft_steady_rows_per_s": steady if per * n >= 2 * batch else None,
                "batched_s": batched_s, "batched_rows_per_s": batched_rows / batched_s,
                "bs1_rows": bs1_rows, "bs1_s": bs1_s, "bs1_rows_per_s": bs1_rows / bs1_s,
            })
            r = results[-1]
            r["vs_batched"] = r["rayft_rows_per_s"] / r["batched_rows_per_s"]
            r["vs_bs1"] = r["rayft_rows_per_s"] / r["bs1_rows_per_s"]
            r["steady_vs_batched"] = r["rayft_steady_rows_per_s"] / r["batched_rows_per_s"] if r["rayft_steady_rows_per_s"] else None
            say(f"[bench] {n} adapters, {engine}: rayft {r['rayft_rows_per_s']:.1f} rows/s, batched loop "
                f"{r['batched_rows_per_s']:.1f}, bs1 loop {r['bs1_rows_per_s']:.1f}")
    ray.shutdown()

    table = markdown_table(
        ["adapters", "engine", "rows", "rayft eval rows/s", "start-up s", "after start-up rows/s", "peft batched rows/s",
         "peft bs=1 rows/s", "× batched", "after start-up × batched", "× bs=1"],
        [[r["adapters"], r["engine"], r["rows"], r["rayft_rows_per_s"], r["rayft_startup_s"], r["rayft_steady_rows_per_s"],
          r["batched_rows_per_s"], r["bs1_rows_per_s"], r["vs_batched"], r["steady_vs_batched"], r["vs_bs1"]] for r in results],
    )
    note = (f"\n\nModel: random Llama, hidden {args.hidden}, {args.layers} layers; LoRA r=8 all-linear adapters; greedy, at most "
            f"{args.max_tokens} tokens; batch {args.batch} (vllm: {args.vllm_batch}); {args.cpus} CPUs for the actor and the loops. rayft eval's time is "
            f"end to end (Ray Data start, actor start, model load, metrics); 'after start-up' counts from the first batch's results "
            f"on; the loops' time excludes their model load. "
            f"Target: ≥ {TARGET:g}× the batched loop at 8 adapters.")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = list(args.adapters)
    for engine in args.engines:
        ax.plot(xs, [r["rayft_rows_per_s"] for r in results if r["engine"] == engine], marker="o", label=f"rayft eval, {engine}")
    first = [r for r in results if r["engine"] == args.engines[0]]
    for key, label in (("batched_rows_per_s", f"peft generate, batch {args.batch}"), ("bs1_rows_per_s", "peft generate, batch 1")):
        ax.plot(xs, [r[key] for r in first], marker="o", linestyle="--", label=label)
    ax.set_xlabel("adapters of one base")
    ax.set_ylabel("rows/s")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    payload = {"title": "rayft eval throughput vs plain peft generate loops", "machine": info, "args": vars(args), "results": results}
    report("eval_bench", args.quick, payload, table + note, fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
