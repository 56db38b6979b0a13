"""Adapter merging: rayft's merges equal peft's own, merged adapters learn both tasks, refusals publish nothing."""

from __future__ import annotations

import json
import shutil
import typing
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from storage.registry import Registry, base_config_digest_of_dir, open_registry
from trainers.merge import COMBINATION_TYPES, DENSITY_TYPES, SIGN_TYPES, SVD_TYPES, MergeError, merge_adapters, parse_merge_options

WEIGHTS = [0.7, -0.4]  # a negative weight exercises peft's sign handling


def save_peft_adapter(model_dir: Path, config: peft.PeftConfig, out: Path, seed: int) -> Path:
    """A peft adapter with random (non-identity) weights, written by plain peft."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    model.save_pretrained(out)
    return out


def lora(**kw) -> peft.LoraConfig:
    return peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **{"r": 4, "lora_alpha": 8, **kw})


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    """A tiny model with another architecture (hidden size 32): a different base."""
    from trainers.tiny import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("other-llama") / "model", hidden_size=32)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir, other_model_dir) -> Registry:
    """A local registry with adapters of every kind the merge must take or refuse, all over `tiny_model_dir`
    unless named otherwise."""
    work = tmp_path_factory.mktemp("merge-sources")
    reg = open_registry(str(work / "store"))
    digest = base_config_digest_of_dir(tiny_model_dir)
    adapters = {
        "task-a": (lora(), "lora"),
        "task-b": (lora(target_modules="all-linear"), "lora"),
        "task-r8": (lora(r=8, lora_alpha=16), "lora"),
        "dora": (lora(use_dora=True), "dora"),
        "rslora": (lora(use_rslora=True), "rslora"),
        "prefix": (peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "prefix_tuning"),
        "ia3-a": (peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False), "ia3"),
        "ia3-b": (peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False), "ia3"),
        "adalora": (peft.AdaLoraConfig(task_type="CAUSAL_LM", init_r=6, target_r=2, total_step=10), "adalora"),
    }
    for seed, (name, (config, method)) in enumerate(adapters.items()):
        path = save_peft_adapter(tiny_model_dir, config, work / name, seed)
        reg.publish(name, path, kind="adapter", base_model=str(tiny_model_dir), base_config_digest=digest,
                    method=method, params={}, metrics={}, lineage={})
    other = save_peft_adapter(other_model_dir, lora(), work / "other-base", 99)
    reg.publish("other-base", other, kind="adapter", base_model=str(other_model_dir),
                base_config_digest=base_config_digest_of_dir(other_model_dir), method="lora", params={}, metrics={}, lineage={})
    reg.publish("tiny", tiny_model_dir, kind="model", base_model=str(tiny_model_dir), base_config_digest=digest,
                method=None, params={}, metrics={}, lineage={})
    # An adapter whose base directory was edited after training: same recorded digest, different base now.
    moved = Path(shutil.copytree(tiny_model_dir, work / "edited-base"))
    reg.publish("on-edited-base", work / "task-a", kind="adapter", base_model=str(moved), base_config_digest=digest,
                method="lora", params={}, metrics={}, lineage={})
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    return reg


def method_options(method: str) -> dict:
    """Options that exercise each knob the method takes."""
    opts: dict = {"method": method, "weights": WEIGHTS, "seed": 7}
    if method in DENSITY_TYPES:
        opts["density"] = 0.6
    if method in SIGN_TYPES:
        opts["majority_sign"] = "frequency"
    if method in SVD_TYPES:
        opts["svd_rank"] = 3
    return opts


def merge(registry: Registry, sources: list[str], into: str, **options):
    return merge_adapters(parse_merge_options({"sources": sources, "into": into, **options}), registry)


def peft_reference(model_dir: Path, adapter_dirs: list[Path], out: Path, **kwargs) -> Path:
    """The same merge through plain peft: no rayft code between the downloaded adapters and the result."""
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter_dirs[0]), adapter_name="s0")
    for i, path in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"s{i}")
    names = [f"s{i}" for i in range(len(adapter_dirs))]
    seed = kwargs.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    model.add_weighted_adapter(names, adapter_name="ref", **kwargs)
    model.save_pretrained(out, selected_adapters=["ref"])
    return out / "ref"


def assert_same_adapter(ours: Path, reference: Path) -> None:
    mine, theirs = load_file(ours / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    a, b = (json.loads((p / "adapter_config.json").read_text()) for p in (ours, reference))
    assert {k: a.get(k) for k in ("r", "lora_alpha", "peft_type")} == {k: b.get(k) for k in ("r", "lora_alpha", "peft_type")}
    assert set(a["target_modules"]) == set(b["target_modules"])


def registry_contents(registry: Registry) -> set[str]:
    return {m.ref for m in registry.list(all_versions=True)}


def test_combination_types_are_peft_s():
    from peft.tuners.lora.model import LoraModel

    annotation = LoraModel.add_weighted_adapter.__annotations__["combination_type"]
    assert set(COMBINATION_TYPES) == set(typing.get_args(eval(annotation, {"Literal": typing.Literal})))


@pytest.mark.parametrize("method", COMBINATION_TYPES)
def test_merged_adapter_equals_peft_add_weighted_adapter(method, registry, tiny_model_dir, tmp_path):
    opts = method_options(method)
    result = merge(registry, ["task-a", "task-b"], f"ab-{method.replace('_', '-')}", **opts)

    assert result.manifest.kind == "adapter" and result.manifest.version == 1
    reference = peft_reference(
        tiny_model_dir, [registry.download("task-a"), registry.download("task-b")], tmp_path,
        weights=WEIGHTS, combination_type=method, density=opts.get("density"), svd_rank=opts.get("svd_rank"),
        majority_sign_method=opts.get("majority_sign", "total"), seed=opts["seed"],
    )
    assert_same_adapter(registry.download(result.manifest.ref), reference)
    lineage = result.manifest.lineage
    assert [s["ref"] for s in lineage["merged_from"]] == ["task-a@1", "task-b@1"]
    assert (lineage["combination_type"], lineage["weights"], lineage["density"]) == (method, WEIGHTS, opts.get("density"))


def test_ia3_adapters_merge_linearly_as_peft_does(registry, tiny_model_dir, tmp_path):
    result = merge(registry, ["ia3-a", "ia3-b"], "ia3-ab", method="linear", weights=[0.5, 0.5])
    reference = peft_reference(tiny_model_dir, [registry.download("ia3-a"), registry.download("ia3-b")], tmp_path, weights=[0.5, 0.5])
    mine, theirs = load_file(registry.download("ia3-ab") / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert result.manifest.method == "ia3" and result.rank is None


def test_different_ranks_merge_with_svd_and_cat(registry):
    assert merge(registry, ["task-a", "task-r8"], "a-r8-svd", method="svd").rank == 8  # the largest source rank
    assert merge(registry, ["task-a", "task-r8"], "a-r8-cat", method="cat").rank == 12  # the sum


def test_full_merge_is_a_model_equal_to_base_plus_merged_adapter(registry, tiny_model_dir):
    opts = {"method": "ties", "density": 0.5, "weights": [1.0, 1.0]}
    adapter = merge(registry, ["task-a", "task-b"], "ab-adapter", **opts).manifest
    model = merge(registry, ["task-a", "task-b"], "ab-model", full=True, **opts).manifest

    assert (model.kind, adapter.kind) == ("model", "adapter")
    assert model.base_config_digest == adapter.base_config_digest == registry.resolve("task-a").base_config_digest
    assert model.lineage["merged_from"] == adapter.lineage["merged_from"]
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {f.path for f in model.files}
    model_dir = registry.download("ab-model")
    merged = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    unmerged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(registry.download("ab-adapter"))).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(["reverse apple = elppa", "upper river = RIVER"], return_tensors="pt", padding=True)
    with torch.no_grad():
        full_logits, adapter_logits, base_logits = (m(**ids).logits for m in (merged, unmerged, base))
    assert (full_logits - adapter_logits).abs().max().item() < 1e-4
    assert (full_logits - base_logits).abs().max().item() > 1e-3  # the merge changed the model
    # Servable like any model: generation runs from the published directory alone.
    out = merged.generate(**tok("reverse apple =", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 0


def test_merged_adapter_passes_the_serve_layer_checks(registry, tiny_model_dir):
    """What the base-model deployment checks before it loads an adapter holds for a merged one."""
    from serve.deployments import adapter_problems, fetch_adapter, linear_shapes
    from serve.spec import AdapterPolicy

    merge(registry, ["task-a", "task-b"], "ab-served", method="ties", density=0.5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    checks = {"base_name": "tiny", "base_digest": base_config_digest_of_dir(tiny_model_dir), "shapes": linear_shapes(base)}
    for ref, servable in (("ab-served", True), ("prefix", False)):  # prefix tuning: the check can fail
        directory, manifest, config = fetch_adapter(registry, ref)
        for policy in (None, AdapterPolicy()):  # merged at load, multiplexed
            assert (adapter_problems(manifest, config, directory, policy=policy, **checks) == []) is servable, (ref, policy)


REFUSALS = [
    (["task-a", "other-base"], {}, "trained on different base models"),
    (["task-a", "tiny"], {}, "source tiny@1 is a model, not an adapter"),
    (["task-a", "prefix"], {}, "source prefix@1 is a prefix_tuning adapter: peft merges only LoRA"),
    (["task-a", "ia3-a"], {}, "cannot merge adapters of different types (ia3: ia3-a@1; lora: task-a@1)"),
    (["task-a", "adalora"], {}, "source adalora@1 is an AdaLoRA adapter"),
    (["task-a", "dora"], {}, "source dora@1 sets use_dora=True, which cannot be merged"),
    (["task-a", "rslora"], {}, "source rslora@1 sets use_rslora=True, which cannot be merged"),
    (["task-a", "task-r8"], {"method": "ties", "density": 0.5}, "needs equal ranks, got r=4 (task-a@1), r=8 (task-r8@1)"),
    (["task-a", "task-r8"], {"method": "linear"}, "needs equal ranks"),
    (["task-a", "task-a@1"], {}, "source task-a@1 is given more than once"),
    (["task-a", "task-a"], {}, "sources: task-a given more than once"),
    (["ia3-a", "ia3-b"], {"method": "ties", "density": 0.5}, "IA3 adapters merge only with method 'linear'"),
    (["task-a", "missing"], {}, "source missing: no published version of 'missing'"),
    (["task-a", "on-edited-base"], {}, "the base changed since training"),
    (["task-a"], {}, "sources: got 1 adapter(s) ['task-a']; a merge needs at least two"),
    (["task-a", "task-b"], {"weights": [1.0]}, "weights: got 1 weight(s) for 2 source(s)"),
    (["task-a", "task-b"], {"weights": [0.0, 0.0]}, "weights: all zero"),
    (["task-a", "task-b"], {"weights": [1.0, float("nan")]}, "weights[1]: got nan"),
    (["task-a", "task-b"], {"method": "ties"}, "density: required by method 'ties'"),
    (["task-a", "task-b"], {"method": "dare_linear", "density": 0.0}, "density: got 0.0, must be > 0"),
    (["task-a", "task-b"], {"method": "dare_ties", "density": 1.5}, "density: got 1.5, must be ≤ 1"),
    (["task-a", "task-b"], {"method": "linear", "density": 0.5}, "density: method 'linear' does not prune"),
    (["task-a", "task-b"], {"method": "svd", "majority_sign": "total"}, "majority_sign: method 'svd' elects no sign"),
    (["task-a", "task-b"], {"method": "ties", "density": 0.5, "svd_rank": 2}, "svd_rank: method 'ties' does no SVD"),
    (["task-a", "task-b"], {"method": "task_arithmetic"}, "method: got 'task_arithmetic', must be one of"),
    (["task-a", "Bad/Name"], {}, "sources[1]: invalid name 'Bad/Name'"),
]


@pytest.mark.parametrize("sources, options, message", REFUSALS, ids=[r[2][:40] for r in REFUSALS])
def test_refusal_is_one_clear_error_and_publishes_nothing(sources, options, message, registry):
    before = registry_contents(registry)
    with pytest.raises(MergeError) as err:
        merge(registry, sources, "refused", **options)
    assert message in str(err.value)
    assert "\n" not in str(err.value) and len(err.value.problems) == 1, err.value.problems
    assert registry_contents(registry) == before and registry.versions("refused") == []


def test_every_problem_is_reported_at_once(registry):
    before = registry_contents(registry)
    with pytest.raises(MergeError) as err:
        merge(registry, ["tiny", "prefix", "dora", "other-base"], "refused-many", method="svd")
    text = str(err.value)
    for part in ("tiny@1 is a model", "prefix@1 is a prefix_tuning adapter", "dora@1 sets use_dora", "different base models"):
        assert part in text
    assert registry_contents(registry) == before


def test_cli_merges_and_refuses(registry, capsys):
    from cluster.cli import main

    uri = registry.store.uri
    assert main(["merge", "task-a", "task-b@1", "--into", "cli-ab", "--method", "dare_ties", "--density", "0.5",
                 "--weights", "0.6", "0.4", "--storage", uri]) == 0
    out = capsys.readouterr().out
    assert "merged task-a@1×0.6 + task-b@1×0.4 (dare_ties, density 0.5)" in out and "published cli-ab@1 (adapter, r=4" in out

    before = registry_contents(registry)
    assert main(["merge", "task-a", "prefix", "--into", "cli-bad", "--storage", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rayft merge: error: cannot merge: source prefix@1 is a prefix_tuning adapter") and "\n" not in err
    assert registry_contents(registry) == before


# ----------------------------------------------------------------------------- real training


def task_loss(model, tokenizer, task: str) -> float:
    """Mean completion-token NLL on 60 rows of `task` drawn with a seed the training data did not use."""
    from trainers.ingest.formats import EncodeOptions, encode_rows, truncate
    from trainers.ingest.stream import Example
    from trainers.loop import mean_loss
    from trainers.precision import Precision
    from trainers.tiny import task_examples

    rows = task_examples(task, 60, seed=99)
    examples = [Example(**truncate(e, 48)[0]) for e in encode_rows(rows, "prompt_completion", tokenizer, EncodeOptions())]
    return mean_loss(model, examples, 16, tokenizer.pad_token_id, torch.device("cpu"), Precision("fp32", torch.float32, None))


@pytest.mark.slow
def test_merge_of_two_task_adapters_beats_base_on_both(ray_session, tiny_model_dir, reverse_data, local_uri, tmp_path):
    from tests.support.inprocess import fit_in_process
    from tests.support.jobs import make_job
    from trainers.run import run_training
    from trainers.tiny import task_examples, write_jsonl

    upper_data = write_jsonl(task_examples("upper", 160, seed=1), tmp_path / "upper.jsonl")
    training = {"max_steps": 36, "lr": 0.01, "eval_every": 36, "checkpoint_every": 36, "log_every": 12}
    for name, data in (("task-reverse", reverse_data), ("task-upper", upper_data)):
        run_training(make_job(tiny_model_dir, data, local_uri, {"name": "lora", "r": 4, "alpha": 8}, name=name, training=training),
                     fit=fit_in_process)  # the worker loop in this process: this test is about merging what trained
    registry = open_registry(local_uri)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_loss = {t: task_loss(base, tok, t) for t in ("reverse", "upper")}
    for name in ("task-reverse", "task-upper"):
        single = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(registry.download(name)))
        print(f"[merge] {name} alone: loss {({t: round(task_loss(single, tok, t), 4) for t in base_loss})}")

    margins = {}
    for method, opts in (("ties", {"density": 0.5}), ("linear", {})):
        merged = merge(registry, ["task-reverse", "task-upper"], f"both-{method}", method=method, **opts)
        assert merged.manifest.method == "lora"
        model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(registry.download(merged.manifest.ref)))
        loss = {t: task_loss(model, tok, t) for t in base_loss}
        margins[method] = {t: base_loss[t] - loss[t] for t in base_loss}
        print(f"[merge] {method}: base loss {_rounded(base_loss)} -> merged {_rounded(loss)}; margin over base {_rounded(margins[method])}")
        # Servable like any adapter: plain peft generates with it.
        assert model.generate(**tok("upper apple =", return_tensors="pt"), max_new_tokens=3, do_sample=False).shape[1] > 0
    for method, by_task in margins.items():
        assert all(margin > 0.02 for margin in by_task.values()), (method, margins)


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in values.items()}
