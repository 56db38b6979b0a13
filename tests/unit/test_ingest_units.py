"""Ingestion without Ray: row formats and their exact loss masks, column mapping, truncation, packing,
and the line-aware readers for JSONL, JSON, Parquet, CSV and `datasets` directories."""

from __future__ import annotations

import json

import pytest

from trainers.ingest.formats import (
    FORMATS, IGNORE, EncodeOptions, apply_columns, assistant_spans, detect_format, encode_rows, pack, truncate,
)
from trainers.ingest.prepare import encode_block, parse_row
from trainers.ingest.sources import DataError, preview, resolve


@pytest.fixture(scope="module")
def tok():
    from trainers.tiny import build_tokenizer

    return build_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def learned(tok, example) -> list[int]:
    return [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]


def one(tok, fmt: str, row: dict, **opts) -> dict:
    out = encode_rows([row], fmt, tok, EncodeOptions(**opts))[0]
    assert not isinstance(out, str), out
    assert len(out["input_ids"]) == len(out["labels"])
    return out


def test_text_learns_every_token(tok):
    ex = one(tok, "text", {"text": "apple river"})
    assert ex["input_ids"] == ids(tok, "apple river") + [tok.eos_token_id]
    assert ex["labels"] == ex["input_ids"]


def test_prompt_completion_mask_token_by_token(tok):
    ex = one(tok, "prompt_completion", {"prompt": "reverse apple =", "completion": " elppa"})
    p, c = ids(tok, "reverse apple ="), ids(tok, " elppa") + [tok.eos_token_id]
    assert ex["input_ids"] == p + c
    assert ex["labels"] == [IGNORE] * len(p) + c
    assert one(tok, "prompt_completion", {"prompt": "a", "completion": " b"}, train_on_prompt=True)["labels"] == ids(tok, "a") + ids(tok, " b") + [2]


def chat_ids(tok, messages) -> list[int]:
    return tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def test_messages_mask_system_user_and_weight_zero_turns(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "draft", "weight": 0}, {"role": "user", "content": "again"},
            {"role": "assistant", "content": "hello"}]
    ex = one(tok, "messages", {"messages": msgs})
    full = chat_ids(tok, [{k: v for k, v in m.items() if k != "weight"} for m in msgs])
    assert ex["input_ids"] == full
    # token by token: exactly the last assistant turn's content + </s> is learned, where it was rendered
    prefix = chat_ids(tok, [{k: v for k, v in m.items() if k != "weight"} for m in msgs[:4]]) + ids(tok, "<|assistant|>")
    target = ids(tok, "hello") + [tok.eos_token_id]
    assert full[:len(prefix) + len(target)] == prefix + target
    expected = [IGNORE] * len(prefix) + target + [IGNORE] * (len(full) - len(prefix) - len(target))
    assert ex["labels"] == expected
    assert tok.decode(learned(tok, ex)) == "hello</s>"
    # without the weight, both assistant turns are learned
    both = one(tok, "messages", {"messages": [{k: v for k, v in m.items() if k != "weight"} for m in msgs]})
    assert tok.decode(learned(tok, both)) == "draft</s>hello</s>"


def test_sharegpt_and_alpaca_render_through_the_chat_template(tok):
    share = one(tok, "sharegpt", {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                                                    {"from": "gpt", "value": "yo"}]})
    assert share["input_ids"] == chat_ids(tok, [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "yo"}])
    assert tok.decode(learned(tok, share)) == "yo</s>"
    alpaca = one(tok, "alpaca", {"instruction": "upper", "input": "sky", "output": "SKY"})
    assert alpaca["input_ids"] == chat_ids(tok, [{"role": "user", "content": "upper\n\nsky"}, {"role": "assistant", "content": "SKY"}])
    assert tok.decode(learned(tok, alpaca)) == "SKY</s>"


