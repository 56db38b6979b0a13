"""PEFT training: every method, published artifacts, fault tolerance, S3.

The method matrix runs the worker loop in this process (tests/support/inprocess.py); real Ray Train runs what only
it shows: a worker killed from outside and restarted (with the data read before and while it is preprocessed), the
CLI's run, and DDP on two workers."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from storage.registry import open_registry
from storage.store import open_store
from tests.support.inprocess import fit_in_process
from tests.support.jobs import fresh_bucket, make_job
from trainers.checkpoints import PROBE_NAME, STATE_NAME
from trainers.ingest.prepare import prepare_for_job
from trainers.ingest.stream import read_examples
from trainers.loop import mean_loss
from trainers.precision import Precision
from trainers.run import TrainingFailed, run_training
from trainers.state_io import load_state

pytestmark = pytest.mark.slow

# One row per method: the job's method block, and the peft config a user would write by hand
# for the same thing (trainable counts must equal peft's count for it).
METHODS = {
    "lora": ({"name": "lora", "r": 4, "alpha": 8}, lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8)),
    "qlora": ({"name": "qlora", "r": 4, "alpha": 8},
              lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear")),
    "dora": ({"name": "dora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
             lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)),
    "adalora": ({"name": "adalora", "init_r": 6, "target_r": 2},
                lambda: peft.AdaLoraConfig(task_type="CAUSAL_LM", init_r=6, target_r=2, total_step=12)),
    "ia3": ({"name": "ia3"}, lambda: peft.IA3Config(task_type="CAUSAL_LM")),
    "prefix_tuning": ({"name": "prefix_tuning", "num_virtual_tokens": 4},
                      lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)),
    "rslora": ({"name": "rslora", "r": 16, "alpha": 8},
               lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=8, use_rslora=True)),
}


LEARNING_RATES = {"adalora": 0.05, "ia3": 0.1, "prefix_tuning": 0.05}


def base_eval_loss(spec, model_dir) -> float:
    """Eval loss of the untouched base model on the job's own eval split."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    _, prepared = prepare_for_job(spec, spec.storage.uri)  # the run's own preprocessed data (reused)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return mean_loss(model, read_examples(prepared), 8, tok.pad_token_id, torch.device("cpu"), Precision("fp32", torch.float32, None))


def peft_reference_count(model_dir, make_config) -> int:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return peft.get_peft_model(model, make_config()).get_nb_trainable_parameters()[0]


def checkpoint_probe(result) -> dict:
    with result.checkpoint.as_directory() as d:
        return load_state(d, PROBE_NAME)


def plain_peft_logits(model_dir, adapter_dir, input_ids) -> torch.Tensor:
    """Logits through peft alone: no rayft code between the files and the model."""
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits


@pytest.fixture(scope="module")
def matrix_store(s3_server, ray_session) -> str:
    """One S3 store for the in-process method runs: their data is preprocessed once and reused (same files, tokenizer
    and data settings), each run keeps its own run folder and registry name."""
    return fresh_bucket(s3_server, "matrix")


@pytest.mark.parametrize("method", [m for m in METHODS if m != "qlora"])
def test_method_trains_publishes_and_reloads(method, tiny_model_dir, reverse_data, matrix_store):
    s3_uri = matrix_store
    block, reference = METHODS[method]
    # Methods with few or zero-initialised parameters (AdaLoRA's singular values, IA3's scales,
    # prefixes) need a larger step size to move in 12 steps.
    training = {"lr": LEARNING_RATES.get(method, 0.01)}
    spec = make_job(tiny_model_dir, reverse_data, s3_uri, block, name=f"rev-{method.replace('_', '-')}", training=training)
    before = base_eval_loss(spec, tiny_model_dir)

    result = run_training(spec, fit=fit_in_process)

    assert result.metrics["step"] == 12
    assert result.metrics["eval_loss"] < before - 0.05, (method, before, result.metrics["eval_loss"])
    assert result.metrics["trainable_params"] == peft_reference_count(tiny_model_dir, reference)
    # Checkpoints and the published adapter are in the S3 bucket.
    store = open_store(s3_uri)
    assert any(k.endswith("/step-00000012/trainer_state.safetensors") for k in store.list(f"runs/{result.run_id}"))
    manifest = result.manifests[0]
    assert (manifest.kind, manifest.method, manifest.name) == ("adapter", method, spec.output.name)
    assert {"adapter_config.json", "adapter_model.safetensors", "loss_curve.png"} <= {f.path for f in manifest.files}
    # The published adapter, loaded by plain peft, is the model as it was at the end of training.
    adapter_dir = open_registry(s3_uri).download(spec.output.name)
    probe = checkpoint_probe(result)
    logits = plain_peft_logits(tiny_model_dir, adapter_dir, probe["input_ids"])
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-4)


