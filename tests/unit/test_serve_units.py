"""serve/ without a running Serve: the spec, the wire format, detokenization, the batching
engine against plain peft, servability checks, and the adapter pool's load/evict/unload cycle."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from serve.deployments import AdapterNotServable, AdapterPool, adapter_problems, fetch_adapter, linear_shapes
from serve.generation import BASE_ADAPTER, Engine, SamplingParams, Sequence, TextStream
from serve.metrics import ModelMetrics
from serve.protocol import ChatCompletionRequest, CompletionRequest, validation_error
from serve.spec import AdapterPolicy, ServeSpecError, load_serve_spec, parse_serve_spec
from storage.registry import base_config_digest_of_dir, open_registry
from trainers.tiny import build_random_lora_dir

REPO = Path(__file__).resolve().parents[2]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- spec


def test_example_spec_is_valid_and_maps_to_serve_options():
    from service.spec import load_service_spec  # the example also turns on the fine-tuning API (service/)

    spec = load_service_spec(REPO / "examples" / "serve.yaml").serve_spec()
    assert spec.model_names() == ["tiny-llama", "reverse-lora-merged"]
    options = spec.base.deployment.serve_options()
    assert options["num_replicas"] == 1 and options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    scaled = parse_serve_spec({"base": {"name": "b", "source": "registry:b",
                                        "deployment": {"autoscaling": {"min_replicas": 0, "max_replicas": 3}}}})
    options = scaled.base.deployment.serve_options()
    assert "num_replicas" not in options and options["autoscaling_config"]["max_replicas"] == 3


def test_bad_spec_lists_every_problem_with_its_field():
    raw = {
        "base": {"name": "Bad/Name", "source": "registry:x", "deployment": {"replicas": 2, "autoscaling": {}},
                 "adapters": {"max_per_replica": 0}},
        "merged": [{"name": "m"}, {"name": "m2", "adapter": "../etc"}, {"name": "m3", "adapter": "x", "source": "y"}],
        "api": {"auth": {"token_sha256": ["not-hex"], "token_env": "1BAD"}},
        "extra": True,
    }
    with pytest.raises(ServeSpecError) as info:
        parse_serve_spec(raw, "serve.yaml")
    text = str(info.value)
    for where in ("base.name", "base.deployment", "base.adapters.max_per_replica", "merged[0]", "merged[1].adapter",
                  "merged[2]", "api.auth.token_sha256", "api.auth.token_env", "extra: got True, unknown field"):
        assert where in text, where
    with pytest.raises(ServeSpecError, match="default_max_tokens .99. is above max_tokens_limit .10."):
        parse_serve_spec({"base": {"name": "a", "source": "s"}, "api": {"default_max_tokens": 99, "max_tokens_limit": 10}})
    with pytest.raises(ServeSpecError, match="used by more than one deployment"):
        parse_serve_spec({"base": {"name": "a", "source": "s"}, "merged": [{"name": "a", "source": "t"}]})


def test_build_app_binds_without_ray_or_storage():
    from ray.serve import Application

    from serve.app import build_app

    spec = parse_serve_spec({"storage": "s3://no-such-bucket-anywhere/x", "base": {"name": "b", "source": "registry:b"},
                             "merged": [{"name": "m", "adapter": "a"}]})
    assert isinstance(build_app(spec), Application)


# --------------------------------------------------------------------------- wire format


@pytest.mark.parametrize("body,field", [
    ({"model": "m", "prompt": "a", "max_tokens": "5"}, "max_tokens"),
    ({"model": "m", "prompt": "a", "temperature": 3}, "temperature"),
    ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "m", "prompt": "a", "n": 2}, "n"),
    ({"model": "m", "prompt": "a", "stop": [""]}, "stop"),
    ({"model": "m", "prompt": "a", "logit_bias": {}}, "logit_bias"),
    ({"model": 3, "prompt": "a"}, "model"),
    ({"prompt": "a"}, "model"),
])
def test_completion_request_rejects_bad_fields_by_name(body, field):
    with pytest.raises(Exception) as info:
        CompletionRequest.model_validate(body)
    error = validation_error(info.value)
    assert error.http_status == 400 and error.param == field and field in error.message


def test_chat_request_accepts_text_parts_and_newer_max_tokens_name():
    req = ChatCompletionRequest.model_validate({
        "model": "m", "max_completion_tokens": 7,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]}],
    })
    assert req.messages[0].text() == "hello" and req.requested_max_tokens() == 7


# --------------------------------------------------------------------------- detokenization


def test_text_stream_holds_back_a_possible_stop_string_and_cuts_at_it(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("apple river stone", add_special_tokens=False).input_ids
    stream = TextStream(tokenizer, ("r st",))
    sent = ""
    for i in range(1, len(ids) + 1):
        delta, stopped = stream.update(ids[:i])
        sent += delta
        if stopped:
            break
    assert stopped and sent == "apple rive"


def test_text_stream_never_sends_half_a_utf8_character(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("café ü", add_special_tokens=False).input_ids
    stream, sent = TextStream(tokenizer, ()), []
    for i in range(1, len(ids) + 1):
        sent.append(stream.update(ids[:i])[0])
    sent.append(stream.flush(ids))
    assert "".join(sent) == "café ü" and not any("\ufffd" in s for s in sent)


# --------------------------------------------------------------------------- engine vs plain peft


def make_adapter(base_dir: Path, out: Path, seed: int, *, dora: bool = False, targets=None, r: int = 4) -> Path:
    return build_random_lora_dir(base_dir, out, seed, r=r, dora=dora, targets=targets)


@pytest.fixture(scope="module")
def three_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("unit-adapters")
    return {
        "qv": make_adapter(tiny_model_dir, work / "qv", 1, targets=["q_proj", "v_proj"]),
        "all": make_adapter(tiny_model_dir, work / "all", 2, targets=ALL_LINEAR),
        "dora": make_adapter(tiny_model_dir, work / "dora", 3, dora=True, targets=ALL_LINEAR),
    }


def peft_greedy(base_dir, adapter_dir, tokenizer, prompt, n) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_engine_mixed_batch_equals_each_adapter_alone_in_peft(tiny_model_dir, three_adapters):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ["reverse apple =", "upper stone is", "a"]  # different lengths: left padding is exercised
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(three_adapters["qv"]),
                                           adapter_name="qv").eval()
    model.load_adapter(str(three_adapters["all"]), adapter_name="all")
    model.load_adapter(str(three_adapters["dora"]), adapter_name="dora")
    jobs = [(name, p) for name in ("qv", "all", "dora", BASE_ADAPTER) for p in prompts]

    async def run() -> tuple[list[list[int]], Engine]:
        engine = Engine(model, tokenizer, max_batch_size=32, max_wait_s=0.05)

        async def one(adapter: str, prompt: str) -> list[int]:
            seq = Sequence(tokenizer(prompt, add_special_tokens=False).input_ids, SamplingParams(max_tokens=7, temperature=0),
                           adapter=adapter, solo=adapter == "dora")
            return [event.token_id async for event in engine.generate(seq)]

        return await asyncio.gather(*(one(a, p) for a, p in jobs)), engine

    results, engine = asyncio.run(run())
    for (adapter, prompt), tokens in zip(jobs, results):
        expected = peft_greedy(tiny_model_dir, None if adapter == BASE_ADAPTER else three_adapters[adapter], tokenizer, prompt, 7)
        assert tokens == expected, (adapter, prompt)
    assert engine.stats.max_adapters_in_pass == 3  # qv, all and the base in one pass; DoRA beside it
    assert engine.stats.groups == 2


def test_engine_late_requests_join_the_running_pass_and_decode_as_alone(tiny_model_dir, three_adapters):
    """Requests arriving mid-generation get one prompt pass, then share the running group's passes
    (KV caches left-padded and stacked); every output still equals that adapter decoding alone."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(three_adapters["qv"]),
                                           adapter_name="qv").eval()
    model.load_adapter(str(three_adapters["all"]), adapter_name="all")
    model.load_adapter(str(three_adapters["dora"]), adapter_name="dora")
    first = ("qv", "a")
    # Longer and shorter than the first request's cache when they join: both sides get padded.
    late = [("all", "reverse apple river stone cloud green"), (BASE_ADAPTER, "up"), ("dora", "stone is"),
            ("dora", "green river stone")]

    async def run() -> tuple[list[list[int]], Engine]:
        engine = Engine(model, tokenizer, max_batch_size=32, max_wait_s=0)
        started = asyncio.Event()

        async def one(adapter: str, prompt: str, tokens: int, signal: bool = False) -> list[int]:
            seq = Sequence(tokenizer(prompt, add_special_tokens=False).input_ids,
                           SamplingParams(max_tokens=tokens, temperature=0), adapter=adapter, solo=adapter == "dora")
            out = []
            async for event in engine.generate(seq):
                out.append(event.token_id)
                if signal and len(out) == 3:
                    started.set()
            return out

        async def later(adapter: str, prompt: str) -> list[int]:
            await started.wait()
            return await one(adapter, prompt, 6)

        results = await asyncio.gather(one(*first, 14, signal=True), *(later(a, p) for a, p in late))
        return results, engine

    results, engine = asyncio.run(run())
    for (adapter, prompt), tokens in zip([first] + late, results):
        n = 14 if (adapter, prompt) == first else 6
        expected = peft_greedy(tiny_model_dir, None if adapter == BASE_ADAPTER else three_adapters[adapter], tokenizer, prompt, n)
        assert tokens == expected, (adapter, prompt)
    # Three groups: the first, the late mixed one (qv's group absorbs it) and the two DoRA requests (never mixed).
    assert (engine.stats.groups, engine.stats.merges) == (3, 1)
    assert engine.stats.max_rows_in_pass == 3  # qv + all + base in one pass (DoRA never joins them)
    assert engine.stats.max_adapters_in_pass == 3


