"""Preference objectives: DPO lifts held-out preference accuracy, the reference is the base (adapter off, or precomputed
for full fine-tuning, also under ZeRO-3 on real Ray Train), QLoRA works, a failed run resumes exactly. Single-worker
runs execute the worker loop in this process (tests/support/inprocess.py)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from storage.registry import open_registry
from tests.support.inprocess import fit_in_process
from tests.support.jobs import make_job
from trainers.checkpoints import PROBE_NAME, STATE_NAME
from trainers.run import TrainingFailed, run_training
from trainers.state_io import load_state
from trainers.tiny import preference_examples, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    """Reverse a word: chosen is the right answer, rejected a wrong one (the word itself, another word reversed...)."""
    return write_jsonl(preference_examples("reverse", 160, seed=1), tmp_path_factory.mktemp("prefs") / "prefs.jsonl")


def pref_job(model_dir, data, uri, name, method=None, objective=None, **sections):
    return make_job(model_dir, data, uri, method or {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
                    name=name, objective=objective or {"name": "dpo", "beta": 0.1}, **sections)


def test_dpo_lora_raises_held_out_preference_accuracy(ray_session, tiny_model_dir, prefs, local_uri):
    spec = pref_job(tiny_model_dir, prefs, local_uri, "rev-dpo", objective={"name": "dpo", "beta": 1.0},
                    training={"max_steps": 40, "micro_batch_size": 16, "eval_every": 20, "checkpoint_every": 40, "lr": 0.01,
                              "log_every": 10})
    result = run_training(spec, fit=fit_in_process)

    m = result.metrics
    assert m["eval_preference_accuracy"] > 0.9 and m["eval_reward_margin"] > 0, m
    manifest = result.manifests[0]
    assert manifest.params["objective"] == {"name": "dpo", "beta": 1.0, "loss_type": "sigmoid", "label_smoothing": 0.0}
    assert manifest.metrics["eval_preference_accuracy"] == m["eval_preference_accuracy"]
    adapter_dir = open_registry(local_uri).download("rev-dpo")
    history = json.loads((adapter_dir / "history.json").read_text())
    before, after = history[0], history[-1]
    assert before["step"] == 0 and after["step"] == 40  # evaluated before the first step, and at the end
    assert before["eval_preference_accuracy"] == 0.0 and before["eval_reward_margin"] == 0.0  # the policy is the reference
    assert "train_preference_accuracy" in after and (adapter_dir / "loss_curve.png").stat().st_size > 0
    # the published adapter, loaded by plain peft, is the model at the end of training
    with result.checkpoint.as_directory() as d:
        probe = load_state(d, PROBE_NAME)
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dir)).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-4)


def _resume_job(model_dir, data, uri, name, max_failures):
    return pref_job(model_dir, data, uri, name, method={"name": "full"}, objective={"name": "kto", "beta": 0.5},
                    training={"max_steps": 8, "checkpoint_every": 4, "eval_every": 8, "log_every": 4, "lr": 0.001},
                    resources={"max_failures": max_failures})


def test_full_kto_failed_run_resumes_like_an_uninterrupted_run(ray_session, tiny_model_dir, local_uri, tmp_path):
    """Full fine-tuning: the reference log-probabilities (KTO's KL term too) are computed by the base before step 1 and
    kept in the checkpoints, so a resumed run, whose model is no longer the base, trains on the same ones. (The worker
    loop in this process: the run fails at step 6 and is run again under its run id; a worker killed from outside and
    restarted by Ray Train is tests/integration/test_train.py's.)"""
    kto_data = write_jsonl(preference_examples("reverse", 96, seed=2, kto=True), tmp_path / "kto.jsonl")
    spec = _resume_job(tiny_model_dir, kto_data, local_uri, "kto-a", 0)
    with pytest.raises(TrainingFailed, match="injected failure at step 6"):
        run_training(spec, run_id="kto-a-run", faults={"fail_at_step": 6}, publish=False, fit=fit_in_process)
    crashed = run_training(spec, run_id="kto-a-run", publish=False, fit=fit_in_process)
    with crashed.checkpoint.as_directory() as d:
        state = load_state(d, STATE_NAME)
    assert state["resumes"] == [4] and state["step"] == 8
    assert set(state["reference"]) == {"train", "eval"}  # a table per part of the preprocessed data, in file order
    assert set(state["reference"]["train"]) == {"sums", "kl_sums"}
    assert len(state["reference"]["train"]["sums"]) + len(state["reference"]["eval"]["sums"]) == 96  # every row
    clean = run_training(_resume_job(tiny_model_dir, kto_data, local_uri, "kto-b", 0), publish=False, fit=fit_in_process)
    for key in ("train_loss", "eval_loss", "eval_kl", "train_rewards_chosen"):
        assert crashed.metrics[key] == pytest.approx(clean.metrics[key], abs=1e-5), key


@pytest.mark.parametrize("method", [{"name": "full"}, {"name": "lora", "r": 4, "alpha": 8}], ids=["full", "lora"])
def test_dpo_under_zero3_on_two_workers_publishes_a_loadable_result(method, ray_session, tiny_model_dir, prefs, local_uri):
    from tests.support.zero3 import zero3_job

    name = f"dpo-z3-{method['name']}"
    spec = zero3_job(tiny_model_dir, prefs, local_uri, method, name, objective={"name": "dpo", "beta": 0.5},
                     training={"max_steps": 4, "checkpoint_every": 4, "eval_every": 4, "lr": 0.005 if method["name"] == "lora" else 0.001})
    result = run_training(spec)

    assert result.metrics["step"] == 4 and result.metrics["eval_preference_accuracy"] is not None
    with result.checkpoint.as_directory() as d:
        state, probe = load_state(d, STATE_NAME), load_state(d, PROBE_NAME)
    # before step 1 the policy is the reference: a precomputed table (full) or the adapter switched off (LoRA) gives
    # the sharded model's own log-probabilities, so every reward is 0
    assert state["history"][0]["step"] == 0 and abs(state["history"][0]["eval_reward_margin"]) < 1e-4
    assert ("reference" in state) == (method["name"] == "full")
    published = open_registry(local_uri).download(name)
    base = AutoModelForCausalLM.from_pretrained(published if method["name"] == "full" else tiny_model_dir)
    model = (base if method["name"] == "full" else peft.PeftModel.from_pretrained(base, str(published))).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-4, rtol=1e-4)


def test_qlora_dpo_runs(ray_session, tiny_model_dir, prefs, local_uri):
    spec = pref_job(tiny_model_dir, prefs, local_uri, "rev-qlora-dpo", method={"name": "qlora", "r": 4, "alpha": 8},
                    training={"max_steps": 4, "eval_every": 4, "checkpoint_every": 4, "log_every": 2})
    result = run_training(spec, fit=fit_in_process)
    assert result.metrics["step"] == 4 and 0 <= result.metrics["eval_preference_accuracy"] <= 1
    assert result.manifests[0].params["objective"]["name"] == "dpo"
