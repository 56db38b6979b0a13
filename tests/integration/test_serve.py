"""The Serve application end to end: a real Serve app on 127.0.0.1, real HTTP, the official
`openai` client, adapters published to a real S3 API server and loaded by the replicas.

Adapters are made in-process with peft on the tiny model (random non-zero B, so each one
answers differently) and their expected greedy outputs are computed with plain
peft/transformers, so "answered correctly for its adapter" is checked token by token.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from storage.registry import Manifest, base_config_digest_of_dir, open_registry
from storage.store import sha256_file
from trainers.tiny import build_random_lora_dir
from tests.support.serving import TOKEN, Served, _publish_pickle_only, post_all

pytestmark = pytest.mark.slow

PROMPTS = ["reverse apple =", "upper stone ="]
MAX_TOKENS = 6
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOOD = [f"ad-{i}" for i in range(8)]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse river"}]


def make_adapter(base_dir: Path, out: Path, seed: int, *, dora: bool = False, targets: list[str] | None = None) -> Path:
    """A LoRA/DoRA adapter with random (non-zero) B: it changes the model's answers."""
    return build_random_lora_dir(base_dir, out, seed, dora=dora, targets=targets)


# The replicas decode in left-padded batches, whose float sums differ from a lone `generate` in the last
# bits: a greedy step whose two best logits are closer than this could go either way, so the adapters
# the tests compare token by token are drawn again until no step of theirs is that close.
MIN_GREEDY_MARGIN = 1e-3


def greedy_with_margin(model, tokenizer, prompt: str | list[int], n: int = MAX_TOKENS) -> tuple[list[int], float]:
    """Greedy tokens, and the smallest gap between the best and second-best logit over the steps."""
    ids = (tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids if isinstance(prompt, str)
           else torch.tensor([prompt]))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    margin = min(float(step[0].topk(2).values.diff().abs()) for step in out.logits)
    return out.sequences[0, ids.shape[1]:].tolist(), margin


