"""Ray Tune search over LoRA rank / alpha / target modules: validation, a real 4-trial search with ASHA,
promotion of the best adapter, a crashing trial, the CLI and --resume."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import uuid
from pathlib import Path

import peft
import pytest
import ray.train
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from storage.registry import base_config_digest_of_dir, open_registry
from storage.store import open_store, pyarrow_filesystem
from tests.support.jobs import make_job
from trainers.checkpoints import PROBE_NAME
from trainers.spec import SpecError, parse_job_spec
from trainers.state_io import load_state
from trainers.tune import (
    RESULTS_CSV,
    RESULTS_JSON,
    RESULTS_PNG,
    TUNE_DIR,
    SearcherUnavailable,
    load_search,
    max_concurrent_trials,
    param_space,
    results_csv,
    preflight,
    run_search,
    trial_spec,
)

MAX_STEPS, EVAL_EVERY = 12, 3
TRAINING = {"max_steps": MAX_STEPS, "eval_every": EVAL_EVERY, "checkpoint_every": EVAL_EVERY, "log_every": MAX_STEPS,
            "micro_batch_size": 8, "lr": 0.01}
BASE = {
    "model": {"source": "registry:tiny-llama"},
    "data": {"train": "examples/data/reverse.jsonl"},
    "method": {"name": "lora", "r": 8},
    "training": {"max_steps": 12, "eval_every": 3},
    "output": {"name": "tuned"},
}


def tune_job(tune: dict, **patch) -> dict:
    return {**BASE, **patch, "tune": tune}


# ----------------------------------------------------------------------------- validation (no Ray)

INVALID = [
    ("empty-choice", {"space": {"r": []}}, "tune.space.r.choice: got [], an empty choice searches nothing"),
    ("alpha-ratio-zero", {"space": {"alpha": "0r"}}, "tune.space.alpha.ratio.choice[0]: got 0.0, must be > 0"),
    ("alpha-ratio-negative", {"space": {"alpha": {"ratio": [-2, 1]}}}, "tune.space.alpha.ratio.choice[0]: got -2, must be > 0"),
    ("unknown-preset", {"space": {"target_modules": ["qv", "qkvo"]}}, "unknown target-module preset 'qkvo'; use one of default, qv"),
    ("alpha-not-a-ratio", {"space": {"alpha": "2x"}}, "tune.space.alpha: got '2x', alpha is a number, or a ratio of r written like 2r"),
    ("grid-over-range", {"space": {"lr": {"range": [1e-4, 1e-2], "log": True}}}, "tune.space.lr: a range cannot be grid-searched"),
    ("empty-space", {"space": {}}, "tune.space: empty; give at least one of"),
    ("typo", {"space": {"rank": [4, 8]}}, "tune.space.rank: got [4, 8], unknown field"),
    ("choice-and-range", {"space": {"r": {"choice": [4], "range": [2, 8]}}}, "give exactly one of `choice: [...]` or `range: [low, high]`"),
    ("method-without-rank", {"space": {"method": ["lora", "ia3"]}}, "tune.space.method[1]: got 'ia3', must be one of 'lora'"),
    ("asha-one-eval", {"space": {"r": [4, 8]}, "asha": {"grace_period": 12}}, "tune.asha.grace_period: got 12, must be < training.max_steps (12)"),
    ("grid-with-samples", {"space": {"r": [4, 8]}, "num_samples": 5}, "tune.num_samples: got 5, grid search runs each combination once"),
]


@pytest.mark.parametrize("case_id,tune,expected", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_search_space_fails_with_one_clear_message(case_id, tune, expected):
    with pytest.raises(SpecError) as err:
        parse_job_spec(tune_job(tune), "job.yaml")
    assert len(err.value.problems) == 1, err.value.problems
    assert expected in err.value.problems[0], err.value.problems[0]


def test_base_method_without_rank_is_refused():
    with pytest.raises(SpecError) as err:
        parse_job_spec(tune_job({"space": {"lr": [1e-3, 1e-4]}}, method={"name": "ia3"}), "job.yaml")
    assert err.value.problems == [
        "method.name: got 'ia3', tune searches rank/alpha/target modules of lora, qlora, dora, rslora; set the base method to one of them"
    ]


def test_rank_above_hidden_size_fails_before_any_trial(tiny_model_dir, local_uri):
    spec = parse_job_spec(tune_job({"space": {"r": [8, 128]}}, model={"source": str(tiny_model_dir)}, storage={"uri": local_uri}))
    with pytest.raises(SpecError) as err:
        preflight(spec, "job.yaml")
    assert err.value.problems == [
        "tune.space.r: got 128, above the model's hidden size (64); a LoRA rank beyond the layer width adds parameters "
        "but no capacity: use ranks ≤ 64"
    ]


def test_method_switch_that_breaks_the_base_job_fails_before_any_trial(tiny_model_dir, local_uri):
    # model.dtype is fine for lora, but a qlora trial loads its base in 4-bit
    spec = parse_job_spec(tune_job({"space": {"method": ["lora", "qlora"]}}, model={"source": str(tiny_model_dir), "dtype": "float32"},
                                   storage={"uri": local_uri}))
    with pytest.raises(SpecError) as err:
        preflight(spec, "job.yaml")
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith("tune.space.method: 'qlora' does not fit the base job: model.dtype")


@pytest.mark.skipif(importlib.util.find_spec("optuna") is not None, reason="optuna is installed here, so there is no error to show")
def test_model_based_searcher_without_its_library_names_the_package(tiny_model_dir, local_uri):
    spec = parse_job_spec(tune_job({"searcher": "optuna", "num_samples": 4, "space": {"r": {"range": [2, 16], "log": True}}},
                                   model={"source": str(tiny_model_dir)}, storage={"uri": local_uri}))
    with pytest.raises(SearcherUnavailable, match=r"tune.searcher: 'optuna' .* `pip install optuna`, or use searcher: random or grid"):
        preflight(spec)


def test_search_space_maps_to_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    grid = parse_job_spec(tune_job({"space": {"r": [4, 8], "alpha": ["1r", "2r"], "target_modules": ["qv", ["q_proj", "o_proj"]],
                                              "lr": 3e-3}})).tune
    space = param_space(grid)
    assert sorted(space) == ["alpha_ratio", "lr", "r", "target_modules"]
    assert space["lr"] == 3e-3
    assert space["r"] == {"grid_search": [4, 8]} and space["alpha_ratio"] == {"grid_search": [1.0, 2.0]}
    assert space["target_modules"] == {"grid_search": ["qv", "q_proj,o_proj"]}
    random = parse_job_spec(tune_job({"searcher": "random", "num_samples": 6, "space": {
        "r": {"range": [2, 64], "log": True}, "lr": {"range": [1e-5, 1e-2], "log": True}, "dropout": [0.0, 0.1], "alpha": 16}})).tune
    space = param_space(random)
    assert isinstance(space["r"], Integer) and (space["r"].lower, space["r"].upper) == (2, 65)  # inclusive high
    assert isinstance(space["lr"], Float) and isinstance(space["dropout"], Categorical) and space["alpha"] == 16.0


def test_trial_spec_puts_the_sampled_config_into_the_base_job():
    base = parse_job_spec(tune_job({"space": {"r": [4]}}, method={"name": "qlora", "r": 8, "quant_type": "fp4"}))
    dora = trial_spec(base, {"method": "dora", "r": 16, "alpha_ratio": 2.0, "target_modules": "attn", "lr": 5e-4, "dropout": 0.1})
    assert dora.method.model_dump() == {"name": "dora", "r": 16, "alpha": 32.0, "dropout": 0.1,
                                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    assert dora.training.lr == 5e-4 and dora.tune is None
    # every report of a trial carries a checkpoint, so ASHA can stop it at any evaluation
    assert dora.training.checkpoint_every == dora.training.eval_every
    same = trial_spec(base, {"r": 4, "target_modules": "q_proj,o_proj"})
    assert (same.method.name, same.method.quant_type, same.method.target_modules) == ("qlora", "fp4", ["q_proj", "o_proj"])


def test_concurrency_is_derived_from_the_cluster_and_the_job():
    spec = parse_job_spec(tune_job({"space": {"r": [2, 4, 8, 16]}}, resources={"num_workers": 1, "cpus_per_worker": 1}))
    assert max_concurrent_trials(spec, {"CPU": 4.0}, gpu=False) == 3  # each trial: 1 worker CPU + its driver's 0.01
    assert max_concurrent_trials(spec, {"CPU": 64.0, "GPU": 2.0}, gpu=True) == 2
    assert max_concurrent_trials(spec, {"CPU": 64.0}, gpu=False) == 4  # never more than the grid has trials
    two = parse_job_spec(tune_job({"space": {"r": [2, 4]}}, resources={"num_workers": 2, "cpus_per_worker": 2, "strategy": "ddp"}))
    assert max_concurrent_trials(two, {"CPU": 4.0}, gpu=False) == 1
    fixed = parse_job_spec(tune_job({"space": {"r": [2, 4]}, "max_concurrent_trials": 1}))
    assert max_concurrent_trials(fixed, {"CPU": 64.0}, gpu=False) == 1


# ----------------------------------------------------------------------------- a real search (Ray Tune + Train)


@pytest.fixture(scope="module")
def search(ray_session, s3_server, tiny_model_dir, reverse_data):
    """One 4-trial grid search on S3: lr {good, far too small} × rank {2, 8}, alpha = 2r, ASHA every 3 steps."""
    bucket = f"rayft-tune-{uuid.uuid4().hex[:12]}"
    s3_server.ensure_bucket(bucket)
    uri = f"s3://{bucket}/prefix"
    spec = make_job(
        tiny_model_dir, reverse_data, uri, {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}, name="rev-tuned",
        training=TRAINING,
        tune={"searcher": "grid", "space": {"lr": [0.01, 1e-6], "r": [2, 8], "alpha": "2r"},
              "asha": {"grace_period": EVAL_EVERY, "reduction_factor": 2}},
    )
    events: list[str] = []
    result = run_search(spec, on_progress=_Recorder(events))
    yield spec, result, uri, events
    client = s3_server.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=item["Key"])
    client.delete_bucket(Bucket=bucket)


class _Recorder:
    """A picklable progress sink (Tune pickles its callbacks with the experiment)."""

    def __init__(self, events: list[str]):
        self.events = events

    def __call__(self, records, event):
        self.events.append(event)


BAD_LR = 1e-6


@pytest.mark.slow
def test_four_trial_search_completes_and_asha_stops_a_bad_trial(search):
    spec, result, uri, events = search
    assert len(result.trials) == 4 and not [t for t in result.trials if t.status == "errored"]
    configs = sorted((t.lr, t.r, t.alpha) for t in result.trials)
    assert configs == [(BAD_LR, 2, 4.0), (BAD_LR, 8, 16.0), (0.01, 2, 4.0), (0.01, 8, 16.0)]
    bad = [t for t in result.trials if t.lr == BAD_LR]
    stopped = [t for t in bad if t.status == "stopped"]
    assert stopped, [(t.trial_id, t.status, t.steps) for t in result.trials]
    for t in stopped:
        assert t.steps < MAX_STEPS and t.steps % EVAL_EVERY == 0
        assert [s for s, _ in t.eval_history] == list(range(EVAL_EVERY, t.steps + 1, EVAL_EVERY))
    assert result.steps_saved == sum(MAX_STEPS - t.steps for t in result.trials if t.status == "stopped") > 0
    assert result.max_concurrent_trials == 3  # 4 logical CPUs, 1 worker CPU + 0.01 per trial
    # every trial is its own Ray Train run with checkpoints in the bucket
    store = open_store(uri)
    for t in result.trials:
        keys = store.list(f"runs/{t.train_run_id}")
        assert any(k.endswith("/adapter/adapter_model.safetensors") for k in keys), t.trial_id
        if t.status == "completed":
            assert f"runs/{t.train_run_id}/step-{MAX_STEPS:08d}/adapter/adapter_model.safetensors" in keys
            assert t.checkpoint.endswith(f"runs/{t.train_run_id}/step-{MAX_STEPS:08d}")
    assert any("stopped by ASHA" in e for e in events)
    # never more trials at once than the cluster fits: the 4th starts only when one has ended
    first_end = next(i for i, e in enumerate(events) if "completed:" in e or "stopped by ASHA" in e)
    assert sum("started:" in e for e in events[:first_end]) == 3, events
    print(f"\n[tune-test] 4-trial search: {result.wall_s:.1f}s wall, ASHA saved {result.steps_saved} of "
          f"{result.steps_run + result.steps_saved} steps; " + ", ".join(f"{t.trial_id[-5:]} lr={t.lr:g} r={t.r}: {t.status}@{t.steps} eval {t.eval_loss:.3f}" for t in result.trials))


@pytest.mark.slow
def test_promoted_adapter_is_the_lowest_eval_loss_and_loads_in_plain_peft(search, tiny_model_dir):
    spec, result, uri, _ = search
    winner = result.trial(result.winner)
    assert winner.eval_loss == min(t.eval_loss for t in result.trials if t.eval_loss is not None)
    assert winner.lr == 0.01 and winner.status == "completed"
    assert result.published == ["rev-tuned@1"]
    registry = open_registry(uri)
    manifest = registry.resolve("rev-tuned")
    assert manifest.kind == "adapter" and manifest.method == "lora"
    assert (manifest.params["r"], manifest.params["alpha"], manifest.params["target_modules"]) == (winner.r, winner.alpha, "all-linear")
    assert manifest.metrics["eval_loss"] == pytest.approx(winner.eval_loss)
    assert manifest.lineage["run_id"] == winner.train_run_id
    assert manifest.lineage["job_spec"]["training"]["lr"] == winner.lr
    # plain peft reproduces the trial's final model exactly
    adapter_dir = registry.download("rev-tuned")
    fs, _ = pyarrow_filesystem(uri)
    with ray.train.Checkpoint(winner.checkpoint, filesystem=fs).as_directory() as ckpt:
        probe = load_state(ckpt, PROBE_NAME)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], attention_mask=torch.ones_like(probe["input_ids"])).logits
    torch.testing.assert_close(logits, probe["logits"], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_promoted_adapter_is_servable(search, tiny_model_dir):
    """The serve layer's own path, without a running Serve: its servability checks pass (merged at load and
    multiplexed), and the base-model deployment's adapter pool loads it and generates what plain peft does."""
    import asyncio

    from serve.deployments import AdapterPool, adapter_problems, fetch_adapter, linear_shapes
    from serve.generation import Engine, SamplingParams, Sequence
    from serve.metrics import ModelMetrics
    from serve.spec import AdapterPolicy

    _, result, uri, _ = search
    registry = open_registry(uri)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    checks = {"base_name": "tiny", "base_digest": base_config_digest_of_dir(tiny_model_dir), "shapes": linear_shapes(base)}
    directory, manifest, config = fetch_adapter(registry, result.published[0])
    for policy in (None, AdapterPolicy()):  # merged at load, multiplexed
        assert adapter_problems(manifest, config, directory, policy=policy, **checks) == []

    engine = Engine(base, tokenizer, max_batch_size=2, max_wait_s=0)
    pool = AdapterPool(engine, registry, reload_base=lambda: None, policy=AdapterPolicy(), metrics=ModelMetrics(), **checks)
    prompt = "reverse apple ="

    async def generate() -> list[int]:
        adapter = await pool.load(result.published[0])
        seq = Sequence(tokenizer(prompt, add_special_tokens=False).input_ids, SamplingParams(max_tokens=5, temperature=0),
                       adapter=adapter.peft_name)
        return [event.token_id async for event in engine.generate(seq)]

    served = asyncio.run(generate())
    plain = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(directory)).eval()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)[0, ids.shape[1]:]
    assert served == expected.tolist()


