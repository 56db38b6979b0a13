"""A method's traits cross the trainers|serve wall in the manifest: trainers/methods/ declares them, the publisher
records them, serving / evaluation / inspect read them; an adapter pushed from elsewhere gets them from the one
fallback (storage.artifacts.adapter_config_traits), which reads adapter_config.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from evaluation.inspect import inspect_lora
from evaluation.runner import EvalError, Target, check_engine, resolve_target
from serve.adapters import AdapterPool, adapter_problems, fetch_adapter, linear_shapes
from serve.generation import Engine
from serve.metrics import ModelMetrics
from serve.spec import AdapterPolicy
from storage.artifacts import adapter_config_traits, artifact_traits, push_directory
from storage.errors import InvalidArtifact
from storage.registry import ArtifactTraits, Manifest, base_config_digest_of_dir, open_registry
from trainers.checkpoints import ADAPTER_DIR, STATE_NAME
from trainers.methods import METHODS
from trainers.publish import publish_run
from trainers.spec import parse_job_spec
from trainers.state_io import save_state
from trainers.tiny import build_random_lora_dir

ROOT = Path(__file__).resolve().parents[2]
#: The one reader outside trainers/methods/ allowed to tell methods apart by what adapter_config.json says.
FALLBACK = ROOT / "storage" / "artifacts.py"
#: A servability / batching rule derived from the files: a peft_type compared, use_dora read, peft's
#: prompt-learning family asked.
DERIVATION = re.compile(
    r"""peft_type\W[^#]*?(?:==|!=|\bnot in\b|\bin\b)|(?:==|!=)\s*["'](?:LORA|IA3|ADALORA|PREFIX_TUNING)["']"""
    r"""|\.get\(\s*["']use_dora["']|\[\s*["']use_dora["']\s*\]|PromptLearningConfig"""
)
#: Packages whose code decides what serves, evaluates or batches. trainers/merge.py tells peft types apart for
#: what peft's add_weighted_adapter combines (a merge rule over files, not a method trait), so trainers/ is left to
#: tests/unit/test_methods.py's name grep.
READERS = ("serve", "evaluation", "service", "cluster", "storage")


def derivations() -> list[str]:
    found = []
    for package in READERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == FALLBACK:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if DERIVATION.search(line.split("#", 1)[0]):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    return found


def test_no_method_rule_is_derived_outside_methods_and_the_fallback():
    assert derivations() == []


@pytest.mark.parametrize("line", [
    'if peft_type != "LORA":',
    'if str(config.get("peft_type", "")).upper() == "LORA":',
    'solo=bool(config.get("use_dora"))',
    'if config["use_dora"] and not policy.allow_dora:',
    "return issubclass(PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type, object), PromptLearningConfig)",
    'elif kind == "IA3":',
])
def test_the_grep_catches_derivations(line):
    assert DERIVATION.search(line)


@pytest.mark.parametrize("line", [
    'method = manifest.method or peft_type.lower() or "unknown"',
    'if traits.serving != "multiplexed":',
    'problems.append(f"method {method} ({peft_type}) cannot be multiplexed")',
])
def test_the_grep_leaves_other_lines(line):
    assert not DERIVATION.search(line)


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if m.TRAITS.is_adapter])
def test_the_fallback_reads_what_each_method_declares(name):
    """The fallback, fed the adapter_config.json a method's own peft config writes, says what its TRAITS say."""
    module = METHODS[name]
    config = module.peft_config(module.Config(), total_steps=100).to_dict()
    config = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    assert adapter_config_traits(config) == module.TRAITS.for_manifest()


# --------------------------------------------------------------------------- publish → manifest → readers


def _publish(tmp_path: Path, registry, tiny_model_dir: Path, method: dict, name: str) -> Manifest:
    """publish_run over a checkpoint as the trainer leaves it: the adapter and the trainer state."""
    ckpt = tmp_path / name / "ckpt"
    build_random_lora_dir(tiny_model_dir, ckpt / ADAPTER_DIR, seed=1, dora=method["name"] == "dora")
    save_state({"step": 2, "history": [{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.5}], "resumes": []},
               ckpt, STATE_NAME)
    spec = parse_job_spec({"model": {"source": str(tiny_model_dir)}, "data": {"train": "examples/data/reverse.jsonl"},
                           "method": method, "output": {"name": name}})
    (manifest,) = publish_run(spec, registry, ckpt, str(tiny_model_dir), {}, "run-1", tmp_path / name)
    return manifest