def chat_prompt_ids(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def fills_max_tokens(tokens: list[int], tokenizer) -> bool:
    """A greedy answer of MAX_TOKENS tokens without end-of-sequence: the tests expect finish_reason "length" and
    MAX_TOKENS completion tokens (a random adapter's answer ended early in a CI run, and the server said "stop")."""
    return len(tokens) == MAX_TOKENS and tokenizer.eos_token_id not in tokens


def _publish_adapter(registry, name: str, directory: Path, digest: str, method: str = "lora") -> Manifest:
    return registry.publish(name, directory, kind="adapter", base_model="tiny", base_config_digest=digest,
                            method=method, params={}, metrics={}, lineage={"test": "serve"})


@pytest.fixture(scope="module")
def served(serve_http, s3_server, tiny_model_dir, tmp_path_factory) -> Served:
    from ray import serve

    from serve.app import build_app
    from serve.spec import parse_serve_spec
    from trainers.tiny import build_tiny_model_dir

    bucket = f"rayft-serve-{uuid.uuid4().hex[:12]}"
    s3_server.ensure_bucket(bucket)
    storage = f"s3://{bucket}/store"
    registry = open_registry(storage)
    work = tmp_path_factory.mktemp("serve-artifacts")
    digest = base_config_digest_of_dir(tiny_model_dir)
    registry.publish("tiny", tiny_model_dir, kind="model", base_model="tiny", base_config_digest=digest,
                     method=None, params={}, metrics={}, lineage={})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    result = Served(url="", app=f"servetest{uuid.uuid4().hex[:8]}", storage=storage, tokenizer=tokenizer)
    base_greedy = {p: greedy_with_margin(base, tokenizer, p) for p in PROMPTS}
    assert min(margin for _, margin in base_greedy.values()) >= MIN_GREEDY_MARGIN  # the tiny base is built the same each time
    result.expected["tiny"] = {p: tokens for p, (tokens, _) in base_greedy.items()}

    # Eight LoRA adapters (half on q/v, half on every linear layer), one DoRA, one for the cold-start test.
    for i, name in enumerate(GOOD + ["dora-0", "cold-0"]):
        targets = ["q_proj", "v_proj"] if i % 2 else ALL_LINEAR
        for _draw in range(20):
            if (work / name).exists():
                shutil.rmtree(work / name)
            directory = make_adapter(tiny_model_dir, work / name, seed=1000 + i + int(uuid.uuid4().int % 10**6),
                                     dora=name.startswith("dora"), targets=targets)
            adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(directory)).eval()
            greedy = {p: greedy_with_margin(adapted, tokenizer, p) for p in PROMPTS}
            chat, _ = greedy_with_margin(adapted, tokenizer, chat_prompt_ids(tokenizer))
            if (min(margin for _, margin in greedy.values()) >= MIN_GREEDY_MARGIN
                    and all(fills_max_tokens(t, tokenizer) for t in [chat, *(t for t, _ in greedy.values())])):
                break
        else:
            pytest.fail(f"no draw of adapter {name} had greedy steps {MIN_GREEDY_MARGIN} apart and answers of {MAX_TOKENS} tokens")
        _publish_adapter(registry, name, directory, digest, method="dora" if name.startswith("dora") else "lora")
        result.adapter_dirs[name] = directory
        result.expected[name] = {p: tokens for p, (tokens, _) in greedy.items()}

    # ad-0 published merged (a plain model directory) and served as its own deployment.
    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(work / "ad-0")).merge_and_unload()
    merged.save_pretrained(work / "ad-0-merged")
    for extra in tiny_model_dir.iterdir():
        if extra.name.startswith(("tokenizer", "chat_template", "generation_config")):
            shutil.copy2(extra, work / "ad-0-merged" / extra.name)
    registry.publish("ad-0-merged", work / "ad-0-merged", kind="model", base_model="tiny", base_config_digest=digest,
                     method="lora", params={}, metrics={}, lineage={"merged_from": "ad-0@1"})

    # Adapters that must be refused at load, each for its own reason.
    _publish_adapter(registry, "corrupt", make_adapter(tiny_model_dir, work / "corrupt", seed=7), digest)
    registry.store.put_bytes(b"tampered after publish", "registry/corrupt/1/files/adapter_model.safetensors")
    garbage = make_adapter(tiny_model_dir, work / "garbage", seed=8)
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    _publish_adapter(registry, "garbage", garbage, digest)
    other_base = build_tiny_model_dir(work / "other-base", hidden_size=32)
    _publish_adapter(registry, "wrong-base", make_adapter(other_base, work / "wrong-base", seed=9),
                     base_config_digest_of_dir(other_base))
    ia3 = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft.IA3Config(task_type="CAUSAL_LM"))
    ia3.save_pretrained(work / "ia3-0")
    _publish_adapter(registry, "ia3-0", work / "ia3-0", digest, method="ia3")
    _publish_pickle_only(registry, "pickled", work, digest)

    spec = parse_serve_spec({
        "storage": storage,
        "base": {
            "name": "tiny", "source": "registry:tiny",
            "deployment": {"replicas": 1, "cpus": 1, "max_ongoing_requests": 64},
            "batch": {"max_batch_size": 16, "max_wait_ms": 50},
            "adapters": {"max_per_replica": 3},
        },
        "merged": [
            {"name": "ad0-pub", "source": "registry:ad-0-merged", "deployment": {"cpus": 0.5}},
            {"name": "ad1-merged", "adapter": "ad-1", "deployment": {"cpus": 0.5}},
        ],
        "api": {
            "auth": {"token_sha256": [hashlib.sha256(TOKEN.encode()).hexdigest()]},
            "max_body_bytes": 64 * 1024, "max_tokens_limit": 64,
            "deployment": {"cpus": 0.1, "max_ongoing_requests": 512},
        },
    }, "test spec")
    serve.run(build_app(spec), name=result.app, route_prefix=f"/{result.app}")
    result.url = f"{serve_http}/{result.app}"
    yield result
    serve.delete(result.app)


def completion_tokens(served: Served, model: str, prompt: str, **extra) -> list[int]:
    reply = served.client().completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_token_ids": True}, **extra)
    return reply.choices[0].model_extra["token_ids"]


def body(model: str, prompt: str, **extra) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True, **extra}


