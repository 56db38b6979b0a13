"""Preference tuning throughput: rayft DPO (LoRA, one Ray Train worker) vs TRL's DPOTrainer.

    .venv/bin/python -m bench.dpo_bench [--quick]

Same model (a random ~10M-parameter Llama), same pairs (`reverse` with a wrong answer, prompts padded with a fixed
instruction so sequences are ~40 tokens), same LoRA (r=8, alpha=16, q+v), same DPO (sigmoid, beta 0.1, the reference
is the base with the adapter off in both), same optimizer, schedule, clipping, batch (8 pairs = 16 rows), steps, fp32.
Runs alternate rayft / TRL, `repeats` times; figures are medians of paired ratios.

steady-state tokens/s: tokens (attention mask, chosen + rejected) of the optimizer steps after the first 2, over those
steps' own time. rayft's comes from the worker's `steady_tokens_per_s`; TRL's from its own token count
(`_total_train_tokens`) and a step timer callback. Target: rayft / TRL >= 0.95.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_common_args, load_now, machine, markdown_table, median, pyplot, rayft_spec, report, say

TARGET = 0.95
STEADY_AFTER = 2  # same as trainers.loop.STEADY_AFTER_STEPS
LORA = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.05}
BETA = 0.1
TRAINING = {"micro_batch_size": 8, "lr": 2e-4, "schedule": "cosine", "max_grad_norm": 1.0, "precision": "fp32"}
MAX_SEQ_LEN = 64
INSTRUCTION = "Spell the word backwards, letter by letter, and answer with that word only. "

FULL = {"model": {"hidden_size": 384, "num_layers": 6, "num_heads": 6, "num_kv_heads": 2, "intermediate_size": 1024},
        "steps": 40, "repeats": 3, "n_train": 512}
QUICK = {"model": {}, "steps": 6, "repeats": 1, "n_train": 64}


def pairs(n: int, seed: int) -> list[dict]:
    from trainers.tiny import preference_examples

    return [{**r, "prompt": INSTRUCTION + r["prompt"]} for r in preference_examples("reverse", n, seed=seed)]


def trl_run(model_dir: str, rows: list[dict], steps: int, out_dir: Path) -> dict:
    import datasets
    import peft
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    class SteadyTimer(TrainerCallback):
        def __init__(self):
            self.t, self.s, self.step, self.tokens0 = None, 0.0, 0, 0

        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step += 1
            if self.step > STEADY_AFTER:
                self.s += time.perf_counter() - self.t
            elif self.step == STEADY_AFTER:
                self.tokens0 = trainer._total_train_tokens

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    timer = SteadyTimer()
    cfg = trl.DPOConfig(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=TRAINING["micro_batch_size"],
                        learning_rate=TRAINING["lr"], lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=steps,
                        save_strategy="no", report_to=[], max_length=MAX_SEQ_LEN, use_cpu=True, bf16=False, seed=0,
                        beta=BETA, loss_type=["sigmoid"], dataloader_num_workers=0)
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=cfg,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=tok, callbacks=[timer],
                             peft_config=peft.LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"],
                                                         lora_dropout=LORA["dropout"]))
    trainer.train()
    tokens = trainer._total_train_tokens - timer.tokens0
    return {"steady_tokens_per_s": tokens / timer.s, "wall_s": time.perf_counter() - t0}


def rayft_run(model_dir: str, train_path: Path, steps: int, storage: str, tag: str) -> dict:
    from trainers.run import run_training

    from trainers.spec import parse_job_spec

    spec = rayft_spec(model_dir, train_path, train_path, storage, LORA, f"dpo-{tag}", {"max_steps": steps, **TRAINING}, MAX_SEQ_LEN)
    raw = spec.model_dump(mode="json")
    raw["objective"] = {"name": "dpo", "beta": BETA, "loss_type": "sigmoid"}
    spec = parse_job_spec(raw, "<bench dpo>")
    t0 = time.perf_counter()
    result = run_training(spec, publish=False)
    return {"steady_tokens_per_s": result.metrics["steady_tokens_per_s"], "wall_s": time.perf_counter() - t0,
            "eval_preference_accuracy": result.metrics.get("eval_preference_accuracy")}


def run(quick: bool) -> dict:
    import ray

    from trainers.run import ensure_ray
    from trainers.tiny import build_tiny_model_dir, write_jsonl

    cfg = QUICK if quick else FULL
    out: dict = {"title": "Preference tuning: rayft DPO vs TRL DPOTrainer", "machine": machine(), "quick": quick,
                 "config": {**cfg, "lora": LORA, "beta": BETA, "training": TRAINING, "max_seq_len": MAX_SEQ_LEN}}
    with tempfile.TemporaryDirectory(prefix="rayft-bench-dpo-") as tmp:
        tmp = Path(tmp)
        model_dir = str(build_tiny_model_dir(tmp / "base", **cfg["model"]))
        rows = pairs(cfg["n_train"], seed=1)
        train_path = write_jsonl(rows, tmp / "train.jsonl")
        ensure_ray()
        runs: dict[str, list[dict]] = {"rayft": [], "trl": []}
        loads = []
        try:
            for i in range(cfg["repeats"]):
                for side in (["rayft", "trl"] if i % 2 == 0 else ["trl", "rayft"]):
                    loads.append(load_now())
                    if side == "rayft":
                        run = rayft_run(model_dir, train_path, cfg["steps"], str(tmp / "store"), f"r{i}")
                    else:
                        run = trl_run(model_dir, rows, cfg["steps"], tmp / f"trl-{i}")
                    runs[side].append(run)
                    say(f"[bench] repeat {i + 1}/{cfg['repeats']} {side}: steady {run['steady_tokens_per_s']:,.0f} tok/s, "
                        f"wall {run['wall_s']:.1f} s")
        finally:
            ray.shutdown()
    loads.append(load_now())
    ratios = [r["steady_tokens_per_s"] / t["steady_tokens_per_s"] for r, t in zip(runs["rayft"], runs["trl"])]
    out.update({
        **runs, "loadavg_during": loads,
        "summary": {
            "rayft_steady_tokens_per_s": median([r["steady_tokens_per_s"] for r in runs["rayft"]]),
            "trl_steady_tokens_per_s": median([r["steady_tokens_per_s"] for r in runs["trl"]]),
            "median_of_paired_ratios": median(ratios), "paired_ratios": ratios,
            "rayft_wall_s": median([r["wall_s"] for r in runs["rayft"]]), "trl_wall_s": median([r["wall_s"] for r in runs["trl"]]),
        },
    })
    out["target"] = {"steady_ratio_min": TARGET, "met": median(ratios) >= TARGET}
    return out


def table(result: dict) -> str:
    s, cfg = result["summary"], result["config"]
    rows = [
        ["TRL DPOTrainer (trl " + str(result["machine"]["versions"].get("trl") or "?") + ")", f"{s['trl_steady_tokens_per_s']:,.0f}",
         "1.000", f"{s['trl_wall_s']:.1f}"],
        ["rayft DPO, 1 Ray Train worker", f"{s['rayft_steady_tokens_per_s']:,.0f}", f"{s['median_of_paired_ratios']:.3f}",
         f"{s['rayft_wall_s']:.1f}"],
    ]
    verdict = "met" if result["target"]["met"] else "MISSED"
    notes = (f"\n\nDPO (sigmoid, beta {cfg['beta']}), LoRA r={cfg['lora']['r']} q+v, reference = base with the adapter off in both; "
             f"{cfg['training']['micro_batch_size']} pairs per step (chosen + rejected rows), <= {cfg['max_seq_len']} tokens; "
             f"{cfg['steps']} steps (first {STEADY_AFTER} not timed); {cfg['repeats']} alternating repeats; fp32. "
             f"Load average during the runs: {min(result['loadavg_during']):.1f}–{max(result['loadavg_during']):.1f}.\n\n"
             f"Target: rayft / TRL >= {TARGET} — measured {s['median_of_paired_ratios']:.3f} (paired ratios "
             f"{', '.join(f'{r:.3f}' for r in s['paired_ratios'])}) ({verdict}).")
    return markdown_table(["trainer", "steady tokens/s (median)", "vs TRL", "wall s (median)"], rows, align="lrrr") + notes


def plot(result: dict):
    plt = pyplot()
    s = result["summary"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(["TRL DPOTrainer", "rayft DPO"], [s["trl_steady_tokens_per_s"], s["rayft_steady_tokens_per_s"]], color=["#2ca02c", "#1f77b4"])
    for i, side in enumerate(("trl", "rayft")):
        for r in result[side]:
            ax.plot(i, r["steady_tokens_per_s"], "k.")
    ax.set_ylabel("steady-state tokens/s")
    ax.set_title(f"rayft / TRL = {s['median_of_paired_ratios']:.3f} (target >= {TARGET})")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    args = parser.parse_args(argv)
    result = run(args.quick)
    report("dpo_bench", args.quick, result, table(result), plot(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
