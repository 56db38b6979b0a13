"""Preference objectives: each loss equals TRL's on a fixed batch (TRL is the reference, not a dependency of
training), preference rows are checked and encoded with the loss on response tokens only, and bad rows are named
with file and line. No Ray here."""

from __future__ import annotations

import json
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers.ingest.formats import IGNORE, EncodeOptions, detect_format, encode_rows, truncate
from trainers.ingest.prepare import encode_block
from trainers.ingest.preference import check_row
from trainers.ingest.sources import DataError, resolve
from trainers.ingest.stream import collate_preference, to_examples
from trainers.objectives import OBJECTIVES, dpo, kto, orpo, simpo
from trainers.objectives._common import SequenceLogps
from trainers.objectives.forward import make_loss_fn, reference_table, sequence_logps
from trainers.tiny import preference_examples

trl = pytest.importorskip("trl", reason="TRL is the reference implementation; `make test` installs it (dev extra)")

ROWS = [
    {"prompt": "reverse apple =", "chosen": " elppa", "rejected": " apple"},
    {"prompt": "reverse river =", "chosen": " revir", "rejected": " rivers stone"},
    {"prompt": "reverse stone =", "chosen": " enots", "rejected": " nots"},
    {"prompt": "reverse green =", "chosen": " neerg", "rejected": " green green"},
]


def encode(rows: list[dict], fmt: str, tok, max_seq_len: int) -> list:
    """Rows through the ingest encoder of `fmt` ("preference" or "kto"), as the worker's examples."""
    encoded = [truncate(e, max_seq_len)[0] for e in encode_rows(rows, fmt, tok, EncodeOptions())]
    columns = {k: [e[k] for e in encoded] for k in encoded[0]}
    columns.update(_src=[0] * len(rows), _row=list(range(1, len(rows) + 1)))
    return to_examples(columns, "paired" if fmt == "preference" else "unpaired")


def encode_pair(row: dict, tok, max_seq_len: int):
    return encode([row], "preference", tok, max_seq_len)[0]


def load_models(model_dir):
    """(policy, reference, tokenizer): the reference is the tiny base, the policy the same with perturbed weights,
    so log-ratios are not zero. Fresh objects each call: TRL's trainers patch the models they are given."""
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    policy = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return policy, ref, AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def models(tiny_model_dir):
    return load_models(tiny_model_dir)


