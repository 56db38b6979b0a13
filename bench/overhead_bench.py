"""Training overhead: rayft's LoRA on one Ray Train worker vs the plain transformers + peft loop.

    .venv/bin/python -m bench.overhead_bench [--quick]

Same model (a random ~10M-parameter Llama), same data (the `json` task), same rows in batches (same lengths,
same padding), same LoRA (r=8, alpha=16, q+v), same optimizer, schedule, clipping, steps and threads.
Runs alternate plain / rayft, `repeats` times; figures are medians.

- steady-state tokens/s: tokens of the optimizer steps after the first 2, over those steps' own time
  (eval and checkpointing excluded). rayft's comes from the worker's `steady_tokens_per_s` metric,
  the plain loop's is computed the same way. Target: rayft / plain >= 0.95.
- start-up overhead: `ray.init` (cold, once), and the wall time of `run_training` (Ray already up)
  minus the wall time of the plain loop doing the same work (load, train, one eval, save).
- MFU: 6 x N x tokens/s over the fp32 matmul peak measured here (2048³, same run, same threads), N =
  parameters in matmuls (all but the input embedding). For LoRA the frozen weights need no weight
  gradient, so the real work is nearer 4·N: the 6·N figure is the convention, not the work done.
- TRL's SFTTrainer as a second baseline, when `trl` is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    add_common_args, load_now, machine, markdown_table, matmul_peak, median, non_embedding_params, pyplot,
    rayft_spec, report, say,
)

TARGET = 0.95
STEADY_AFTER = 2  # same as trainers.loop.STEADY_AFTER_STEPS
LORA = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.05}
TRAINING = {"micro_batch_size": 8, "lr": 2e-4, "schedule": "cosine", "max_grad_norm": 1.0, "precision": "fp32"}
MAX_SEQ_LEN = 64

FULL = {"model": {"hidden_size": 384, "num_layers": 6, "num_heads": 6, "num_kv_heads": 2, "intermediate_size": 1024},
        "steps": 120, "repeats": 5, "n_train": 1024}
QUICK = {"model": {}, "steps": 8, "repeats": 1, "n_train": 64}


def plain_lora_run(model_dir: str, train_path: Path, eval_path: Path, steps: int, out_dir: Path) -> dict:
    """The loop a user would write with transformers + peft: load, LoRA, AdamW + cosine, train, eval, save."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    from trainers.ingest.stream import Example, collate  # the same padding and masks as rayft's batches

    t0 = time.perf_counter()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)

    def encode(row: dict) -> Example:
        p = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return Example((p + c)[:MAX_SEQ_LEN], ([-100] * len(p) + c)[:MAX_SEQ_LEN])

    train = [encode(json.loads(line)) for line in train_path.read_text().splitlines()]
    evals = [encode(json.loads(line)) for line in eval_path.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"],
                                                       lora_dropout=LORA["dropout"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=TRAINING["lr"], weight_decay=0.0)
    sched = get_scheduler("cosine", opt, num_warmup_steps=0, num_training_steps=steps)
    bs = TRAINING["micro_batch_size"]
    steady_tokens, steady_s = 0, 0.0
    for step in range(1, steps + 1):
        ts = time.perf_counter()
        idx = [((step - 1) * bs + i) % len(train) for i in range(bs)]  # same rows and lengths, a fixed order
        batch = collate([train[i] for i in idx], tok.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        loss.item()
        torch.nn.utils.clip_grad_norm_(params, TRAINING["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step > STEADY_AFTER:
            steady_tokens += int(batch["attention_mask"].sum())
            steady_s += time.perf_counter() - ts
    model.eval()
    with torch.no_grad():
        eval_loss = sum(model(**collate(evals[i:i + bs], tok.pad_token_id)).loss.item() for i in range(0, len(evals), bs))
    model.save_pretrained(out_dir)
    return {"steady_tokens_per_s": steady_tokens / steady_s, "wall_s": time.perf_counter() - t0,
            "eval_loss_sum": eval_loss, "threads": torch.get_num_threads()}


def trl_run(model_dir: str, train_path: Path, steps: int, out_dir: Path) -> dict | None:
    """TRL's SFTTrainer on the same job, or None when trl is not installed."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return None
    import datasets
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    class SteadyTimer(TrainerCallback):
        def __init__(self):
            self.t, self.tokens, self.s, self.step = None, 0, 0.0, 0

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step += 1
            if self.step > STEADY_AFTER:
                self.s += time.perf_counter() - self.t

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = datasets.Dataset.from_list([json.loads(line) for line in train_path.read_text().splitlines()])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    timer = SteadyTimer()
    cfg = trl.SFTConfig(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=TRAINING["micro_batch_size"],
                        learning_rate=TRAINING["lr"], lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=steps,
                        save_strategy="no", report_to=[], max_length=MAX_SEQ_LEN, use_cpu=True, seed=0,
                        completion_only_loss=True, dataloader_num_workers=0)
    trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer],
                             peft_config=peft.LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"],
                                                         lora_dropout=LORA["dropout"]))
    trainer.train()
    # TRL pads per batch like rayft; tokens are counted from the same rows (average row length x steps).
    lengths = [len(tok(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in ds]
    per_step = TRAINING["micro_batch_size"] * sum(lengths) / len(lengths)
    return {"steady_tokens_per_s": per_step * (steps - STEADY_AFTER) / timer.s, "wall_s": time.perf_counter() - t0}


def rayft_run(model_dir: str, train_path: Path, eval_path: Path, steps: int, storage: str, cpus: float | None, tag: str) -> dict:
    from trainers.run import run_training

    spec = rayft_spec(model_dir, train_path, eval_path, storage, LORA, f"overhead-{tag}",
                      {"max_steps": steps, **TRAINING}, MAX_SEQ_LEN, cpus_per_worker=cpus)
    t0 = time.perf_counter()
    result = run_training(spec, publish=False)
    return {"steady_tokens_per_s": result.metrics["steady_tokens_per_s"], "tokens_per_s": result.metrics["tokens_per_s"],
            "wall_s": time.perf_counter() - t0, "peak_rss_bytes": result.metrics.get("peak_rss_bytes"),
            "cpus_per_worker": spec.resources.cpus_per_worker}


def run(quick: bool) -> dict:
    import ray
    from transformers import AutoModelForCausalLM

    from trainers.run import ensure_ray
    from trainers.tiny import build_tiny_model_dir, task_examples, write_jsonl

    cfg = QUICK if quick else FULL
    info = machine()
    peak = matmul_peak(repeats=3 if quick else 5)
    say(f"[bench] fp32 matmul peak {peak['flops_per_s'] / 1e9:.1f} GFLOP/s ({peak['threads']} threads)")
    out: dict = {"title": "Training overhead: rayft LoRA vs a plain transformers + peft loop", "machine": info,
                 "quick": quick, "config": {**cfg, "lora": LORA, "training": TRAINING, "max_seq_len": MAX_SEQ_LEN},
                 "matmul_peak": peak}
    with tempfile.TemporaryDirectory(prefix="rayft-bench-ovh-") as tmp:
        tmp = Path(tmp)
        model_dir = str(build_tiny_model_dir(tmp / "base", **cfg["model"]))
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        n_matmul = non_embedding_params(model)
        out["model"] = {"total_params": sum(p.numel() for p in model.parameters()), "matmul_params": n_matmul}
        del model
        train_path = write_jsonl(task_examples("json", cfg["n_train"], seed=1), tmp / "train.jsonl")
        eval_path = write_jsonl(task_examples("json", 16, seed=2), tmp / "eval.jsonl")

        t0 = time.perf_counter()
        ensure_ray()
        out["ray_init_s"] = time.perf_counter() - t0
        import importlib.util

        # TRL, when installed, takes its turn in the same rotation (same load, Ray up for all three).
        sides = ["plain", "rayft"] + (["trl"] if importlib.util.find_spec("trl") is not None else [])
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        trl_note = None if "trl" in sides else "trl is not installed: `pip install -e '.[bench]'` (make bench does) gives this baseline"
        loads = []
        try:
            for i in range(cfg["repeats"]):
                # Rotate the order so a slow drift in machine load hits every side alike.
                k = i % len(sides)
                for side in sides[k:] + sides[:k]:
                    loads.append(load_now())
                    if side == "plain":
                        run = plain_lora_run(model_dir, train_path, eval_path, cfg["steps"], tmp / f"plain-{i}")
                    elif side == "rayft":
                        run = rayft_run(model_dir, train_path, eval_path, cfg["steps"], str(tmp / "store"), None, f"r{i}")
                    else:
                        try:
                            run = trl_run(model_dir, train_path, cfg["steps"], tmp / f"trl-{i}")
                        except Exception as exc:  # a second baseline must not sink the bench: record why it is missing
                            trl_note = f"TRL run failed: {type(exc).__name__}: {exc}"
                            sides.remove("trl")
                            runs.pop("trl")
                            continue
                    runs[side].append(run)
                    say(f"[bench] repeat {i + 1}/{cfg['repeats']} {side}: steady {run['steady_tokens_per_s']:,.0f} tok/s, "
                        f"wall {run['wall_s']:.1f} s")
            # An explicit `cpus_per_worker: 1` (rayft's default before 2026-11-28): Ray sets OMP_NUM_THREADS=1.
            default_cpu = None if quick else rayft_run(model_dir, train_path, eval_path, cfg["steps"], str(tmp / "store"), 1, "cpu1")
        finally:
            ray.shutdown()
    loads.append(load_now())

    plain, rayft, trl = runs["plain"], runs["rayft"], runs.get("trl") or []
    plain_tps = median([r["steady_tokens_per_s"] for r in plain])
    rayft_tps = median([r["steady_tokens_per_s"] for r in rayft])
    ratios = [r["steady_tokens_per_s"] / p["steady_tokens_per_s"] for r, p in zip(rayft, plain)]
    trl_result = {"steady_tokens_per_s": median([r["steady_tokens_per_s"] for r in trl]),
                  "wall_s": median([r["wall_s"] for r in trl]), "runs": trl} if trl else None
    flops_per_token = 6 * n_matmul
    out.update({
        "plain": plain, "rayft": rayft, "rayft_cpus_per_worker_1": default_cpu, "trl": trl_result,
        "trl_note": trl_note,
        "loadavg_during": loads,
        "summary": {
            "plain_steady_tokens_per_s": plain_tps, "rayft_steady_tokens_per_s": rayft_tps,
            "ratio_of_medians": rayft_tps / plain_tps, "median_of_paired_ratios": median(ratios), "paired_ratios": ratios,
            "rayft_wall_s": median([r["wall_s"] for r in rayft]), "plain_wall_s": median([r["wall_s"] for r in plain]),
            "startup_overhead_s": median([r["wall_s"] for r in rayft]) - median([r["wall_s"] for r in plain]),
            "ray_init_s": out["ray_init_s"],
            "mfu_rayft": flops_per_token * rayft_tps / peak["flops_per_s"],
            "mfu_plain": flops_per_token * plain_tps / peak["flops_per_s"],
            # The frozen base needs no weight gradients: forward 2N + input-gradient 2N FLOPs per token.
            "mfu_rayft_4n": 4 * n_matmul * rayft_tps / peak["flops_per_s"],
            "rayft_cpu1_ratio": default_cpu["steady_tokens_per_s"] / plain_tps if default_cpu else None,
            "trl_ratio": median([t["steady_tokens_per_s"] / p["steady_tokens_per_s"] for t, p in zip(trl, plain)]) if trl else None,
            "rayft_vs_trl": median([r["steady_tokens_per_s"] / t["steady_tokens_per_s"] for r, t in zip(rayft, trl)]) if trl else None,
        },
    })
    out["target"] = {"steady_ratio_min": TARGET, "met": median(ratios) >= TARGET}
    return out


def table(result: dict) -> str:
    s, peak = result["summary"], result["matmul_peak"]["flops_per_s"]
    fpt = 6 * result["model"]["matmul_params"]
    rows = [
        ["plain transformers + peft loop", f"{s['plain_steady_tokens_per_s']:,.0f}", "1.000", f"{100 * s['mfu_plain']:.1f}%",
         f"{s['plain_wall_s']:.1f}", "—"],
        ["rayft, 1 Ray Train worker", f"{s['rayft_steady_tokens_per_s']:,.0f}", f"{s['median_of_paired_ratios']:.3f}",
         f"{100 * s['mfu_rayft']:.1f}%", f"{s['rayft_wall_s']:.1f}", f"{s['startup_overhead_s']:+.1f} (+ ray.init {s['ray_init_s']:.1f} once)"],
    ]
    if result.get("rayft_cpus_per_worker_1"):
        r = result["rayft_cpus_per_worker_1"]
        rows.append(["rayft, cpus_per_worker: 1 (1 thread)", f"{r['steady_tokens_per_s']:,.0f}", f"{s['rayft_cpu1_ratio']:.3f}",
                     f"{100 * fpt * r['steady_tokens_per_s'] / peak:.1f}%", f"{r['wall_s']:.1f}", "—"])
    if result.get("trl"):
        r = result["trl"]
        rows.append(["TRL SFTTrainer (trl " + str(result["machine"]["versions"].get("trl") or "?") + ")",
                     f"{r['steady_tokens_per_s']:,.0f}", f"{s['trl_ratio']:.3f}",
                     f"{100 * fpt * r['steady_tokens_per_s'] / peak:.1f}%", f"{r['wall_s']:.1f}", "—"])
    headers = ["loop", "steady tokens/s (median)", "vs plain", "MFU (6·N)", "wall s (median)", "start-up overhead s"]
    work = (f" With LoRA the frozen base needs no weight gradients, so the work done is nearer 4·N FLOPs/token: "
            f"rayft's MFU counted that way is {100 * s['mfu_rayft_4n']:.1f}%.")
    cfg = result["config"]
    verdict = "met" if result["target"]["met"] else "MISSED"
    notes = (
        f"\n\nModel: random Llama, {result['model']['total_params']:,} params ({result['model']['matmul_params']:,} in matmuls); "
        f"LoRA r={cfg['lora']['r']} q+v; batch {cfg['training']['micro_batch_size']} x <= {cfg['max_seq_len']} tokens; "
        f"{cfg['steps']} steps (first {STEADY_AFTER} not timed); {cfg['repeats']} alternating repeats. "
        f"Matmul peak (2048³ fp32, {result['matmul_peak']['threads']} threads, median): {peak / 1e9:.1f} GFLOP/s. "
        f"Load average during the runs: {min(result['loadavg_during']):.1f}–{max(result['loadavg_during']):.1f}.\n\n"
        f"Target: steady-state rayft / plain >= {TARGET} — measured {s['median_of_paired_ratios']:.3f} "
        f"(median of paired ratios {', '.join(f'{r:.3f}' for r in s['paired_ratios'])}; ratio of medians "
        f"{s['ratio_of_medians']:.3f}) ({verdict})." + work
    )
    if result.get("trl"):
        notes += (f" TRL's SFTTrainer (same model, rows, LoRA, batch and steps; its own collator and padding) ran in the "
                  f"same rotation: rayft / TRL = {s['rayft_vs_trl']:.3f} (median of paired ratios).")
    if result.get("trl_note"):
        notes += f" TRL: {result['trl_note']}."
    return markdown_table(headers, rows, align="lrrrrl") + notes


def plot(result: dict):
    plt = pyplot()
    s = result["summary"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = ["plain", "rayft"] + (["TRL"] if result.get("trl") else [])
    medians = [s["plain_steady_tokens_per_s"], s["rayft_steady_tokens_per_s"]]
    each = [result["plain"], result["rayft"]]
    if result.get("trl"):
        medians.append(result["trl"]["steady_tokens_per_s"])
        each.append(result["trl"]["runs"])
    a.bar(labels, medians, color=["#888", "#1f77b4", "#2ca02c"][: len(labels)])
    for i, runs in enumerate(each):
        for r in runs:
            a.plot(i, r["steady_tokens_per_s"], "k.")
    a.set_ylabel("steady-state tokens/s")
    a.set_title(f"rayft / plain = {s['median_of_paired_ratios']:.3f} (target >= {TARGET})")
    b.bar(["plain loop", "rayft run_training", "ray.init (once)"], [s["plain_wall_s"], s["rayft_wall_s"], s["ray_init_s"]],
          color=["#888", "#1f77b4", "#ff7f0e"])
    b.set_ylabel("wall seconds (same steps)")
    b.set_title(f"start-up overhead {s['startup_overhead_s']:+.1f} s per run")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    result = run(args.quick)
    report("overhead_bench", args.quick, result, table(result), plot(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