# --------------------------------------------------------------------------- OpenAI client


def test_openai_client_lists_models_and_completes(served):
    client = served.client()
    ids = {m.id for m in client.models.list().data}
    assert {"tiny", "ad0-pub", "ad1-merged", "dora-0", *GOOD} <= ids
    assert "wrong-base" not in ids  # an adapter of another base is not offered here
    assert client.models.retrieve("ad-3").id == "ad-3"

    reply = client.completions.create(model="ad-2", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
    expected = served.expected["ad-2"][PROMPTS[0]]
    assert reply.choices[0].text == served.tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.choices[0].finish_reason == "length"
    prompt_len = len(served.tokenizer(PROMPTS[0], add_special_tokens=False).input_ids)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        prompt_len, MAX_TOKENS, prompt_len + MAX_TOKENS)
    assert reply.model == "ad-2" and reply.object == "text_completion"

    chunks = list(client.completions.create(model="ad-2", prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == reply.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_client_chat_and_streaming_chat(served, tiny_model_dir):
    client = served.client()
    messages = CHAT
    reply = client.chat.completions.create(model="ad-3", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    prompt_ids = chat_prompt_ids(served.tokenizer)
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(served.adapter_dirs["ad-3"])).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        expected = adapted.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(prompt_ids):]
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == served.tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.usage.prompt_tokens == len(prompt_ids)

    stream = client.chat.completions.create(model="ad-3", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS and chunks[-1].choices == []


def test_sampling_seed_and_stop(served):
    client = served.client()
    sampled = [client.completions.create(model="ad-4", prompt=PROMPTS[1], max_tokens=12, temperature=1.0, top_p=0.9,
                                         seed=1234).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]  # same seed, same output
    greedy = served.tokenizer.decode(served.expected["ad-4"][PROMPTS[1]], skip_special_tokens=True)
    stop = greedy[2:4]
    reply = client.completions.create(model="ad-4", prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert reply.choices[0].text == greedy[: greedy.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


# --------------------------------------------------------------------------- equality


def test_multiplexed_adapter_equals_merged_model_and_solo_reference(served):
    for prompt in PROMPTS:
        reference = served.expected["ad-0"][prompt]
        assert completion_tokens(served, "ad-0", prompt) == reference  # multiplexed, solo request
        assert completion_tokens(served, "ad0-pub", prompt) == reference  # published merged model
        assert completion_tokens(served, "ad-1", prompt) == served.expected["ad-1"][prompt]
        assert completion_tokens(served, "ad1-merged", prompt) == served.expected["ad-1"][prompt]  # merged at load
        assert completion_tokens(served, "ad-0@1", prompt) == reference  # name@version


def test_mixed_batch_of_three_adapters_and_base_equals_solo(served):
    models = ["ad-4", "ad-5", "dora-0", "tiny"]
    solo = {(m, p): completion_tokens(served, m, p) for m in models for p in PROMPTS}  # also warms the adapters
    assert all(solo[(m, p)] == served.expected[m][p] for m in models for p in PROMPTS)
    pairs = [(m, p) for m in models for p in PROMPTS] * 2
    mixed = False
    for _ in range(3):  # HTTP does not promise that 16 requests reach the replica within one batch window
        before = served.base_stats()["engine"]
        responses = asyncio.run(post_all(served, [body(m, p) for m, p in pairs]))
        assert [r.status_code for r in responses] == [200] * len(pairs)
        for (model, prompt), response in zip(pairs, responses):
            assert response.json()["choices"][0]["token_ids"] == solo[(model, prompt)], model
        after = served.base_stats()["engine"]
        mixed = after["mixed_passes"] > before["mixed_passes"]  # adapters really shared forward passes
        if mixed:
            break
    assert mixed
    assert after["max_adapters_in_pass"] >= 3  # ad-4, ad-5 and the base in one pass (DoRA decodes beside it)


# --------------------------------------------------------------------------- load, evictions, cold start


def test_eight_adapters_three_per_replica_under_216_concurrent_requests(served):
    before = served.base_stats()["counts"]
    pairs = [(GOOD[i % 8], PROMPTS[(i // 8) % 2]) for i in range(208)] + [("tiny", PROMPTS[i % 2]) for i in range(8)]
    responses = asyncio.run(post_all(served, [body(m, p) for m, p in pairs], concurrency=64))
    statuses = [r.status_code for r in responses]
    assert all(s < 500 for s in statuses), statuses
    assert statuses == [200] * len(pairs)
    wrong = [(m, p, got, _whose(served, got)) for (m, p), r in zip(pairs, responses)
             if (got := r.json()["choices"][0]["token_ids"]) != served.expected[m][p]]
    assert not wrong
    after = served.base_stats()
    assert after["counts"].get("cache_eviction", 0) > before.get("cache_eviction", 0)  # 8 adapters, 3 slots
    assert len(after["adapters"]["live"]) <= 3


def test_32_simultaneous_first_requests_for_a_cold_adapter_download_it_once(served):
    manifest = open_registry(served.storage).resolve("cold-0")
    responses = asyncio.run(post_all(served, [body("cold-0", PROMPTS[i % 2]) for i in range(32)], concurrency=32))
    assert [r.status_code for r in responses] == [200] * 32
    for i, response in enumerate(responses):
        assert response.json()["choices"][0]["token_ids"] == served.expected["cold-0"][PROMPTS[i % 2]]
    stats = served.base_stats()
    # Counted by the replica's botocore client. The weights are new content: fetched exactly once.
    # (Files whose content the local cache already holds, e.g. an identical README, are not fetched at all.)
    assert stats["counts"][f"downloads:{manifest.ref}:adapter_model.safetensors"] == 1
    assert stats["counts"][f"downloads:{manifest.ref}"] <= len(manifest.files)
    assert len(stats["load_s"][manifest.ref]) == 1  # and loaded once
    assert len(stats["latency_s"][f"{manifest.ref}|cold"]) >= 1


# --------------------------------------------------------------------------- bad input


HOSTILE_IDS = [
    "../../etc/passwd", "ad-0/../ad-1", "/abs", "AD-0", "ad-0@0", "ad-0@01", "ad-0@-1", "ad-0@1@2", "x" * 65,
    "ad\x00-0", "\u0430d-0", "%2e%2e%2f", " ad-0", "s3://bucket/key", "registry:ad-0", "ad-0\\x", "..", "ad-0@latest",
]


def test_hostile_model_ids_get_400_before_any_storage_access(served):
    before = served.api_stats()["counts"].get("storage_requests", 0)
    responses = asyncio.run(post_all(served, [body(m, "hi") for m in HOSTILE_IDS]))
    for model, response in zip(HOSTILE_IDS, responses):
        assert response.status_code == 400, (model, response.status_code, response.text)
        error = response.json()["error"]
        assert error["param"] == "model" and error["type"] == "invalid_request_error"
    assert served.api_stats()["counts"].get("storage_requests", 0) == before


def test_unknown_adapter_is_404_and_an_undeployed_model_is_404(served):
    responses = asyncio.run(post_all(served, [body("no-such-adapter", "hi"), body("ad-0-merged", "hi"), body("ad-0@9", "hi")]))
    assert [r.status_code for r in responses] == [404, 404, 404]
    assert responses[0].json()["error"]["code"] == "model_not_found"
    assert "not deployed" in responses[1].json()["error"]["message"]


@pytest.mark.parametrize("name,reason", [
    ("corrupt", "integrity check failed"),
    ("garbage", "not a valid safetensors file"),
    ("wrong-base", "trained on base model"),
    ("pickled", "pickle-based weight files"),
    ("ia3-0", "cannot be multiplexed"),
])
def test_bad_adapter_is_refused_with_its_reason_and_others_keep_serving(served, name, reason):
    replica = served.base_stats()["replica"]
    responses = asyncio.run(post_all(served, [body(name, PROMPTS[0]), body("ad-6", PROMPTS[0]), body("tiny", PROMPTS[0])]))
    refused, good, base = responses
    assert refused.status_code == 422, refused.text
    assert reason in refused.json()["error"]["message"] and name in refused.json()["error"]["message"]
    assert good.status_code == 200 and good.json()["choices"][0]["token_ids"] == served.expected["ad-6"][PROMPTS[0]]
    assert base.status_code == 200 and base.json()["choices"][0]["token_ids"] == served.expected["tiny"][PROMPTS[0]]
    assert served.base_stats()["replica"] == replica  # the same replica, still serving


def test_malformed_requests_are_4xx_never_5xx(served):
    url, auth = served.url, served.headers
    cases = [
        ("POST", "/v1/completions", {"content": b"{not json"}, 400),
        ("POST", "/v1/completions", {"content": b"[1, 2]"}, 400),
        ("POST", "/v1/completions", {"content": "\u00e9".encode("latin-1")}, 400),
        ("POST", "/v1/completions", {"json": {"model": "tiny"}}, 400),  # no prompt
        ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": "a", "max_tokens": "5"}}, 400),
        ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": "a", "temperature": "hot"}}, 400),
        ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": "a", "max_tokens": 10**12}}, 400),
        ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": "a", "max_tokens": -3}}, 400),
        ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": "a", "n": 3}}, 400),
        ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}}, 400),
        ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": "a", "surprise": 1}}, 400),
        ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": "word " * 600, "max_tokens": 8}}, 400),  # context
        ("POST", "/v1/completions", {"json": {"model": "tiny", "prompt": "x" * 100_000}}, 413),
        ("POST", "/v1/chat/completions", {"json": {"model": "tiny", "messages": "hi"}}, 400),
        ("POST", "/v1/chat/completions", {"json": {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}}, 400),
        ("POST", "/v1/chat/completions", {"json": {"model": "tiny", "messages": []}}, 400),
        ("GET", "/v1/completions", {}, 405),
        ("POST", "/v1/nothing-here", {"json": {}}, 404),
    ]
    with httpx.Client(timeout=60, headers=auth) as client:
        for method, path, kwargs, expected in cases:
            response = client.request(method, url + path, **kwargs)
            assert response.status_code == expected, (path, kwargs.get("json", kwargs.get("content", ""))[:80] if kwargs else "", response.text)
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        # a streamed request that fails its checks is a plain 4xx too, not a 200 stream
        response = client.post(url + "/v1/completions", json={"model": "no-such", "prompt": "a", "stream": True})
        assert response.status_code == 404


def test_missing_or_wrong_bearer_token_is_401(served):
    from openai import AuthenticationError, OpenAI

    with httpx.Client(timeout=30) as client:
        assert client.get(f"{served.url}/health").status_code == 200  # liveness needs no token
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}):
            response = client.post(f"{served.url}/v1/completions", json=body("tiny", "a"), headers=headers)
            assert response.status_code == 401, headers
            assert response.json()["error"]["type"] == "authentication_error"
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.get(f"{served.url}/v1/models").status_code == 401
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()


# --------------------------------------------------------------------------- fault tolerance (keep last: it restarts the replica)


def test_killed_replica_is_replaced_and_the_service_answers_again(served):
    import ray

    old = served.base_stats()
    pairs = [(GOOD[i % 4], PROMPTS[i % 2]) for i in range(48)]

    async def load_while_killing() -> list[httpx.Response]:
        requests = asyncio.ensure_future(post_all(served, [body(m, p) for m, p in pairs], concurrency=8, retry_503_for=90))
        await asyncio.sleep(0.5)
        ray.kill(ray.get_actor(old["actor_name"], namespace="serve"), no_restart=True)
        return await requests

    responses = asyncio.run(load_while_killing())
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * len(pairs), statuses
    wrong = [(i, model, prompt, got, served.expected[model][prompt], _whose(served, got))
             for i, ((model, prompt), response) in enumerate(zip(pairs, responses))
             if (got := response.json()["choices"][0]["token_ids"]) != served.expected[model][prompt]]
    assert not wrong, (wrong, served.base_stats())
    assert served.base_stats()["replica"] != old["replica"]  # Serve started a new replica


def _whose(served: Served, tokens: list[int]) -> list[tuple[str, str]]:
    """Which (model, prompt) of the fixture greedily answers `tokens` (to tell a mix-up from a numeric flip)."""
    return [(m, p) for m, by_prompt in served.expected.items() for p, expected in by_prompt.items() if expected == tokens]
