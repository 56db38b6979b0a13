"""lm-evaluation-harness tasks from local files through rayft's model actors (the optional extra `lm-eval`).

The harness's metrics on a 10-row multiple-choice task and a 10-row generate_until task must equal
rayft's own choice accuracy and exact match on the same rows; the data is written so that neither is
0 or 1 (a metric that cannot fail proves nothing). The actor runs in process (the same ModelActor class
Ray Data runs), so these tests need no Ray.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from evaluation.data import parse_row
from evaluation.generate import CHOICES, GENERATE, ModelGroup
from evaluation.metrics import Output, row_stats
from trainers.eval_spec import EvalSpec, MetricSpec

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-evaluation-harness (the optional extra `lm-eval`) is not installed")

PROMPTS = ["one two", "red green", "cat dog", "sun moon", "left right", "up down", "hot cold", "big small", "old new", "day night"]
CHOICES_OF = [[" blue", " three", " fish"], [" a", " b", " c"], [" x", " y", " z"], [" river", " stone", " cloud"],
              [" north", " south", " east"], [" ten", " five", " nine"], [" salt", " sugar", " rice"], [" tree", " leaf", " root"],
              [" car", " bus", " train"], [" pen", " ink", " page"]]
MC_TASK = """task: rayft_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_TASK = """task: rayft_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: completion
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rayft_outputs(tiny_model_dir: Path, raw_rows: list[dict], want: str, settings: dict) -> tuple[list, list[Output]]:
    """rayft's own path for these rows: eval items through one model actor, as `rayft eval --data` builds them."""
    from evaluation.harness import in_process_executor

    run = in_process_executor(ModelGroup(str(tiny_model_dir), "", base_label="base"), settings)
    results = {r["key"]: r for r in run([{"key": i, "label": "base", "row": row, "want": [want]} for i, row in enumerate(raw_rows)])}
    rows = [parse_row(row, i, f"row {i + 1}") for i, row in enumerate(raw_rows)]
    return rows, [Output(**{k: v for k, v in results[i].items() if k not in ("key", "label")}) for i in range(len(rows))]


@needs_lm_eval
def test_harness_metrics_equal_rayft_choice_accuracy_and_exact_match(tiny_model_dir, tmp_path):
    from evaluation.harness import run_harness
    from evaluation.runner import Target, actor_settings

    spec = EvalSpec(max_tokens=6, stop=["\n"], batch_size=16, bootstrap=0)
    settings = actor_settings(spec)
    # Multiple choice: answer keys so that exactly 6 of 10 rows are right for this model (argmax by rayft's own scoring).
    probe = [{"prompt": p, "choices": c, "answer": 0} for p, c in zip(PROMPTS, CHOICES_OF)]
    _, outs = _rayft_outputs(tiny_model_dir, probe, CHOICES, settings)
    best = [max(range(3), key=lambda j: o.choice_logprobs[j]) for o in outs]
    mc_rows = [dict(r, answer=b if i < 6 else (b + 1) % 3) for i, (r, b) in enumerate(zip(probe, best))]
    # Generation: references equal to the model's greedy answer on 5 rows, something it does not say on the others.
    gen_probe = [{"prompt": p, "completion": ""} for p in PROMPTS]
    _, gen_outs = _rayft_outputs(tiny_model_dir, gen_probe, GENERATE, settings)
    gen_rows = [dict(r, completion=o.answer if i % 2 == 0 else "§never§") for i, (r, o) in enumerate(zip(gen_probe, gen_outs))]

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=_write(tmp_path / "mc.jsonl", mc_rows)))
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=_write(tmp_path / "gen.jsonl", gen_rows)))
    report = run_harness([Target("base", str(tiny_model_dir))], tasks, ["rayft_tiny_mc", "rayft_tiny_gen"], spec,
                         storage_uri=str(tmp_path / "storage"), in_process=True)

    # rayft's own metrics on the same rows (the choices' log-likelihoods and the answers, computed again).
    rows, outs = _rayft_outputs(tiny_model_dir, mc_rows, CHOICES, settings)
    rayft_acc = row_stats(MetricSpec(name="choice_accuracy"), rows, outs)
    rows, outs = _rayft_outputs(tiny_model_dir, gen_rows, GENERATE, settings)
    rayft_em = row_stats(MetricSpec(name="exact_match", normalize=[]), rows, outs)
    assert report.metric("base", "rayft_tiny_mc", "acc") == pytest.approx(float(rayft_acc.values.mean())) == pytest.approx(0.6)
    assert report.metric("base", "rayft_tiny_gen", "exact_match") == pytest.approx(float(rayft_em.values.mean())) == pytest.approx(0.5)
    # Row by row: the harness's samples carry rayft's answers and per-row scores.
    gen_samples = sorted(report.samples["base"]["rayft_tiny_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in gen_samples] == [o.answer for o in outs]
    mc_samples = sorted(report.samples["base"]["rayft_tiny_mc"], key=lambda s: s["doc_id"])
    assert [s["acc"] for s in mc_samples] == list(rayft_acc.values[:, 0])
    table = report.table()
    assert "rayft_tiny_mc" in table and " acc " in table and " exact_match " in table and "sample_len" not in table


@needs_lm_eval
def test_unknown_task_and_tasks_without_directory_are_refused(tmp_path, tiny_model_dir, capsys):
    from cluster.cli import main

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=_write(tmp_path / "mc.jsonl", [{"prompt": "a", "choices": ["b", "c"], "answer": 0}])))
    rc = main(["eval", str(tiny_model_dir), "--lm-eval-tasks", str(tasks), "--tasks", "rayft_tiny_mc,nope", "--storage", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc != 0 and "no harness task named nope" in err and "tasks there: rayft_tiny_mc" in err
    rc = main(["eval", str(tiny_model_dir), "--tasks", "rayft_tiny_mc", "--storage", str(tmp_path / "s")])
    assert rc != 0 and "--lm-eval-tasks DIR" in capsys.readouterr().err
    # A task whose data is not a local file: refused (offline, nothing downloaded) before Ray starts.
    (tasks / "remote.yaml").write_text("task: rayft_remote\ndataset_path: someone/not-a-local-dataset\ntest_split: test\n"
                                       "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: completion\n")
    rc = main(["eval", str(tiny_model_dir), "--lm-eval-tasks", str(tasks), "--tasks", "rayft_remote", "--storage", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc != 0 and "rayft_remote" in err and "must be local files" in err and len(err.strip().splitlines()) == 1


def test_missing_extra_is_one_line_with_the_install_command(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from cluster.cli import main

    # A None entry makes `import lm_eval` raise ImportError, as on an install without the extra.
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    rc = main(["eval", str(tiny_model_dir), "--lm-eval-tasks", str(tmp_path), "--tasks", "x", "--storage", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "pip install 'rayft[lm-eval]'" in err


@needs_lm_eval
def test_rolling_loglikelihood_scores_every_token_after_the_prefix_token(tiny_model_dir):
    """loglikelihood_rolling (perplexity tasks) equals log P of every token given the EOS/BOS prefix, by transformers."""
    import torch
    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluation.harness import in_process_executor
    from evaluation.harness_lm import RayftLM
    from evaluation.runner import actor_settings

    texts = ["the cat sat on the mat", "red green blue"]
    lm = RayftLM("base", in_process_executor(ModelGroup(str(tiny_model_dir), "", base_label="base"), actor_settings(EvalSpec())))
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for text, value in zip(texts, got):
        ids = [prefix] + tok(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        expected = float(logprobs.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).sum())
        assert value == pytest.approx(expected, rel=1e-4)
    assert got[0] != got[1]