def logps(model, batch) -> SequenceLogps:
    with torch.no_grad():
        return SequenceLogps(*sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"]))


def trl_batch_to_ours(batch: dict) -> dict:
    """TRL's collated batch (completion_mask marks response tokens) in rayft's form (labels)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_equals_trl_dpo_trainer(loss_type, models, tiny_model_dir, tmp_path):
    from datasets import Dataset

    policy, ref, tok = models
    trl_policy, trl_ref, _ = load_models(tiny_model_dir)
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.3, loss_type=[loss_type], report_to=[], use_cpu=True,
                         bf16=False, per_device_train_batch_size=4)
    trainer = trl.DPOTrainer(model=trl_policy, ref_model=trl_ref, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tok)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    with torch.no_grad():
        expected = trainer._compute_loss(trainer.model, trl_batch, return_outputs=False)

    batch = trl_batch_to_ours(trl_batch)
    ours, metrics = dpo.loss(dpo.Config(beta=0.3, loss_type=loss_type), logps(policy, batch), logps(ref, batch))
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)
    logged = trainer._metrics["train" if trainer.model.training else "eval"]
    assert logged["rewards/margins"][-1] == pytest.approx(metrics["reward_margin"].item(), abs=1e-5)
    assert logged["rewards/accuracies"][-1] == pytest.approx(metrics["preference_accuracy"].item())
    # the batch TRL tokenized is the batch rayft's own encoding gives (prompt + response + EOS, loss on the response)
    ours_batch = collate_preference([encode_pair(r, tok, 64) for r in ROWS], tok.pad_token_id)
    for i in range(2 * len(ROWS)):
        theirs = batch["labels"][i][batch["attention_mask"][i].bool()]
        mine = ours_batch["labels"][i][ours_batch["attention_mask"][i].bool()]
        assert theirs.tolist() == mine.tolist()


def test_dpo_label_smoothing_equals_trl_conservative_sigmoid(models):
    """TRL 1.16's DPOTrainer dropped cDPO's label smoothing from the sigmoid loss; its CPO trainer keeps the same
    formula on log-ratio differences, which is what cDPO is."""
    from trl.experimental.cpo import CPOTrainer

    policy, ref, tok = models
    batch = collate_preference([encode_pair(r, tok, 64) for r in ROWS], tok.pad_token_id)
    pol, rf = logps(policy, batch), logps(ref, batch)
    fake = types.SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=0.2, label_smoothing=0.15,
                                 accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, _, _ = CPOTrainer.cpo_loss(fake, pol.chosen - rf.chosen, pol.rejected - rf.rejected)
    ours, _ = dpo.loss(dpo.Config(beta=0.2, label_smoothing=0.15), pol, rf)
    assert ours.item() == pytest.approx(losses.mean().item(), abs=1e-5)


def _trl_logits_and_labels(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]


def test_orpo_loss_equals_trl(models):
    from trl.experimental.orpo import ORPOTrainer

    policy, _, tok = models
    batch = collate_preference([encode_pair(r, tok, 64) for r in ROWS], tok.pad_token_id)
    logits, labels = _trl_logits_and_labels(policy, batch)
    avg = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    n = len(ROWS)
    fake = types.SimpleNamespace(beta=0.25, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    or_losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(fake, avg[:n], avg[n:])
    # TRL's NLL term also counts the prompt tokens; rayft's is on the chosen response only (the loss mask)
    nll = torch.nn.functional.cross_entropy(logits[:n, :-1].reshape(-1, logits.shape[-1]), labels[:n, 1:].reshape(-1))
    ours, metrics = orpo.loss(orpo.Config(beta=0.25), logps(policy, batch), None)
    assert ours.item() == pytest.approx((nll - or_losses.mean()).item(), abs=1e-5)
    assert metrics["reward_margin"].item() == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), abs=1e-5)


def test_simpo_loss_equals_trl_cpo_simpo(models):
    from trl.experimental.cpo import CPOTrainer

    policy, _, tok = models
    batch = collate_preference([encode_pair(r, tok, 64) for r in ROWS], tok.pad_token_id)
    logits, labels = _trl_logits_and_labels(policy, batch)
    avg = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)  # TRL averages for simpo
    n = len(ROWS)
    fake = types.SimpleNamespace(alpha=0.0, loss_type="simpo", beta=2.5, simpo_gamma=0.7, label_smoothing=0.0,
                                 accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, _ = CPOTrainer.cpo_loss(fake, avg[:n], avg[n:])  # cpo_alpha 0: pure SimPO
    ours, metrics = simpo.loss(simpo.Config(beta=2.5, gamma=0.7), logps(policy, batch), None)
    assert ours.item() == pytest.approx(losses.mean().item(), abs=1e-5)
    assert metrics["rewards_chosen"].item() == pytest.approx(chosen_rewards.mean().item(), abs=1e-5)


KTO_ROWS = [
    {"prompt": "reverse apple =", "completion": " elppa", "label": True},
    {"prompt": "reverse river =", "completion": " river", "label": False},
    {"prompt": "reverse stone =", "completion": " enots", "label": True},
    {"prompt": "reverse green =", "completion": " green", "label": False},
    {"prompt": "reverse cloud =", "completion": " duolc", "label": True},
]


def test_kto_loss_equals_trl_kto_trainer(models, tiny_model_dir, tmp_path):
    from datasets import Dataset

    policy, ref, tok = models
    trl_policy, trl_ref, _ = load_models(tiny_model_dir)
    args = trl.KTOConfig(output_dir=str(tmp_path), beta=0.3, desirable_weight=1.0, undesirable_weight=1.5,
                         report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=len(KTO_ROWS))
    trainer = trl.KTOTrainer(model=trl_policy, ref_model=trl_ref, args=args, train_dataset=Dataset.from_list(KTO_ROWS), processing_class=tok)
    trl_batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        expected = trainer._compute_loss(trainer.model, trl_batch, return_outputs=False)

    batch = trl_batch_to_ours(trl_batch)
    kl_batch = {"input_ids": trl_batch["KL_input_ids"], "attention_mask": trl_batch["KL_attention_mask"],
                "completion_mask": trl_batch["KL_completion_mask"]}
    kl = trl_batch_to_ours(kl_batch)
    batch.update({"kto_labels": trl_batch["label"], **{f"kl_{k}": v for k, v in kl.items()}})
    cfg = kto.Config(beta=0.3, desirable_weight=1.0, undesirable_weight=1.5)
    pol, rf = logps(policy, batch), logps(ref, batch)
    for side, model in ((pol, policy), (rf, ref)):
        side.labels = batch["kto_labels"]
        side.kl_sums = logps(model, {"input_ids": kl["input_ids"], "attention_mask": kl["attention_mask"], "labels": kl["labels"]}).sums
    ours, metrics = kto.loss(cfg, pol, rf)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-5)
    assert metrics["kl"].item() == pytest.approx(trainer._metrics["train" if trainer.model.training else "eval"]["kl"][-1], abs=1e-5)


def test_loss_fn_with_adapter_reference_equals_explicit_reference(models, tiny_model_dir):
    """The loop's loss function takes the reference from the model with its adapter switched off, and equals
    the loss computed from a separate base model."""
    import peft

    _, ref, tok = models
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft.LoraConfig(r=4, init_lora_weights=False))
    batch = collate_preference([encode_pair(r, tok, 64) for r in ROWS], tok.pad_token_id)
    cfg = dpo.Config(beta=0.5)
    loss, _ = make_loss_fn(cfg, live_reference=True)(model, batch)
    expected, _ = dpo.loss(cfg, logps(model, batch), logps(ref, batch))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert loss.requires_grad and model.active_adapters == ["default"]  # the adapter is back on after the reference pass
    # precomputed reference (full fine-tuning): the same loss from the table carried in the batch
    examples = [encode_pair(r, tok, 64) for r in ROWS]
    table = reference_table(ref, iter(examples), len(examples), lambda ex: collate_preference(ex, tok.pad_token_id), 3, 1, 0,
                            torch.device("cpu"))
    for e, sums in zip(examples, table["sums"]):
        e.ref = tuple(sums.tolist())
    batch = collate_preference(examples, tok.pad_token_id)
    assert "ref_sums" in batch
    precomputed, _ = make_loss_fn(cfg, live_reference=False)(model, batch)
    assert precomputed.item() == pytest.approx(expected.item(), abs=1e-5)


def test_every_objective_registered_with_the_same_shape():
    for name, module in OBJECTIVES.items():
        assert module.Config().name == name
        assert module.DATA in ("text", "paired", "unpaired") and isinstance(module.REFERENCE, bool)
        assert callable(module.loss)


# ---------------------------------------------------------------------------- data


def test_messages_rows_mask_everything_but_the_assistant_reply(models):
    _, _, tok = models
    row = {"prompt": [{"role": "user", "content": "reverse apple ="}],
           "chosen": [{"role": "assistant", "content": "elppa"}], "rejected": [{"role": "assistant", "content": "apple"}]}
    assert check_row(row, "paired") is None
    pair = encode_pair(row, tok, 64)
    kept = [t for t in pair.chosen.labels if t != IGNORE]
    assert tok.decode(kept) == "elppa</s>"
    assert tok.decode([t for t in pair.rejected.labels if t != IGNORE]) == "apple</s>"


@pytest.mark.parametrize("row,kind,expected", [
    ({"prompt": "a", "chosen": "b"}, "paired", 'missing field "rejected"'),
    ({"prompt": "a", "chosen": "b", "rejected": ""}, "paired", '"rejected" is empty'),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, "paired", '"chosen" must be a string or a non-empty list'),
    ({"prompt": "a", "completion": "b", "label": "yes"}, "unpaired", '"label" must be true (desirable) or false'),
    ({"prompt": "a", "completion": "b"}, "unpaired", 'missing field "label"'),
    ({"prompt": "a", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "y"}, "paired", "all be strings or all be message lists"),
])
def test_bad_preference_rows_are_named(row, kind, expected):
    assert expected in check_row(row, kind)


def test_preference_rows_are_detected_only_for_preference_objectives():
    assert detect_format(ROWS[0], "paired") == "preference"
    assert detect_format(KTO_ROWS[0], "unpaired") == "kto"
    assert detect_format(KTO_ROWS[0], "text") == "prompt_completion"  # an SFT job reads a KTO file's prompt/completion
    assert detect_format({"prompt": "a", "completion": "b"}, "paired") is None


def test_bad_row_reported_with_file_and_line(models, tmp_path):
    _, _, tok = models
    path = tmp_path / "prefs.jsonl"
    lines = [json.dumps(r) for r in ROWS[:2]] + [json.dumps({"prompt": "p", "chosen": "c"}), "{not json"]
    path.write_text("\n".join(lines) + "\n")
    _, files = resolve(str(path))
    rows = [(0, i + 1, line.encode()) for i, line in enumerate(lines)]
    cfg = {"columns": None, "train_on_prompt": False, "max_seq_len": 64, "on_bad_row": "error"}
    with pytest.raises(DataError) as err:
        encode_block(rows, files, {0: "preference"}, cfg, tok)
    assert str(err.value).startswith(f'{path}:3: missing field "rejected"')
    done = encode_block(rows, files, {0: "preference"}, {**cfg, "on_bad_row": "skip"}, tok)
    assert (len(done["examples"]), done["bad"]) == (2, 2)


def test_kto_rows_carry_a_mismatched_kl_sequence(models):
    _, _, tok = models
    examples = encode(KTO_ROWS[:4], "kto", tok, 32)
    batch = collate_preference(examples, tok.pad_token_id)
    assert batch["kl_input_ids"].shape[0] == batch["input_ids"].shape[0] == 4
    assert batch["kto_labels"].dtype == torch.bool
    # each row's KL sequence is its own prompt with the next row's completion
    first = tok.decode([t for t in examples[0].kl.labels if t != IGNORE])
    second = tok.decode([t for t in examples[1].completion.labels if t != IGNORE])
    assert first == second


def test_synthetic_preference_task_prefers_the_right_answer():
    rows = preference_examples("reverse", 20, seed=3)
    assert all(r["chosen"] == " " + r["prompt"].split()[1][::-1] and r["rejected"] != r["chosen"] for r in rows)


@pytest.mark.parametrize("objective,data,expected", [
    ("dpox", {}, ["objective.name: got 'dpox'", "'kto'"]),
    ({"name": "dpo", "beta": 0}, {}, ["objective.dpo.beta: got 0, must be > 0"]),
    ({"name": "kto", "desirable_weight": -1}, {}, ["objective.kto.desirable_weight"]),
    ("orpo", {"packing": True, "format": "text"}, ["data.packing: objective orpo", "data.format: got 'text', objective orpo reads"]),
])
def test_objective_spec_problems_are_named(objective, data, expected):
    from trainers.spec import SpecError, parse_job_spec

    raw = {"model": {"source": "m"}, "data": {"train": "t.jsonl", **data}, "method": {"name": "lora"},
           "objective": objective, "output": {"name": "x"}}
    with pytest.raises(SpecError) as err:
        parse_job_spec(raw, "job.yaml")
    for part in expected:
        assert part in str(err.value)


def test_plan_counts_both_sequences_of_a_pair_and_the_reference_pass(tiny_model_dir):
    from trainers.plan import PlanRequest, plan

    def planned(objective, batch, method="lora"):
        return plan(PlanRequest(model=str(tiny_model_dir), method={"name": method}, hardware={"device": "cpu"},
                                seq_len=32, micro_batch=batch, objective=objective))

    sft2, dpo1 = planned("sft", 2), planned("dpo", 1)
    assert dpo1.per_device.activations == sft2.per_device.activations  # a pair is two sequences
    assert dpo1.per_device.transient > sft2.per_device.transient  # + the reference pass's logits (adapter off)
    assert any("adapter off" in n for n in dpo1.notes)
    # no reference model: ORPO holds the pair's activations and nothing more; full FT precomputes the reference
    assert planned("orpo", 1).per_device.transient == sft2.per_device.transient
    assert any("computed once by the frozen base" in n for n in planned("dpo", 1, "full").notes)


def test_tune_space_takes_objective_and_beta():
    from trainers.spec import SpecError, parse_job_spec
    from trainers.tune import param_space, trial_spec

    raw = {"model": {"source": "m"}, "data": {"train": "t.jsonl"}, "method": {"name": "lora"}, "output": {"name": "x"},
           "objective": {"name": "dpo", "loss_type": "ipo"}, "training": {"max_steps": 20, "eval_every": 5},
           "tune": {"space": {"objective": ["dpo", "simpo"], "beta": [0.1, 0.5]}}}
    spec = parse_job_spec(raw, "job.yaml")
    assert spec.tune.space.ranking() == ("eval_preference_accuracy", "max")
    assert param_space(spec.tune) == {"objective": {"grid_search": ["dpo", "simpo"]}, "beta": {"grid_search": [0.1, 0.5]}}
    dpo_trial = trial_spec(spec, {"objective": "dpo", "beta": 0.5})
    assert (dpo_trial.objective.name, dpo_trial.objective.beta, dpo_trial.objective.loss_type) == ("dpo", 0.5, "ipo")
    assert trial_spec(spec, {"objective": "simpo", "beta": 0.1}).objective.model_dump() == {"name": "simpo", "beta": 0.1, "gamma": 0.5}
    one = {**raw, "tune": {"space": {"beta": [0.1, 0.5]}}}
    assert parse_job_spec(one, "job.yaml").tune.space.ranking() == ("eval_loss", "min")
    with pytest.raises(SpecError, match="tune.space.beta: sft has no beta"):
        parse_job_spec({**one, "objective": "sft"}, "job.yaml")
