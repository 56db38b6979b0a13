"""The methods table, measured: every fine-tuning method rayft offers, on one pre-trained base and one task.

    .venv/bin/python -m bench.methods_bench [--quick]

1. Base: a ~10M-parameter Llama (trainers.tiny's tokenizer) pre-trained briefly, with a plain torch loop,
   on a synthetic corpus generated here with a fixed seed: word sentences, `key:value` lists, JSON objects,
   copy drills, and facts (`groups apple=B river=D`: each of 20 words is in one of four groups). The
   pre-trained base is cached (keyed by everything that shapes it) under ~/.cache/rayft/bench.
2. Task: narrow classification with a locked output format, built on those facts:
   `groups apple river ->` → ` {"first": "B", "second": "D"}`. The prompt form and the JSON answer never
   occur in pre-training. Accuracy is measured on word pairs never seen in fine-tuning.
3. Each method fine-tunes through rayft's real path (`parse_job_spec` → `run_training` on one Ray Train
   worker), same data, steps, batch and seed; learning rates are each method's usual order of magnitude.
4. Per method: trainable params (and % of the base), peak RSS of the Ray Train worker process (its
   `peak_rss_bytes` metric: each run gets a fresh worker process), adapter/model bytes on disk,
   steady-state tokens/s (`steady_tokens_per_s`), final eval loss, and exact-match accuracy of greedy
   decoding on held-out prompts, loading the run's final checkpoint with plain transformers + peft.
Plot: accuracy vs trainable % and vs peak memory.

A first version used trainers.tiny's `json` task (copy three `key:value` fields into a JSON object): at
this size and budget (~10M params, a few hundred steps) no method, full fine-tuning included, learned to
copy the values (0% exact match after 200 steps), so it could not rank methods; see bench/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    add_common_args, human_bytes, load_now, machine, markdown_table, pyplot, rayft_spec, report, say,
)

BASE_SHAPE = {"hidden_size": 384, "num_layers": 6, "num_heads": 6, "num_kv_heads": 2, "intermediate_size": 1024}
QUICK_SHAPE = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 128}
CORPUS_VERSION = 4  # bump when the corpus generator changes: it is part of the cache key

#: (label, method block, learning rate). One learning rate per family, picked on this task with a short
#: sweep at 200 steps (see bench/README.md): full FT 1e-3, the LoRA family 5e-3, AdaLoRA 2e-2, IA3 and
#: prefix tuning (few parameters, scaling vectors / virtual tokens) higher still.
METHODS = [
    ("full FT", {"name": "full"}, 1e-3),
    ("LoRA q+v r=8", {"name": "lora", "r": 8, "alpha": 16}, 5e-3),
    ("LoRA all-linear r=8", {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"}, 5e-3),
    ("QLoRA all-linear r=8", {"name": "qlora", "r": 8, "alpha": 16}, 5e-3),
    ("DoRA all-linear r=8", {"name": "dora", "r": 8, "alpha": 16, "target_modules": "all-linear"}, 5e-3),
    ("rsLoRA q+v r=64", {"name": "rslora", "r": 64, "alpha": 16}, 5e-3),
    ("AdaLoRA q+v r 12→8", {"name": "adalora", "init_r": 12, "target_r": 8, "alpha": 16}, 2e-2),
    ("IA3", {"name": "ia3"}, 1e-1),
    ("prefix tuning 16", {"name": "prefix_tuning", "num_virtual_tokens": 16}, 5e-2),
]

FULL = {"shape": BASE_SHAPE, "pretrain_steps": 600, "pretrain_batch": 16, "block": 64, "pretrain_lr": 2e-3,
        "n_train": 3200, "n_eval": 64, "n_accuracy": 64, "steps": 200, "batch": 16, "seeds": [0, 1], "methods": [m[0] for m in METHODS]}
QUICK = {"shape": QUICK_SHAPE, "pretrain_steps": 10, "pretrain_batch": 8, "block": 64, "pretrain_lr": 1e-3,
         "n_train": 64, "n_eval": 8, "n_accuracy": 8, "steps": 4, "batch": 4, "seeds": [0],
         "methods": ["full FT", "LoRA q+v r=8", "QLoRA all-linear r=8", "AdaLoRA q+v r 12→8", "prefix tuning 16"]}
MAX_SEQ_LEN = 64
PRECISION = "bf16"  # this CPU has AVX-512 BF16 (STACK-NOTES: 2.6x the fp32 matmul rate); GPUs train in bf16 too


# ----------------------------------------------------------------------------------- pre-training


GROUPS = "ABCD"


def word_groups(seed: int = 11) -> dict[str, str]:
    """The facts the base learns in pre-training: each of trainers.tiny's first 20 words is in one group A–D."""
    from trainers.tiny import WORDS

    words = list(WORDS[:20])
    random.Random(seed).shuffle(words)
    return {w: GROUPS[i % len(GROUPS)] for i, w in enumerate(words)}


