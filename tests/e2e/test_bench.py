"""The benchmark runner and the one bench cheap enough for the suite.

Speed is measured in bench/, never asserted here: these tests check that every bench is found, takes
`--quick`, and that the memory bench (bytes, not seconds) writes its three files with a 4-bit ratio
inside the issue's target.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import discover
from bench.common import markdown_table, result_name

ROOT = Path(__file__).resolve().parents[2]
BENCHES = ["memory_bench", "plan_vs_measured", "overhead_bench", "methods_bench", "serve_bench", "serve_engines_bench",
           "dpo_bench", "eval_bench", "data_bench"]


def test_runner_finds_every_bench_cheap_ones_first() -> None:
    names = discover()
    assert sorted(names) == sorted(BENCHES)
    assert names[:2] == ["memory_bench", "plan_vs_measured"]


@pytest.mark.parametrize("name", BENCHES)
def test_each_bench_takes_quick(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    # `python -m bench.NAME --help`, in this process: the runner calls the same main(argv)
    with pytest.raises(SystemExit) as exited:
        importlib.import_module(f"bench.{name}").main(["--help"])
    assert exited.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_unknown_bench_is_refused_with_the_known_names(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(["--only", "nope_bench"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope_bench'" in err and "memory_bench" in err


def test_quick_results_never_overwrite_full_ones() -> None:
    assert result_name("serve_bench", quick=True) == "serve_bench_quick"
    assert result_name("serve_bench", quick=False) == "serve_bench"


def test_markdown_table_aligns_numbers_right() -> None:
    text = markdown_table(["method", "tok/s"], [["lora", 2958.4], ["ia3", 12.5]])
    assert text.splitlines() == ["| method | tok/s |", "| --- | ---: |", "| lora | 2,958 |", "| ia3 | 12.5 |"]


def test_memory_bench_quick_writes_results_within_target(tmp_path: Path) -> None:
    env = {**os.environ, "RAYFT_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "memory_bench"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory_bench_quick.json", "memory_bench_quick.md",
                                                         "memory_bench_quick.png"]
    result = json.loads((tmp_path / "memory_bench_quick.json").read_text())
    assert result["rows"]["nf4-dq"]["linear4bit_layers"] == 2 * 7  # every decoder linear layer of the 2-layer model
    assert result["ratios"]["linear_4bit_vs_bf16"] <= 0.3
    assert result["machine"]["cores"] >= 1 and result["machine"]["date"].startswith("20")
    assert "Measured " in (tmp_path / "memory_bench_quick.md").read_text()
    assert "memory_bench_quick.json" in proc.stdout  # the runner's summary lists what the bench wrote


@pytest.mark.slow
def test_serve_bench_quick_runs_every_scenario_over_http(tmp_path: Path) -> None:
    """The serving bench end to end at toy size (real Ray Serve, S3 server, HTTP): no request fails,
    batching happens only where it is allowed, and every figure the table reports is there."""
    env = {**os.environ, "RAYFT_BENCH_RESULTS": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "bench.serve_bench", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "serve_bench_quick.json").read_text())
    for name in ("mixed_batching", "no_batching", "merged_per_adapter"):
        assert result[name]["failures"] == 0 and result[name]["requests"] == 32, name
    assert result["no_batching"]["engine"]["max_rows_in_pass"] == 1
    assert result["mixed_batching"]["engine"]["max_rows_in_pass"] > 1
    assert result["mixed_batching"]["engine"]["finished"] >= 32
    (single,) = result["single_request"]
    assert single["hidden"] == 128 and len(single["unmerged_ms"]) == len(single["merged_ms"]) == 5
    assert len(result["cold_warm"]["cold_ms"]) == 2  # one cold request per adapter
    assert (tmp_path / "serve_bench_quick.md").read_text().count("| mixed_batching |") == 1


@pytest.mark.parametrize("version,refused", [("0.165.0", True), ("0.137.0", True), ("0.136.3", False)])
def test_engines_bench_says_when_bare_serve_llm_cannot_answer(monkeypatch: pytest.MonkeyPatch, version: str, refused: bool) -> None:
    import fastapi

    from bench.serve_bench import bare_serve_llm_problem

    monkeypatch.setattr(fastapi, "__version__", version)
    problem = bare_serve_llm_problem()
    assert (problem is not None) == refused
    if refused:
        assert f"installed: {version}" in problem and "--target .bench-fastapi 'fastapi<0.137'" in problem


def test_data_bench_verdicts_compare_the_largest_size_with_the_smallest_within_a_path() -> None:
    from bench.data_bench import verdicts

    def row(n: int, path: str, first: float, rss: int, tps: float, after: float | None = None) -> dict:
        return {"rows": n, "path": path, "first_step_s": first, "peak_rss_bytes": rss, "steady_tokens_per_s": tps,
                **({"after_data_s": after} if after is not None else {})}

    rows = [row(20_000, "old (in memory)", 20.0, 700, 1000.0), row(20_000, "new (Ray Data)", 20.0, 700, 990.0, 16.0),
            row(3_200_000, "old (in memory)", 90.0, 5000, 1000.0), row(3_200_000, "new (Ray Data)", 25.0, 720, 900.0, 24.0),
            row(20_000, "new, preprocess during", 30.0, 700, 900.0), row(3_200_000, "new, preprocess during", 42.0, 700, 400.0)]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in verdicts(rows).splitlines()[2:]}
    assert "| 1.25x | <= 1.3x | met |" in lines["new (Ray Data): time to first step, 3,200,000 rows / 20,000 rows"]
    assert "| 1.03x | <= 1.3x | met |" in lines["new (Ray Data): worker peak RSS, 3,200,000 rows / 20,000 rows"]
    assert "| 1.50x | <= 1.3x | missed |" in lines["new (Ray Data): data ready to first step, 3,200,000 rows / 20,000 rows"]
    assert not any("old (in memory): data ready" in k for k in lines)  # the old path prints no data line
    assert "| 1.40x | <= 1.3x | missed |" in lines["new, preprocess during: time to first step, 3,200,000 rows / 20,000 rows"]
    assert "| 4.50x | <= 1.3x | missed |" in lines["old (in memory): time to first step, 3,200,000 rows / 20,000 rows"]
    assert "| 0.99x | >= 0.95x | met |" in lines["steady tokens/s, new / old, 20,000 rows"]
    assert "| 0.90x | >= 0.95x | missed |" in lines["steady tokens/s, new / old, 3,200,000 rows"]
