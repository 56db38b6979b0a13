"""Ingestion on Ray Data: the preprocessing pass over real files (local and the embedded S3 server),
bad-data errors before any worker starts, reuse of a preprocessed dataset, and the streaming shards
Ray Train hands each worker (disjoint, covering, the same every time)."""

from __future__ import annotations

import json

import pytest

from trainers.ingest.prepare import prepare_data
from trainers.ingest.sources import DataError
from trainers.spec import DataSpec


def prep(data: DataSpec, model_dir, storage, seed: int = 0, kind: str = "text"):
    return prepare_data(data, model_source=str(model_dir), model_dir=str(model_dir), storage_uri=str(storage), seed=seed,
                        kind=kind)


def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_examples(prepared, part: str = "train") -> list[tuple[list[int], list[int]]]:
    import pyarrow.parquet as pq

    from trainers.ingest.sources import filesystem_for

    fs, _ = filesystem_for(prepared.uri)
    out = []
    for f in getattr(prepared, f"{part}_files"):
        t = pq.read_table(f, filesystem=fs)
        out += list(zip(t.column("input_ids").to_pylist(), t.column("labels").to_pylist()))
    return out


def test_prepare_from_s3_glob_with_eval_split_and_reuse(ray_session, tiny_model_dir, s3_uri, capsys):
    from storage.store import open_store

    store = open_store(s3_uri)
    for part in range(2):
        store.put_bytes("".join(json.dumps({"text": f"apple {part} {i} river"}) + "\n" for i in range(60)).encode(), f"d/part-{part}.jsonl")
    store.put_bytes(b'{"text": "not matched"}\n', "d/other.parquet.bak")
    data = DataSpec(train=f"{s3_uri}/d/part-*.jsonl", eval_fraction=0.2, max_seq_len=32)
    prepared = prep(data, tiny_model_dir, s3_uri)
    assert prepared.uri.startswith(s3_uri)
    assert prepared.stats["rows_read"] == 120 and prepared.n_train + prepared.n_eval == 120
    assert 5 <= prepared.n_eval <= 45
    train, evals = read_examples(prepared), read_examples(prepared, "eval")
    assert len({tuple(i) for i, _ in train + evals}) == 120  # every row exactly once, train and eval disjoint
    out = capsys.readouterr().out
    assert "part-0.jsonl: format text (detected)" in out
    again = prep(data, tiny_model_dir, s3_uri)
    assert again.reused and again.train_files == prepared.train_files
    assert read_examples(again) == train