def pretrain_corpus(n: int, seed: int) -> list[str]:
    """Text the base learns from: the vocabulary, `key:value` lists, JSON objects, copy drills, and facts
    (`groups apple=B river=D`). The task's prompt and its JSON answer never appear: fine-tuning has to teach
    the format and connect it to the facts the base already holds."""
    from trainers.tiny import WORDS

    rng = random.Random(seed)
    groups = word_groups()
    lines = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))))
        elif kind == 1:
            lines.append(" ".join(f"{k}:{rng.choice(WORDS)}" for k in rng.sample(WORDS, rng.randint(2, 4))))
        elif kind == 2:
            lines.append(json.dumps({k: rng.choice(WORDS) for k in rng.sample(WORDS, rng.randint(1, 4))}))
        elif kind == 3:
            lines.append("groups " + " ".join(f"{w}={groups[w]}" for w in rng.sample(list(groups), rng.randint(3, 6))))
        else:
            ws = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
            lines.append("copy " + " ".join(ws) + " = " + " ".join(ws))
    return lines


def task_examples(n: int, seed: int) -> list[dict]:
    """The downstream task: two words → the exact JSON of their groups (format locking on top of known facts)."""
    rng = random.Random(seed)
    groups = word_groups()
    rows = []
    for _ in range(n):
        a, b = rng.sample(sorted(groups), 2)
        rows.append({"prompt": f"groups {a} {b} ->", "completion": " " + json.dumps({"first": groups[a], "second": groups[b]})})
    return rows


def pretrain_key(cfg: dict) -> str:
    blob = json.dumps({k: cfg[k] for k in ("shape", "pretrain_steps", "pretrain_batch", "block", "pretrain_lr")}, sort_keys=True)
    return hashlib.sha256(f"{CORPUS_VERSION}:{blob}".encode()).hexdigest()[:16]


def pretrain_base(cfg: dict, cache_root: Path) -> tuple[Path, dict]:
    """A pre-trained base as a transformers directory (cached); returns (dir, how it was made)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

    from trainers.tiny import build_tiny_model_dir

    target = cache_root / f"base-{pretrain_key(cfg)}"
    meta_path = target / "bench_pretrain.json"
    if meta_path.exists():
        return target, {**json.loads(meta_path.read_text()), "cached": True}
    work = cache_root / f"tmp-{os.getpid()}"
    build_tiny_model_dir(work, seed=0, **cfg["shape"])
    tok = AutoTokenizer.from_pretrained(work)
    model = AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32)
    ids: list[int] = []
    for line in pretrain_corpus(cfg["pretrain_steps"] * cfg["pretrain_batch"] * cfg["block"] // 8, seed=7):
        ids += tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    block, bs = cfg["block"], cfg["pretrain_batch"]
    blocks = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["pretrain_lr"], weight_decay=0.01)
    sched = get_scheduler("cosine", opt, num_warmup_steps=max(cfg["pretrain_steps"] // 20, 1), num_training_steps=cfg["pretrain_steps"])
    order = torch.randperm(len(blocks))
    t0, losses = time.perf_counter(), []
    model.train()
    for step in range(cfg["pretrain_steps"]):
        pick = order[(torch.arange(bs) + step * bs) % len(blocks)]
        batch = blocks[pick]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(cfg["pretrain_steps"] // 10, 1) == 0:
            say(f"[bench] pre-train step {step + 1}/{cfg['pretrain_steps']} loss {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    meta = {"steps": cfg["pretrain_steps"], "tokens": cfg["pretrain_steps"] * bs * block, "corpus_tokens": len(ids),
            "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]), "seconds": time.perf_counter() - t0}
    model.save_pretrained(work, safe_serialization=True)
    (work / "bench_pretrain.json").write_text(json.dumps(meta))
    work.rename(target)
    return target, {**meta, "cached": False}


# ----------------------------------------------------------------------------------- evaluation


def task_data(cfg: dict, root: Path) -> tuple[Path, Path, list[dict]]:
    """Train and eval JSONL files, and held-out accuracy rows whose prompts are in neither
    (20 words give 380 ordered pairs: the accuracy prompts are pairs never trained on)."""
    from trainers.tiny import write_jsonl

    pairs = task_examples(4000, seed=1)
    distinct = list({r["prompt"]: r for r in pairs}.values())
    held = distinct[: cfg["n_accuracy"]]
    held_prompts = {r["prompt"] for r in held}
    rest = [r for r in pairs if r["prompt"] not in held_prompts]
    train, evals = rest[: cfg["n_train"]], rest[cfg["n_train"]: cfg["n_train"] + cfg["n_eval"]]
    return write_jsonl(train, root / "train.jsonl"), write_jsonl(evals, root / "eval.jsonl"), held


def load_for_eval(base_dir: Path, ckpt_dir: Path | None, method: str):
    """The fine-tuned model from a checkpoint directory, with plain transformers + peft (QLoRA: 4-bit base)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from trainers.checkpoints import ADAPTER_DIR, MODEL_DIR
    from trainers.methods import method_module, traits

    if ckpt_dir is None:
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if not traits(method).is_adapter:
        return AutoModelForCausalLM.from_pretrained(ckpt_dir / MODEL_DIR, dtype=torch.float32)
    kwargs = {"dtype": torch.float32}
    module = method_module(method)
    quantization = module.quantization_config(module.Config(), torch.float32)  # QLoRA: its 4-bit base
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": "cpu"})
    base = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    return peft.PeftModel.from_pretrained(base, str(ckpt_dir / ADAPTER_DIR))


