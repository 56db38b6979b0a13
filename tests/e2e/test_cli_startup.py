"""`rayft --help` and `rayft validate` stay light: seen from a fresh interpreter, as a user runs `rayft` (the
project's imports are laid out by tests/unit/test_imports.py; this checks what they add up to)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Libraries neither command needs. (Both import torch today, through the job spec's objectives: not made worse.)
HEAVY = ("ray", "vllm", "deepspeed", "fastapi", "peft", "bitsandbytes", "transformers")


@pytest.mark.parametrize("argv", [["--help"], ["validate", "examples/dora.yaml"]], ids=["help", "validate"])
def test_the_cli_starts_without_ray_or_the_serving_stack(argv):
    code = (f"import sys; sys.argv = ['rayft', *{argv!r}]\n"
            "from cluster.cli import main\n"
            "try:\n    rc = main()\nexcept SystemExit as exit:\n    rc = exit.code\n"
            f"print(rc, sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout[-2000:] + out.stderr[-2000:]
