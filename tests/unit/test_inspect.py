"""`rayft inspect`: figures of an update built by hand are reported exactly (issue 17).

A LoRA adapter whose ΔW = B·A·scale has a known spectrum (so a known rank, effective rank and
norm), and a full fine-tune whose weights received one planted direction, chosen to be as far
as possible from every singular direction of the base weight (an intruder dimension).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from cluster.cli import main
from evaluation.inspect import effective_rank, inspect_target, intruder_count, lora_singular_values

SCALE = 2.0  # lora_alpha 8 / r 4


def lora_adapter_by_hand(base_dir: Path, out: Path) -> Path:
    """A plain-peft r=4 LoRA adapter on q_proj and v_proj whose ΔW is set by hand:

    layer 0 q_proj: ΔW = SCALE·(3·f1e1ᵀ + 4·f2e2ᵀ) → singular values 6, 8: rank 2, effective rank 2, norm 10
    layer 1 v_proj: ΔW = SCALE·(5·f1e1ᵀ + 0.1·f2e2ᵀ) → rank 2 but effective rank 1 (99.96% of the energy in one)
    every other module: B = 0 → ΔW = 0
    """
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    plan = {"layers.0.self_attn.q_proj": (3.0, 4.0), "layers.1.self_attn.v_proj": (5.0, 0.1)}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, module in modules.items():
            if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
                continue
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight  # (r, in), (out, r)
            a.zero_()
            b.zero_()
            for suffix, (c1, c2) in plan.items():
                if name.endswith(suffix):
                    a[0, 0], a[1, 1] = 1.0, 1.0  # rows e1, e2 (orthonormal)
                    b[2, 0], b[3, 1] = c1, c2  # columns c1·f3, c2·f4 (orthonormal)
    model.save_pretrained(out)
    return out


def test_lora_spectrum_rank_and_norm_of_a_hand_built_update(tiny_model_dir, tmp_path, capsys):
    adapter = lora_adapter_by_hand(tiny_model_dir, tmp_path / "adapter")
    report = inspect_target(str(adapter), base=str(tiny_model_dir))
    by_path = {m.path: m for m in report.modules}
    q0 = by_path["model.layers.0.self_attn.q_proj"]
    assert q0.layer == 0 and q0.module == "q_proj"
    assert q0.singular_values[:2] == pytest.approx([8.0, 6.0], rel=1e-5)
    assert q0.delta_norm == pytest.approx(10.0, rel=1e-5)
    assert (q0.rank, q0.effective_rank) == (2, 2)
    v1 = by_path["model.layers.1.self_attn.v_proj"]
    assert v1.delta_norm == pytest.approx(SCALE * math.hypot(5.0, 0.1), rel=1e-5)
    assert (v1.rank, v1.effective_rank) == (2, 1)
    untouched = [m for p, m in by_path.items() if p not in (q0.path, v1.path)]
    assert untouched and all(m.delta_norm == 0 and m.rank == 0 and m.effective_rank == 0 for m in untouched)
    assert all(m.intruders is not None and m.relative_norm is not None for m in report.modules)

    # Through the CLI, as a user runs it: table, then the heatmap.
    png = tmp_path / "heat.png"
    assert main(["inspect", str(adapter), "--base", str(tiny_model_dir), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[:2] == ["0", "q_proj"])
    assert row.split()[3:7] == ["10", q0.relative_norm and f"{q0.relative_norm:.3g}", "2", "2"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_inspect_a_pushed_adapter_by_ref_finds_its_base_in_the_manifest(tiny_model_dir, tmp_path, local_uri, capsys):
    adapter = lora_adapter_by_hand(tiny_model_dir, tmp_path / "adapter")
    assert main(["registry", "push", str(tiny_model_dir), "--name", "tiny", "--storage", local_uri]) == 0
    assert main(["registry", "push", str(adapter), "--name", "hand", "--kind", "adapter", "--base-model", "registry:tiny",
                 "--storage", local_uri]) == 0
    capsys.readouterr()
    assert main(["inspect", "hand", "--storage", local_uri, "--json", "--no-png"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target"] == "hand@1" and report["kind"] == "lora" and report["notes"] == []
    norms = {m["path"]: m["delta_norm"] for m in report["modules"]}
    assert norms["model.layers.0.self_attn.q_proj"] == pytest.approx(10.0, rel=1e-5)


def test_full_fine_tune_with_a_planted_direction_has_one_intruder(tiny_model_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_model_dir, tuned)
    weights = load_file(tuned / "model.safetensors")
    planted, scaled = "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    w = weights[planted].double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    # The unit vectors spread evenly over all of W's singular directions: |cosine| = 1/sqrt(n) with every one.
    left = u.sum(dim=1) / math.sqrt(u.shape[1])
    right = vh.sum(dim=0) / math.sqrt(vh.shape[0])
    weights[planted] = (w + 3 * float(s[0]) * torch.outer(left, right)).float()
    weights[scaled] = weights[scaled] * 1.5  # a change along W's own directions: no intruder
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})

    assert main(["inspect", str(tuned), "--base", str(tiny_model_dir), "--no-png", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "full"
    by_path = {m["path"]: m for m in report["modules"]}
    assert set(by_path) == {planted[: -len(".weight")], scaled[: -len(".weight")]}  # unchanged weights are not listed
    assert by_path[planted[: -len(".weight")]]["intruders"] == 1
    assert by_path[planted[: -len(".weight")]]["effective_rank"] == 1
    assert by_path[scaled[: -len(".weight")]]["intruders"] == 0
    assert by_path[scaled[: -len(".weight")]]["relative_norm"] == pytest.approx(0.5, rel=1e-5)

    # A full model with no base to compare with is refused with one line.
    code = main(["inspect", str(tuned), "--no-png"])
    assert code == 2 and "pass --base" in capsys.readouterr().err


def test_linear_algebra_helpers_agree_with_a_dense_svd():
    import torch

    torch.manual_seed(0)
    a, b = torch.randn(4, 24), torch.randn(16, 4)
    dense = torch.linalg.svdvals(1.5 * b.double() @ a.double())
    assert lora_singular_values(a, b, 1.5).double() == pytest.approx(dense[:4], rel=1e-5)
    assert effective_rank(torch.tensor([3.0, 0.0])) == 1
    assert effective_rank(torch.tensor([3.0, 1.0]), energy=0.9) == 1  # 9 / 10 is exactly 90%
    assert effective_rank(torch.tensor([3.0, 1.1]), energy=0.95) == 2
    assert effective_rank(torch.zeros(3)) == 0
    w = torch.randn(12, 12)
    assert intruder_count(w, 2 * w) == 0  # same singular directions


def test_inspect_refuses_non_lora_adapters_with_one_line(tiny_model_dir, tmp_path, capsys):
    import peft
    from transformers import AutoModelForCausalLM

    ia3 = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft.IA3Config(task_type="CAUSAL_LM"))
    ia3.save_pretrained(tmp_path / "ia3")
    assert main(["inspect", str(tmp_path / "ia3"), "--no-png"]) == 2
    assert "is a IA3 adapter: inspect reads LoRA-family adapters" in capsys.readouterr().err