@pytest.mark.slow
def test_results_table_and_plot_are_saved_with_the_run(search):
    _, result, uri, _ = search
    store = open_store(uri)
    prefix = f"{TUNE_DIR}/{result.run_id}"
    assert load_search(result.run_id, uri) == result
    rows = list(csv.DictReader(io.StringIO(store.get_bytes(f"{prefix}/{RESULTS_CSV}").decode())))
    assert sorted(r["trial_id"] for r in rows) == sorted(t.trial_id for t in result.trials)
    assert {r["status"] for r in rows} <= {"completed", "stopped"}
    assert store.get_bytes(f"{prefix}/{RESULTS_PNG}")[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(store.get_bytes(f"{prefix}/{RESULTS_JSON}"))
    assert saved["winner"] == result.winner and saved["steps_saved"] == result.steps_saved
    assert json.loads(store.get_bytes(f"{prefix}/job.json"))["tune"]["space"]["alpha"]["ratio"]["choice"] == [2.0]


# ----------------------------------------------------------------------------- a crashing trial, the CLI, --resume


@pytest.mark.slow
def test_cli_search_records_a_crashed_trial_promotes_the_rest_and_resumes(ray_session, tiny_model_dir, reverse_data, local_uri, tmp_path, capsys):
    import yaml

    from cluster.cli import main

    spec = make_job(
        tiny_model_dir, reverse_data, local_uri, {"name": "lora", "r": 4, "alpha": 8}, name="rev-crash",
        training={**TRAINING, "max_steps": 6},
        # a module name the model does not have: peft raises inside that trial's worker, for real
        tune={"space": {"target_modules": ["qv", ["no_such_proj"]], "method": "dora"}, "max_failures": 1,
              "scheduler": "fifo"},
    )
    job = tmp_path / "tune.yaml"
    job.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True)))
    assert main(["tune", str(job)]) == 0
    out = capsys.readouterr().out

    run_id = out.split("[rayft] search ", 1)[1].split(":", 1)[0]
    result = load_search(run_id, local_uri)
    crashed = next(t for t in result.trials if t.target_modules == "no_such_proj")
    good = next(t for t in result.trials if t.target_modules == "qv")
    assert crashed.status == "errored" and "no_such_proj" in crashed.error, crashed.error
    assert good.status == "completed" and result.winner == good.trial_id and good.method == "dora"
    assert result.published == ["rev-crash@1"]
    assert open_registry(local_uri).resolve("rev-crash").lineage["run_id"] == good.train_run_id
    # the live view: events, a table with status/config/losses, then the winner and where it went
    assert f"trial {crashed.trial_id} failed (attempt 1), retrying:" in out
    assert f"trial {crashed.trial_id} errored after 2 attempt(s), recorded:" in out
    header = next(line for line in out.splitlines() if line.strip().startswith("trial ") and "eval loss" in line)
    for column in ("status", "method", "r", "alpha", "targets", "lr", "dropout", "step", "eval loss", "best"):
        assert column in header
    assert f"winner           : trial {good.trial_id}: dora r=4 alpha=8 targets=qv" in out
    assert "published        : rev-crash@1" in out
    assert f"errored          : trial {crashed.trial_id}:" in out

    # --resume of a finished search shows it and runs nothing
    assert main(["tune", "--resume", run_id, "--storage", local_uri]) == 0
    out = capsys.readouterr().out
    assert f"search {run_id} already finished; nothing to resume" in out and "published        : rev-crash@1" in out

    # a driver that died after the trials but before the results were written: Tune restores the
    # experiment, and the winner, already in the registry, is not published twice
    open_store(local_uri).delete(f"{TUNE_DIR}/{run_id}/{RESULTS_JSON}")
    assert main(["tune", "--resume", run_id, "--storage", local_uri]) == 0
    out = capsys.readouterr().out
    assert f"resuming search {run_id}" in out and "published        : rev-crash@1" in out
    resumed = load_search(run_id, local_uri)
    assert resumed.winner == good.trial_id and [t.status for t in resumed.trials] == [t.status for t in result.trials]
    assert open_registry(local_uri).versions("rev-crash") == [1]


