"""Evaluation metrics on hand-made answer files, intervals, the eval/gate spec and bad input (no Ray)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evaluation.data import EvalDataError, load_rows
from evaluation.metrics import MetricError, Output, paired_difference, row_stats, summarize
from trainers.eval_spec import EvalSpec, MetricSpec, check_gates, parse_gate

ROWS = [
    {"prompt": "q1", "completion": " Paris"},
    {"prompt": "q2", "completion": "the Cat"},
    {"prompt": "q3", "completion": "42"},
    {"prompt": "q4", "completion": "blue sky", "pattern": r"^\d+$"},
]
ANSWERS = [" Paris", "cat!", "The answer is 42", "123"]


def _rows(tmp_path, rows=ROWS):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_rows(str(path))


def _score(tmp_path, metric: dict | str, answers=ANSWERS, rows=ROWS) -> list[float]:
    stats = row_stats(MetricSpec.model_validate(metric), _rows(tmp_path, rows), [Output(answer=a) for a in answers])
    return stats.values[:, 0].tolist()


def test_exact_match_and_its_normalisation(tmp_path):
    assert _score(tmp_path, "exact_match") == [1, 0, 0, 0]  # default: strip only
    assert _score(tmp_path, {"name": "exact_match", "normalize": ["lower", "punctuation", "articles", "whitespace", "strip"]}) == [1, 1, 0, 0]
    assert _score(tmp_path, {"name": "exact_match", "normalize": []}) == [1, 0, 0, 0]
    assert _score(tmp_path, {"name": "exact_match", "normalize": []}, answers=["Paris"] + ANSWERS[1:]) == [0, 0, 0, 0]


def test_contains_and_regex(tmp_path):
    assert _score(tmp_path, "contains") == [1, 0, 1, 0]
    assert _score(tmp_path, {"name": "contains", "normalize": ["lower", "strip"]}) == [1, 0, 1, 0]
    rows = [dict(r, pattern=r"\d") for r in ROWS]
    assert _score(tmp_path, "regex", rows=rows) == [0, 0, 1, 1]
    assert _score(tmp_path, {"name": "regex", "pattern": "^[A-Z ]"}) == [1, 0, 1, 0]
    with pytest.raises(MetricError, match="row 1 has no `pattern`"):
        _score(tmp_path, "regex")


def test_bleu_and_chrf_equal_sacrebleu_and_rouge_equals_rouge_score(tmp_path):
    import sacrebleu
    from rouge_score import rouge_scorer

    rows = [{"prompt": str(i), "completion": ref} for i, ref in enumerate(
        ["the cat sat on the mat", "a quick brown fox jumps", "hello world again", "rain falls on the plain in spain"])]
    answers = ["the cat sat on a mat", "the quick brown fox jumped", "hello again world", "the rain in spain falls mainly"]
    refs = [r["completion"] for r in rows]
    loaded = _rows(tmp_path, rows)
    outputs = [Output(answer=a) for a in answers]
    bleu = row_stats(MetricSpec(name="bleu"), loaded, outputs)
    chrf = row_stats(MetricSpec(name="chrf"), loaded, outputs)
    assert bleu.aggregate(bleu.values) == pytest.approx(sacrebleu.corpus_bleu(answers, [refs]).score, abs=1e-9)
    assert chrf.aggregate(chrf.values) == pytest.approx(sacrebleu.corpus_chrf(answers, [refs]).score, abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    direct = np.mean([scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, refs)])
    rouge = row_stats(MetricSpec(name="rouge_l"), loaded, outputs)
    assert rouge.aggregate(rouge.values) == pytest.approx(direct, abs=1e-12)
    assert 0 < direct < 1


def test_choice_accuracy_and_perplexity_from_log_likelihoods(tmp_path):
    rows = [{"prompt": "p", "choices": ["a", "b", "c"], "answer": 2}, {"prompt": "p", "choices": ["x", "y"], "answer": "x"}]
    loaded = _rows(tmp_path, rows)
    acc = row_stats(MetricSpec(name="choice_accuracy"), loaded,
                    [Output(choice_logprobs=[-3.0, -2.0, -1.0]), Output(choice_logprobs=[-5.0, -0.5])])
    assert acc.values[:, 0].tolist() == [1.0, 0.0]
    ppl = row_stats(MetricSpec(name="perplexity"), loaded, [Output(ref_nll=2.0, ref_tokens=1), Output(ref_nll=4.0, ref_tokens=3)])
    assert ppl.aggregate(ppl.values) == pytest.approx(math.exp(6.0 / 4))


def test_user_metric_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_metric_mod.py").write_text("def length_ok(row, answer):\n    return float(len(answer) <= len(row['completion']) + 1)\n")
    (tmp_path / "broken_metric_mod.py").write_text("def boom(row, answer):\n    return row['missing']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _score(tmp_path, "my_metric_mod:length_ok") == [1, 1, 0, 1]
    with pytest.raises(MetricError, match="failed on row 1: KeyError"):
        _score(tmp_path, "broken_metric_mod:boom")
    with pytest.raises(MetricError, match="cannot import"):
        _score(tmp_path, "no_such_module_xyz:f")


def test_bootstrap_interval_and_paired_difference(tmp_path):
    from evaluation.metrics import RowStats, _mean

    a = RowStats(np.array([[1.0], [0.0]] * 50), _mean)
    b = RowStats(np.array([[1.0], [1.0]] * 50), _mean)
    s = summarize(a, 2000, seed=1)
    assert s.value == 0.5 and s.low < 0.5 < s.high and s.high - s.low < 0.3
    same = paired_difference(a, a, 500)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)
    better = paired_difference(a, b, 2000, seed=3)
    assert better.value == 0.5 and better.low > 0  # b is right on every row a misses: the interval excludes 0
    assert summarize(a, 0).low is None


def test_eval_spec_and_gates():
    spec = EvalSpec.model_validate({"data": "x.jsonl", "metrics": ["exact_match", {"name": "chrf", "label": "chrF"}]})
    assert [m.key for m in spec.metrics] == ["exact_match", "chrF"] and spec.temperature == 0
    assert parse_gate(">= 0.8") == (">=", 0.8) and parse_gate("<12") == ("<", 12.0)
    with pytest.raises(ValueError, match="must be a comparison"):
        parse_gate("at least 0.8")
    assert check_gates({"exact_match": ">= 0.8"}, {"exact_match": 0.85}) == []
    assert check_gates({"exact_match": ">= 0.8"}, {"exact_match": 0.5}) == ["exact_match = 0.5, required >= 0.8"]
    assert check_gates({"perplexity": "<= 20"}, {}) == ["perplexity = missing, required <= 20"]


def test_engine_vllm_where_vllm_is_missing_is_one_problem_with_the_fix(monkeypatch):
    import importlib.util

    from trainers.spec import SpecError, parse_job_spec

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    assert EvalSpec.model_validate({"engine": "transformers"}).engine == "transformers"
    with pytest.raises(SpecError) as err:
        parse_job_spec({"model": {"source": "m"}, "data": {"train": "t.jsonl"}, "method": {"name": "lora"},
                        "eval": {"data": "e.jsonl", "engine": "vllm", "kv_cache_gib": 0}})
    text = str(err.value)
    assert "eval.engine" in text and "vLLM is not installed here" in text and "engine: transformers" in text
    assert "eval.kv_cache_gib" in text  # reported with the other problem, not after it is fixed


def test_check_engine_names_every_adapter_vllm_cannot_run():
    import json

    from evaluation.runner import EvalError, Target, check_engine

    lora = Target("a", "base", {"adapter_config.json": json.dumps({"peft_type": "LORA"}).encode()}, mode="peft")
    dora = Target("b@1", "base", "b@1", config={"peft_type": "LORA", "use_dora": True})
    ia3 = Target("c", "base", {"adapter_config.json": json.dumps({"peft_type": "IA3"}).encode()}, mode="peft")
    saved = Target("d@2", "base", "d@2", config={"peft_type": "LORA", "modules_to_save": ["lm_head"]})
    model = Target("base@1", "base")
    check_engine([model, lora, dora, ia3, saved], "transformers")  # runs every peft method
    check_engine([model, lora], "vllm")
    with pytest.raises(EvalError) as err:
        check_engine([model, lora, dora, ia3, saved], "vllm")
    text = str(err.value)
    assert "b@1 is a DoRA adapter" in text and "c is IA3 (vLLM runs LoRA adapters only)" in text
    assert "d@2 carries full copies of ['lm_head']" in text and "--engine transformers" in text
    assert "a is" not in text and "base@1" not in text


def test_job_spec_reports_eval_and_gate_problems_together(tmp_path):
    from trainers.spec import SpecError, parse_job_spec

    base = {"model": {"source": "m"}, "data": {"train": "t.jsonl"}, "method": {"name": "lora"}}
    ok = parse_job_spec({**base, "output": {"name": "a", "require": {"exact_match": ">= 0.5"}}, "eval": {"data": "e.jsonl"}})
    assert ok.output.require == {"exact_match": ">= 0.5"} and ok.eval.metrics[0].name == "exact_match"
    with pytest.raises(SpecError) as err:
        parse_job_spec({**base, "output": {"name": "a", "require": {"chrf": "about 3"}},
                        "eval": {"metrics": ["exact_match", "bleu_score", {"name": "regex", "pattern": "("}]}})
    text = str(err.value)
    assert "eval.metrics[1].name" in text and "bleu_score" in text
    assert "eval.metrics[2].pattern" in text and "not a valid regular expression" in text
    assert "output.require.chrf: got 'about 3', must be a comparison" in text
    assert "output.require.chrf: not a metric of eval.metrics" in text
    assert "eval.data: unset and so is data.eval" in text
    with pytest.raises(SpecError, match="output.require: needs an eval: section"):
        parse_job_spec({**base, "output": {"name": "a", "require": {"exact_match": ">= 0.5"}}})


def test_bad_rows_name_the_line_and_the_fix(tmp_path):
    path = tmp_path / "bad.jsonl"
    for text, message in [
        ('{"prompt": "a", "completion": "b"}\n{"nothing": 1}\n', r"bad.jsonl:2: a row needs prompt"),
        ('{"prompt": "a", "choices": ["x", "y"], "answer": 5}\n', r"bad.jsonl:1: answer must be the index \(0..1\)"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "the last message must be the assistant"),
        ('not json\n', r"bad.jsonl:1: not valid JSON"),
        ('\n', "holds no rows"),
    ]:
        path.write_text(text)
        with pytest.raises(EvalDataError, match=message):
            load_rows(str(path))
    with pytest.raises(EvalDataError, match=r"missing.jsonl does not exist.*pass evaluation rows with --data"):
        load_rows(str(tmp_path / "missing.jsonl"))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path.write_text(json.dumps({"messages": messages}) + "\n")
    (row,) = load_rows(str(path))
    assert row.reference == "hello" and row.messages == messages[:1]


def test_eval_rows_come_from_any_source_the_training_data_may_use(tmp_path):
    """The training data's readers: a directory of JSONL and Parquet, a glob, bad rows named by row index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(3)))
    pq.write_table(pa.Table.from_pylist([{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(3)]), tmp_path / "b.parquet")
    assert [r.prompt for r in load_rows(str(tmp_path), max_rows=4)] == ["p0", "p1", "p2", "q0"]
    assert [r.reference for r in load_rows(str(tmp_path / "*.parquet"))] == ["a0", "a1", "a2"]
    pq.write_table(pa.Table.from_pylist([{"prompt": "x", "answer": "y"}, {"nothing": 1}]), tmp_path / "c.parquet")
    with pytest.raises(EvalDataError, match=r"c.parquet: row 1: a row needs prompt"):
        load_rows(str(tmp_path / "c.parquet"))