def is_full_model(row: dict) -> bool:
    """A row of full fine-tuning (the whole model trained): the baseline the adapters are measured against."""
    from trainers.methods import traits

    return not traits(row["method"]["name"]).is_adapter


def score(text: str, expected: str) -> tuple[bool, bool, float]:
    """(exact match, valid JSON with the expected keys in order, share of values right) for one completion."""
    want = json.loads(expected)
    try:
        got = json.loads(text)
    except ValueError:
        return False, False, 0.0
    if not isinstance(got, dict):
        return False, False, 0.0
    keys_ok = list(got) == list(want)
    values = sum(got.get(k) == v for k, v in want.items()) / len(want)
    return text.strip() == expected.strip(), keys_ok, values


def greedy_complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy decoding by full forward passes, prompts of equal token length batched together.

    Not `generate()`: with transformers 5 + peft 0.21, `generate` on a prefix-tuning model drops the
    learned prefix ("Both `past_key_values` and `cache` are set ... ignoring past_key_values"), so it
    would score prefix tuning as the untouched base. A forward pass applies every method as in training.
    """
    import torch

    eos = tokenizer.eos_token_id
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out: list[str] = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    for length, members in by_length.items():
        ids = torch.tensor([encoded[i] for i in members])
        done = torch.zeros(len(members), dtype=torch.bool)
        for _ in range(max_new_tokens):
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1, :]
            nxt = torch.where(done, torch.full_like(done, eos, dtype=torch.long), logits.argmax(-1))
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= nxt == eos
            if bool(done.all()):
                break
        for row, i in zip(ids[:, length:].tolist(), members):
            out[i] = tokenizer.decode(row[: row.index(eos)] if eos in row else row, skip_special_tokens=True)
    return out


def exact_match(model, tokenizer, rows: list[dict]) -> dict:
    """Greedy-decode every prompt; exact-match accuracy (the headline), plus how close the misses were."""
    model.eval()
    texts = greedy_complete(model, tokenizer, [r["prompt"] for r in rows])
    exact, keys, values, samples = 0, 0, 0.0, []
    for row, text in zip(rows, texts):
        ok, keys_ok, share = score(text, row["completion"])
        exact, keys, values = exact + ok, keys + keys_ok, values + share
        if len(samples) < 3:
            samples.append({"prompt": row["prompt"], "expected": row["completion"], "got": text, "ok": ok})
    n = len(rows)
    return {"accuracy": exact / n, "json_keys_ok": keys / n, "value_accuracy": values / n, "samples": samples}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def base_eval_loss(base_dir: Path, spec) -> float:
    """Mean token loss of the base on the eval file, with the masks rayft's pipeline builds (same encoder)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.ingest.formats import EncodeOptions, encode_rows, truncate
    from trainers.ingest.stream import Example
    from trainers.loop import mean_loss
    from trainers.precision import Precision

    tok = AutoTokenizer.from_pretrained(base_dir)
    rows = [json.loads(line) for line in Path(spec.data.eval).read_text().splitlines() if line.strip()]
    examples = [Example(**truncate(e, spec.data.max_seq_len)[0]) for e in encode_rows(rows, "prompt_completion", tok, EncodeOptions())]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return mean_loss(model, examples, 16, tok.pad_token_id, torch.device("cpu"), Precision("fp32", torch.float32, None))


