"""Training data at scale: the in-memory path (every worker reads and tokenizes the whole file) vs Ray Data
ingestion (preprocessed once on the cluster's CPUs, streamed into the workers).

    .venv/bin/python -m bench.data_bench [--quick] [--sizes 20000,200000,800000,3200000] [--steps N] [--old REV]
        [--paths old,new,during]

Data: generated prompt/completion rows of 6 words (3 + 3), JSONL. Model: trainers.tiny's Llama, LoRA r=8,
one Ray Train worker, `steps` optimizer steps, micro-batch 8, no eval. Each run is its own interpreter with
its own Ray instance (ray.init is not timed).

- old: the code at `--old` (default: the last commit before trainers/ingest existed), unpacked from git.
- new: this tree, a first run (preprocessing included) and a second run that reuses the preprocessed data
  (what a resumed run, a rerun or every `rayft tune` trial gets).
- during: this tree, a first run with `data.preprocess: during` (training starts while the pass runs; the run
  ends when both are done).

Figures: time from `run_training` to the first optimizer step's console line, and the part of it after the data
is ready (from the driver's data statistics line: the workers' start, model load and first step), peak RSS of the Ray Train worker
process (its `peak_rss_bytes` metric), steady training tokens/s (`steady_tokens_per_s`, steps after the 2nd), and
for the new path the preprocessing pass's time and rows/s on this machine's cores.
Targets (issue 15): at the largest size, time to first step and worker peak RSS <= 1.3x their value at the
smallest; steady tokens/s >= 0.95x the in-memory path's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, add_common_args, human_bytes, machine, markdown_table, report, say

#: The last commit whose workers read the whole file into memory (trainers/data.py).
OLD_REV = "4f8726b"
#: 2,000 steps (~70 s of training here): at 400 (~14 s) steady tokens/s of identical runs differed by up to 1.4x
FULL = {"sizes": [20_000, 200_000, 800_000, 3_200_000], "steps": 2000}
QUICK = {"sizes": [2_000, 20_000], "steps": 6}
FIRST_STEP = "[rayft] step 1/"


def generate(n: int, path: Path) -> Path:
    """`n` rows of a 6-word prompt/completion task (fixed seed), written once and reused."""
    if path.exists():
        return path
    from trainers.tiny import WORDS

    rng = random.Random(0)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        for _ in range(n):
            w = [rng.choice(WORDS) for _ in range(6)]
            fh.write(json.dumps({"prompt": " ".join(w[:3]) + " =", "completion": " " + " ".join(w[3:])}) + "\n")
    tmp.rename(path)
    return path


def old_tree(rev: str, into: Path) -> Path:
    """The package tree at `rev`, unpacked (no checkout of this worktree is touched)."""
    if not (into / "trainers").exists():
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(into, filter="data")
    return into


def child(args) -> int:
    """One training run; prints `[bench] t0` just before run_training and the result as JSON at the end."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray

    from trainers.run import run_training
    from trainers.spec import parse_job_spec

    ray.init(include_dashboard=False, log_to_driver=True, logging_level="WARNING")
    spec = parse_job_spec({
        "model": {"source": args.model},
        "data": {"train": args.data, "eval_fraction": 0, "max_seq_len": 32, "preprocess": args.preprocess},
        "method": {"name": "lora", "r": 8, "alpha": 16},
        "training": {"max_steps": args.steps, "micro_batch_size": 8, "lr": 1e-3, "eval_every": args.steps,
                     "checkpoint_every": args.steps, "log_every": 1, "precision": "fp32", "keep_checkpoints": 1},
        "resources": {"num_workers": 1, "use_gpu": False},
        "output": {"name": "data-bench"},
        "storage": {"uri": args.storage},
    }, "<data bench>")
    print(f"[bench] t0 {time.time():.3f}", flush=True)
    result = run_training(spec, publish=False)
    print("[bench] result " + json.dumps({k: result.metrics.get(k) for k in ("steady_tokens_per_s", "peak_rss_bytes")}), flush=True)
    ray.shutdown()
    return 0