def test_a_file_of_several_pass_blocks_is_preprocessed_like_one_block(ray_session, tiny_model_dir, tmp_path, monkeypatch, capsys):
    # a large file is cut into PASS_BLOCK_BYTES blocks, tokenized by parallel tasks; that must not change what is
    # written, its order, or the held-out rows. The driver says how far the pass has got as blocks finish.
    from trainers.ingest import prepare as prepare_module
    from trainers.tiny import task_examples, write_jsonl

    path = write_jsonl(task_examples("reverse", 600, seed=3), tmp_path / "rows.jsonl")
    data = DataSpec(train=str(path), eval_fraction=0.2, max_seq_len=32)
    whole = prep(data, tiny_model_dir, tmp_path / "one-block")
    monkeypatch.setattr(prepare_module, "PASS_BLOCK_BYTES", path.stat().st_size // 5)
    monkeypatch.setattr(prepare_module, "PROGRESS_EVERY_S", 0.0)  # a progress line after every block
    capsys.readouterr()
    cut = prep(data, tiny_model_dir, tmp_path / "blocks")
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[rayft] data: preprocessing data.train: ")]

    def first_rows(prepared):  # each file is named <file>-<first row of its block>-<n>
        return {f.rsplit("/", 1)[1].split("-")[1] for f in prepared.train_files + prepared.eval_files}

    assert len(first_rows(whole)) == 1 and len(first_rows(cut)) >= 4, (whole.train_files, cut.train_files)
    assert (cut.n_train, cut.n_eval, cut.stats["rows_read"]) == (whole.n_train, whole.n_eval, 600)
    assert read_examples(cut) == read_examples(whole)
    assert read_examples(cut, "eval") == read_examples(whole, "eval")
    rows = [int(line.split(": ")[2].split(" rows")[0].replace(",", "")) for line in progress]
    shares = [int(line.split(", ")[2].split("%")[0]) for line in progress]
    assert len(progress) == len(first_rows(cut)) and rows == sorted(rows) and rows[-1] == 600, progress
    assert shares == sorted(shares) and 0 < shares[0] and shares[-1] == 99 and all(" left" in line for line in progress[1:]), progress
    assert " left" not in progress[0]  # no rate to go by until a second block is done


def test_bad_row_deep_in_a_file_names_its_line_or_is_skipped(ray_session, tiny_model_dir, tmp_path):
    rows = [{"prompt": f"p {i}", "completion": f" c {i}"} for i in range(40)]
    rows[29] = '{"prompt": "p", "completion": 3}'  # line 30: past the rows checked up front
    path = write_rows(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl:30: expected string fields \"prompt\" and \"completion\" \(set data.on_bad_row: skip"):
        prep(DataSpec(train=str(path), eval_fraction=0.0), tiny_model_dir, tmp_path / "store")
    skipped = prep(DataSpec(train=str(path), eval_fraction=0.0, on_bad_row="skip"), tiny_model_dir, tmp_path / "store")
    assert (skipped.stats["bad_rows_skipped"], skipped.n_train) == (1, 39)


def test_parquet_bad_row_names_its_index_and_packing_stats(ray_session, tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"reverse {w} =", "answer": " " + w[::-1]} for w in ["apple", "river", "stone"] * 10]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    data = DataSpec(train=str(tmp_path / "qa.parquet"), eval_fraction=0.0, columns={"prompt": "question", "completion": "answer"},
                    max_seq_len=16, packing=True)
    prepared = prep(data, tiny_model_dir, tmp_path / "store")
    assert prepared.n_train == prepared.stats["tokens"] // 16 and 0.5 < prepared.stats["packing_efficiency"] <= 1
    assert all(len(ids) == 16 for ids, _ in read_examples(prepared))
    rows[25]["answer"] = ""
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa2.parquet")
    with pytest.raises(DataError, match=r"qa2.parquet: row 25: \"completion\" is empty"):
        prep(data.model_copy(update={"train": str(tmp_path / "qa2.parquet")}), tiny_model_dir, tmp_path / "store")