def test_publish_records_the_method_traits_and_serving_reads_them(tmp_path, tiny_model_dir):
    registry = open_registry(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    dora = _publish(tmp_path, registry, tiny_model_dir, {"name": "dora", "r": 4}, "dora-run")
    lora = _publish(tmp_path, registry, tiny_model_dir, {"name": "lora", "r": 4}, "lora-run")
    stored = json.loads((tmp_path / "store" / "registry" / "dora-run" / "1" / "manifest.json").read_text())
    assert stored["traits"] == {"serving": "multiplexed", "mixes_in_batch": False, "prompt_learning": False}
    assert registry.resolve("dora-run").traits == METHODS["dora"].TRAITS.for_manifest() == dora.traits
    assert lora.traits == ArtifactTraits(serving="multiplexed", mixes_in_batch=True)

    # serve: the pool decodes a DoRA adapter alone because its manifest says it does not mix in a batch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    engine = Engine(model, AutoTokenizer.from_pretrained(tiny_model_dir), max_batch_size=4, max_wait_s=0.0)
    digest = base_config_digest_of_dir(tiny_model_dir)
    pool = AdapterPool(engine, registry, base_name="tiny", base_digest=digest, reload_base=lambda: model,
                       shapes=linear_shapes(model), policy=AdapterPolicy(max_per_replica=4), metrics=ModelMetrics())
    import asyncio

    loaded = [asyncio.run(pool.load(ref)) for ref in ("dora-run@1", "lora-run@1")]
    assert [a.solo for a in loaded] == [True, False]
    no_dora = AdapterPolicy(max_per_replica=4, allow_dora=False)
    directory, manifest, config = fetch_adapter(registry, "dora-run@1")
    assert any("DoRA" in p for p in adapter_problems(manifest, config, directory, base_name="tiny", base_digest=digest,
                                                       shapes=linear_shapes(model), policy=no_dora))

    # eval: a multiplexed adapter joins its base's pool; vLLM refuses the one that does not mix in a batch
    target = resolve_target("lora-run@1", registry)
    assert (target.mode, target.traits) == ("pool", lora.traits)
    with pytest.raises(EvalError, match="DoRA"):
        check_engine([resolve_target("dora-run@1", registry)], "vllm")


def _manifest(traits: ArtifactTraits | None) -> Manifest:
    return Manifest(name="x", version=1, kind="adapter", base_model="tiny", base_config_digest="a" * 64, method="lora",
                    params={}, metrics={}, lineage={}, traits=traits, created_at="2026-01-01T00:00:00Z",
                    files=[{"path": "adapter_model.safetensors", "sha256": "0" * 64, "size": 1}])


def test_readers_take_the_manifest_over_the_files(tmp_path, tiny_model_dir):
    """The manifest is the one home: a LoRA config under a manifest that says `merged` is not multiplexed,
    evaluated nor inspected as one; a manifest without traits (older, or pushed) falls back to the files."""
    adapter = build_random_lora_dir(tiny_model_dir, tmp_path / "a", seed=2)
    config = json.loads((adapter / "adapter_config.json").read_text())
    merged = ArtifactTraits(serving="merged", mixes_in_batch=False)
    assert artifact_traits(_manifest(merged), config) == merged
    assert artifact_traits(_manifest(None), config) == ArtifactTraits(serving="multiplexed", mixes_in_batch=True)
    digest = base_config_digest_of_dir(tiny_model_dir)
    problems = adapter_problems(_manifest(merged).model_copy(update={"base_config_digest": digest}), config, adapter,
                                base_name="tiny", base_digest=digest, shapes={}, policy=AdapterPolicy())
    assert any("cannot be multiplexed" in p for p in problems)
    with pytest.raises(InvalidArtifact, match="inspect reads LoRA-family adapters"):
        inspect_lora(adapter, None, target="x@1", manifest=_manifest(merged))
    assert inspect_lora(adapter, None, target="x@1", manifest=_manifest(None)).modules
    old = _manifest(None).model_dump(mode="json")
    del old["traits"]  # a manifest written before traits were recorded still reads
    assert Manifest.model_validate(old).traits is None
    prompt = ArtifactTraits(serving="none", mixes_in_batch=False, prompt_learning=True)
    registry = open_registry(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    registry.publish("p", adapter, kind="adapter", base_model=str(tiny_model_dir), base_config_digest=digest,
                     method="lora", params={}, metrics={}, lineage={}, traits=prompt)
    with pytest.raises(EvalError, match="work through the prompt"):
        resolve_target("p", registry)
    peft_target = Target("t", "base", {"adapter_config.json": json.dumps(config).encode()}, mode="peft", traits=merged)
    with pytest.raises(EvalError, match="vLLM runs LoRA adapters only"):
        check_engine([peft_target], "vllm")


def test_a_pushed_adapter_gets_its_traits_from_the_fallback(tmp_path, tiny_model_dir):
    registry = open_registry(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    dora = build_random_lora_dir(tiny_model_dir, tmp_path / "dora", seed=3, dora=True)
    manifest = push_directory(registry, dora, "pushed-dora", "adapter", str(tiny_model_dir))
    assert manifest.method is None
    assert manifest.traits == registry.resolve("pushed-dora").traits == ArtifactTraits(serving="multiplexed", mixes_in_batch=False)
    assert push_directory(registry, tiny_model_dir, "pushed-model", "model", None).traits is None
    directory, manifest, config = fetch_adapter(registry, "pushed-dora@1")
    problems = adapter_problems(manifest, config, directory, base_name="tiny", base_digest=manifest.base_config_digest,
                                shapes={}, policy=None, vllm_max_rank=64)
    assert any("DoRA adapter, which vLLM does not serve" in p for p in problems)