def test_detection_and_column_mapping():
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"instruction": "x", "input": "", "output": "y"}) == "alpaca"
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"text": "a"}) == "text"
    assert detect_format({"question": "a"}) is None
    mapped = apply_columns({"question": "q", "answer": "a", "id": 3}, {"prompt": "question", "completion": "answer"})
    assert mapped == {"prompt": "q", "completion": "a", "id": 3}
    assert detect_format(mapped) == "prompt_completion"
    assert parse_row(b'{"question": "q"}', {"prompt": "question", "completion": "answer"})[1].startswith("no column 'answer'")


@pytest.mark.parametrize("fmt,row,reason", [
    ("messages", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0] must be"),
    ("messages", {"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ("messages", {"messages": [{"role": "user", "content": "x", "weight": 0}, {"role": "assistant", "content": "y"}]}, "only allowed on assistant"),
    ("messages", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]}, "no assistant message with weight 1"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "x"}]}, 'no "gpt" turn'),
    ("alpaca", {"instruction": "x", "output": ""}, '"output" is empty'),
    ("prompt_completion", {"prompt": "a", "completion": ""}, '"completion" is empty'),
    ("text", {"text": ""}, 'non-empty string field "text"'),
])
def test_format_checks(fmt, row, reason):
    assert reason in FORMATS[fmt].check(row)


