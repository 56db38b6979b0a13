"""The memory/strategy planner (`trainers.plan`, `rayft plan`, the `rayft train` pre-flight).

Models are built from configs on the meta device (no weights); the measured-memory check runs the real
training loop on a tiny model in a subprocess (bench/plan_vs_measured.py --quick's cases).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers import plan as planner
from trainers.methods import METHODS
from trainers.plan import GiB, Hardware, PlanError, PlanRequest

ROOT = Path(__file__).resolve().parents[2]
LLAMA_7B = str(ROOT / "examples" / "configs" / "llama-7b.json")
LLAMA_70B = str(ROOT / "examples" / "configs" / "llama-70b.json")


def _job_yaml(tmp_path: Path, source: str, method: dict, **sections) -> Path:
    import yaml

    spec = {
        "model": {"source": source},
        "data": {"train": "unused.jsonl", "max_seq_len": sections.pop("max_seq_len", 256)},
        "method": method,
        "training": {"micro_batch_size": sections.pop("micro_batch_size", 4), "max_steps": 10},
        "resources": {"num_workers": 1, **sections.pop("resources", {})},
        "output": {"name": "plan-test"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _peft_count(config, method_cfg, total_steps: int = planner.DEFAULT_TOTAL_STEPS) -> tuple[int, int]:
    """peft's own (trainable, total) on a meta-device model, built independently of the planner."""
    import peft
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        peft_cfg = METHODS[method_cfg.name].peft_config(method_cfg, total_steps)
        if peft_cfg is None:
            params = list(model.parameters())
            return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
        return peft.get_peft_model(model, peft_cfg).get_nb_trainable_parameters()


METHOD_VARIANTS = [
    {"name": "full"},
    {"name": "lora"},
    {"name": "lora", "target_modules": "all-linear", "r": 16},
    {"name": "lora", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 4},
    {"name": "qlora"},
    {"name": "dora", "target_modules": "all-linear"},
    {"name": "adalora"},
    {"name": "ia3"},
    {"name": "prefix_tuning", "num_virtual_tokens": 8},
    {"name": "rslora", "r": 32},
]


def _method(data: dict):
    from pydantic import TypeAdapter

    from trainers.methods import MethodConfig

    return TypeAdapter(MethodConfig).validate_python(data)


# ----------------------------------------------------------------------------------------- counts


