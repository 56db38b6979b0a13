"""The serving engines side by side (issue 16): `python -m bench.serve_engines_bench [--quick]`.

The code is bench/serve_bench.py's `--engines` mode (same artifacts, load generator and specs);
this name lets `python -m bench` (`make bench`) find and run it. Writes bench/results/serve_engines.*.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_bench import main as serve_bench_main


def main(argv: list[str] | None = None) -> int:
    return serve_bench_main(["--engines", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