# ----------------------------------------------------------------------------------- the runs


def fine_tune(label: str, block: dict, lr: float, seed: int, cfg: dict, base_dir: Path, train: Path, evals: Path,
              held: list[dict], storage: str) -> dict:
    """One rayft run (one seed) and its scores."""
    from transformers import AutoTokenizer

    from trainers.checkpoints import ADAPTER_DIR, MODEL_DIR
    from trainers.methods import traits
    from trainers.run import run_training

    steps = cfg["steps"]
    training = {"max_steps": steps, "micro_batch_size": cfg["batch"], "lr": lr, "warmup_steps": max(steps // 10, 1),
                "precision": PRECISION, "seed": seed}
    name = "m-" + "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")[:36] + f"-s{seed}"
    spec = rayft_spec(base_dir, train, evals, storage, block, name, training, MAX_SEQ_LEN)
    load = load_now()
    result = run_training(spec, publish=False)
    m = result.metrics
    with result.checkpoint.as_directory() as ckpt:
        ckpt = Path(ckpt)
        artifact = ckpt / (ADAPTER_DIR if traits(block["name"]).is_adapter else MODEL_DIR)
        artifact_bytes = dir_bytes(artifact)
        tok = AutoTokenizer.from_pretrained(base_dir)
        t0 = time.perf_counter()
        scores = exact_match(load_for_eval(base_dir, ckpt, block["name"]), tok, held)
        decode_s = time.perf_counter() - t0
    row = {
        "label": label, "seed": seed, "method": block, "lr": lr, "trainable_params": m["trainable_params"], "total_params": m["total_params"],
        "peak_rss_bytes": m.get("peak_rss_bytes"), "artifact_bytes": artifact_bytes,
        "steady_tokens_per_s": m.get("steady_tokens_per_s"), "tokens_per_s": m.get("tokens_per_s"),
        "eval_loss": m["eval_loss"], "train_loss": m["train_loss"], **scores,
        "wall_s": result.wall_s, "decode_s": decode_s, "loadavg_at_start": load,
    }
    say(f"[bench] {label} (seed {seed}): accuracy {scores['accuracy']:.3f} (values {scores['value_accuracy']:.3f}), eval loss {m['eval_loss']:.3f}, "
        f"peak RSS {human_bytes(row['peak_rss_bytes'])}, {row['steady_tokens_per_s'] or 0:,.0f} tok/s, wall {result.wall_s:.0f} s")
    return row