def test_resume_of_an_unknown_search_says_what_to_check(local_uri, capsys):
    from cluster.cli import main

    assert main(["tune", "--resume", "nope-tune-1", "--storage", local_uri]) == 2
    err = capsys.readouterr().err
    assert "rayft tune: error: no search 'nope-tune-1'" in err and "check the run id" in err


# ----------------------------------------------------------------------------- ranking by a task metric (tune.metric)

METRIC_INVALID = [
    ("unknown-metric", {"space": {"r": [2, 4]}, "metric": "bleu"},
     ["tune.metric: got 'bleu', must be one of 'eval_loss', 'exact_match' or 'contains'"]),
    ("mode-against-metric", {"space": {"r": [2, 4]}, "metric": "exact_match", "mode": "min"},
     ["tune.mode: got 'min', exact_match is better when higher; use mode: max, or leave mode unset"]),
    ("mode-against-loss", {"space": {"r": [2, 4]}, "mode": "max"},
     ["tune.mode: got 'max', eval_loss is better when lower; use mode: min, or leave mode unset"]),
]


@pytest.mark.parametrize("case_id,tune,expected", METRIC_INVALID, ids=[c[0] for c in METRIC_INVALID])
def test_bad_tune_metric_or_mode_fails_with_one_clear_message(case_id, tune, expected):
    with pytest.raises(SpecError) as err:
        parse_job_spec(tune_job(tune), "job.yaml")
    assert err.value.problems == expected


