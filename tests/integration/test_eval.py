"""`rayft eval` and the eval:/output.require pipeline end to end: real Ray (Data actors), real registry, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainers.tiny import build_random_lora_dir, task_examples, write_jsonl
from tests.support.answers import MAX_TOKENS, _decode, _peft_answer, _direct_logprob

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry_setup(tmp_path_factory, tiny_model_dir, s3_server):
    """A registry on the S3 server with the tiny base and two random LoRA adapters of it."""
    from cluster.commands.registry import push_directory
    from storage.registry import base_config_digest_of_dir, open_registry

    bucket = "rayft-eval-tests"
    s3_server.ensure_bucket(bucket)
    storage = f"s3://{bucket}/store"
    work = tmp_path_factory.mktemp("eval")
    registry = open_registry(storage)
    push_directory(registry, str(tiny_model_dir), "eval-base", "model", None)
    digest = base_config_digest_of_dir(tiny_model_dir)
    adapters = {}
    for seed in (1, 2):
        directory = build_random_lora_dir(tiny_model_dir, work / f"lora{seed}", seed, b_std=0.3)
        registry.publish(f"eval-lora{seed}", directory, kind="adapter", base_model="registry:eval-base",
                         base_config_digest=digest, method="lora", params={}, metrics={}, lineage={})
        adapters[f"eval-lora{seed}@1"] = directory
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in task_examples("reverse", 6, seed=5)]
    rows += [{"prompt": "upper stone =", "choices": [" STONE", " stone", " enots"], "answer": 0},
             {"prompt": "reverse river =", "choices": [" revir", " river"], "answer": " revir"},
             {"prompt": "reverse cloud =", "choices": [" cloud", " duolc", " CLOUD"], "answer": 1}]
    data = write_jsonl(rows, work / "rows.jsonl")
    return storage, adapters, data, rows, work


def test_rayft_eval_equals_peft_generate_and_direct_log_likelihoods(registry_setup, ray_session, tiny_model_dir, tmp_path, capsys):
    """`rayft eval` on a base, two registry LoRA adapters (on one base load) and a local adapter
    directory (an actor group of its own): every answer equals peft's `generate`; BLEU equals sacrebleu on those
    answers; choice accuracy and perplexity equal a direct log-likelihood computation with transformers."""
    import math

    import peft
    import sacrebleu
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.cli import main

    storage, adapters, data, rows, _ = registry_setup
    local = str(adapters["eval-lora1@1"])  # the same adapter as eval-lora1, from its directory
    out = tmp_path / "out"
    rc = main(["eval", "eval-base", *adapters, local, "--data", str(data), "--storage", storage,
               "--max-tokens", str(MAX_TOKENS), "--batch-size", "8", "--out", str(out),
               "--metric", "exact_match", "--metric", "bleu", "--metric", "choice_accuracy", "--metric", "perplexity"])
    assert rc == 0
    labels = ["eval-base@1", "eval-lora1@1", "eval-lora2@1", local]
    printed = capsys.readouterr().out
    assert "choice_accuracy ↑" in printed and "perplexity ↓" in printed and f"Δ {local} − eval-base@1" in printed
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())["refs"]
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert list(results) == labels and len(answers) == len(rows)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    models = {"eval-base@1": AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()}
    for ref, directory in adapters.items():
        models[ref] = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(directory)).eval()
    models[local] = models["eval-lora1@1"]
    references = [r.get("completion") or (r["choices"][r["answer"]] if isinstance(r["answer"], int) else r["answer"]) for r in rows]
    for label, model in models.items():
        expected = [_peft_answer(model, tokenizer, r["prompt"]) for r in rows]
        assert [a[label] for a in answers] == expected, label
        metrics = results[label]
        assert metrics["bleu"]["value"] == pytest.approx(sacrebleu.corpus_bleu(expected, [references]).score)
        logprobs = [_direct_logprob(model, tokenizer, r["prompt"], ref) for r, ref in zip(rows, references)]
        tokens = sum(len(tokenizer(ref, add_special_tokens=False).input_ids) for ref in references)
        assert metrics["perplexity"]["value"] == pytest.approx(math.exp(-sum(logprobs) / tokens), rel=1e-4)
        choice_rows = [r for r in rows if "choices" in r]
        right = [max(range(len(r["choices"])), key=lambda i: _direct_logprob(model, tokenizer, r["prompt"], r["choices"][i]))
                 == (r["answer"] if isinstance(r["answer"], int) else r["choices"].index(r["answer"])) for r in choice_rows]
        assert metrics["choice_accuracy"] == {"value": sum(right) / len(right), "ci95": metrics["choice_accuracy"]["ci95"], "n": len(right)}
    # The adapters change the answers (otherwise the comparisons above would prove little).
    assert [a["eval-lora1@1"] for a in answers] != [a["eval-base@1"] for a in answers]
    assert results["eval-lora2@1"]["vs"]["baseline"] == "eval-base@1"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, ray_session, s3_server):
    """One small LoRA training on the reverse task, not published (as the pipeline runs it before its gates)."""
    from tests.support.inprocess import fit_in_process
    from tests.support.jobs import make_job
    from trainers.run import run_training

    bucket = "rayft-eval-gates"
    s3_server.ensure_bucket(bucket)
    work = tmp_path_factory.mktemp("gate")
    train = write_jsonl(task_examples("reverse", 200, seed=1), work / "train.jsonl")
    heldout = write_jsonl(task_examples("reverse", 24, seed=9), work / "heldout.jsonl")
    spec = make_job(tiny_model_dir, train, f"s3://{bucket}/store", {"name": "lora", "r": 8, "alpha": 16}, name="gated",
                    training={"max_steps": 30, "eval_every": 30, "checkpoint_every": 30, "log_every": 10})
    result = run_training(spec, publish=False, fit=fit_in_process)  # the worker loop in this process
    return spec, result, heldout


def test_failing_gate_publishes_nothing_and_says_why(trained_run):
    from evaluation.pipeline import GateFailed, gate_and_publish
    from storage.registry import open_registry
    from trainers.eval_spec import EvalSpec

    spec, result, heldout = trained_run
    gated = spec.model_copy(update={
        "eval": EvalSpec.model_validate({"data": str(heldout), "metrics": ["exact_match"], "max_tokens": 8, "compare_base": False}),
        "output": spec.output.model_copy(update={"require": {"exact_match": ">= 0.99"}}),
    })
    with pytest.raises(GateFailed) as err:
        gate_and_publish(gated, result)
    message = str(err.value)
    assert "not published" in message and "exact_match = " in message and "required >= 0.99" in message
    assert result.checkpoint_path in message
    registry = open_registry(spec.storage.uri)
    assert registry.versions("gated") == []
    assert "results.json" in " ".join(registry.store.list(f"runs/{result.run_id}/eval"))


def test_trained_adapter_beats_its_base_and_publishes_its_results(trained_run):
    from evaluation.pipeline import gate_and_publish
    from storage.registry import open_registry
    from trainers.eval_spec import EvalSpec

    spec, result, heldout = trained_run
    gated = spec.model_copy(update={
        "eval": EvalSpec.model_validate({"data": str(heldout), "metrics": ["chrf", "perplexity"], "max_tokens": 8}),
        "output": spec.output.model_copy(update={"require": {"perplexity": "< 1000"}}),
    })
    gate_and_publish(gated, result)
    manifest = open_registry(spec.storage.uri).resolve("gated")
    results = manifest.metrics["eval"]["metrics"]
    assert results["vs"]["baseline"].startswith("base (")
    ppl = results["vs"]["perplexity"]
    # 30 steps on a 64-wide model do not yet make right answers (the demo's 400 steps on a 128-wide one do), but the
    # held-out references are already far likelier under the adapter than under the random base, and the paired
    # interval says so.
    assert ppl["value"] < 0 and ppl["ci95"][1] < 0, ppl
    assert set(results) >= {"chrf", "perplexity", "vs"} and results["chrf"]["n"] == 24
    assert results["perplexity"]["value"] < 1000