def run_child(tree: Path, model: Path, data: Path, storage: Path, steps: int, preprocess: str | None = None) -> dict:
    """Run one training in a fresh interpreter with `tree` first on the path; time its console lines."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-u", str(ROOT / "bench" / "data_bench.py"), "--child", "--model", str(model),
           "--data", str(data), "--storage", str(storage), "--steps", str(steps)] + (["--preprocess", preprocess] if preprocess else [])
    proc = subprocess.Popen(cmd, env=env, cwd=str(tree), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = first = ready = None
    out: dict = {}
    stats_line = None
    tail: list[str] = []
    for line in proc.stdout:
        now = time.time()
        tail = (tail + [line.rstrip()])[-40:]
        if line.startswith("[bench] t0 "):
            t0 = float(line.split()[2])
        elif FIRST_STEP in line and first is None:
            first = now
        elif line.startswith("[bench] result "):
            # the first JSON value: a worker's console line may have been written onto the end of this one
            out = json.JSONDecoder().raw_decode(line[len("[bench] result "):])[0]
        elif line.startswith("[rayft] data: ") and "rows read" in line:
            stats_line, ready = line.strip(), now
    if proc.wait() != 0 or t0 is None or first is None:
        raise RuntimeError("bench run failed:\n" + "\n".join(tail))
    out["first_step_s"] = first - t0
    if ready is not None:
        out["after_data_s"] = first - ready
    if stats_line:
        out["data_line"] = stats_line
        out["rows_per_s"] = float(stats_line.rsplit("; ", 1)[1].split(" rows/s")[0].replace(",", ""))
    return out


def preprocess_s(storage: Path) -> float | None:
    """The preprocessing time recorded in the newest stats.json under `storage`."""
    found = sorted((storage / "datasets").glob("*/stats.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text())["stats"]["preprocess_s"] if found else None


def verdicts(rows: list[dict]) -> str:
    """Issue 15's targets, from the rows of one run: growth from the smallest size to the largest of each path's
    time to first step and worker peak RSS (<= 1.3x), and the new path's steady tokens/s over the old one's (>= 0.95x)."""
    checks = []
    for path in ("new (Ray Data)", "new, reused", "new, preprocess during", "old (in memory)"):
        mine = sorted((r for r in rows if r["path"] == path), key=lambda r: r["rows"])
        if len(mine) < 2:
            continue
        small, large = mine[0], mine[-1]
        for key, label in (("first_step_s", "time to first step"), ("after_data_s", "data ready to first step"),
                           ("peak_rss_bytes", "worker peak RSS")):
            if small.get(key) and large.get(key):
                ratio = large[key] / small[key]
                checks.append([f"{path}: {label}, {large['rows']:,} rows / {small['rows']:,} rows", f"{ratio:.2f}x", "<= 1.3x",
                               "met" if ratio <= 1.3 else "missed"])
    old = {r["rows"]: r for r in rows if r["path"] == "old (in memory)"}
    for r in rows:
        if r["path"] == "new (Ray Data)" and r["rows"] in old and r.get("steady_tokens_per_s") and old[r["rows"]].get("steady_tokens_per_s"):
            ratio = r["steady_tokens_per_s"] / old[r["rows"]]["steady_tokens_per_s"]
            checks.append([f"steady tokens/s, new / old, {r['rows']:,} rows", f"{ratio:.2f}x", ">= 0.95x",
                           "met" if ratio >= 0.95 else "missed"])
    return markdown_table(["figure", "measured", "target", "verdict"], checks, "llll")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--sizes", help="comma-separated row counts (default 20000,200000,800000,3200000)")
    parser.add_argument("--old", default=OLD_REV, help=f"git revision of the in-memory path (default {OLD_REV})")
    parser.add_argument("--paths", default="old,new,during",
                        help="which paths to run: old (in memory), new (preprocess before training, then reused), during "
                        "(data.preprocess: during, a first run)")
    parser.add_argument("--preprocess", default="before", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model"), parser.add_argument("--data"), parser.add_argument("--storage")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 2000; --quick: 6)")
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    cfg = dict(QUICK if args.quick else FULL)
    cfg["steps"] = args.steps or cfg["steps"]
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else cfg["sizes"]
    paths = args.paths.split(",")
    cache = Path(os.environ.get("RAYFT_BENCH_CACHE") or Path.home() / ".cache" / "rayft" / "bench" / "data")
    cache.mkdir(parents=True, exist_ok=True)
    from trainers.tiny import build_tiny_model_dir

    model = cache / "model"
    if not (model / "config.json").exists():
        build_tiny_model_dir(model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="rayft-data-bench-") as tmp:
        old = old_tree(args.old, Path(tmp) / "old") if "old" in paths else None
        for n in sizes:
            data = generate(n, cache / f"rows-{n}.jsonl")
            mib = data.stat().st_size / 2**20
            if old is not None:
                say(f"[bench] {n:,} rows: old path")
                r = run_child(old, model, data, Path(tmp) / f"store-old-{n}", cfg["steps"])
                r.pop("after_data_s", None)  # the old path's data line comes from the worker, after it has read the data
                rows.append({"rows": n, "file_mib": mib, "path": "old (in memory)", **r})
                say(f"[bench] {rows[-1]}")
            if "new" in paths:
                store = Path(tmp) / f"store-new-{n}"
                say(f"[bench] {n:,} rows: new path, first run")
                r = run_child(ROOT, model, data, store, cfg["steps"])
                rows.append({"rows": n, "file_mib": mib, "path": "new (Ray Data)", "preprocess_s": preprocess_s(store), **r})
                say(f"[bench] {rows[-1]}")
                say(f"[bench] {n:,} rows: new path, preprocessed data reused")
                r = run_child(ROOT, model, data, store, cfg["steps"])
                rows.append({"rows": n, "file_mib": mib, "path": "new, reused", **r})
                say(f"[bench] {rows[-1]}")
            if "during" in paths:
                store = Path(tmp) / f"store-during-{n}"
                say(f"[bench] {n:,} rows: new path, first run, training while preprocessing")
                r = run_child(ROOT, model, data, store, cfg["steps"], preprocess="during")
                r.pop("after_data_s", None)  # its data line comes when the pass ends, after the first step
                rows.append({"rows": n, "file_mib": mib, "path": "new, preprocess during", "preprocess_s": preprocess_s(store), **r})
                say(f"[bench] {rows[-1]}")
    # a run of some of the paths has its own result files: it does not replace the full comparison
    name = "data_bench" if sorted(paths) == ["during", "new", "old"] else "data_bench_" + "_".join(paths)
    report(name, args.quick, {"machine": machine(), "config": {**cfg, "sizes": sizes, "old": args.old}, "rows": rows},
           render(rows))
    return 0


def render(rows: list[dict]) -> str:
    """The results table and the verdicts, as markdown."""
    table = markdown_table(
        ["rows", "file", "path", "time to first step", "of it after data ready", "worker peak RSS", "steady tokens/s", "preprocessing", "preprocess rows/s"],
        [[f"{r['rows']:,}", f"{r['file_mib']:.1f} MiB", r["path"], f"{r['first_step_s']:.1f} s",
          f"{r['after_data_s']:.1f} s" if r.get("after_data_s") is not None else "-", human_bytes(r.get("peak_rss_bytes")),
          f"{r['steady_tokens_per_s']:,.0f}" if r.get("steady_tokens_per_s") else "-",
          f"{r['preprocess_s']:.1f} s" if r.get("preprocess_s") else "-",
          f"{r['rows_per_s']:,.0f}" if r.get("rows_per_s") and r["path"] != "new, reused" else "-"] for r in rows],
    )
    return table + "\n\n" + verdicts(rows)


if __name__ == "__main__":
    sys.exit(main())