def test_task_metric_without_prompts_and_completions_reports_every_problem_at_once():
    raw = tune_job({"space": {"r": [2, 4]}, "metric": "contains", "mode": "min"},
                   data={"train": "x.jsonl", "format": "text", "train_on_prompt": True})
    with pytest.raises(SpecError) as err:
        parse_job_spec(raw, "job.yaml")
    problems = err.value.problems
    assert [p.split(",")[0] for p in problems] == ["tune.mode: got 'min'", "tune.metric: got 'contains'", "tune.metric: got 'contains'"]
    assert "data.format is text" in problems[1] and "data.train_on_prompt" in problems[2]
    with pytest.raises(SpecError) as err:
        parse_job_spec(tune_job({"space": {"r": [2, 4]}, "metric": "exact_match"}, objective="dpo"), "job.yaml")
    assert err.value.problems == [
        "tune.metric: got 'exact_match', a task metric compares generated answers with completions, which the preference "
        "objective(s) dpo do not have; use metric: eval_loss, or objective: sft"]


def test_task_metric_ranks_trials_and_reaches_the_workers():
    tune = parse_job_spec(tune_job({"space": {"r": [2, 4]}, "metric": "exact_match", "mode": "max",
                                    "task_eval": {"rows": 8, "max_tokens": 4, "normalize": ["strip", "lower"]}})).tune
    assert tune.ranking() == ("eval_exact_match", "max")
    task = tune.task_eval_for_workers()
    assert (task.metric, task.rows, task.max_tokens, task.normalize) == ("exact_match", 8, 4, ["strip", "lower"])
    plain = parse_job_spec(tune_job({"space": {"r": [2, 4]}})).tune
    assert plain.ranking() == ("eval_loss", "min") and plain.task_eval_for_workers() is None