def summarize(runs: list[dict]) -> dict:
    """One table row from a method's runs (one per seed): means of the scores, the largest peak memory."""
    first = runs[0]
    mean = lambda key: sum(r[key] for r in runs) / len(runs)  # noqa: E731
    rates = sorted(r["steady_tokens_per_s"] for r in runs if r["steady_tokens_per_s"])
    return {
        "label": first["label"], "method": first["method"], "lr": first["lr"],
        "trainable_params": first["trainable_params"], "artifact_bytes": first["artifact_bytes"],
        "peak_rss_bytes": max(r["peak_rss_bytes"] or 0 for r in runs) or None,
        "steady_tokens_per_s": rates[len(rates) // 2] if rates else None,
        "eval_loss": mean("eval_loss"), "accuracy": mean("accuracy"), "value_accuracy": mean("value_accuracy"),
        "json_keys_ok": mean("json_keys_ok"), "accuracy_by_seed": [r["accuracy"] for r in runs],
        "loadavg_at_start": first["loadavg_at_start"], "runs": runs,
    }


def runtime_floor(storage: str, root: Path) -> int | None:
    """Peak RSS of a Ray Train worker running rayft's loop on a micro model: the runtime's own share
    (torch, Ray, transformers, peft) that every row's peak memory includes."""
    from trainers.run import run_training
    from trainers.tiny import build_tiny_model_dir, task_examples as tiny_rows, write_jsonl

    model_dir = build_tiny_model_dir(root / "micro", hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    data = write_jsonl(tiny_rows("reverse", 16, seed=0), root / "micro.jsonl")
    spec = rayft_spec(model_dir, data, None, storage, {"name": "lora", "r": 2, "alpha": 4}, "m-floor",
                      {"max_steps": 3, "micro_batch_size": 2, "precision": PRECISION}, MAX_SEQ_LEN)
    return run_training(spec, publish=False).metrics.get("peak_rss_bytes")


def run(quick: bool, cache_root: Path) -> dict:
    import ray
    from transformers import AutoTokenizer

    from trainers.run import ensure_ray

    cfg = QUICK if quick else FULL
    info = machine()
    t_start = time.perf_counter()
    cache_root.mkdir(parents=True, exist_ok=True)
    base_dir, pretrain = pretrain_base(cfg, cache_root)
    how = "cached" if pretrain["cached"] else f"pre-trained in {pretrain['seconds']:.0f} s"
    say(f"[bench] base {base_dir} ({how}, "
        f"loss {pretrain['first_loss']:.2f} → {pretrain['final_loss']:.2f})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="rayft-bench-methods-") as tmp:
        tmp = Path(tmp)
        train, evals, held = task_data(cfg, tmp)
        tok = AutoTokenizer.from_pretrained(base_dir)
        base_model = load_for_eval(base_dir, None, "base")
        base_params = sum(p.numel() for p in base_model.parameters())
        base_scores = exact_match(base_model, tok, held)
        del base_model
        ensure_ray()
        try:
            floor = runtime_floor(str(tmp / "store"), tmp)
            for label, block, lr in METHODS:
                if label in cfg["methods"]:
                    runs = [fine_tune(label, block, lr, seed, cfg, base_dir, train, evals, held, str(tmp / "store"))
                            for seed in cfg["seeds"]]
                    rows.append(summarize(runs))
        finally:
            ray.shutdown()
        probe_spec = rayft_spec(base_dir, train, evals, str(tmp / "store"), {"name": "full"}, "probe", {"max_steps": 1})
        base_loss = base_eval_loss(base_dir, probe_spec)
    full = next((r for r in rows if is_full_model(r)), None)
    for r in rows:
        r["trainable_pct"] = 100 * r["trainable_params"] / base_params  # peft counts a 4-bit base's packed halves
        r["accuracy_vs_full_pct"] = 100 * r["accuracy"] / full["accuracy"] if full and full["accuracy"] > 0 else None
    peft_rows = [r for r in rows if not is_full_model(r) and r["accuracy_vs_full_pct"] is not None]
    return {
        "title": "Fine-tuning methods, measured (rayft on one Ray Train worker)", "machine": info, "quick": quick,
        "config": {**cfg, "max_seq_len": MAX_SEQ_LEN, "precision": PRECISION, "task": "groups → JSON"},
        "pretrain": pretrain, "base": {"params": base_params, "eval_loss": base_loss, **base_scores},
        "runtime_floor_rss_bytes": floor,
        "rows": rows, "loadavg_at_end": load_now(), "wall_s": time.perf_counter() - t_start,
        "summary": {
            "peft_accuracy_vs_full_pct_median": sorted(r["accuracy_vs_full_pct"] for r in peft_rows)[len(peft_rows) // 2] if peft_rows else None,
            "peft_at_or_above_90pct": [r["label"] for r in peft_rows if r["accuracy_vs_full_pct"] >= 90],
            "peft_below_90pct": [r["label"] for r in peft_rows if r["accuracy_vs_full_pct"] < 90],
        },
    }


def table(result: dict) -> str:
    cfg = result["config"]
    floor = result.get("runtime_floor_rss_bytes")
    headers = ["method", "lr", "trainable params", "trainable %", "peak RSS (worker)", "above runtime floor",
               "artifact on disk", "tokens/s", "eval loss", "exact match (per seed)", "values right", "% of full FT"]
    b = result["base"]
    rows = [["base, not fine-tuned", "—", "0", "0", "—", "—", "—", "—", f"{b['eval_loss']:.3f}",
             f"{100 * b['accuracy']:.1f}%", f"{100 * b['value_accuracy']:.1f}%", "—"]]
    for r in result["rows"]:
        per_seed = " / ".join(f"{100 * a:.0f}" for a in r["accuracy_by_seed"])
        above = r["peak_rss_bytes"] - floor if r["peak_rss_bytes"] and floor else None
        rows.append([r["label"], f"{r['lr']:g}", f"{r['trainable_params']:,}", f"{r['trainable_pct']:.3g}",
                     human_bytes(r["peak_rss_bytes"]), human_bytes(above), human_bytes(r["artifact_bytes"]),
                     f"{r['steady_tokens_per_s']:,.0f}" if r["steady_tokens_per_s"] else "—", f"{r['eval_loss']:.3f}",
                     f"{100 * r['accuracy']:.1f}% ({per_seed})", f"{100 * r['value_accuracy']:.1f}%",
                     f"{r['accuracy_vs_full_pct']:.0f}%" if r["accuracy_vs_full_pct"] is not None else "—"])
    p = result["pretrain"]
    s = result["summary"]
    seeds = cfg["seeds"]
    notes = (
        f"\n\nBase: Llama {cfg['shape']} ({b['params']:,} params), pre-trained {p['steps']} steps x {cfg['pretrain_batch']} x "
        f"{cfg['block']} tokens on the bench's synthetic corpus (loss {p['first_loss']:.2f} → {p['final_loss']:.2f}). "
        f"Task: `{cfg['task']}` (`groups apple river ->` → `{{\"first\": \"B\", \"second\": \"D\"}}`, groups known "
        f"from pre-training); {cfg['n_train']} train rows, {cfg['n_eval']} eval rows. Exact match: greedy decoding of "
        f"{cfg['n_accuracy']} held-out word pairs gives exactly the expected JSON (mean over seeds {seeds}, each seed's "
        f"figure in brackets); values right: share of the two groups right. Every method: {cfg['steps']} steps, batch "
        f"{cfg['batch']}, {cfg['precision']} autocast, cosine schedule with 10% warmup, through `run_training` on one Ray "
        "Train worker. Peak RSS: the worker process's `ru_maxrss`, largest over seeds; the runtime floor "
        f"({human_bytes(floor)}) is the same measurement for a micro model. tokens/s: steady state (steps after the "
        f"first 2), median over seeds. Load average {result['rows'][0]['loadavg_at_start'] if result['rows'] else '—'} "
        f"at the first run, {result['loadavg_at_end']} at the end; bench wall time {result['wall_s'] / 60:.1f} min."
    )
    if s["peft_accuracy_vs_full_pct_median"] is not None:
        notes += (f"\n\nClaim checked: \"PEFT recovers 90–95% of full fine-tuning quality\". Median PEFT method here: "
                  f"{s['peft_accuracy_vs_full_pct_median']:.0f}% of full FT's exact match; at or above 90%: "
                  f"{', '.join(s['peft_at_or_above_90pct']) or 'none'}; below: {', '.join(s['peft_below_90pct']) or 'none'}.")
    return markdown_table(headers, rows, align="lrrrrrrrrrrr") + notes


def plot(result: dict):
    plt = pyplot()
    rows = result["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.4))
    for i, r in enumerate(rows):
        color = f"C{i % 10}"
        x_pct = max(r["trainable_pct"] or 1e-3, 1e-3)
        x_mem = (r["peak_rss_bytes"] or 0) / 2**20
        for ax, x in ((a, x_pct), (b, x_mem)):
            ax.scatter([x] * len(r["accuracy_by_seed"]), [100 * v for v in r["accuracy_by_seed"]], color=color, alpha=0.35, s=14)
            ax.scatter(x, 100 * r["accuracy"], color=color, s=40)
            ax.annotate(r["label"], (x, 100 * r["accuracy"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    a.set_xscale("log")
    a.set_xlabel("trainable parameters (% of base, log)")
    b.set_xlabel("peak RSS of the training worker (MiB)")
    for ax in (a, b):
        ax.set_ylabel("exact match on held-out prompts (%)")
        ax.axhline(100 * result["base"]["accuracy"], color="#aaa", ls=":", lw=1)
        ax.set_ylim(-3, 103)
    full = next((r for r in rows if is_full_model(r)), None)
    if full:
        for ax in (a, b):
            ax.axhline(90 * full["accuracy"], color="#d62728", ls="--", lw=1, label="90% of full FT")
        a.legend(fontsize=8, loc="center left")
    fig.suptitle("Accuracy vs trainable share and memory (mean of seeds bold, each seed faint)")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--cache", default=os.environ.get("RAYFT_BENCH_CACHE", str(Path.home() / ".cache" / "rayft" / "bench")),
                        help="where the pre-trained base is cached (default ~/.cache/rayft/bench, or $RAYFT_BENCH_CACHE)")
    args = parser.parse_args(argv)
    result = run(args.quick, Path(args.cache))
    report("methods_bench", args.quick, result, table(result), plot(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
