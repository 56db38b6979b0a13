"""Serving benchmark: N adapters, C concurrent clients, fixed prompt and output lengths.

    python -m bench.serve_bench [--adapters 8] [--clients 64] [--requests 256] ...

Measures, on a local Ray + Serve + embedded S3 server, through the real HTTP API:
  (a) mixed-adapter batching: one base deployment, every adapter multiplexed, rows of
      different adapters share forward passes (max_batch_size = --batch);
  (b) adapter switching without batching: the same deployment with max_batch_size 1;
  (c) one merged model per adapter: N plain deployments (merged at load), each batching
      only its own requests;
  and cold vs warm latency of an adapter's first and later requests (cold = fetched from
  S3, verified and attached on demand).
Prints a table and writes bench/results/serve_bench.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=8, help="number of LoRA adapters")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients")
    p.add_argument("--requests", type=int, default=256, help="requests per scenario")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens")
    p.add_argument("--max-tokens", type=int, default=16, help="generated tokens per request (fixed: no early stop)")
    p.add_argument("--batch", type=int, default=32, help="max_batch_size of the batching scenarios")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the random Llama model")
    p.add_argument("--layers", type=int, default=4, help="layers of the random Llama model")
    p.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="where the JSON and PNG go")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_artifacts(work: Path, storage: str, args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """Publish the base model and N random LoRA adapters; returns (adapter names, a prompt's token ids)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from storage.registry import base_config_digest_of_dir, open_registry
    from trainers.tiny import build_tiny_model_dir

    base_dir = build_tiny_model_dir(work / "base", hidden_size=args.hidden, num_layers=args.layers,
                                    num_heads=max(4, args.hidden // 64), num_kv_heads=max(2, args.hidden // 128))
    registry = open_registry(storage)
    digest = base_config_digest_of_dir(base_dir)
    registry.publish("bench-base", base_dir, kind="model", base_model="bench-base", base_config_digest=digest,
                     method=None, params={}, metrics={}, lineage={})
    names = []
    for i in range(args.adapters):
        torch.manual_seed(i)
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                    peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules="all-linear"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.02)
        model.save_pretrained(work / f"adapter-{i}")
        registry.publish(f"bench-{i}", work / f"adapter-{i}", kind="adapter", base_model="bench-base",
                         base_config_digest=digest, method="lora", params={}, metrics={}, lineage={})
        names.append(f"bench-{i}")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    words = tokenizer(" ".join(["apple river stone cloud"] * args.prompt_tokens), add_special_tokens=False).input_ids
    return names, words[: args.prompt_tokens]


def spec_for(storage: str, *, batch: int, adapters: int, merged: list[str], cpus: int):
    from serve.spec import parse_serve_spec

    per_merged = max(0.1, (cpus - 1.2) / max(len(merged), 1))
    return parse_serve_spec({
        "storage": storage,
        "base": {"name": "bench-base", "source": "registry:bench-base",
                 "deployment": {"cpus": 1, "max_ongoing_requests": 256},
                 "batch": {"max_batch_size": batch, "max_wait_ms": 5},
                 "adapters": {"max_per_replica": max(adapters, 1)}},
        "merged": [{"name": f"{m}-merged", "adapter": m, "batch": {"max_batch_size": batch, "max_wait_ms": 5},
                    "deployment": {"cpus": per_merged, "max_ongoing_requests": 256}} for m in merged],
        "api": {"max_tokens_limit": 4096, "max_prompt_tokens": 4096,
                "deployment": {"cpus": 0.1, "max_ongoing_requests": 1024}},
    }, "bench spec")


async def run_load(url: str, models: list[str], prompt: str, args: argparse.Namespace) -> dict:
    """`--requests` requests over `models` (round robin) from `--clients` concurrent clients."""
    import httpx

    limit = asyncio.Semaphore(args.clients)
    latencies: list[float] = []
    failures = 0
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=args.clients)) as client:
        async def one(i: int) -> None:
            nonlocal failures
            async with limit:
                t0 = time.perf_counter()
                response = await client.post(f"{url}/v1/completions", json={**body, "model": models[i % len(models)]})
                latencies.append(time.perf_counter() - t0)
                failures += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.requests)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": args.requests, "failures": failures, "wall_s": wall,
        "req_per_s": args.requests / wall, "tokens_per_s": args.requests * args.max_tokens / wall,
        "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