def test_engine_seeded_sampling_does_not_depend_on_the_batch(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = tokenizer("green river", add_special_tokens=False).input_ids
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=42)

    async def run(n_others: int, cancel_one: bool) -> list[int]:
        engine = Engine(model, tokenizer, max_batch_size=16, max_wait_s=0.02)

        async def one(p: SamplingParams, stop_after: int | None = None) -> list[int]:
            tokens = []
            async for event in engine.generate(Sequence(ids, p)):
                tokens.append(event.token_id)
                if stop_after is not None and len(tokens) == stop_after:
                    break  # the caller goes away mid-generation
            return tokens

        others = [one(SamplingParams(max_tokens=12, temperature=0.7, seed=i), 2 if cancel_one and i == 0 else None)
                  for i in range(n_others)]
        return (await asyncio.gather(one(params), *others))[0]

    alone = asyncio.run(run(0, False))
    assert asyncio.run(run(5, True)) == alone
    assert len(alone) == 10


# --------------------------------------------------------------------------- servability and the adapter pool


@pytest.fixture(scope="module")
def unit_registry(tiny_model_dir, three_adapters, tmp_path_factory):
    """A local-directory registry holding the tiny base and adapters, good and bad."""
    from trainers.tiny import build_tiny_model_dir

    root = tmp_path_factory.mktemp("unit-registry")
    registry = open_registry(str(root / "store"), cache_dir=root / "cache")
    digest = base_config_digest_of_dir(tiny_model_dir)

    def publish(name, directory, digest=digest, method="lora"):
        registry.publish(name, directory, kind="adapter", base_model="tiny", base_config_digest=digest, method=method,
                         params={}, metrics={}, lineage={})

    for name, directory in three_adapters.items():
        publish(name, directory)
    publish("big-rank", make_adapter(tiny_model_dir, root / "big", 4, r=16))
    publish("all2", make_adapter(tiny_model_dir, root / "all2", 7, targets=ALL_LINEAR))
    other = build_tiny_model_dir(root / "other", hidden_size=32)
    publish("other-base", make_adapter(other, root / "other-adapter", 5), digest=base_config_digest_of_dir(other))
    publish("lying-digest", root / "other-adapter")  # claims our base; its tensors say otherwise
    ia3 = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft.IA3Config(task_type="CAUSAL_LM"))
    ia3.save_pretrained(root / "ia3")
    publish("ia3", root / "ia3", method="ia3")
    saves = root / "saves"
    make_adapter(tiny_model_dir, saves, 6)
    config = json.loads((saves / "adapter_config.json").read_text())
    (saves / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["lm_head"]}))
    publish("saves", saves)
    return registry, digest


