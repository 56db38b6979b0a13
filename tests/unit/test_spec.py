"""Job spec validation: examples pass, every malformed spec fails with one message listing every problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainers.spec import JobSpec, SpecError, load_job_spec, parse_job_spec

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_JOBS = sorted(p for p in (REPO / "examples").glob("*.yaml") if "kind: serve" not in p.read_text() and not p.name.startswith("serve"))

GOOD = {
    "model": {"source": "registry:tiny-llama"},
    "data": {"train": "examples/data/reverse.jsonl"},
    "method": {"name": "lora", "r": 8},
    "output": {"name": "my-adapter"},
}


def with_(base: dict, **patch) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for dotted, value in patch.items():
        section, _, field = dotted.partition("__")
        if field:
            out.setdefault(section, {})[field] = value
        else:
            out[section] = value
    return out


@pytest.mark.parametrize("path", EXAMPLE_JOBS, ids=lambda p: p.name)
def test_every_example_job_validates(path):
    spec = load_job_spec(path)
    assert isinstance(spec, JobSpec)
    # the files they read exist in the repo (a file, a directory, or a glob that matches)
    assert (REPO / spec.data.train).exists() or any(REPO.glob(spec.data.train)), spec.data.train


# (case id, raw spec, substrings every one of which must appear in the single message)
MALFORMED = [
    ("rank-zero", with_(GOOD, method={"name": "lora", "r": 0}), ["method.lora.r: got 0, must be ≥ 1"]),
    ("unknown-method", with_(GOOD, method={"name": "lorax"}), ["method.name: got 'lorax'", "'qlora'"]),
    ("method-without-name", with_(GOOD, method={"r": 8}), ["method", "name"]),
    ("missing-model", {k: v for k, v in GOOD.items() if k != "model"}, ["model: required field is missing"]),
    ("typo-field", with_(GOOD, training={"max_step": 10}), ["training.max_step", "unknown field"]),
    ("negative-lr", with_(GOOD, training__lr=-1.0), ["training.lr: got -1.0, must be > 0"]),
    ("bad-schedule", with_(GOOD, training__schedule="sine"), ["training.schedule: got 'sine'", "'cosine'"]),
    ("warmup-too-long", with_(GOOD, training__max_steps=10, training__warmup_steps=10), ["training.warmup_steps: got 10, must be < training.max_steps (10)"]),
    ("prefix-with-targets", with_(GOOD, method={"name": "prefix_tuning", "target_modules": ["q_proj"]}),
     ["method.prefix_tuning.target_modules: prefix tuning", "remove this field"]),
    ("qlora-zero3", with_(GOOD, method={"name": "qlora"}, resources={"num_workers": 2, "strategy": "deepspeed_zero3"}),
     ["resources.strategy: got 'deepspeed_zero3', a 4-bit (qlora) base cannot be sharded"]),
    ("qlora-dtype", with_(GOOD, method={"name": "qlora"}, model={"source": "x", "dtype": "bfloat16"}), ["model.dtype: got 'bfloat16'"]),
    ("single-many-workers", with_(GOOD, resources={"num_workers": 4, "strategy": "single"}), ["resources.num_workers: got 4"]),
    ("adalora-target-above-init", with_(GOOD, method={"name": "adalora", "init_r": 4, "target_r": 8}), ["method.adalora.target_r: got 8, must be <= init_r (4)"]),
    ("eval-file-and-fraction", with_(GOOD, data={"train": "a.jsonl", "eval": "b.jsonl", "eval_fraction": 0.2}), ["data.eval_fraction: set together with data.eval"]),
    ("hostile-output-name", with_(GOOD, output={"name": "../etc/passwd"}), ["output.name", "../etc/passwd"]),
    ("uppercase-output-name", with_(GOOD, output={"name": "MyAdapter"}), ["output.name"]),
    ("fp16-on-cpu", with_(GOOD, training__precision="fp16", resources={"use_gpu": False}), ["training.precision: got 'fp16'"]),
    ("empty-target-list", with_(GOOD, method={"name": "lora", "target_modules": []}), ["method.lora.target_modules"]),
    ("dropout-one", with_(GOOD, method={"name": "dora", "dropout": 1.0}), ["method.dora.dropout: got 1.0, must be < 1"]),
    ("max-eval-rows-nothing-evaluated", with_(GOOD, data__eval_fraction=0, data__max_eval_rows=100),
     ["data.max_eval_rows: set, but nothing is evaluated"]),
    ("max-eval-rows-zero", with_(GOOD, data__max_eval_rows=0), ["data.max_eval_rows: got 0, must be ≥ 1"]),
    ("seq-len-tiny", with_(GOOD, data__max_seq_len=4), ["data.max_seq_len: got 4, must be ≥ 8"]),
    ("bad-format", with_(GOOD, data__format="csv"), ["data.format: got 'csv'"]),
    ("preprocess-unknown", with_(GOOD, data__preprocess="after"), ["data.preprocess: got 'after'", "'before'", "'during'"]),
    ("preprocess-during-epochs", with_(GOOD, data__preprocess="during", training={"epochs": 2}),
     ["data.preprocess: got 'during', but training.epochs needs the dataset's size", "give training.max_steps"]),
    ("preprocess-during-preference", with_(GOOD, data__preprocess="during", objective="dpo"),
     ["data.preprocess: got 'during'", "objective dpo reads preference rows", "set data.preprocess: before"]),
    ("not-a-mapping", ["just", "a", "list"], ["must be a mapping"]),
    ("ds-extra-without-zero3", with_(GOOD, deepspeed={"extra": {"steps_per_print": 1}}), ["deepspeed.extra: set, but the job does not use"]),
]


@pytest.mark.parametrize("case_id,raw,expected", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_spec_names_field_value_and_rule(case_id, raw, expected):
    with pytest.raises(SpecError) as err:
        parse_job_spec(raw, "job.yaml")
    message = str(err.value)
    for part in expected:
        assert part in message, f"{case_id}: {part!r} not in\n{message}"


def test_every_problem_is_reported_at_once():
    raw = with_(GOOD, method={"name": "lora", "r": 0, "alpha": -1}, training={"lr": 0, "max_steps": 5, "warmup_steps": 9},
                output={"name": "Bad Name"})
    with pytest.raises(SpecError) as err:
        parse_job_spec(raw, "job.yaml")
    assert len(err.value.problems) == 5, err.value.problems
    for field in ("method.lora.r", "method.lora.alpha", "training.lr", "training.warmup_steps", "output.name"):
        assert any(p.startswith(field) for p in err.value.problems), field


def test_strategy_auto_resolves_from_method_and_workers():
    assert parse_job_spec(GOOD).resolved_strategy() == "single"
    assert parse_job_spec(with_(GOOD, resources={"num_workers": 2})).resolved_strategy() == "ddp"
    full = with_(GOOD, method={"name": "full"}, resources={"num_workers": 2})
    assert parse_job_spec(full).resolved_strategy() == "deepspeed_zero3"


BAD_FILES = {
    "not-yaml.yaml": "model: [\n",
    "rank-zero.yaml": yaml.safe_dump(with_(GOOD, method={"name": "lora", "r": 0})),
    "empty.yaml": "",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_cli_validate_exits_2_with_one_message_and_no_traceback(name, tmp_path, capsys):
    from cluster.cli import main

    path = tmp_path / name
    path.write_text(BAD_FILES[name])
    assert main(["validate", str(path)]) == 2  # an uncaught error would raise here, with its traceback
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("rayft validate: error:") == 1
    assert str(path) in err


def test_cli_validate_ok_on_example(capsys):
    from cluster.cli import main

    assert main(["validate", str(REPO / "examples" / "lora.yaml")]) == 0
    assert capsys.readouterr().out.startswith("OK:")


def test_eval_file_without_eval_fraction_is_valid():
    spec = parse_job_spec(with_(GOOD, data={"train": "a.jsonl", "eval": "b.jsonl"}), "job.yaml")
    assert spec.data.eval == "b.jsonl"
