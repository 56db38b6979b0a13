"""What a user sees on the console: rayft's progress lines, its summary and real errors, not Ray's internals.

`rayft demo` (the README's first command) runs training, merging and serving with the OpenAI client,
so its output covers every source of noise there was: Ray Train's controller and checkpoint
bookkeeping, Serve's access log (a line per request), library warnings, progress bars.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.client.console import print_rayft_lines

# What must not reach the console without --verbose (each was there before, issue 14 papercut 5).
NOISE = [
    re.compile(r"\b(GET|POST) /\S* (200|404|4\d\d)\b"),  # a Serve access-log line
    re.compile(r"ServeReplica|ProxyActor|ServeController|TrainController|PlacementGroupCleaner|RayTrainWorker"),
    re.compile(r"Checkpoint successfully created|TrainingReport\(|Reporting training result"),
    re.compile(r"gemm_4bit_forward|FutureWarning|warnings\.warn|Loading weights|Writing model shards"),
    re.compile(r"^\s*('[^']{0,3}'\s+){3,}"),  # streamed chunks printed one by one: 's' 's' 's' ''
    re.compile(r"Traceback"),
    re.compile(r"streaming_executor|logging_progress|Execution plan of Dataset|Running Dataset"),  # Ray Data's driver logging
]


def test_only_rayft_lines_of_what_workers_stream_are_printed(capsys: pytest.CaptureFixture[str]) -> None:
    print_rayft_lines({"is_err": False, "lines": [
        "\x1b[36m(RayTrainWorker pid=8102)\x1b[0m [rayft] step 100/400 loss 5.3222",
        "\x1b[36m(TrainController pid=7876)\x1b[0m Requesting resources: {'CPU': 2.0} * 1",
        "\x1b[36m(RayTrainWorker pid=8102)\x1b[0m Checkpoint successfully created at: Checkpoint(...)",
    ]})
    print_rayft_lines({"is_err": True, "lines": ["(ServeReplica:app:BaseModel pid=1) INFO ... POST /v1/completions 200 41.2ms"]})

    out, err = capsys.readouterr()
    assert out == "[rayft] step 100/400 loss 5.3222\n" and err == ""


@pytest.mark.slow
def test_demo_console_shows_rayfts_lines_and_no_ray_internals(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "demo", "--steps", "4", "--workdir", str(tmp_path / "demo-out")],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=900,
    )
    output = proc.stdout + proc.stderr

    assert proc.returncode == 0, output[-5000:]
    noisy = [line for line in output.splitlines() if any(p.search(line) for p in NOISE)]
    assert noisy == [], "\n".join(noisy[:20])
    # rayft's own lines are all there: progress from the workers, summaries, serving and the burst.
    for expected in ("[rayft] step 4/4", "published        : reverse-lora@", "published        : upper-lora@",
                     "[rayft] serving on http://127.0.0.1:", "] streamed '", "mixed burst:", "demo finished in"):
        assert expected in output, (expected, output[-5000:])