def test_qlora_trains_on_4bit_base_and_merges(tiny_model_dir, reverse_data, matrix_store):
    s3_uri = matrix_store
    import bitsandbytes as bnb

    from trainers.precision import decide_precision
    from trainers.strategy import load_model

    block, reference = METHODS["qlora"]
    spec = make_job(tiny_model_dir, reverse_data, s3_uri, block, name="rev-qlora", output={"name": "rev-qlora", "merge": True})
    model = load_model(spec, str(tiny_model_dir), decide_precision("fp32", torch.device("cpu"), False), torch.device("cpu"), 12)
    linear4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7  # q,k,v,o,gate,up,down in each of the 2 layers

    before = base_eval_loss(spec, tiny_model_dir)
    result = run_training(spec, fit=fit_in_process)
    assert result.metrics["eval_loss"] < before - 0.05
    adapter, merged = result.manifests
    assert merged.name == "rev-qlora-merged" and merged.kind == "model"
    probe = checkpoint_probe(result)
    merged_model = AutoModelForCausalLM.from_pretrained(open_registry(s3_uri).download("rev-qlora-merged"))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged_model.modules())
    with torch.no_grad():
        merged_gap = (merged_model(input_ids=probe["input_ids"]).logits - probe["logits"]).abs().max().item()
    # bitsandbytes' CPU 4-bit matmul and a matmul with the dequantized weights differ by ~1e-3 on
    # their own; merging must add no error beyond that gap of the base model itself.
    base_gap = dequantization_gap(tiny_model_dir, spec, probe["input_ids"])
    assert merged_gap <= 2 * base_gap + 1e-4, (merged_gap, base_gap)


def dequantization_gap(model_dir, spec, input_ids) -> float:
    """Max |logits| difference between the 4-bit base and the same base dequantized to fp32."""
    from trainers.methods import qlora

    quant = qlora.quantization_config(spec.method, torch.float32)
    four_bit = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.float32, device_map={"": "cpu"})
    dequantized = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.float32,
                                                       device_map={"": "cpu"}).dequantize()
    with torch.no_grad():
        return (four_bit(input_ids=input_ids).logits - dequantized(input_ids=input_ids).logits).abs().max().item()


def test_lora_merged_model_equals_unmerged(ray_session, tiny_model_dir, reverse_data, local_uri):
    spec = make_job(tiny_model_dir, reverse_data, local_uri, METHODS["lora"][0], name="rev-lora-m",
                    output={"name": "rev-lora-m", "merge": True})
    result = run_training(spec, fit=fit_in_process)
    registry = open_registry(local_uri)
    probe = checkpoint_probe(result)
    unmerged = plain_peft_logits(tiny_model_dir, registry.download("rev-lora-m"), probe["input_ids"])
    merged_model = AutoModelForCausalLM.from_pretrained(registry.download("rev-lora-m-merged"))
    with torch.no_grad():
        merged = merged_model(input_ids=probe["input_ids"]).logits
    assert (merged - unmerged).abs().max().item() < 1e-4
    lineage = registry.resolve("rev-lora-m-merged").lineage
    assert lineage["merged_from"] == "rev-lora-m@1" and lineage["run_id"] == result.run_id


def _fault_job(model_dir, data, uri, name, max_failures, **data_options):
    return make_job(
        model_dir, data, uri, {"name": "lora", "r": 4, "alpha": 8}, name=name,
        training={"max_steps": 20, "checkpoint_every": 5, "eval_every": 20, "log_every": 5, "lr": 0.005},
        resources={"max_failures": max_failures}, data=data_options,
    )


def test_worker_killed_resumes_from_last_checkpoint(ray_session, tiny_model_dir, reverse_data, local_uri, tmp_path):
    marker = tmp_path / "crashed"
    crashed = run_training(_fault_job(tiny_model_dir, reverse_data, local_uri, "fault-a", 2),
                           faults={"crash_at_step": 12, "marker": str(marker)}, publish=False)
    assert marker.read_text() == "12"  # the worker process really exited at step 12
    with crashed.checkpoint.as_directory() as d:
        state = load_state(d, STATE_NAME)
    assert state["resumes"] == [10]  # after the 2nd checkpoint (step 10), not from step 0
    assert state["step"] == 20 and crashed.metrics["step"] == 20

    # the uninterrupted run in this process: the same data order and steps as a Ray Train worker's
    clean = run_training(_fault_job(tiny_model_dir, reverse_data, local_uri, "fault-b", 0), publish=False, fit=fit_in_process)
    assert crashed.metrics["train_loss"] == pytest.approx(clean.metrics["train_loss"], abs=1e-4)
    assert crashed.metrics["eval_loss"] == pytest.approx(clean.metrics["eval_loss"], abs=1e-4)


def test_failed_run_resumed_with_its_run_id_equals_an_uninterrupted_run(ray_session, tiny_model_dir, reverse_data, local_uri):
    """The resume path itself (newest complete checkpoint, optimizer, schedule, RNG and data position), in this process:
    the run fails after its step-10 checkpoint, is run again under the same run id, and ends where a run that never
    failed ends."""
    spec = _fault_job(tiny_model_dir, reverse_data, local_uri, "resume-a", 0)
    with pytest.raises(TrainingFailed, match="injected failure at step 13"):
        run_training(spec, run_id="resume-a-run", faults={"fail_at_step": 13}, publish=False, fit=fit_in_process)
    resumed = run_training(spec, run_id="resume-a-run", publish=False, fit=fit_in_process)
    with resumed.checkpoint.as_directory() as d:
        assert load_state(d, STATE_NAME)["resumes"] == [10]
    clean = run_training(_fault_job(tiny_model_dir, reverse_data, local_uri, "resume-b", 0), publish=False, fit=fit_in_process)
    assert resumed.metrics["train_loss"] == pytest.approx(clean.metrics["train_loss"], abs=1e-6)
    assert resumed.metrics["eval_loss"] == pytest.approx(clean.metrics["eval_loss"], abs=1e-6)