def test_preference_rows_go_through_the_same_pipeline(ray_session, tiny_model_dir, tmp_path, capsys):
    """Pairs from Parquet with a column mapping, KTO rows from JSONL: detected for the objective's kind, encoded with
    their own columns, each example keyed by its source row (the index of a precomputed reference)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainers.ingest.stream import PairExample, UnpairedExample, iter_examples, part_keys

    words = ["apple", "river", "stone", "green"] * 5
    pq.write_table(pa.Table.from_pylist([{"prompt": f"reverse {w} =", "good": " " + w[::-1], "bad": " " + w} for w in words]),
                   tmp_path / "pairs.parquet")
    data = DataSpec(train=str(tmp_path / "pairs.parquet"), eval_fraction=0.2, columns={"chosen": "good", "rejected": "bad"})
    pairs = prep(data, tiny_model_dir, tmp_path / "store", kind="paired")
    assert "pairs.parquet: format preference (detected)" in capsys.readouterr().out
    assert (pairs.kind, pairs.n_train + pairs.n_eval) == ("paired", 20)
    assert pairs.columns == ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
    train = list(iter_examples(pairs, "train"))
    assert all(isinstance(e, PairExample) for e in train) and [e.key for e in train] == part_keys(pairs, "train")
    assert train[0].chosen.input_ids[:4] == train[0].rejected.input_ids[:4]  # the same prompt, then the responses
    kto = write_rows(tmp_path / "kto.jsonl", [{"prompt": f"reverse {w} =", "completion": " " + w[::-1], "label": i % 2 == 0}
                                              for i, w in enumerate(words)])
    unpaired = prep(DataSpec(train=str(kto), eval_fraction=0.0), tiny_model_dir, tmp_path / "store", kind="unpaired")
    assert "label" in unpaired.columns and "kl_input_ids" in unpaired.columns
    rows = list(iter_examples(unpaired, "train"))
    assert isinstance(rows[0], UnpairedExample) and [r.label for r in rows[:2]] == [True, False]
    # an SFT file given to a preference objective: one clear error naming what the objective reads
    sft = write_rows(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": " b"}] * 3)
    with pytest.raises(DataError, match=r"sft.jsonl:1: cannot tell the format: expected one of: preference \(chosen\+rejected\); "
                                        "this job's objective reads paired preference rows"):
        prep(DataSpec(train=str(sft), eval_fraction=0.0), tiny_model_dir, tmp_path / "store", kind="paired")


@pytest.mark.parametrize("case", ["empty", "missing column", "no format", "no trainable tokens", "wrong extension", "eval too small"])
def test_bad_data_is_one_clear_error_before_training(case, ray_session, tiny_model_dir, tmp_path):
    path, extra, message = tmp_path / "d.jsonl", {}, None
    if case == "empty":
        path.write_text("\n\n")
        message = "empty: no rows"
    elif case == "missing column":
        write_rows(path, [{"question": "q", "reply": "a"}])
        extra = {"columns": {"prompt": "question", "completion": "answer"}}
        message = r"data.columns: .*d.jsonl:1: no column 'answer' \(named in data.columns\); the row has question, reply"
    elif case == "no format":
        write_rows(path, [{"question": "q"}])
        message = r"d.jsonl:1: cannot tell the format: expected one of: messages \(messages\).*set data.format or map fields"
    elif case == "no trainable tokens":
        write_rows(path, [{"prompt": "apple " * 30, "completion": " b"}] * 3)
        extra = {"max_seq_len": 8}
        message = r"d.jsonl:1: no trainable tokens after masking and truncation to max_seq_len=8"
    elif case == "wrong extension":
        path = tmp_path / "d.parquet"
        write_rows(path, [{"text": "a"}])
        message = r"d.parquet: not a Parquet file"
    elif case == "eval too small":
        write_rows(path, [{"text": "apple"}])
        extra = {"eval_fraction": 0.01}
        message = "too few to hold out eval_fraction=0.01"
    with pytest.raises(DataError, match=message):
        prep(DataSpec(train=str(path), **{"eval_fraction": 0.0, **extra}), tiny_model_dir, tmp_path / "store")


@pytest.mark.parametrize("window,fetch", [(4, 3), (10, 5), (1000, 8)])
def test_local_shuffle_hands_out_every_row_once_in_a_seeded_order(window, fetch):
    import numpy as np
    import pyarrow as pa

    from trainers.ingest.stream import shuffled

    blocks = [pa.table({"input_ids": [[b, r] for r in range(7)]}) for b in range(5)]  # 35 rows in 5 blocks

    def run(seed: int):
        events = []
        out = []
        for batch in shuffled(iter(blocks), window, fetch, np.random.default_rng(seed), lambda: events.append(len(out))):
            assert 0 < len(batch["input_ids"]) <= fetch
            out.append(batch["input_ids"])
        return out, events

    batches, events = run(1)
    rows = [tuple(r) for b in batches for r in b]
    assert sorted(rows) == sorted(tuple(r) for t in blocks for r in t.column("input_ids").to_pylist())  # each row once
    assert rows != sorted(rows)  # shuffled
    held_at_end = sum(len(b) for b in batches[events[0]:])
    assert events and held_at_end <= window + fetch  # the end was signalled while at most a window's rows were held
    assert run(1)[0] == batches and run(2)[0] != batches  # a function of the seed


@pytest.mark.parametrize("end_micro,passes", [(None, 2), (8, 1), (9, 2)])
def test_the_next_epochs_pass_starts_early_only_if_the_run_reaches_it(end_micro, passes):
    """A shard of 40 rows, micro-batches of 5: 8 per epoch. The next epoch's pass is started while the last rows of
    this one train, unless the run ends within this epoch."""
    import pyarrow as pa

    from trainers.ingest.stream import train_micro_batches

    class Shard:  # what a worker's Ray Data shard offers the stream: one pass per iter_batches call
        started = 0

        def iter_batches(self, **_):
            Shard.started += 1
            return iter([pa.table({"input_ids": [[i] for i in range(b, b + 10)], "labels": [[i] for i in range(b, b + 10)]})
                         for b in range(0, 40, 10)])

    stream = train_micro_batches(Shard(), n_train=40, world=1, micro_batch_size=5, seed=0, end_micro=end_micro)
    first_epoch = [next(stream) for _ in range(8)]
    assert sorted(e.input_ids[0] for batch in first_epoch for e in batch) == list(range(40))
    assert Shard.started == passes
    if end_micro is None:
        # epoch 2 runs on the pass started early; its 40 rows fit the shuffle window, so epoch 3's starts at once
        assert len(next(stream)) == 5 and Shard.started == 3


@pytest.mark.slow
def test_two_workers_get_disjoint_shards_covering_the_data_in_the_same_order(ray_session, tiny_model_dir, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    from trainers.ingest.stream import trainer_datasets

    path = write_rows(tmp_path / "t.jsonl", [{"text": f"apple {i}"} for i in range(101)])
    prepared = prep(DataSpec(train=str(path), eval_fraction=0.0), tiny_model_dir, tmp_path / "store")
    out = tmp_path / "seen"
    out.mkdir()

    def consume(config):
        from trainers.ingest.stream import train_micro_batches

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        shard = ray.train.get_dataset_shard("train")
        stream = train_micro_batches(shard, n_train=config["n"], world=world, micro_batch_size=5, seed=3,
                                     start_micro=config["start"])
        batches = [[e.input_ids for e in next(stream)] for _ in range(config["count"])]
        (out / f"{config['tag']}-{rank}.json").write_text(json.dumps(batches))

    def fit(tag: str, start: int, count: int):
        datasets, data_config = trainer_datasets(prepared, seed=3)
        TorchTrainer(consume, train_loop_config={"n": prepared.n_train, "start": start, "count": count, "tag": tag},
                     datasets=datasets, dataset_config=data_config,
                     scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False)).fit()
        return [json.loads((out / f"{tag}-{r}.json").read_text()) for r in range(2)]

    # 101 rows, 2 workers: 50 rows each = 10 micro-batches of 5 per epoch; 14 batches cross into epoch 2
    first = fit("a", 0, 14)
    epoch1 = [tuple(ids) for rank in first for batch in rank[:10] for ids in batch]
    assert len(epoch1) == 100 and len(set(epoch1)) == 100  # disjoint across workers, one row left out (equal shards)
    ranks = [{tuple(ids) for batch in rank[:10] for ids in batch} for rank in first]
    assert not ranks[0] & ranks[1]
    assert [b for b in first[0][10:]] != first[0][:4]  # epoch 2 is reshuffled
    resumed = fit("b", 7, 7)  # a restarted worker skipping to micro-batch 7 sees what the first run saw
    assert [rank[7:14] for rank in first] == resumed


def reverse_rows(n: int, seed: int) -> list[tuple[str, str]]:
    from trainers.tiny import task_examples

    return [(r["prompt"], r["completion"]) for r in task_examples("reverse", n, seed=seed)]


@pytest.mark.slow
def test_every_source_kind_and_row_format_trains(ray_session, tiny_model_dir, s3_uri, local_uri, tmp_path):
    """One directory holding JSONL (prompt/completion), Parquet (OpenAI chat with weight 0), CSV (Alpaca) and a
    datasets directory (ShareGPT); eval from the embedded S3 server. Training lowers the eval loss."""
    import csv

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from storage.store import open_store
    from tests.support.jobs import make_job
    from trainers.ingest.prepare import prepare_for_job
    from trainers.ingest.stream import read_examples
    from trainers.loop import Precision, mean_loss
    from tests.support.inprocess import fit_in_process
    from trainers.run import run_training

    d = tmp_path / "mixed"
    rows = reverse_rows(160, seed=1)
    write_rows(d / "a.jsonl", [{"prompt": p, "completion": c} for p, c in rows[:40]])
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "x", "weight": 0},
                                                       {"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}]}
                                         for p, c in rows[40:80]]), d / "b.parquet")
    with open(d / "c.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["instruction", "input", "output"])
        w.writerows([(p, "", c.strip()) for p, c in rows[80:120]])
    datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": c.strip()}]}
                                for p, c in rows[120:]]).save_to_disk(str(d / "hf"))
    open_store(s3_uri).put_bytes("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in reverse_rows(30, seed=2)).encode(),
                                 "eval/reverse.jsonl")
    spec = make_job(tiny_model_dir, d, local_uri, {"name": "lora", "r": 8, "alpha": 16, "target_modules": "all-linear"},
                    data={"eval": f"{s3_uri}/eval/*.jsonl", "eval_fraction": 0.0, "max_seq_len": 48},
                    training={"max_steps": 16, "eval_every": 16, "checkpoint_every": 16})
    result = run_training(spec, publish=False, fit=fit_in_process)  # the worker loop in this process, on the Ray Data shard
    _, prepared = prepare_for_job(spec, local_uri)
    assert prepared.reused and sorted(prepared.stats["formats"].values()) == [
        "alpaca", "messages", "prompt_completion", "prompt_completion", "sharegpt"]  # the S3 eval file is prompt_completion too
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = mean_loss(AutoModelForCausalLM.from_pretrained(tiny_model_dir), read_examples(prepared), 8, tok.pad_token_id,
                     torch.device("cpu"), Precision("fp32", torch.float32, None))
    assert result.metrics["eval_loss"] < base - 0.2, (result.metrics["eval_loss"], base)  # 6.19 -> 5.76 in 16 steps
    with result.checkpoint.as_directory() as ckpt:
        from trainers.state_io import load_state

        assert load_state(ckpt, "trainer_state")["data"]["train_examples"] == 160


def test_epochs_become_steps_before_training(ray_session, tiny_model_dir, tmp_path, capsys):
    from tests.support.jobs import make_job
    from trainers.ingest.prepare import prepare_for_job

    path = write_rows(tmp_path / "t.jsonl", [{"text": f"apple {i}"} for i in range(50)])
    from trainers.spec import parse_job_spec

    raw = make_job(tiny_model_dir, path, str(tmp_path / "store"), {"name": "lora"}, data={"eval_fraction": 0.0},
                   resources={"num_workers": 2}).model_dump(mode="json", exclude_unset=True)
    raw["training"] = {"epochs": 2.5, "micro_batch_size": 4, "grad_accum": 2}
    spec = parse_job_spec(raw)
    resolved, prepared = prepare_for_job(spec, str(tmp_path / "store"))
    # 50 examples, 2 workers: 25 each = 6 micro-batches of 4 = 3 steps of 2 per epoch; 2.5 epochs = 7 steps
    assert (prepared.n_train, resolved.training.max_steps, resolved.training.epochs) == (50, 7, None)
    assert "2.5 epoch(s) = 7 steps of 3 per epoch" in capsys.readouterr().out
    too_big = make_job(tiny_model_dir, path, str(tmp_path / "store"), {"name": "lora"}, data={"eval_fraction": 0.0},
                       training={"micro_batch_size": 64})
    with pytest.raises(DataError, match="50 training examples are too few for 1 worker"):
        prepare_for_job(too_big, str(tmp_path / "store"))


def test_max_eval_rows_evaluates_the_first_eval_examples_and_reuses_the_data(ray_session, tiny_model_dir, tmp_path, capsys):
    from tests.support.jobs import make_job
    from trainers.ingest.prepare import prepare_for_job
    from trainers.ingest.prepare import Prepared
    from trainers.ingest.stream import eval_batches, iter_examples, part_keys

    path = write_rows(tmp_path / "t.jsonl", [{"text": f"apple {i} river {i % 7}"} for i in range(400)])
    store = str(tmp_path / "store")
    whole_spec = make_job(tiny_model_dir, path, store, {"name": "lora"}, data={"eval_fraction": 0.25})
    _, whole = prepare_for_job(whole_spec, store)
    assert whole.n_eval > 60 and whole.n_evaluated == whole.n_eval
    capped_spec = make_job(tiny_model_dir, path, store, {"name": "lora"}, data={"eval_fraction": 0.25, "max_eval_rows": 30})
    _, capped = prepare_for_job(capped_spec, store)
    assert capped.reused and capped.key == whole.key  # the cap is not preprocessing
    assert (capped.n_eval, capped.n_evaluated) == (whole.n_eval, 30)
    assert f"evaluating the first 30 of {whole.n_eval} eval examples (data.max_eval_rows)" in capsys.readouterr().out
    all_eval = list(iter_examples(whole))
    assert list(iter_examples(capped)) == all_eval[:30]
    assert part_keys(capped, "eval") == part_keys(whole, "eval")[:30]
    shards = [[e for batch in eval_batches(capped, 4, 2, rank) for e in batch] for rank in range(2)]
    assert sorted(map(str, shards[0] + shards[1])) == sorted(map(str, all_eval[:30]))
    assert Prepared.from_json(capped.to_json()).n_evaluated == 30  # what the driver hands every worker