async def cold_warm(url: str, models: list[str], prompt: str, max_tokens: int) -> dict:
    """First request to each adapter (cold: loaded on demand) vs its next two (warm), one client."""
    import httpx

    cold, warm = [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for model in models:
            for attempt in range(3):
                t0 = time.perf_counter()
                response = await client.post(f"{url}/v1/completions",
                                             json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
                response.raise_for_status()
                (cold if attempt == 0 else warm).append(1000 * (time.perf_counter() - t0))
    return {"cold_p50_ms": statistics.median(cold), "warm_p50_ms": statistics.median(warm),
            "cold_ms": cold, "warm_ms": warm}


def deploy(spec, name: str) -> None:
    from ray import serve

    from serve.app import build_app

    serve.run(build_app(spec), name=name, route_prefix=f"/{name}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    from ray import serve

    from storage.local_s3 import S3Server, s3_env

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": vars(args)}
    with S3Server() as s3, tempfile.TemporaryDirectory(prefix="rayft-serve-bench-") as tmp:
        os.environ.update(s3_env(s3.endpoint_url))
        os.environ["RAYFT_HOME"] = str(Path(tmp) / "home")  # a cold local cache: cold starts really download
        s3.ensure_bucket("bench")
        storage = "s3://bench/store"
        print(f"[bench] publishing a random Llama (hidden {args.hidden}, {args.layers} layers) and {args.adapters} adapters",
              flush=True)
        adapters, prompt_ids = make_artifacts(Path(tmp), storage, args)
        from transformers import AutoTokenizer

        from storage.registry import open_registry

        prompt = AutoTokenizer.from_pretrained(open_registry(storage).download("bench-base")).decode(prompt_ids)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        root = f"http://127.0.0.1:{port}"
        try:
            scenarios = [
                ("mixed_batching", spec_for(storage, batch=args.batch, adapters=len(adapters), merged=[], cpus=args.cpus), adapters),
                ("no_batching", spec_for(storage, batch=1, adapters=len(adapters), merged=[], cpus=args.cpus), adapters),
                ("merged_per_adapter", spec_for(storage, batch=args.batch, adapters=1, merged=adapters, cpus=args.cpus),
                 [f"{a}-merged" for a in adapters]),
            ]
            for name, spec, models in scenarios:
                print(f"[bench] {name}: deploying", flush=True)
                deploy(spec, name)
                url = f"{root}/{name}"
                if name == "mixed_batching":
                    results["cold_warm"] = asyncio.run(cold_warm(url, models, prompt, args.max_tokens))
                else:
                    asyncio.run(cold_warm(url, models, prompt, 2))  # warm up: every adapter / model loaded
                results[name] = asyncio.run(run_load(url, models, prompt, args))
                if name != "merged_per_adapter":
                    results[name]["engine"] = serve.get_deployment_handle("BaseModel", name).stats.remote().result()["engine"]
                serve.delete(name)
                print(f"[bench] {name}: {results[name]['req_per_s']:.1f} req/s", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    results["speedup_mixed_vs_no_batching"] = results["mixed_batching"]["req_per_s"] / results["no_batching"]["req_per_s"]
    print_table(results)
    (out / "serve_bench.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "serve_bench.png")
    print(f"[bench] wrote {out / 'serve_bench.json'} and {out / 'serve_bench.png'}")
    return 0


def print_table(results: dict) -> None:
    cfg = results["config"]
    print(f"\n{cfg['adapters']} adapters, {cfg['clients']} clients, {cfg['requests']} requests, "
          f"{cfg['prompt_tokens']} prompt + {cfg['max_tokens']} output tokens each")
    print(f"{'scenario':22} {'req/s':>8} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6} {'rows/pass':>9}")
    for name in ("mixed_batching", "no_batching", "merged_per_adapter"):
        r = results[name]
        engine = r.get("engine")
        rows = f"{engine['rows'] / max(engine['steps'], 1):.1f}" if engine else "-"
        print(f"{name:22} {r['req_per_s']:8.1f} {r['tokens_per_s']:8.0f} {r['p50_ms']:8.0f} {r['p99_ms']:8.0f} "
              f"{r['failures']:6d} {rows:>9}")
    cw = results["cold_warm"]
    print(f"adapter latency, one client: cold (first request, loaded from S3) p50 {cw['cold_p50_ms']:.0f} ms, "
          f"warm p50 {cw['warm_p50_ms']:.0f} ms")
    print(f"mixed-adapter batching vs no batching: {results['speedup_mixed_vs_no_batching']:.2f}x throughput")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["mixed_batching", "no_batching", "merged_per_adapter"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.bar(names, [results[n]["req_per_s"] for n in names], color=["tab:green", "tab:red", "tab:blue"])
    left.set_ylabel("requests / s")
    left.set_title("throughput")
    x = range(len(names))
    right.bar([i - 0.2 for i in x], [results[n]["p50_ms"] for n in names], width=0.4, label="p50")
    right.bar([i + 0.2 for i in x], [results[n]["p99_ms"] for n in names], width=0.4, label="p99")
    right.set_xticks(list(x), names)
    right.set_ylabel("latency, ms")
    right.set_title("latency")
    right.legend()
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
