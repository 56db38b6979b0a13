"""Running the rayft CLI in a fresh interpreter, as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_cli_isolated(args: list[str], cwd=None, env: dict[str, str] | None = None) -> tuple[int, str, bool]:
    """Run `rayft ARGS` in a fresh interpreter (with `env`, default this one's); returns (exit code, stderr,
    whether Ray got started).

    In-process, the session's Ray instance may already be up, so "refused before starting Ray"
    can only be observed in a process of its own.
    """
    code = (  # ray is not imported here: a command that never imports it has not started it (and runs faster)
        "import sys\n"
        "from cluster.cli import main\n"
        f"rc = main({args!r})\n"
        "ray = sys.modules.get('ray')\n"
        "sys.stdout.write('RAY_STARTED=%s\\n' % bool(ray and ray.is_initialized()))\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd or REPO,
                          env=env)
    return proc.returncode, proc.stderr, "RAY_STARTED=True" in proc.stdout