def test_truncation_and_packing():
    ex, cut = truncate({"input_ids": list(range(10)), "labels": list(range(10))}, 4)
    assert cut and ex["input_ids"] == [0, 1, 2, 3]
    assert truncate({"input_ids": [1], "labels": [1]}, 4) == ({"input_ids": [1], "labels": [1]}, False)
    blocks = pack([{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}, {"input_ids": [4, 5, 6], "labels": [4, 5, 6]}], 4)
    assert blocks == [{"input_ids": [1, 2, 3, 4], "labels": [IGNORE, 2, 3, 4]}]
    assert assistant_spans([0, 1, 1, 0, 1]) == [(1, 3), (4, 5)]


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_readers_name_lines_and_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(3)]
    write_rows(tmp_path / "a.jsonl", [rows[0], "", rows[1], rows[2]])  # a blank line keeps line numbers honest
    (tmp_path / "b.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"{r['prompt']},{r['completion']}\n" for r in rows))
    fs, files = resolve(str(tmp_path))
    assert [f.kind for f in files] == ["jsonl", "json", "parquet", "csv"]
    where = {f.kind: [f.where(pos) for pos, _ in preview(fs, f, i)] for i, f in enumerate(files)}
    assert where["jsonl"] == [f"{tmp_path}/a.jsonl:1", f"{tmp_path}/a.jsonl:3", f"{tmp_path}/a.jsonl:4"]
    assert where["parquet"][2] == f"{tmp_path}/c.parquet: row 2"
    assert where["json"][0] == f"{tmp_path}/b.json: row 0"
    assert where["csv"][0] == f"{tmp_path}/d.csv:2"
    for i, f in enumerate(files):
        assert [json.loads(raw) for _, raw in preview(fs, f, i)] == rows, f.kind
    _, globbed = resolve(str(tmp_path / "*.parquet"))
    assert [f.kind for f in globbed] == ["parquet"]


def test_datasets_save_to_disk_directory(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the datasets package writes the save_to_disk fixture")
    rows = [{"text": f"apple {i}"} for i in range(5)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    fs, files = resolve(str(tmp_path / "hf"))
    assert [f.kind for f in files] == ["arrow"]
    assert [json.loads(raw) for _, raw in preview(fs, files[0], 0)] == rows


@pytest.mark.parametrize("name,content,message", [
    ("fake.parquet", b'{"text": "a"}\n', "not a Parquet file"),
    ("fake.jsonl", b"PAR1\x00\x00binary", "binary data"),
    ("fake.csv", b"a,b\n1,2,3,4\n", "not a CSV file"),
])
def test_file_that_is_not_what_its_extension_says(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    fs, files = resolve(str(tmp_path / name))
    with pytest.raises(DataError, match=message):
        preview(fs, files[0], 0)


def test_missing_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        resolve(str(tmp_path / "none.jsonl"))
    with pytest.raises(DataError, match="no .* files match"):
        resolve(str(tmp_path / "*.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        resolve(str(tmp_path / "x.txt"))


def test_bad_rows_in_a_block(tok, tmp_path):
    fs, files = resolve(str(write_rows(tmp_path / "b.jsonl", ["{}"])))
    cfg = {"columns": None, "train_on_prompt": False, "max_seq_len": 8, "on_bad_row": "error"}
    rows = [(0, 1, b'{"prompt": "a", "completion": " b"}'), (0, 2, b"{oops"), (0, 3, b'{"prompt": "' + b"apple " * 20 + b'", "completion": " b"}')]
    with pytest.raises(DataError, match=r"b.jsonl:2: not valid JSON .*on_bad_row: skip"):
        encode_block(rows, files, {0: "prompt_completion"}, cfg, tok)
    done = encode_block(rows, files, {0: "prompt_completion"}, {**cfg, "on_bad_row": "skip"}, tok)
    assert (len(done["examples"]), done["bad"]) == (1, 2)  # bad JSON, and a prompt that fills max_seq_len
    with pytest.raises(DataError, match=r"b.jsonl:3: no trainable tokens after masking and truncation to max_seq_len=8"):
        encode_block(rows[2:], files, {0: "prompt_completion"}, cfg, tok)


def test_spec_data_fields_are_checked():
    from trainers.spec import SpecError, parse_job_spec

    raw = {"model": {"source": "m"}, "data": {"train": "t.jsonl", "format": "csvish", "columns": {"prompt": 3}},
           "method": {"name": "lora"}, "training": {"epochs": 2, "max_steps": 10}, "output": {"name": "x"}}
    with pytest.raises(SpecError) as err:
        parse_job_spec(raw)
    text = "\n".join(err.value.problems)
    assert "data.format" in text and "unknown format 'csvish'" in text and "sharegpt" in text
    assert "data.columns.prompt" in text
    assert "training.epochs: set together with training.max_steps" in text


def test_messages_from_columnar_files_have_weight_none_for_unset(tok):
    # Parquet/Arrow rows give every message every field: weight None means "not set", not "weight 0"
    msgs = [{"role": "user", "content": "hi", "weight": None}, {"role": "assistant", "content": "yo", "weight": None}]
    assert FORMATS["messages"].check({"messages": msgs}) is None
    assert tok.decode(learned(tok, one(tok, "messages", {"messages": msgs}))) == "yo</s>"


def test_a_block_is_written_as_files_of_at_most_file_rows_named_in_data_order(tiny_model_dir, tmp_path, monkeypatch):
    """A training worker streams one preprocessed file as one Ray Data block: the files' size bounds its memory."""
    from dataclasses import asdict

    import pyarrow as pa
    import pyarrow.fs
    import pyarrow.parquet as pq

    from trainers.ingest import prepare
    from trainers.spec import DataSpec

    monkeypatch.setattr(prepare, "FILE_ROWS", 4)  # 10 rows → files of 4, 4 and 2 rows
    source = write_rows(tmp_path / "t.jsonl", [{"text": f"apple {i} river"} for i in range(10)])
    _, files = resolve(str(source))
    cfg = prepare._cfg(DataSpec(train=str(source), eval_fraction=0.0, max_seq_len=32), str(tiny_model_dir), None, seed=0)
    batch = pa.table({"_src": [0] * 10, "_row": list(range(1, 11)), "_raw": source.read_bytes().splitlines()})
    out = tmp_path / "out"
    for part in ("train", "eval"):
        (out / part).mkdir(parents=True)
    stats = prepare.prepare_block(batch, files=[asdict(f) for f in files], formats=["text"], cfg=cfg, split="train",
                                  out_dir=str(out), out_fs=pyarrow.fs.LocalFileSystem())
    names = sorted(p.name for p in (out / "train").iterdir())
    assert names == [f"00000-000000000001-{n:05d}.parquet" for n in range(3)]
    assert [pq.read_table(out / "train" / n).column("_row").to_pylist() for n in names] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert stats.column("train_examples").to_pylist() == [10] and not list((out / "eval").iterdir())


@pytest.mark.parametrize(("sizes", "max_rows", "max_tokens", "files"), [
    ([3, 3, 3, 3, 3], 2, 100, [[0, 1], [2, 3], [4]]),      # the row bound
    ([3, 3, 3, 3, 3], 10, 7, [[0, 1], [2, 3], [4]]),       # the token bound
    ([2, 9, 2, 2], 10, 5, [[0], [1], [2, 3]]),             # an example over the token bound gets a file of its own
    ([], 4, 10, []),
])
def test_file_chunks_bound_rows_and_tokens_and_keep_order(sizes, max_rows, max_tokens, files):
    from trainers.ingest.prepare import file_chunks

    items = [(0, i, {"input_ids": [1] * n, "labels": [1] * n}) for i, n in enumerate(sizes)]
    assert [[row for _, row, _ in chunk] for chunk in file_chunks(items, max_rows, max_tokens)] == files


def test_pass_progress_says_rows_rate_share_and_time_left_every_interval(capsys, monkeypatch):
    from trainers.ingest import prepare
    from trainers.ingest.sources import SourceFile

    monkeypatch.setattr(prepare, "PROGRESS_EVERY_S", 10.0)
    now = [100.0]
    jsonl = [SourceFile(uri=f"d/{i}.jsonl", path=f"/d/{i}.jsonl", kind="jsonl", size=500, mtime=None) for i in range(2)]
    progress = prepare.PassProgress("data.train", jsonl, clock=lambda: now[0])
    now[0] += 5
    progress.update(1000, 250)
    assert capsys.readouterr().out == ""  # nothing before the first interval
    now[0] += 5
    progress.update(1000, 250)
    # rows so far, their rate, the share of the input's bytes, and the time left at that rate
    assert capsys.readouterr().out == "[rayft] data: preprocessing data.train: 2,000 rows, 200 rows/s, 50% of the input, about 0:00:10 left\n"
    now[0] += 1
    progress.update(1000, 500)  # the whole input, but a line comes only an interval after the last one
    assert capsys.readouterr().out == ""
    now[0] += 9
    progress.update(0, 0)
    # never 100% before the pass ends: the bytes do not count blank lines
    assert capsys.readouterr().out == "[rayft] data: preprocessing data.train: 3,000 rows, 150 rows/s, 99% of the input, about 0:00:00 left\n"

    # the time left goes at the rate since the first block: the seconds before it were start-up
    slow_start = prepare.PassProgress("data.train", jsonl, clock=lambda: now[0])
    now[0] += 8
    slow_start.update(100, 100)
    now[0] += 2
    slow_start.update(200, 200)
    assert capsys.readouterr().out.endswith(", 30% of the input, about 0:00:07 left\n")
    # no time left to say while the first block is the only one done
    first_late = prepare.PassProgress("data.train", jsonl, clock=lambda: now[0])
    now[0] += 12
    first_late.update(100, 100)
    assert capsys.readouterr().out.endswith(" rows/s, 10% of the input\n")

    parquet = [SourceFile(uri="d/a.parquet", path="/d/a.parquet", kind="parquet", size=500, mtime=None)]
    mixed = prepare.PassProgress("data.eval", jsonl + parquet, clock=lambda: now[0])
    now[0] += 3600 * 2
    mixed.update(72_000, 900)  # a Parquet file's bytes are not the rows' bytes: no share, no time left
    assert capsys.readouterr().out == "[rayft] data: preprocessing data.eval: 72,000 rows, 10 rows/s\n"
