"""The serving half of `rayft demo`: deploy the OpenAI-compatible app and query it with the `openai` client.

Runs on the Ray instance the demo already started, against the demo's storage.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time

APP_NAME = "rayft-demo"
WORDS = ["apple", "river", "green", "tiger", "paper"]


def _free_port(preferred: int = 8000) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]


def prompt_for(model: str, word: str) -> str:
    """The demo tasks are named by their adapter's first word: `reverse-lora` answers `reverse apple =`."""
    task = model.split("-")[0]
    return f"{task} {word} =" if task in ("reverse", "upper") else f"{word} ="


def demo_spec(storage_uri: str, base: str, adapters: list[str]):
    from serve.spec import parse_serve_spec

    raw = {
        "storage": storage_uri,
        "base": {
            "name": base, "source": f"registry:{base}",
            "deployment": {"cpus": 1, "max_ongoing_requests": 128},
            "batch": {"max_batch_size": 32, "max_wait_ms": 10},
            "adapters": {"max_per_replica": 8},
        },
        "merged": [{"name": f"{adapters[0]}-merged", "adapter": adapters[0], "deployment": {"cpus": 0.5}}] if adapters else [],
        "api": {"deployment": {"cpus": 0.1}},
    }
    return parse_serve_spec(raw, "demo serve spec")


def run_demo_queries(storage_uri: str, base: str, adapters: list[str], keep_serving: bool = False) -> None:
    """Deploy base + adapters (+ the first adapter merged) and print answers through the OpenAI client; with
    `keep_serving`, the application and its web console stay up until Ctrl-C."""
    from openai import OpenAI
    from ray import serve

    from cluster.commands.serve import deploy
    from cluster.client.ray_connect import connect

    connect(None)
    spec = demo_spec(storage_uri, base, adapters)
    started = time.perf_counter()
    url = deploy(spec, port=_free_port(), name=APP_NAME)
    print(f"[rayft] serving on {url}/v1 (deployed in {time.perf_counter() - started:.1f}s)", flush=True)
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    try:
        print("models:", ", ".join(m.id for m in client.models.list().data), flush=True)
        chat = client.chat.completions.create(
            model=base, messages=[{"role": "user", "content": "hello"}], max_tokens=8, temperature=0,
        )
        print(f"\n[{base}] chat 'hello' -> {chat.choices[0].message.content!r}  (untrained base: noise is expected)")
        cold, warm = [], []  # adapter requests, one client: the first loads the adapter on demand
        for model in adapters + [m.name for m in spec.merged]:
            # Measured: on this tiny random base no peft combination (cat, linear, svd, ties, dare) of the two
            # task adapters keeps either task; the merge is shown for the flow, not for its answers.
            note = "  (a TIES merge of two unrelated tasks on a tiny base: they interfere)" if "ties" in model else ""
            print(f"\n[{model}]{note}")
            for i, word in enumerate(WORDS[:3]):
                t0 = time.perf_counter()
                reply = client.completions.create(model=model, prompt=prompt_for(model, word), max_tokens=12, temperature=0)
                elapsed = time.perf_counter() - t0
                if model in adapters:
                    (cold if i == 0 else warm).append(elapsed)
                print(f"  {prompt_for(model, word)!r:22} -> {reply.choices[0].text!r:16} "
                      f"({reply.usage.completion_tokens} tokens, {1000 * elapsed:.0f} ms)")
        if cold and warm:
            print(f"\nadapter latency through the API, one client: cold (first request: fetch from S3, verify, attach) "
                  f"p50 {1000 * statistics.median(cold):.0f} ms, warm p50 {1000 * statistics.median(warm):.0f} ms")
        stream_model = adapters[-1] if adapters else base
        # Collected, then printed as one line: pieces printed as they come interleave with other output.
        prompt = prompt_for(stream_model, "tiger")
        chunks = [chunk.choices[0].text for chunk in client.completions.create(
            model=stream_model, prompt=prompt, max_tokens=12, temperature=0, stream=True)]
        print(f"\n[{stream_model}] streamed {prompt!r} -> {''.join(chunks)!r} in {len(chunks)} server-sent events")
        asyncio.run(_burst(url, [base] + adapters, 48))
        _print_replica_stats(serve.get_deployment_handle("BaseModel", APP_NAME).stats.remote().result())
        print(f"\n[rayft] console: {url}/console (runs, registry, compare, playground; the demo needs no token)", flush=True)
        if keep_serving:
            from cluster.commands.serve import wait_for_stop_signal

            print("[rayft] --keep-serving: the application stays up; Ctrl-C to stop", flush=True)
            wait_for_stop_signal()
    finally:
        serve.delete(APP_NAME)


async def _burst(url: str, models: list[str], n: int) -> None:
    """n concurrent requests spread over the base and every adapter: they share forward passes."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2)

    async def one(i: int) -> tuple[str, str, float]:
        model, word = models[i % len(models)], WORDS[i % len(WORDS)]
        t0 = time.perf_counter()
        reply = await client.completions.create(model=model, prompt=prompt_for(model, word), max_tokens=8, temperature=0)
        return model, reply.choices[0].text, time.perf_counter() - t0

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    latencies = sorted(r[2] for r in results)
    print(f"\nmixed burst: {n} concurrent requests over {len(models)} models in {wall:.2f}s "
          f"({n / wall:.1f} req/s, p50 {1000 * statistics.median(latencies):.0f} ms, "
          f"max {1000 * latencies[-1]:.0f} ms)")
    await client.close()


def _print_replica_stats(stats: dict) -> None:
    engine, counts = stats["engine"], stats["counts"]
    rows_per_pass = engine["rows"] / max(engine["steps"], 1)
    print(f"base replica: {engine['steps']} forward passes, {rows_per_pass:.1f} rows/pass on average, "
          f"{engine['mixed_passes']} passes mixed adapters (up to {engine['max_adapters_in_pass']} in one), "
          f"{counts.get('adapter_loads', 0)} adapter loads")
    loads = [s for values in stats["load_s"].values() for s in values]
    if loads:
        print(f"adapter load (fetch + sha256 verify + attach) in the replica: p50 {1000 * statistics.median(loads):.0f} ms")
