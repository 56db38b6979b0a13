"""Run every benchmark in bench/, one after another: `python -m bench [--quick] [--only NAME ...]` (`make bench`).

A bench is a module `bench/<name>_bench.py` (or one named in EXTRA) with `main(argv) -> int`; each runs
in its own interpreter (its own Ray instance, its own peak memory), so a bench added later is picked up
without touching this file. Each writes its table, JSON and PNG into bench/results/.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
#: Benches whose module name does not end in `_bench`.
EXTRA = ("plan_vs_measured",)
#: Cheap ones first: a failure shows up before the long runs.
ORDER = ("memory_bench", "plan_vs_measured", "overhead_bench", "dpo_bench", "methods_bench")


def discover() -> list[str]:
    """Bench module names present in bench/, in ORDER first, then the rest alphabetically."""
    found = {p.stem for p in BENCH_DIR.glob("*_bench.py")} | {n for n in EXTRA if (BENCH_DIR / f"{n}.py").exists()}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def run_one(name: str, quick: bool) -> tuple[int, float, list[Path]]:
    """Run `python -m bench.<name>` from the repository root; return (exit code, seconds, result files it wrote)."""
    before = time.time()
    cmd = [sys.executable, "-m", f"bench.{name}"] + (["--quick"] if quick else [])
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    code = subprocess.call(cmd, cwd=ROOT)
    seconds = time.perf_counter() - t0
    from bench.common import RESULTS as results

    written = sorted(p for p in results.glob("*") if p.is_file() and p.stat().st_mtime >= before) if results.exists() else []
    return code, seconds, written


def main(argv: list[str] | None = None) -> int:
    names = discover()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each bench's tiny configuration (checks the code paths)")
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME", help=f"run only these: {', '.join(names)}")
    parser.add_argument("--list", action="store_true", help="list the benches and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(names))
        return 0
    chosen = args.only or names
    summary = []
    t0 = time.perf_counter()
    for name in chosen:
        code, seconds, written = run_one(name, args.quick)
        summary.append((name, code, seconds, written))
    print(f"\n=== bench summary ({(time.perf_counter() - t0) / 60:.1f} min)")
    for name, code, seconds, written in summary:
        status = "ok" if code == 0 else f"exit {code}"
        print(f"{name:22} {status:8} {seconds / 60:5.1f} min")
        for path in written:
            print(f"    {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0 if all(code == 0 for _, code, _, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
