"""QLoRA's base weights: bytes of a 4-bit NF4 (double-quant) base vs the same model in bf16 (and fp32).

    .venv/bin/python -m bench.memory_bench [--quick]

One random ~32M-parameter Llama (trainers.tiny, hidden 512, 10 layers) is saved once and loaded three
ways through transformers (+ bitsandbytes for 4-bit) on CPU, as rayft's QLoRA loads its base. For each:
- linear-layer bytes: the decoder's linear layers (the ones QLoRA quantizes), weight plus quantization
  state (absmax, nested absmax, offset) counted by hand;
- whole-model bytes: transformers' `get_memory_footprint()` (parameters + buffers), and a by-hand count of
  every distinct tensor storage the model holds, quantization state included;
- bytes on disk of `save_pretrained` (safetensors).
Target (issue 10 §4): 4-bit linear bytes <= 0.3x bf16.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_common_args, human_bytes, machine, markdown_table, pyplot, report

TARGET = 0.3
MODEL = {"hidden_size": 512, "num_layers": 10, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 1536}
QUICK_MODEL = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 384}


def _tensor_bytes(t) -> int:
    return t.nelement() * t.element_size()


def _quant_state_tensors(param) -> list:
    """The tensors a bitsandbytes 4-bit weight carries besides its packed data."""
    qs = getattr(param, "quant_state", None)
    if qs is None:
        return []
    out = [qs.absmax, qs.code]
    if qs.nested:
        out += [qs.state2.absmax, qs.state2.code, qs.offset]
    return [t for t in out if t is not None]


def _distinct_bytes(tensors) -> int:
    """Bytes of the distinct storages among `tensors` (shared code tables count once)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.nelement())
        if key not in seen:
            seen.add(key)
            total += _tensor_bytes(t)
    return total


def measure_model(model) -> dict:
    """Linear-layer and whole-model bytes of a loaded model (4-bit state included)."""
    import bitsandbytes as bnb
    import torch

    linear_tensors, linear_params, n_linear4 = [], 0, 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            w = module.weight
            linear_tensors += [w] + _quant_state_tensors(w)
            if module.bias is not None:
                linear_tensors.append(module.bias)
            linear_params += module.in_features * module.out_features
            n_linear4 += isinstance(module, bnb.nn.Linear4bit)
    every = list(model.parameters()) + list(model.buffers())
    every += [t for p in model.parameters() for t in _quant_state_tensors(p)]
    return {
        "linear_layers_bytes": _distinct_bytes(linear_tensors),
        "linear_layers_params": linear_params,
        "linear4bit_layers": n_linear4,
        "footprint_bytes": model.get_memory_footprint(),
        "by_hand_bytes": _distinct_bytes(every),
    }


def load(model_dir: Path, kind: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind == "fp32":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if kind == "bf16":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    # What rayft's qlora method builds (trainers/methods/qlora.py), with a bf16 compute dtype.
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=quant,
                                                device_map={"": "cpu"})


def disk_bytes(model, out: Path) -> int:
    model.save_pretrained(out, safe_serialization=True)
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def run(quick: bool) -> dict:
    from trainers.tiny import build_tiny_model_dir

    info = machine()
    shape = QUICK_MODEL if quick else MODEL
    rows = {}
    with tempfile.TemporaryDirectory(prefix="rayft-bench-mem-") as tmp:
        model_dir = build_tiny_model_dir(Path(tmp) / "base", **shape)
        for kind in ("fp32", "bf16", "nf4-dq"):
            t0 = time.perf_counter()
            model = load(model_dir, kind)
            row = measure_model(model)
            row["load_s"] = time.perf_counter() - t0
            row["disk_bytes"] = disk_bytes(model, Path(tmp) / f"saved-{kind}")
            if kind == "fp32":
                total_params = sum(p.numel() for p in model.parameters())
            rows[kind] = row
            del model
    bf16, q = rows["bf16"], rows["nf4-dq"]
    ratios = {
        "linear_4bit_vs_bf16": q["linear_layers_bytes"] / bf16["linear_layers_bytes"],
        "whole_model_4bit_vs_bf16_by_hand": q["by_hand_bytes"] / bf16["by_hand_bytes"],
        "whole_model_4bit_vs_bf16_footprint": q["footprint_bytes"] / bf16["footprint_bytes"],
        "disk_4bit_vs_bf16": q["disk_bytes"] / bf16["disk_bytes"],
        "bits_per_linear_param_4bit": 8 * q["linear_layers_bytes"] / q["linear_layers_params"],
    }
    return {"title": "QLoRA base weight bytes: 4-bit NF4 vs bf16", "machine": info, "quick": quick,
            "model_shape": shape, "total_params": total_params, "rows": rows, "ratios": ratios,
            "target": {"linear_4bit_vs_bf16_max": TARGET, "met": ratios["linear_4bit_vs_bf16"] <= TARGET}}


def table(result: dict) -> str:
    rows = []
    for kind, r in result["rows"].items():
        rows.append([kind, human_bytes(r["linear_layers_bytes"]), f"{8 * r['linear_layers_bytes'] / r['linear_layers_params']:.2f}",
                     human_bytes(r["footprint_bytes"]), human_bytes(r["by_hand_bytes"]), human_bytes(r["disk_bytes"]),
                     f"{r['linear_layers_bytes'] / result['rows']['bf16']['linear_layers_bytes']:.3f}x",
                     f"{r['by_hand_bytes'] / result['rows']['bf16']['by_hand_bytes']:.3f}x"])
    headers = ["base weights", "decoder linear bytes", "bits / linear param", "get_memory_footprint()",
               "all tensors (by hand)", "safetensors on disk", "linear vs bf16", "whole model vs bf16"]
    ratio = result["ratios"]["linear_4bit_vs_bf16"]
    verdict = "met" if result["target"]["met"] else "MISSED"
    return (f"Model: random Llama, {result['total_params']:,} parameters, shape {result['model_shape']}.\n\n"
            + markdown_table(headers, rows, align="lrrrrrrr")
            + f"\n\nTarget: 4-bit linear bytes <= {TARGET}x bf16 — measured {ratio:.3f}x ({verdict}). "
            "`get_memory_footprint()` counts parameters and buffers only (the packed uint8 weights, no absmax); "
            "the by-hand count adds the quantization state.")


def plot(result: dict):
    plt = pyplot()
    kinds = list(result["rows"])
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    x = range(len(kinds))
    lin = [result["rows"][k]["linear_layers_bytes"] / 2**20 for k in kinds]
    whole = [result["rows"][k]["by_hand_bytes"] / 2**20 for k in kinds]
    ax.bar([i - 0.2 for i in x], lin, 0.4, label="decoder linear layers")
    ax.bar([i + 0.2 for i in x], whole, 0.4, label="whole model")
    ax.set_xticks(list(x), kinds)
    ax.set_ylabel("MiB")
    ax.set_title(f"Base weights, {result['total_params'] / 1e6:.0f}M-param Llama: "
                 f"4-bit = {result['ratios']['linear_4bit_vs_bf16']:.2f}x bf16 (linear)")
    ax.legend()
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    result = run(args.quick)
    report("memory_bench", args.quick, result, table(result), plot(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
