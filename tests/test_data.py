"""Data loading: three row formats, loss masks, bad rows, splits, packing and a resumable batch order."""

from __future__ import annotations

import json

import pytest

from trainers import data as data_mod
from trainers.data import IGNORE, DataError, build_datasets, micro_batch_indices
from trainers.spec import DataSpec


@pytest.fixture(scope="module")
def tokenizer():
    from trainers.tiny import build_tokenizer

    return build_tokenizer()


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_prompt_completion_masks_the_prompt(tmp_path, tokenizer):
    path = write(tmp_path, "pc.jsonl", [{"prompt": "reverse apple =", "completion": " elppa"}] * 4)
    ds = build_datasets(DataSpec(train=path, eval_fraction=0.25), tokenizer, seed=0)
    ex = ds.train[0]
    n_prompt = len(tokenizer("reverse apple =", add_special_tokens=False)["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tokenizer.eos_token_id
    assert (len(ds.train), len(ds.eval)) == (3, 1)


def test_train_on_prompt_keeps_every_label(tmp_path, tokenizer):
    path = write(tmp_path, "pc.jsonl", [{"prompt": "upper sky =", "completion": " SKY"}] * 3)
    ds = build_datasets(DataSpec(train=path, eval_fraction=0.0, train_on_prompt=True), tokenizer, seed=0)
    assert ds.train[0].labels == ds.train[0].input_ids


def test_messages_learn_only_assistant_tokens(tmp_path, tokenizer):
    row = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}]}
    ds = build_datasets(DataSpec(train=write(tmp_path, "m.jsonl", [row] * 2), eval_fraction=0.0), tokenizer, seed=0)
    ex = ds.train[0]
    learned = tokenizer.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE])
    assert learned == "hello</s>"


def test_text_rows_and_truncation(tmp_path, tokenizer):
    ds = build_datasets(DataSpec(train=write(tmp_path, "t.jsonl", [{"text": "apple river " * 40}] * 2), eval_fraction=0.0, max_seq_len=16),
                        tokenizer, seed=0)
    assert all(len(e.input_ids) == 16 and e.labels == e.input_ids for e in ds.train)


def test_packing_fills_blocks(tmp_path, tokenizer):
    rows = [{"text": f"apple {i} river"} for i in range(40)]
    ds = build_datasets(DataSpec(train=write(tmp_path, "p.jsonl", rows), eval_fraction=0.0, max_seq_len=32, packing=True),
                        tokenizer, seed=0)
    assert ds.train and all(len(e.input_ids) == 32 for e in ds.train)


BAD_ROWS = [
    ("not json", "{oops", "not valid JSON"),
    ("array row", "[1, 2]", "expected a JSON object"),
    ("no known fields", '{"question": "x"}', "cannot tell the format"),
    ("empty completion", '{"prompt": "a", "completion": ""}', '"completion" is empty'),
    ("bad role", '{"messages": [{"role": "robot", "content": "x"}]}', "messages[0] must be"),
    ("no assistant", '{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
]


@pytest.mark.parametrize("label,line,reason", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_bad_row_names_file_and_line(label, line, reason, tmp_path, tokenizer):
    first = '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}' if "messages" in line else \
        '{"prompt": "a", "completion": " b"}'
    if label in ("not json", "array row", "no known fields"):
        first = line  # the very first row decides the format, so it fails there
        expected_line = 1
    else:
        expected_line = 3
    path = write(tmp_path, "bad.jsonl", [first, first, line] if expected_line == 3 else [line, first])
    with pytest.raises(DataError) as err:
        build_datasets(DataSpec(train=path, eval_fraction=0.0), tokenizer, seed=0)
    assert f"bad.jsonl:{expected_line}: " in str(err.value) and reason in str(err.value)
    assert "on_bad_row: skip" in str(err.value)


def test_bad_rows_can_be_skipped_and_counted(tmp_path, tokenizer):
    rows = ['{"prompt": "a", "completion": " b"}', "{oops", '{"prompt": "c", "completion": ""}', '{"prompt": "d", "completion": " e"}']
    ds = build_datasets(DataSpec(train=write(tmp_path, "s.jsonl", rows), eval_fraction=0.0, on_bad_row="skip"), tokenizer, seed=0)
    assert (len(ds.train), ds.skipped_rows) == (2, 2)


def test_missing_and_empty_files(tmp_path, tokenizer):
    with pytest.raises(DataError, match="data file not found"):
        build_datasets(DataSpec(train=str(tmp_path / "none.jsonl")), tokenizer, seed=0)
    with pytest.raises(DataError, match="no usable rows"):
        build_datasets(DataSpec(train=write(tmp_path, "e.jsonl", [""])), tokenizer, seed=0)


def test_data_from_s3(s3_uri, tokenizer):
    from storage.store import open_store

    open_store(s3_uri).put_bytes(b'{"text": "apple river"}\n{"text": "stone cloud"}\n', "d/train.jsonl")
    ds = build_datasets(DataSpec(train=f"{s3_uri}/d/train.jsonl", eval_fraction=0.5), tokenizer, seed=0)
    assert len(ds.train) == len(ds.eval) == 1


def test_batch_order_is_a_function_of_seed_and_step():
    n, bs, world = 10, 3, 2
    first = [micro_batch_indices(n, step_micro=k, micro_batch_size=bs, world=world, rank=r, seed=7) for k in range(5) for r in range(world)]
    again = [micro_batch_indices(n, step_micro=k, micro_batch_size=bs, world=world, rank=r, seed=7) for k in range(5) for r in range(world)]
    assert first == again
    # one epoch = n samples: ranks together see each index exactly once per epoch
    flat = [i for batch in first for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    other = [micro_batch_indices(n, step_micro=k, micro_batch_size=bs, world=world, rank=r, seed=8) for k in range(5) for r in range(world)]
    assert other != first


def test_collate_pads_and_masks():
    batch = data_mod.collate([data_mod.Example([5, 6, 7], [IGNORE, 6, 7]), data_mod.Example([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