def test_best_trial_by_task_metric_is_not_the_best_by_eval_loss(local_uri):
    """Promotion follows tune.metric: the highest exact match wins even with a worse eval loss."""
    from trainers.checkpoints import STATE_NAME
    from trainers.tune.results import TrialRecord
    from trainers.tune.search import best_trial

    def trial(trial_id: str, eval_loss: float, em: float | None) -> TrialRecord:
        ckpt = Path(local_uri) / trial_id
        ckpt.mkdir(parents=True)
        (ckpt / f"{STATE_NAME}.json").write_text("{}")
        return TrialRecord(trial_id=trial_id, status="completed", config={}, method="lora", r=4, alpha=8, target_modules="qv",
                           lr=0.01, dropout=0.0, steps=6, eval_loss=eval_loss, eval_exact_match=em, train_run_id=trial_id,
                           checkpoint=str(ckpt))

    trials = [trial("a", 1.0, 0.25), trial("b", 2.0, 0.75), trial("c", 0.5, None), trial("d", 3.0, 0.75)]
    assert best_trial(trials, local_uri, "eval_exact_match").trial_id == "b"  # ties on exact match: lower eval loss
    assert best_trial(trials, local_uri, "eval_loss").trial_id == "c"


def test_task_metric_in_the_loop_scores_greedy_answers_without_ray(tiny_model_dir):
    """The worker's scorer: prompts split at the loss mask, greedy peft/transformers answers, exact match against
    the completions; an answer the model gives scores 1, any other 0; text rows have no prompt and are refused."""
    from trainers.ingest.formats import EncodeOptions, encode_rows, truncate
    from trainers.ingest.stream import Example

    def encode_row(row, fmt, tok, max_seq_len, train_on_prompt):
        return Example(**truncate(encode_rows([row], fmt, tok, EncodeOptions(train_on_prompt=train_on_prompt))[0], max_seq_len)[0])
    from trainers.precision import Precision
    from trainers.task_eval import TaskEvalError, split_prompts, task_metric, task_scorer
    from trainers.tune_spec import TaskEval

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = ["reverse cat =", "upper dog =", "code sun ="]
    own = []
    for p in prompts:  # what the model answers, straight from transformers
        ids = tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        own.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert all(own), own
    rows = [{"prompt": prompts[0], "completion": own[0]}, {"prompt": prompts[1], "completion": own[1] + " nope"},
            {"prompt": prompts[2], "completion": "  " + own[2] + " "}]
    examples = [encode_row(r, "prompt_completion", tokenizer, 64, False) for r in rows]
    split = split_prompts(examples, tokenizer, rows=8)
    assert [s.reference for s in split] == [own[0], own[1] + " nope", "  " + own[2] + " "]
    fp32 = Precision("fp32", torch.float32, None)
    task = TaskEval(metric="exact_match", rows=8, max_tokens=4)
    args = (tokenizer, torch.device("cpu"), fp32, 1, 0)
    assert task_metric(model, split, task, *args) == pytest.approx(2 / 3)  # strip makes row 3 match
    assert task_metric(model, split, task.model_copy(update={"normalize": []}), *args) == pytest.approx(1 / 3)
    assert task_metric(model, split, task.model_copy(update={"metric": "contains"}), *args) == pytest.approx(2 / 3)
    assert task_metric(model, split[:2], task, *args) == pytest.approx(1 / 2)
    assert len(split_prompts(examples, tokenizer, rows=2)) == 2

    class _Text:
        def eval_examples(self):
            return [encode_row({"text": "reverse cat = tac"}, "text", tokenizer, 64, False)]

    with pytest.raises(TaskEvalError, match="none of the 1 eval examples has a prompt before its trained tokens"):
        task_scorer(task, tokenizer, _Text(), torch.device("cpu"), fp32, 1, 0, False)


