"""Serving benchmark: N adapters, C concurrent clients, fixed prompt and output lengths.

    python -m bench.serve_bench [--adapters 8] [--clients 64] [--requests 256] ...

Measures, on a local Ray + Serve + embedded S3 server, through the real HTTP API:
  (a) mixed-adapter batching: one base deployment, every adapter multiplexed, rows of
      different adapters share forward passes (max_batch_size = --batch);
  (b) adapter switching without batching: the same deployment with max_batch_size 1;
  (c) one merged model per adapter: N plain deployments (merged at load), each batching
      only its own requests;
  and, with one client and nothing else running, the latency of an unmerged adapter (base
  deployment, adapter attached) vs the same adapter merged (its own deployment, same CPUs),
  requests alternating, median of --latency-repeats pairs (target: <= 1.3x);
  and cold vs warm latency of an adapter's first and later requests (cold = fetched from
  S3, verified and attached on demand).
Prints a table and writes bench/results/serve_bench.{json,md,png} (`_quick` with --quick).

    python -m bench.serve_bench --engines [--quick]     (also: python -m bench.serve_engines_bench)

runs the engine side by side instead, at each of --engine-hidden: rayft with `engine: transformers`,
rayft with `engine: vllm`, and bare Ray Serve LLM (`build_openai_app` on the same files, adapters
from the same S3 server), with the adapters and with the base model only: the transformers row
alone on the machine, the two vLLM rows deployed together and measured in turns (--repeats
rounds, order swapped each round); plus greedy outputs compared across the three for every
adapter. Writes bench/results/serve_engines.{json,md} (target: the median of the paired ratios
rayft vllm / bare Ray Serve LLM >= 0.95x).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_common_args, load_now, machine, markdown_table, median, pyplot, report, say

#: Issue 10 §3: mixed batching >= 3x no batching (req/s); unmerged single-request latency <= 1.3x merged.
TARGET_BATCHING = 3.0
TARGET_UNMERGED = 1.3
QUICK = {"adapters": 2, "clients": 8, "requests": 32, "hidden": 128, "layers": 2, "latency_repeats": 5,
         "latency_hidden": [128], "engine_hidden": [256], "repeats": 2}
#: Issue 16: what rayft adds around vLLM costs at most 5% of bare Ray Serve LLM's throughput.
TARGET_VLLM_VS_BARE = 0.95


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
    p.add_argument("--latency-repeats", type=int, default=20, help="one-client request pairs (unmerged, merged)")
    p.add_argument("--latency-hidden", type=int, nargs="+", default=[256, 1024],
                   help="hidden sizes of the models the one-client latency is measured on (each its own base)")
    p.add_argument("--engines", action="store_true",
                   help="run the engine side by side (transformers / vllm / bare Ray Serve LLM) instead of the scenarios")
    p.add_argument("--engine-hidden", type=int, nargs="+", default=[256, 1024],
                   help="hidden sizes of the side by side (head size 64: hidden/64 heads)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of the two vLLM rows measured in turns (the target is the median of their paired ratios)")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_artifacts(work: Path, storage: str, args: argparse.Namespace, *, base: str = "bench-base",
                   hidden: int | None = None, adapters: int | None = None) -> tuple[list[str], list[int]]:
    """Publish a random base model `base` and random LoRA adapters on it; returns (adapter names, a prompt's ids)."""
    from transformers import AutoTokenizer

    from storage.registry import base_config_digest_of_dir, open_registry
    from trainers.tiny import build_random_lora_dir, build_tiny_model_dir

    hidden = hidden or args.hidden
    # Head size 64 (hidden 256 and up): the one vLLM's CPU attention and the transformers engine both run.
    base_dir = build_tiny_model_dir(work / base, hidden_size=hidden, num_layers=args.layers,
                                    num_heads=max(4, hidden // 64), num_kv_heads=max(2, hidden // 128))
    registry = open_registry(storage)
    digest = base_config_digest_of_dir(base_dir)
    registry.publish(base, base_dir, kind="model", base_model=base, base_config_digest=digest,
                     method=None, params={}, metrics={}, lineage={})
    names = []
    prefix = "bench" if base == "bench-base" else base
    for i in range(args.adapters if adapters is None else adapters):
        build_random_lora_dir(base_dir, work / f"{prefix}-{i}", seed=i, r=8, alpha=16, targets="all-linear", b_std=0.02)
        registry.publish(f"{prefix}-{i}", work / f"{prefix}-{i}", kind="adapter", base_model=base,
                         base_config_digest=digest, method="lora", params={}, metrics={}, lineage={})
        names.append(f"{prefix}-{i}")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    words = tokenizer(" ".join(["apple river stone cloud"] * args.prompt_tokens), add_special_tokens=False).input_ids
    return names, words[: args.prompt_tokens]


def spec_for(storage: str, *, batch: int, adapters: int, merged: list[str], cpus: int, merged_cpus: float | None = None,
             base: str = "bench-base", engine: str = "transformers"):
    from serve.spec import parse_serve_spec

    per_merged = merged_cpus if merged_cpus is not None else max(0.1, (cpus - 1.2) / max(len(merged), 1))
    vllm = {"engine": "vllm", "vllm": {**VLLM_SETTINGS, "max_loras": max(adapters, 1)}} if engine == "vllm" else {}
    return parse_serve_spec({
        **vllm,
        "storage": storage,
        "base": {"name": base, "source": f"registry:{base}",
                 "deployment": {"cpus": 1, "max_ongoing_requests": 256},
                 "batch": {"max_batch_size": batch, "max_wait_ms": 5},
                 "adapters": {"max_per_replica": max(adapters, 1)}},
        "merged": [{"name": f"{m}-merged", "adapter": m, "batch": {"max_batch_size": batch, "max_wait_ms": 5},
                    "deployment": {"cpus": per_merged, "max_ongoing_requests": 256}} for m in merged],
        "api": {"max_tokens_limit": 4096, "max_prompt_tokens": 4096,
                "deployment": {"cpus": 0.1, "max_ongoing_requests": 1024}},
    }, "bench spec")


async def run_load(url: str, models: list[str], prompt: str | list[int], args: argparse.Namespace) -> dict:
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


async def unmerged_vs_merged(url: str, adapter: str, prompt: str, max_tokens: int, repeats: int) -> dict:
    """One client, one request at a time: `adapter` through the base deployment vs `<adapter>-merged`.

    The two alternate (and swap which goes first every pair) so that load on the shared machine
    falls on both alike; the ratio is the median of the per-pair ratios.
    """
    import httpx

    async def timed(client, model: str) -> float:
        t0 = time.perf_counter()
        response = await client.post(f"{url}/v1/completions",
                                     json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        response.raise_for_status()
        return 1000 * (time.perf_counter() - t0)

    unmerged, merged = [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for model in (adapter, f"{adapter}-merged"):  # both loaded before anything is timed
            await timed(client, model)
        for i in range(repeats):
            if i % 2 == 0:
                unmerged.append(await timed(client, adapter))
                merged.append(await timed(client, f"{adapter}-merged"))
            else:
                merged.append(await timed(client, f"{adapter}-merged"))
                unmerged.append(await timed(client, adapter))
    return {"adapter": adapter, "repeats": repeats, "unmerged_p50_ms": median(unmerged), "merged_p50_ms": median(merged),
            "ratio": median([u / m for u, m in zip(unmerged, merged)]), "unmerged_ms": unmerged, "merged_ms": merged}


def deploy(spec, name: str) -> None:
    from ray import serve

    from serve.app import build_app

    serve.run(build_app(spec), name=name, route_prefix=f"/{name}")


def run(args: argparse.Namespace) -> dict:
    """Every scenario on one local Ray + Serve + S3 server; returns the figures."""
    import ray
    from ray import serve

    from storage.local_s3 import S3Server, s3_env

    results: dict = {"title": "Serving: mixed-adapter batching, switching, merged models", "machine": machine(),
                     "quick": args.quick, "config": {k: v for k, v in vars(args).items() if k != "quick"},
                     "targets": {"mixed_vs_no_batching_min": TARGET_BATCHING, "unmerged_vs_merged_max": TARGET_UNMERGED}}
    with S3Server() as s3, tempfile.TemporaryDirectory(prefix="rayft-serve-bench-") as tmp:
        os.environ.update(s3_env(s3.endpoint_url))
        os.environ["RAYFT_HOME"] = str(Path(tmp) / "home")  # a cold local cache: cold starts really download
        s3.ensure_bucket("bench")
        storage = "s3://bench/store"
        say(f"[bench] publishing a random Llama (hidden {args.hidden}, {args.layers} layers) and {args.adapters} adapters")
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
                say(f"[bench] {name}: deploying")
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
                say(f"[bench] {name}: {results[name]['req_per_s']:.1f} req/s")
            results["single_request"] = []
            for hidden in args.latency_hidden:
                # Same CPUs for the base replica and the merged one: the difference is the adapter's own cost.
                base = f"lat{hidden}"
                (adapter,), _ = make_artifacts(Path(tmp), storage, args, base=base, hidden=hidden, adapters=1)
                say(f"[bench] single_request: hidden {hidden}, {adapter} unmerged vs merged, {args.latency_repeats} pairs")
                app = f"single_request_{hidden}"
                deploy(spec_for(storage, batch=args.batch, adapters=1, merged=[adapter], cpus=args.cpus, merged_cpus=1,
                                base=base), app)
                row = asyncio.run(unmerged_vs_merged(f"{root}/{app}", adapter, prompt, args.max_tokens, args.latency_repeats))
                results["single_request"].append({"hidden": hidden, "layers": args.layers, **row})
                serve.delete(app)
                say(f"[bench] single_request: hidden {hidden}: {row['ratio']:.2f}x")
        finally:
            serve.shutdown()
            ray.shutdown()
    results["speedup_mixed_vs_no_batching"] = results["mixed_batching"]["req_per_s"] / results["no_batching"]["req_per_s"]
    # The headline is the largest model: the closest to what is served, where the adapter's matmuls and
    # not per-layer Python dominate (the smaller rows show how the ratio shrinks with size).
    results["unmerged_vs_merged_latency"] = results["single_request"][-1]["ratio"]
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engines:
        # Written after each model size too: on a busy machine the second size may not finish.
        run_engines(args, lambda partial: report("serve_engines", args.quick, partial, engines_table(partial)))
        return 0
    results = run(args)
    report("serve_bench", args.quick, results, table(results), plot(results))
    return 0


# --------------------------------------------------------------------------- engines side by side

#: The vLLM settings of both vLLM rows (rayft's engine and bare Ray Serve LLM), so they differ only in what is around vLLM.
VLLM_SETTINGS = {"max_lora_rank": 8, "cpu_kv_cache_gib": 1}
ENGINES = ("rayft_transformers", "rayft_vllm", "bare_serve_llm")


def bare_serve_llm_app(base: str, base_dir: str, lora_uri: str, adapters: int, max_model_len: int):
    """Ray Serve LLM's own OpenAI app (`build_openai_app`) on the same model and adapter files, as its docs set it up."""
    from ray.serve.llm import LLMConfig, build_openai_app

    config = LLMConfig(
        model_loading_config={"model_id": base, "model_source": base_dir},
        lora_config={"dynamic_lora_loading_path": lora_uri, "max_num_adapters_per_replica": max(adapters, 1)},
        engine_kwargs={"enable_lora": True, "max_lora_rank": VLLM_SETTINGS["max_lora_rank"], "max_loras": max(adapters, 1),
                       "max_cpu_loras": max(adapters, 1), "dtype": "float32", "max_model_len": max_model_len},
        placement_group_config={"bundles": [{"CPU": 1}]},
        deployment_config={"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 256, "num_replicas": 1},
        # VLLM_PLUGINS="": without rayft's vLLM plugin (serve.vllm_cpu_lora), as where rayft is not installed
        runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
                     | {"VLLM_CPU_KVCACHE_SPACE": str(VLLM_SETTINGS["cpu_kv_cache_gib"]), "VLLM_PLUGINS": ""}},
    )
    return build_openai_app({"llm_configs": [config]})


def bare_serve_llm_problem() -> str | None:
    """Why bare Ray Serve LLM cannot answer in this environment, if it cannot.

    Ray 2.60's `serve.ingress` makes a class's methods routes by giving `self` a dependency default and
    including the router again; FastAPI >= 0.137 keeps included routes as they were analysed, so `self`
    stays a required query parameter and Ray Serve LLM's OpenAI ingress answers every request 400
    ("Field required at ('query', 'self')"). rayft's ingress passes itself as a dependency and is not
    affected; vllm-cpu 0.29 itself asks for fastapi<0.137.
    """
    import fastapi
    from packaging.version import Version

    if Version(fastapi.__version__) < Version("0.137"):
        return None
    return (f"the bare Ray Serve LLM row needs fastapi<0.137 (installed: {fastapi.__version__}, with which Ray 2.60's "
            "serve.ingress leaves `self` a query parameter and Ray Serve LLM answers every request 400). Run the bench "
            "over an overlay: .venv/bin/pip install --no-deps --target .bench-fastapi 'fastapi<0.137' && "
            "PYTHONPATH=.bench-fastapi .venv/bin/python -m bench.serve_engines_bench")


def valid_text(text: str) -> str:
    """`text` without U+FFFD. A random model emits bytes that are not UTF-8; vLLM's detokenizer holds back
    text ending in an incomplete character (so such an answer can come back empty), rayft's transformers
    engine sends U+FFFD for it at the end: the engines are compared on the characters both decode."""
    return text.replace("\ufffd", "")


def upload_adapters(work: Path, storage_bucket: str, prefix: str, names: list[str]) -> str:
    """The adapters as Ray Serve LLM expects them: s3://bucket/prefix/<name>/{adapter_config.json, adapter_model.safetensors}."""
    import boto3

    client = boto3.client("s3")
    for name in names:
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            client.upload_file(str(work / name / file), storage_bucket, f"{prefix}/{name}/{file}")
    return f"s3://{storage_bucket}/{prefix}"


async def greedy_texts(url: str, models: list[str], prompt: str | list[int], max_tokens: int, headers: dict | None = None) -> list[str]:
    import httpx

    texts = []
    async with httpx.AsyncClient(timeout=600, headers=headers) as client:
        for model in models:
            response = await client.post(f"{url}/v1/completions",
                                         json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
            if response.status_code >= 400:  # the engine's own message says why (Ray Serve LLM's 400s carry it)
                raise RuntimeError(f"{url} model {model!r}: HTTP {response.status_code}: {response.text[:1000]}")
            texts.append(response.json()["choices"][0]["text"])
    return texts


async def mixed_traffic_texts(url: str, models: list[str], prompt: str | list[int], max_tokens: int,
                              clients: int = 8, rounds: int = 4) -> list[tuple[int, str]]:
    """Greedy answers with base and adapter requests in flight together (`clients` at a time, the models in
    turn, `rounds` times): (index into `models`, text) for each. On vLLM's CPU backend a base row batched with
    adapter rows used to get the last slot's adapter (serve.vllm_engine); compared with the one-at-a-time answers."""
    import httpx

    limit = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> tuple[int, str]:
            async with limit:
                response = await client.post(f"{url}/v1/completions", json={
                    "model": models[i % len(models)], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
                response.raise_for_status()
                return i % len(models), response.json()["choices"][0]["text"]

        return await asyncio.gather(*(one(i) for i in range(rounds * len(models))))


def run_engines(args: argparse.Namespace, on_size_done=None) -> dict:
    """The three engines at each hidden size, one deployment on the machine at a time; `on_size_done(results)`
    after each size."""
    import ray
    from ray import serve

    from storage.local_s3 import S3Server, s3_env
    from storage.registry import open_registry

    problem = bare_serve_llm_problem()
    if problem is not None:
        raise SystemExit(f"bench.serve_engines_bench: {problem}")
    hiddens = args.engine_hidden
    results: dict = {"title": "Serving engines side by side: rayft transformers, rayft vLLM, bare Ray Serve LLM",
                     "machine": machine(), "quick": args.quick,
                     "config": {k: v for k, v in vars(args).items() if k != "quick"}, "vllm_settings": VLLM_SETTINGS,
                     "targets": {"rayft_vllm_vs_bare_min": TARGET_VLLM_VS_BARE}, "rows": []}
    with S3Server() as s3, tempfile.TemporaryDirectory(prefix="rayft-serve-engines-") as tmp:
        os.environ.update(s3_env(s3.endpoint_url))
        os.environ["RAYFT_HOME"] = str(Path(tmp) / "home")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(VLLM_SETTINGS["cpu_kv_cache_gib"]))
        s3.ensure_bucket("bench")
        storage = "s3://bench/store"
        # Ray Serve LLM's own ingress needs logical CPUs beside the replica's bundle (STACK-NOTES); placement only.
        ray.init(num_cpus=max(args.cpus, 8), include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        root = f"http://127.0.0.1:{port}"
        try:
            for hidden in hiddens:
                base = f"eng{hidden}"
                say(f"[bench] engines: a random Llama (hidden {hidden}, {args.layers} layers) and {args.adapters} adapters")
                adapters, prompt_ids = make_artifacts(Path(tmp), storage, args, base=base, hidden=hidden)
                base_dir = str(open_registry(storage).download(base))
                from transformers import AutoTokenizer

                prompt = AutoTokenizer.from_pretrained(base_dir).decode(prompt_ids)
                lora_uri = upload_adapters(Path(tmp), "bench", f"lora/{base}", adapters)
                max_len = args.prompt_tokens + args.max_tokens + 64
                outputs, deployed = {}, {}

                def deploy_engine(engine: str) -> None:
                    app = f"{engine}_{hidden}"
                    say(f"[bench] engines: hidden {hidden}, {engine}: deploying")
                    t0 = time.perf_counter()
                    if engine == "bare_serve_llm":
                        serve.run(bare_serve_llm_app(base, base_dir, lora_uri, len(adapters), max_len), name=app, route_prefix=f"/{app}")
                        # Ray Serve LLM names adapters base:folder and tokenizes a text prompt with special tokens:
                        # the same token ids as rayft's prompt are sent as ids.
                        models, sent = [f"{base}:{a}" for a in adapters], prompt_ids
                    else:
                        spec = spec_for(storage, batch=args.batch, adapters=len(adapters), merged=[], cpus=args.cpus,
                                        base=base, engine=engine.removeprefix("rayft_"))
                        deploy(spec, app)
                        models, sent = adapters, prompt
                    url = f"{root}/{app}"
                    outputs[engine] = asyncio.run(greedy_texts(url, [base, *models], sent, args.max_tokens))  # also warms up
                    mixed = asyncio.run(mixed_traffic_texts(url, [base, *models], sent, args.max_tokens))
                    results.setdefault("mixed_traffic_wrong", {}).setdefault(str(hidden), {})[engine] = {
                        "wrong_base": sum(i == 0 and valid_text(t) != valid_text(outputs[engine][0]) for i, t in mixed),
                        "wrong_adapter": sum(i > 0 and valid_text(t) != valid_text(outputs[engine][i]) for i, t in mixed),
                        "requests": len(mixed)}
                    deployed[engine] = {"app": app, "url": url, "models": models, "sent": sent,
                                        "deploy_s": time.perf_counter() - t0, "runs": []}

                def measure(engine: str) -> None:
                    d = deployed[engine]
                    load_before = load_now()
                    with_adapters = asyncio.run(run_load(d["url"], d["models"], d["sent"], args))
                    base_only = asyncio.run(run_load(d["url"], [base], d["sent"], args))
                    # The machine's 1-minute load average around the runs: other work on a shared machine shows here.
                    d["runs"].append({"adapters": with_adapters, "base_only": base_only, "load_avg": [load_before, load_now()]})
                    say(f"[bench] engines: hidden {hidden}, {engine}: {with_adapters['req_per_s']:.1f} req/s with adapters, "
                        f"{base_only['req_per_s']:.1f} base only")

                def finish(engine: str) -> None:
                    d = deployed.pop(engine)
                    serve.delete(d["app"])
                    results["rows"].append({"hidden": hidden, "layers": args.layers, "engine": engine, "deploy_s": d["deploy_s"],
                                            **median_run(d["runs"]), "runs": d["runs"]})

                # The transformers engine alone on the machine.
                deploy_engine("rayft_transformers")
                measure("rayft_transformers")
                finish("rayft_transformers")
                # The target compares the two vLLM rows, and runs minutes apart on this machine differ by more
                # than the 5% it is about: both stay deployed (idle between runs) and are measured in turns,
                # the order swapped each round, and each round's ratio is a pair measured minutes apart at most.
                deploy_engine("rayft_vllm")
                deploy_engine("bare_serve_llm")
                for round_ in range(args.repeats):
                    for engine in (("rayft_vllm", "bare_serve_llm") if round_ % 2 == 0 else ("bare_serve_llm", "rayft_vllm")):
                        measure(engine)
                results.setdefault("paired_ratios", {})[str(hidden)] = {
                    kind: [mine[kind]["req_per_s"] / bare[kind]["req_per_s"]
                           for mine, bare in zip(deployed["rayft_vllm"]["runs"], deployed["bare_serve_llm"]["runs"])]
                    for kind in ("adapters", "base_only")}
                finish("rayft_vllm")
                finish("bare_serve_llm")
                reference = outputs["bare_serve_llm"]
                results.setdefault("greedy_equal", {})[str(hidden)] = {
                    engine: [valid_text(a) == valid_text(b) for a, b in zip(texts, reference)] for engine, texts in outputs.items()}
                results.setdefault("greedy_outputs", {})[str(hidden)] = outputs
                if on_size_done is not None:
                    on_size_done(results)
        finally:
            serve.shutdown()
            ray.shutdown()
    return results


def median_run(runs: list[dict]) -> dict:
    """Per kind (with adapters, base only), the run with the median req/s (the lower middle one of an even count)."""
    out = {}
    for kind in ("adapters", "base_only"):
        ordered = sorted((r[kind] for r in runs), key=lambda m: m["req_per_s"])
        out[kind] = ordered[(len(ordered) - 1) // 2]
    out["load_avg"] = [min(r["load_avg"][0] for r in runs), max(r["load_avg"][1] for r in runs)]
    return out


def engines_table(results: dict) -> str:
    cfg = results["config"]
    rows, ratios = [], []
    by = {(r["hidden"], r["engine"]): r for r in results["rows"]}
    for (hidden, engine), r in by.items():
        equal = results["greedy_equal"][str(hidden)][engine]
        rows.append([hidden, engine, r["adapters"]["req_per_s"], r["adapters"]["tokens_per_s"], r["adapters"]["p50_ms"],
                     r["adapters"]["p99_ms"], r["base_only"]["req_per_s"],
                     r["adapters"]["failures"] + r["base_only"]["failures"], f"{sum(equal)}/{len(equal)}", r["deploy_s"],
                     "–".join(f"{x:.0f}" for x in r.get("load_avg", []))])
    load = markdown_table(["hidden", "engine", "req/s (adapters)", "tok/s", "p50 ms", "p99 ms", "req/s (base only)",
                           "errors", "greedy = bare", "deploy s", "load avg"], rows, "rlrrrrrrrrr")
    checks = []
    for hidden in sorted({h for h, _ in by}):
        for kind in ("adapters", "base_only"):
            pairs = results["paired_ratios"][str(hidden)][kind]
            ratio = statistics.median(pairs)
            ratios.append(ratio)
            checks.append([f"hidden {hidden}, {kind.replace('_', ' ')}: rayft vllm / bare Ray Serve LLM, req/s, median of "
                           f"{len(pairs)} paired runs ({', '.join(f'{x:.2f}' for x in pairs)})", f"{ratio:.2f}x",
                           f">= {TARGET_VLLM_VS_BARE}x", "met" if ratio >= TARGET_VLLM_VS_BARE else "missed"])
    errors = sum(run["adapters"]["failures"] + run["base_only"]["failures"] for r in results["rows"] for run in r["runs"])
    same = all(all(v) for per in results["greedy_equal"].values() for v in per.values())
    checks.append(["errors, every run", str(errors), "0", "met" if errors == 0 else "missed"])
    checks.append(["greedy outputs identical across the three (base + every adapter)", "yes" if same else "no", "yes",
                   "met" if same else "missed"])
    for hidden, per in results.get("mixed_traffic_wrong", {}).items():
        for engine, w in per.items():
            checks.append([f"hidden {hidden}, {engine}: answers that differ from its one-at-a-time answers under mixed base + "
                           f"adapter traffic (base / adapter, of {w['requests']})", f"{w['wrong_base']} / {w['wrong_adapter']}",
                           "0 / 0", "met" if w["wrong_base"] + w["wrong_adapter"] == 0 else "missed"])
    return (f"{cfg['adapters']} LoRA adapters (r=8, all-linear) on random Llamas ({cfg['layers']} layers, head size 64, fp32), "
            f"{cfg['clients']} concurrent clients, {cfg['requests']} requests per run of {cfg['prompt_tokens']} prompt + "
            f"{cfg['max_tokens']} output tokens, over HTTP; one replica with one CPU each. The transformers row ran alone; the two "
            f"vLLM rows stayed deployed together and were measured in turns, {cfg['repeats']} rounds, order swapped each "
            f"round (rows: the median run of each).\n\n"
            f"{load}\n\n{markdown_table(['figure', 'measured', 'target', 'verdict'], checks, 'llll')}\n")


SCENARIOS = ("mixed_batching", "no_batching", "merged_per_adapter")


def table(results: dict) -> str:
    cfg = results["config"]
    rows = []
    for name in SCENARIOS:
        r = results[name]
        engine = r.get("engine")
        rows.append([name, r["req_per_s"], r["tokens_per_s"], r["p50_ms"], r["p99_ms"], r["failures"],
                     engine["rows"] / max(engine["steps"], 1) if engine else None])
    load = markdown_table(["scenario", "req/s", "tok/s", "p50 ms", "p99 ms", "failed", "rows/pass"], rows, "lrrrrrr")
    cw = results["cold_warm"]
    speedup = results["speedup_mixed_vs_no_batching"]
    verdict = lambda ok: "met" if ok else "missed"  # noqa: E731
    rows = [["mixed-adapter batching / no batching, req/s", f"{speedup:.2f}x", f">= {TARGET_BATCHING}x",
             verdict(speedup >= TARGET_BATCHING)]]
    for single in results["single_request"]:
        rows.append([f"one request, unmerged / merged latency, hidden {single['hidden']} ({single['repeats']} pairs)",
                     f"{single['ratio']:.2f}x ({single['unmerged_p50_ms']:.0f} / {single['merged_p50_ms']:.0f} ms)",
                     f"<= {TARGET_UNMERGED}x", verdict(single["ratio"] <= TARGET_UNMERGED)])
    rows.append(["adapter latency, one client: cold (first request, from S3) / warm p50",
                 f"{cw['cold_p50_ms']:.0f} / {cw['warm_p50_ms']:.0f} ms", "reported", "-"])
    targets = markdown_table(["figure", "measured", "target", "verdict"], rows, "llll")
    return (f"{cfg['adapters']} LoRA adapters (r=8, all-linear) on a random Llama (hidden {cfg['hidden']}, "
            f"{cfg['layers']} layers), {cfg['clients']} concurrent clients, {cfg['requests']} requests per scenario, "
            f"{cfg['prompt_tokens']} prompt + {cfg['max_tokens']} output tokens each, max_batch_size {cfg['batch']}, "
            f"local Ray with {cfg['cpus']} logical CPUs, real HTTP.\n\n{load}\n\n{targets}\n")


def plot(results: dict):
    plt = pyplot()
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(13, 3.8))
    left.bar(SCENARIOS, [results[n]["req_per_s"] for n in SCENARIOS], color=["tab:green", "tab:red", "tab:blue"])
    left.set_ylabel("requests / s")
    left.set_title(f"throughput, {results['config']['clients']} clients")
    x = range(len(SCENARIOS))
    mid.bar([i - 0.2 for i in x], [results[n]["p50_ms"] for n in SCENARIOS], width=0.4, label="p50")
    mid.bar([i + 0.2 for i in x], [results[n]["p99_ms"] for n in SCENARIOS], width=0.4, label="p99")
    mid.set_xticks(list(x), SCENARIOS)
    mid.set_ylabel("latency, ms")
    mid.set_title("latency under load")
    mid.legend()
    singles = results["single_request"]
    x = range(len(singles))
    right.bar([i - 0.2 for i in x], [s["unmerged_p50_ms"] for s in singles], width=0.4, label="unmerged adapter")
    right.bar([i + 0.2 for i in x], [s["merged_p50_ms"] for s in singles], width=0.4, label="merged model")
    right.set_xticks(list(x), [f"hidden {s['hidden']}: {s['ratio']:.2f}x" for s in singles])
    right.set_ylabel("p50 latency, ms")
    right.set_title("one client, one request")
    right.legend()
    for ax in (left, mid, right):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    sys.exit(main())