def test_training_while_preprocessing_resumes_exactly_and_a_rerun_on_the_finished_data_trains_the_same(
        ray_session, tiny_model_dir, reverse_data, tmp_path, capsys):
    store, marker = str(tmp_path / "store"), tmp_path / "crashed"
    crashed = run_training(_fault_job(tiny_model_dir, reverse_data, store, "live-a", 2, preprocess="during"),
                           faults={"crash_at_step": 12, "marker": str(marker)}, publish=False)
    out = capsys.readouterr().out
    assert "[rayft] data: preprocessing while training (data.preprocess: during)" in out
    assert "[rayft] data: 160 rows read, 0 skipped, 0 truncated; " in out  # said when the pass is done
    assert marker.read_text() == "12"
    with crashed.checkpoint.as_directory() as d:
        state = load_state(d, STATE_NAME)
    assert state["resumes"] == [10] and state["data"]["rows_read"] == 160
    rerun_spec = _fault_job(tiny_model_dir, reverse_data, store, "live-b", 0, preprocess="during")
    rerun = run_training(rerun_spec, publish=False, fit=fit_in_process)
    assert "[rayft] data: reusing preprocessed" in capsys.readouterr().out
    assert crashed.metrics["train_loss"] == pytest.approx(rerun.metrics["train_loss"], abs=1e-4)
    assert crashed.metrics["eval_loss"] == pytest.approx(rerun.metrics["eval_loss"], abs=1e-4)
    assert rerun.metrics["eval_loss"] < base_eval_loss(rerun_spec, tiny_model_dir) - 0.1


def test_a_bad_row_found_while_training_fails_the_run_with_its_line_and_publishes_nothing(
        ray_session, tiny_model_dir, tmp_path):
    from trainers.ingest.sources import DataError
    from trainers.tiny import task_examples, write_jsonl

    rows = task_examples("reverse", 400, seed=2)
    path = write_jsonl(rows, tmp_path / "late-bad.jsonl")
    lines = path.read_text().splitlines()
    lines[299] = '{"prompt": "p", "completion": 3}'  # line 300: past the rows checked before training starts
    path.write_text("\n".join(lines) + "\n")
    store = str(tmp_path / "store")
    spec = make_job(tiny_model_dir, path, store, {"name": "lora"}, name="late-bad", data={"preprocess": "during"})
    with pytest.raises(DataError, match=r"late-bad.jsonl:300: expected string fields \"prompt\" and \"completion\""):
        run_training(spec, fit=fit_in_process)
    assert not open_registry(store).list()


def test_failure_without_retries_reports_error_and_keeps_last_checkpoint(ray_session, tiny_model_dir, reverse_data, local_uri):
    spec = _fault_job(tiny_model_dir, reverse_data, local_uri, "fault-c", 0)
    with pytest.raises(TrainingFailed, match="injected failure at step 8"):
        run_training(spec, run_id="fault-c-run", faults={"fail_at_step": 8}, fit=fit_in_process)
    ckpt = Path(local_uri) / "runs" / "fault-c-run" / "step-00000005"
    assert load_state(ckpt, STATE_NAME)["step"] == 5
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = peft.PeftModel.from_pretrained(base, str(ckpt / "adapter"))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert not open_registry(local_uri).list()  # nothing was published


def test_cli_train_prints_summary_and_publishes(ray_session, tiny_model_dir, reverse_data, local_uri, tmp_path, capsys):
    import yaml

    from cluster.cli import main

    spec = make_job(tiny_model_dir, reverse_data, local_uri, {"name": "ia3"}, name="cli-ia3")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude={"tune"})))
    assert main(["train", str(job)]) == 0
    out = capsys.readouterr().out
    assert "trainable params" in out and "published        : cli-ia3@1 (adapter)" in out
    history = json.loads((open_registry(local_uri).download("cli-ia3") / "history.json").read_text())
    assert history[-1]["step"] == 12


def test_lora_ddp_on_two_workers(ray_session, tiny_model_dir, reverse_data, local_uri):
    spec = make_job(tiny_model_dir, reverse_data, local_uri, METHODS["lora"][0], name="rev-lora-ddp",
                    resources={"num_workers": 2, "strategy": "ddp"})
    before = base_eval_loss(spec, tiny_model_dir)
    result = run_training(spec)
    assert result.metrics["eval_loss"] < before - 0.05
    probe = checkpoint_probe(result)
    logits = plain_peft_logits(tiny_model_dir, open_registry(local_uri).download("rev-lora-ddp"), probe["input_ids"])
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-4)