@pytest.mark.slow
def test_tune_by_task_metric_promotes_the_best_by_that_metric(ray_session, tiny_model_dir, local_uri, tmp_path):
    """Ranked by exact match, the winner is the best by exact match even where eval loss says otherwise.

    The eval file's first rows (the ones answered) complete each prompt with the base model's own greedy answer;
    the rest, like the train rows, complete with " yes". A trial at lr 1e-6 stays the base model: every answer
    matches, but its eval loss (dominated by the " yes" rows) stays high. A trial at lr 0.05 learns " yes"
    (lower eval loss) and its answers drift (lower exact match). Each evaluation reports eval_exact_match from
    the workers' greedy answers; the promotion ranks by it; the manifest records it. Both trials run to the end
    (fifo): at the first evaluation the lr 0.05 trial's eval loss is still above the base's, so an ASHA stop
    there would leave nothing for the two metrics to disagree on.
    """
    from trainers.tiny import write_jsonl

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    answered = []
    for i in range(40):
        ids = tokenizer(f"answer {i} =", add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        if answer.strip():
            answered.append({"prompt": f"answer {i} =", "completion": answer})
    assert len(answered) >= 8
    yes = [{"prompt": f"answer {i} =", "completion": " yes"} for i in range(100, 180)]
    train = write_jsonl([{"prompt": f"answer {i} =", "completion": " yes"} for i in range(200, 280)], tmp_path / "train.jsonl")
    held_out = write_jsonl(answered[:8] + yes, tmp_path / "eval.jsonl")
    spec = make_job(
        tiny_model_dir, train, local_uri, {"name": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"}, name="em-tuned",
        data={"eval": str(held_out), "eval_fraction": 0}, training={**TRAINING, "max_steps": 6},
        tune={"space": {"lr": [0.05, BAD_LR]}, "metric": "exact_match", "mode": "max",
              "task_eval": {"rows": 8, "max_tokens": 4}, "scheduler": "fifo"},
    )
    result = run_search(spec)
    learned, base_like = sorted(result.trials, key=lambda t: -t.lr)
    summary = [(t.lr, t.status, t.steps, t.eval_exact_match, t.eval_loss) for t in result.trials]
    assert base_like.eval_exact_match > learned.eval_exact_match, summary
    assert base_like.eval_loss > learned.eval_loss, summary  # eval loss would have promoted the other trial
    assert result.winner == base_like.trial_id
    manifest = open_registry(local_uri).resolve("em-tuned")
    assert manifest.lineage["run_id"] == base_like.train_run_id
    assert manifest.metrics["eval_exact_match"] == pytest.approx(base_like.eval_exact_match)
    assert "eval_exact_match" in results_csv(result).splitlines()[0]
    print(f"\n[tune-test] by exact match: {result.wall_s:.1f}s wall; "
          + ", ".join(f"lr={t.lr:g}: {t.status}@{t.steps} em {t.eval_exact_match:.3f} loss {t.eval_loss:.3f}" for t in result.trials))