@pytest.mark.parametrize("variant", METHOD_VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
@pytest.mark.parametrize("model", ["tiny", "7b"])
def test_trainable_count_equals_peft(variant, model, tiny_model_dir):
    source = str(tiny_model_dir) if model == "tiny" else LLAMA_7B
    result = planner.plan_for_model(source, variant, gpus=1, seq_len=32, batch=1)
    expected_trainable, expected_total = _peft_count(planner.load_model_config(source), _method(variant))
    assert result.params.trainable == expected_trainable
    assert result.params.total == expected_total
    assert 0 < result.params.trainable <= result.params.total


@pytest.mark.parametrize("method", ["lora", "qlora", "full", "ia3"])
def test_trainable_count_equals_the_loaded_training_model(method, tiny_model_dir):
    """The same counts as the loop's own model, loaded with real weights (QLoRA: real bitsandbytes 4-bit)."""
    from trainers.precision import decide_precision
    from trainers.strategy import count_parameters, load_model
    from trainers.spec import parse_job_spec

    spec = parse_job_spec({
        "model": {"source": str(tiny_model_dir)}, "data": {"train": "x.jsonl", "max_seq_len": 32},
        "method": {"name": method}, "training": {"precision": "fp32"},
        "resources": {"use_gpu": False}, "output": {"name": "count"},
    })
    precision = decide_precision("fp32", torch.device("cpu"), full_finetune=method == "full")
    model = load_model(spec, str(tiny_model_dir), precision, torch.device("cpu"), spec.training.max_steps)
    trainable, total = count_parameters(model)
    result = planner.plan_for_spec(spec, Hardware(device="cpu"))
    assert (result.params.trainable, result.params.total) == (trainable, total)


def test_four_bit_weight_bytes_match_bitsandbytes(tiny_model_dir):
    """Packed 4-bit data + block constants, as bitsandbytes stores them (double quant on and off)."""
    import bitsandbytes.functional as F

    weight = torch.randn(384, 256)
    for double_quant in (True, False):
        packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        stored = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
        if double_quant:
            stored += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4  # + the offset scalar
        assert planner.four_bit_bytes(weight.numel(), double_quant) == stored

    # The whole loaded QLoRA model: weights + quantization constants vs the plan's weight bytes.
    from trainers.precision import decide_precision
    from trainers.strategy import count_parameters, load_model
    from trainers.spec import parse_job_spec

    spec = parse_job_spec({
        "model": {"source": str(tiny_model_dir)}, "data": {"train": "x.jsonl"}, "method": {"name": "qlora"},
        "training": {"precision": "fp32"}, "resources": {"use_gpu": False}, "output": {"name": "q"},
    })
    precision = decide_precision("fp32", torch.device("cpu"), full_finetune=False)
    model = load_model(spec, str(tiny_model_dir), precision, torch.device("cpu"), 10)
    held = 0
    for param in model.parameters():
        held += param.numel() * param.element_size()
        qs = getattr(param, "quant_state", None)
        if qs is not None:
            held += qs.absmax.numel() * qs.absmax.element_size()
            if qs.nested:
                held += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + 4
    predicted = planner.plan_for_spec(spec, Hardware(device="cpu")).per_device.weights
    assert predicted == pytest.approx(held, rel=0.01)


# ----------------------------------------------------------------------------------- ZeRO-3 figures


def _deepspeed_estimates(total_params: int, largest_layer: int, gpus_per_node: int, nodes: int) -> dict:
    """DeepSpeed's own table (zero_init=1 rows): {(offload_param, offload_optimizer): (cpu_bytes, gpu_bytes)}."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimate_zero3_model_states_mem_needs_all_cold(
            total_params=total_params, largest_layer_params=largest_layer, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
        )
    rows = {}
    pattern = re.compile(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| offload_param=(\S+), offload_optimizer=(\S+), zero_init=1")
    for line in out.getvalue().splitlines():
        match = pattern.match(line)
        if match:
            cpu, gpu, param, optim = match.groups()
            rows[("cpu" in param, "cpu" in optim.rstrip(","))] = (float(cpu) * GiB, float(gpu) * GiB)
    assert len(rows) == 3, out.getvalue()
    return rows


@pytest.mark.parametrize("source", [LLAMA_7B, LLAMA_70B], ids=["7b", "70b"])
@pytest.mark.parametrize("workers,per_node", [(1, 1), (8, 8), (16, 8), (64, 8)])
def test_zero3_model_states_agree_with_deepspeed(source, workers, per_node):
    for offload_params, offload_optimizer in ((False, False), (False, True), (True, True)):
        result = planner.plan_for_model(
            source, "full", gpus=workers, seq_len=128, batch=1, strategy="deepspeed_zero3",
            offload_optimizer=offload_optimizer, offload_params=offload_params,
        )
        req = result.request.hardware
        estimates = _deepspeed_estimates(result.params.total, result.params.largest_layer, per_node, -(-workers // per_node))
        ds_cpu, ds_gpu = estimates[(offload_params, offload_optimizer)]
        d = result.per_device
        model_states = d.weights + d.gradients + d.optimizer
        assert model_states == pytest.approx(ds_gpu, rel=0.05, abs=0.011 * GiB), (offload_params, offload_optimizer, req)
        assert result.host_per_node == pytest.approx(ds_cpu, rel=0.05, abs=0.011 * GiB)


def test_largest_layer_is_deepspeeds(tiny_model_dir):
    """The gathered unit is what DeepSpeed's model_to_params finds on the real model."""
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    total, largest = model_to_params(model)
    result = planner.plan_for_model(str(tiny_model_dir), "full", gpus=2, seq_len=32, batch=1)
    assert (result.params.total, result.params.largest_layer) == (total, largest)
    assert result.strategy == "deepspeed_zero3"


# ------------------------------------------------------------------------------ measured on CPU


def test_prediction_within_15_percent_of_measured_peak(tmp_path):
    """Real CPU training steps (full, LoRA, QLoRA on the tiny model) vs the plan; the 50M cases are in bench/."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "plan_vs_measured.py"), "--quick",
         "--models-dir", str(tmp_path / "models"), "--results-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    rows = json.loads((tmp_path / "plan_vs_measured_quick.json").read_text())["rows"]
    assert {r["case"]["method"] for r in rows} == {"full", "lora", "qlora"}
    for row in rows:
        assert abs(row["error"]) <= 0.15, (row["case"], row["predicted"]["peak"], row["measured"]["train_peak"])
        # the weights alone, as resident after loading (4-bit + constants for qlora)
        assert row["measured"]["after_load"] == pytest.approx(row["predicted"]["weights"], rel=0.5, abs=512 * 1024)


# ---------------------------------------------------------------------------- literature ranges


def test_llama_7b_figures_match_the_literature():
    full = planner.plan_for_model(LLAMA_7B, "full", gpus=1, gpu_memory="80GiB", seq_len=512, batch=1)
    assert full.fits is False
    assert full.per_device.weights + full.per_device.gradients + full.per_device.optimizer >= 100 * GiB
    assert full.per_device.total > 1.4 * 80 * GiB  # far above one 80 GB card

    lora = planner.plan_for_model(LLAMA_7B, {"name": "lora", "r": 16}, gpus=1, seq_len=512, batch=4)
    assert 20 * GiB <= lora.per_device.total <= 30 * GiB
    assert lora.params.trainable_percent < 1
    assert 50 * 2**20 <= planner.plan_for_model(LLAMA_7B, {"name": "lora", "r": 16, "target_modules": "all-linear"},
                                                seq_len=512).artifact_bytes <= 300 * 2**20

    qlora = planner.plan_for_model(LLAMA_7B, "qlora", gpus=1, gpu_memory="24GiB", seq_len=512, batch=1)
    assert qlora.fits is True
    assert 6 * GiB <= qlora.per_device.total <= 16 * GiB
    assert qlora.per_device.weights < 0.4 * lora.per_device.weights  # 4-bit base


def test_llama_70b_needs_sharding_or_4bit():
    full = planner.plan_for_model(LLAMA_70B, "full", gpus=8, gpu_memory="80GiB", seq_len=512, batch=1, strategy="deepspeed_zero3")
    assert full.fits is False  # 18 B/param over 8 GPUs is ~145 GiB each
    offload = planner.plan_for_model(
        LLAMA_70B, "full", gpus=8, gpu_memory="80GiB", seq_len=512, batch=1, strategy="deepspeed_zero3",
        offload_optimizer=True, gradient_checkpointing=True,
    )
    assert offload.fits is True and offload.host_per_node > 1000 * GiB
    qlora = planner.plan_for_model(LLAMA_70B, "qlora", gpus=1, gpu_memory="80GiB", seq_len=512, batch=1, gradient_checkpointing=True)
    assert qlora.fits is True and 35 * GiB < qlora.per_device.total < 80 * GiB


def test_gradient_checkpointing_and_batch_move_activations_only():
    base = planner.plan_for_model(LLAMA_7B, "lora", seq_len=1024, batch=1)
    gc = planner.plan_for_model(LLAMA_7B, "lora", seq_len=1024, batch=1, gradient_checkpointing=True)
    double = planner.plan_for_model(LLAMA_7B, "lora", seq_len=1024, batch=2)
    assert gc.per_device.activations < base.per_device.activations / 4
    assert gc.per_device.weights == base.per_device.weights
    assert double.per_device.activations == pytest.approx(2 * base.per_device.activations, rel=0.02)
    assert base.activations.with_checkpointing == gc.per_device.activations


# -------------------------------------------------------------------------------- recommendation


def test_recommendations_follow_the_methods_table():
    style = planner.recommend("style", Hardware(workers=1, memory_per_device=24 * GiB), LLAMA_7B, seq_len=1024)
    assert style.method in ("lora", "qlora") and style.plan.fits and style.scaling.num_workers == 1

    knowledge = planner.recommend("knowledge", Hardware(workers=8, memory_per_device=80 * GiB), LLAMA_7B, seq_len=1024)
    assert (knowledge.method, knowledge.strategy) == ("full", "deepspeed_zero3")
    assert knowledge.scaling.model_dump() == {"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 1.0, "GPU": 1.0}}

    big = planner.recommend("instruction", Hardware(workers=1, memory_per_device=80 * GiB), LLAMA_70B, seq_len=512)
    assert big.method == "qlora" and big.plan.fits

    nothing = planner.recommend("instruction", Hardware(workers=1, memory_per_device=24 * GiB), LLAMA_70B, seq_len=512)
    assert nothing.plan is None and "nothing fits" in nothing.reasons[0]


# -------------------------------------------------------------------------------------- preflight


def test_preflight_refuses_a_job_that_cannot_fit(tmp_path):
    from trainers.spec import load_job_spec

    spec = load_job_spec(_job_yaml(tmp_path, LLAMA_7B, {"name": "full"}, max_seq_len=512, micro_batch_size=1))
    card = Hardware(device="cuda", workers=1, memory_per_device=24 * GiB)
    with pytest.raises(planner.DoesNotFit) as err:
        planner.preflight_check(spec, hardware=card)
    message = str(err.value)
    assert "\n" not in message
    assert "does not fit" in message and "24.00 GiB" in message
    assert "cheapest configuration that fits: method lora" in message and "--force" in message
    forced = planner.preflight_check(spec, force=True, hardware=card)
    assert forced is not None and forced.fits is False


def test_preflight_passes_a_tiny_job_on_this_host(tmp_path, tiny_model_dir):
    from trainers.spec import load_job_spec

    spec = load_job_spec(_job_yaml(tmp_path, str(tiny_model_dir), {"name": "lora"}, resources={"use_gpu": False}))
    result = planner.preflight_check(spec)  # host memory available per worker (psutil)
    assert result is not None and result.fits is True and result.request.hardware.device == "cpu"


def test_rayft_train_refuses_before_starting_ray(tmp_path, capsys, monkeypatch):
    from cluster.cli import main

    # Inputs are resolved before the plan: a model directory (its config is all the planner reads) and a data file.
    model = tmp_path / "llama-7b"
    model.mkdir()
    (model / "config.json").write_text(Path(LLAMA_7B).read_text())
    (tmp_path / "unused.jsonl").write_text('{"text": "x"}\n')
    monkeypatch.chdir(tmp_path)
    job = _job_yaml(tmp_path, str(model), {"name": "full"}, resources={"use_gpu": False})
    assert main(["train", str(job)]) == 2
    err = _error_lines(capsys, "train")
    assert len(err) == 1 and "job does not fit" in err[0] and "--force" in err[0]
    from tests.support.cli import run_cli_isolated

    rc, stderr, ray_started = run_cli_isolated(["train", str(job)], cwd=tmp_path)
    assert rc == 2 and "job does not fit" in stderr and not ray_started


# -------------------------------------------------------------------------------------------- CLI


def _error_lines(capsys, command: str) -> list[str]:
    """The CLI's error output: `rayft <command>: error: ...` lines (libraries may log other lines to stderr)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"rayft {command}: error:")]
    # a one-line error: nothing of the message spills onto following lines
    tail = err.split(f"rayft {command}: error:", 1)[-1].strip().splitlines()
    assert len(tail) == 1, err
    return lines


def test_cli_plan_json_for_a_model_config(capsys):
    from cluster.cli import main

    assert main(["plan", LLAMA_7B, "--method", "qlora", "--gpu-memory", "24GiB", "--seq-len", "512", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    p = out["plan"]
    assert p["fits"] is True and p["request"]["method"]["name"] == "qlora"
    assert p["per_device"]["total"] == p["per_device"]["peak"] + p["per_device"]["overhead"]
    assert p["scaling"]["num_workers"] == 1


def test_cli_plan_text_for_a_job_with_a_recommendation(tmp_path, tiny_model_dir, capsys):
    from cluster.cli import main

    job = _job_yaml(tmp_path, str(tiny_model_dir), {"name": "lora"})
    assert main(["plan", str(job), "--gpus", "2", "--gpu-memory", "16GiB", "--task", "classification"]) == 0
    out = capsys.readouterr().out
    assert "2 x GPU (16.00 GiB)" in out and "strategy ddp" in out and "verdict: FITS" in out
    assert "recommendation for classification:" in out and "ScalingConfig(num_workers=2" in out


def test_hub_id_offline_fails_with_one_line(monkeypatch, capsys):
    from cluster.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", "meta-llama/Llama-2-7b-hf"]) == 2
    err = _error_lines(capsys, "plan")
    assert len(err) == 1 and "pass a local config.json" in err[0]


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--gpu-memory", "24 parsecs"], "expected a number with a unit"),
        (["--method", "sparse"], "must be one of"),
        (["--method", "qlora", "--gpus", "2", "--strategy", "deepspeed_zero3"], "cannot be sharded by ZeRO-3"),
        (["--offload", "optimizer"], "CPU offload is a ZeRO-3 feature"),
        (["--gpus", "2", "--strategy", "single"], "'single' runs one worker"),
        (["--cpu", "--precision", "fp16"], "fp16 needs CUDA"),
    ],
)
def test_cli_bad_input_is_one_clear_line(argv, expected, capsys):
    from cluster.cli import main

    assert main(["plan", LLAMA_7B, *argv]) == 2
    err = _error_lines(capsys, "plan")
    assert len(err) == 1 and expected in err[0], err


def test_config_only_from_s3(s3_uri):
    """An s3:// model prefix holding only config.json plans: the weights are never needed."""
    from storage.store import open_store

    open_store(s3_uri).put_bytes(Path(LLAMA_7B).read_bytes(), "config.json")
    remote = planner.plan_for_model(s3_uri, "lora", seq_len=64, batch=1)
    local = planner.plan_for_model(LLAMA_7B, "lora", seq_len=64, batch=1)
    assert remote.params == local.params and remote.per_device == local.per_device
    with pytest.raises(PlanError, match="cannot read its config.json"):
        planner.load_model_config(s3_uri.rstrip("/") + "-empty")


def test_bad_model_configs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlanError, match="has no config.json"):
        planner.load_model_config(str(tmp_path / "empty"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(PlanError, match="no `model_type` key"):
        planner.load_model_config(str(bad))
    with pytest.raises(PlanError, match="no such file"):
        planner.load_model_config(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="offload_params"):
        PlanRequest(model=LLAMA_7B, method={"name": "full"}, hardware=Hardware(workers=2), strategy="deepspeed_zero3", offload_params=True)


def test_sizes_parse_both_unit_systems():
    assert planner.parse_size("24GiB") == 24 * 2**30
    assert planner.parse_size("80GB") == 80 * 10**9
    assert planner.parse_size("512MiB") == 512 * 2**20
    assert planner.parse_size("24") == 24 * 2**30
    with pytest.raises(PlanError):
        planner.parse_size("-1GiB")


# ------------------------------------------------------------------------------ the plan inside every run


def test_preflight_never_skips_an_unreadable_model(tmp_path, monkeypatch):
    """A model whose config cannot be read stops the run with one clear error; it never trains unplanned."""
    from trainers.spec import load_job_spec

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = load_job_spec(_job_yaml(tmp_path, "no-such-org/no-such-model", {"name": "lora"}, resources={"use_gpu": False}))
    with pytest.raises(PlanError, match="hub is not reachable"):
        planner.preflight_check(spec)


def test_rayft_train_plans_inside_the_run_and_an_unreadable_model_is_an_error(tmp_path, monkeypatch, capsys):
    from cluster.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # the job's inputs are checked first: its data file and storage are there
    (tmp_path / "unused.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    job = _job_yaml(tmp_path, "no-such-org/no-such-model", {"name": "lora"}, resources={"use_gpu": False})
    assert main(["train", str(job), "--storage", str(tmp_path / "store")]) == 2
    err = _error_lines(capsys, "train")
    assert len(err) == 1 and "no-such-org/no-such-model" in err[0] and "hub is not reachable" in err[0]


def test_cli_overrides_are_validated_with_the_file(tmp_path):
    from trainers.spec import SpecError, load_job_spec

    job = _job_yaml(tmp_path, LLAMA_7B, {"name": "lora"})
    spec = load_job_spec(job, {"output.merge": True, "storage.uri": str(tmp_path / "store")})
    assert spec.output.merge is True and spec.storage.uri == str(tmp_path / "store")
    with pytest.raises(SpecError, match="output.merge"):
        load_job_spec(job, {"output.merge": "sometimes"})
