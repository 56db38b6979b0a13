"""What every bench shares: the machine it ran on, a measured matmul peak, medians, tables, result files.

Each bench writes three files into bench/results/ (with a `_quick` suffix for `--quick` runs):
`<name>.json` (every figure, the machine and the date), `<name>.md` (the table, with the same header)
and `<name>.png` (the plot). Timings on a shared machine are noisy, so benches compare against a
baseline measured in the same run and report medians of repeats.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

# Progress bars of every weight load would drown the tables (Ray workers inherit this too).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
#: Where result files go; $RAYFT_BENCH_RESULTS moves them (tests run benches without touching the committed ones).
RESULTS = Path(os.environ.get("RAYFT_BENCH_RESULTS") or ROOT / "bench" / "results")


def result_name(name: str, quick: bool) -> str:
    """The stem of a bench's result files: quick runs never overwrite the full ones."""
    return f"{name}_quick" if quick else name


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def machine() -> dict:
    """The machine and moment a result belongs to: CPU, cores usable, memory, load, library versions, date."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": _cpu_model(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round((_memory_bytes() or 0) / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("torch", "transformers", "peft", "ray", "bitsandbytes", "trl")},
    }


def machine_line(info: dict) -> str:
    """One line for the top of a table: where and when it was measured."""
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    load = info.get("loadavg_1_5_15") or [0, 0, 0]
    return (f"{info['date']} · {info['cpu']} · {info['cores']} cores (torch {info['torch_threads']} threads)"
            f"{gpu} · {info['memory_gib']} GiB · load avg {load[0]:.1f} at start · torch {info['versions']['torch']}")


def matmul_peak(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> dict:
    """This machine's dense matmul ceiling right now: median FLOP/s of `repeats` n³ matmuls (after one warm-up)."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, dtype=dt)
    b = torch.randn(n, n, dtype=dt)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    flops = 2 * n**3
    return {"n": n, "dtype": dtype, "threads": torch.get_num_threads(), "repeats": repeats,
            "flops_per_s": flops / median(times), "best_flops_per_s": flops / min(times)}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub table; `align` is one letter per column (l/r), numbers right-aligned by default."""
    cells = [[_cell(v) for v in row] for row in rows]
    if align is None:
        align = "".join("r" if rows and isinstance(rows[0][i], (int, float)) else "l" for i in range(len(headers)))
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def write_results(name: str, quick: bool, payload: dict, markdown: str, figure=None,
                  results_dir: Path | None = None) -> list[Path]:
    """Write `<name>.json`, `<name>.md` and (if given a matplotlib figure) `<name>.png`; return the paths."""
    results = Path(results_dir or RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    stem = result_name(name, quick)
    info = payload.get("machine") or {}
    paths = [results / f"{stem}.json", results / f"{stem}.md"]
    paths[0].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    header = f"# {payload.get('title', name)}\n\nMeasured {machine_line(info)}" + (" · `--quick`" if quick else "") + "\n\n"
    image = f"\n\n![{stem}]({stem}.png)\n" if figure is not None else "\n"
    paths[1].write_text(header + markdown.rstrip() + image)
    if figure is not None:
        paths.append(results / f"{stem}.png")
        figure.savefig(paths[-1], dpi=120)
    return paths


def report(name: str, quick: bool, payload: dict, markdown: str, figure=None, results_dir: Path | None = None) -> list[Path]:
    """Print the table, write the result files (see `write_results`) and say where they went."""
    say("\n" + markdown)
    paths = write_results(name, quick, payload, markdown, figure, results_dir)
    for path in paths:
        say(f"[bench] wrote {path}")
    return paths


def pyplot():
    """matplotlib's pyplot on the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def say(message: str) -> None:
    print(message, flush=True)


def load_now() -> float:
    return round(os.getloadavg()[0], 2)


def add_common_args(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps: checks the code paths in ~2 minutes")



def rayft_spec(model_dir: str | Path, train: str | Path, eval_path: str | Path | None, storage_uri: str, method: dict,
               name: str, training: dict, max_seq_len: int = 64, cpus_per_worker: float | None = None):
    """A one-worker rayft JobSpec, built the way a job file is (`parse_job_spec` validates it)."""
    from trainers.spec import parse_job_spec

    data = {"train": str(train), "max_seq_len": max_seq_len}
    if eval_path is not None:
        # eval_fraction 0 spelled out: JobSpec's cross-field check otherwise rejects its own default next to `eval`.
        data.update({"eval": str(eval_path), "eval_fraction": 0})
    steps = training["max_steps"]
    raw = {
        "model": {"source": str(model_dir)},
        "data": data,
        "method": method,
        # One eval and one checkpoint, at the end: reports cost a controller poll each.
        "training": {"eval_every": steps, "checkpoint_every": steps, "log_every": max(steps // 4, 1), "seed": 0,
                     "keep_checkpoints": 1, **training},
        # cpus_per_worker None: rayft's own default (a single CPU worker gets every CPU).
        "resources": {"num_workers": 1, "use_gpu": False,
                      **({"cpus_per_worker": cpus_per_worker} if cpus_per_worker is not None else {})},
        "output": {"name": name},
        "storage": {"uri": storage_uri},
    }
    return parse_job_spec(raw, f"<bench {name}>")


def non_embedding_params(model) -> int:
    """Parameters that take part in matmuls (all but the input embedding lookup): the N of 6·N FLOPs/token."""
    emb = model.get_input_embeddings()
    skip = {id(p) for p in emb.parameters()} if emb is not None else set()
    out = model.get_output_embeddings()
    tied = out is not None and emb is not None and out.weight is emb.weight
    n = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    return n + (out.weight.numel() if tied else 0)