@pytest.mark.parametrize("name,reason", [
    ("other-base", "trained on base model"),
    ("lying-digest", "does not fit layer"),
    ("ia3", "cannot be multiplexed"),
    ("big-rank", "above adapters.max_rank"),
    ("saves", "modules_to_save"),
    ("dora", "allow_dora: false"),
])
def test_adapter_problems_name_the_reason(unit_registry, tiny_model_dir, name, reason):
    registry, digest = unit_registry
    directory, manifest, config = fetch_adapter(registry, name)
    shapes = linear_shapes(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    problems = adapter_problems(manifest, config, directory, base_name="tiny", base_digest=digest, shapes=shapes,
                                policy=AdapterPolicy(max_rank=8, allow_dora=False))
    assert any(reason in p for p in problems), problems
    ok_dir, ok_manifest, ok_config = fetch_adapter(registry, "qv")
    assert adapter_problems(ok_manifest, ok_config, ok_dir, base_name="tiny", base_digest=digest, shapes=shapes,
                            policy=AdapterPolicy(max_rank=8)) == []


def engine_with_pool(unit_registry, tiny_model_dir) -> tuple:
    """(tokenizer, an engine on the plain tiny base, the adapter pool attaching the registry's adapters to it)."""
    registry, digest = unit_registry
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    engine = Engine(base, tokenizer, max_batch_size=4, max_wait_s=0)
    pool = AdapterPool(engine, registry, base_name="tiny", base_digest=digest, reload_base=lambda: None,
                       shapes=linear_shapes(base), policy=AdapterPolicy(), metrics=ModelMetrics())
    return tokenizer, engine, pool


def test_pool_defers_unloading_an_evicted_adapter_until_its_requests_finish(unit_registry, tiny_model_dir):
    registry = unit_registry[0]
    tokenizer, engine, pool = engine_with_pool(unit_registry, tiny_model_dir)

    async def scenario() -> None:
        first = await pool.load("qv@1")
        second = await pool.load("dora@1")
        assert set(engine.model.peft_config) == {first.peft_name, second.peft_name}
        pool.acquire(first)
        first.__del__()  # Serve's LRU eviction...
        first.__del__()  # ...and the garbage collector later: the second call changes nothing
        engine.model = pool.unload_retired(engine.model)
        assert first.peft_name in engine.model.peft_config  # still in use: kept
        pool.release(first)
        engine.model = pool.unload_retired(engine.model)
        assert set(engine.model.peft_config) == {second.peft_name}
        second.__del__()
        engine.model = pool.unload_retired(engine.model)
        assert not hasattr(engine.model, "peft_config")  # the last adapter gone: a plain model again
        again = await pool.load("qv@1")  # and adapters load onto it as before
        seq = Sequence(tokenizer("reverse apple =", add_special_tokens=False).input_ids,
                       SamplingParams(max_tokens=5, temperature=0), adapter=again.peft_name)
        tokens = [event.token_id async for event in engine.generate(seq)]
        assert tokens == peft_greedy(tiny_model_dir, registry.download("qv"), tokenizer, "reverse apple =", 5)
        with pytest.raises(AdapterNotServable, match="trained on base model"):
            await pool.load("other-base@1")
        assert set(engine.model.peft_config) == {again.peft_name}  # a refusal leaves the model as it was

    asyncio.run(scenario())
    assert pool.metrics.snapshot()["counts"]["cache_eviction"] == 2


def test_evicting_the_active_adapter_leaves_every_layer_on_the_same_adapter(unit_registry, tiny_model_dir):
    """Deleting peft's active adapter lets each layer pick its own successor (q/v layers one adapter, MLP
    layers another, found by the 216-request serve test); after the pool unloads it, a lone request for
    the q/v adapter (the engine's single-adapter pass) decodes exactly as that adapter alone."""
    registry = unit_registry[0]
    tokenizer, engine, pool = engine_with_pool(unit_registry, tiny_model_dir)
    prompt = "reverse apple ="

    async def scenario() -> list[int]:
        active = await pool.load("all@1")  # every linear layer; peft makes the first adapter the active one
        qv = await pool.load("qv@1")  # q and v only
        await pool.load("all2@1")  # every linear layer again
        active.__del__()  # Serve's LRU evicts the active adapter
        engine.model = pool.unload_retired(engine.model)
        per_layer = {tuple(m.active_adapters) for m in engine.model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
        assert per_layer == {(engine.model.active_adapter,)}
        seq = Sequence(tokenizer(prompt, add_special_tokens=False).input_ids, SamplingParams(max_tokens=6, temperature=0),
                       adapter=qv.peft_name)
        return [event.token_id async for event in engine.generate(seq)]

    assert asyncio.run(scenario()) == peft_greedy(tiny_model_dir, registry.download("qv"), tokenizer, prompt, 6)


# --------------------------------------------------------------------------- CLI (checks that run before Ray starts)


def test_cli_serve_reports_spec_problems_and_missing_models_before_starting_ray(tmp_path, capsys):
    import yaml

    from cluster.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": {"name": "Tiny!", "source": "registry:tiny"}, "replicas": 3}))
    assert main(["serve", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "base.name" in err and "replicas: got 3, unknown field" in err

    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({
        "storage": str(tmp_path / "empty-store"),
        "base": {"name": "tiny", "source": "registry:tiny"},
        "merged": [{"name": "m", "adapter": "no-such-adapter"}, {"name": "n", "source": str(tmp_path / "nowhere")}],
    }))
    assert main(["serve", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "base.source: no published version of 'tiny'" in err
    assert "merged[0].adapter: no published version of 'no-such-adapter'" in err
    assert "merged[1].source: local directory" in err
    assert main(["serve", str(missing), "--detach"]) == 2
    assert "--detach" in capsys.readouterr().err  # a fresh interpreter refuses it before Ray starts: tests/e2e/test_refused_before_ray.py
