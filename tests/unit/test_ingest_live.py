"""Training while preprocessing (`data.preprocess: during`) without Ray: the manifest a pass keeps as it writes, and
the workers' reads of it. The pass here is a function that writes Parquet files block by block (the real one is
the Ray Data pass of trainers.ingest.prepare, exercised end to end in tests/integration/test_ingest.py)."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from trainers.ingest import live
from trainers.ingest.live import LiveManifest, LivePass, LiveStream, live_pass
from trainers.ingest.prepare import Prepared
from trainers.ingest.sources import DataError

N = 30  # examples; example i is the sequence [i + 1, i + 1] (its first token names it)


def write_pass(out_dir, cuts: list[int], gate=None, fail_after: int | None = None):
    """A pass writing examples 0..sum(cuts)-1 as one file per block of `cuts[k]` rows. `gate` (a threading.Semaphore):
    each block after the first waits for a release. `fail_after`: raise a DataError after that many blocks."""

    def run(on_block=None) -> Prepared:
        start, paths = 0, []
        for k, n in enumerate(cuts):
            if fail_after is not None and k == fail_after:
                raise DataError("data.jsonl:17: not JSON (Expecting value) (set data.on_bad_row: skip to skip such rows)")
            if gate is not None and k > 0:
                assert gate.acquire(timeout=30)
            rows = list(range(start, start + n))
            path = f"{out_dir}/train/{k:05d}.parquet"
            pq.write_table(pa.table({"input_ids": [[i + 1, i + 1] for i in rows], "labels": [[i + 1, i + 1] for i in rows],
                                     "_src": pa.array([0] * n, pa.int32()), "_row": pa.array(rows, pa.int64())}), path)
            paths.append(path)
            start += n
            if on_block is not None:
                on_block([path])
        return Prepared(uri=str(out_dir), key="k", train_files=paths, eval_files=[], n_train=start, n_eval=0,
                        stats={"rows_read": start, "bad_rows_skipped": 0})

    return run


def start(tmp_path, name: str, cuts: list[int], gate=None, fail_after=None) -> Prepared:
    out = tmp_path / name
    (out / "train").mkdir(parents=True)
    handle = Prepared(uri=str(out), key=name, train_files=[], eval_files=[], n_train=0, n_eval=0, live=True)
    return LivePass(write_pass(out, cuts, gate, fail_after), handle, pyarrow.fs.LocalFileSystem(), str(out), lambda p: None).prepared


def first_tokens(table) -> list[int]:
    return [ids[0] - 1 for ids in table.column("input_ids").to_pylist()]


@pytest.fixture
def small_blocks(monkeypatch):
    # a worker's re-cut blocks, its shuffle window and its fetch, small enough for 30 examples to cross them
    monkeypatch.setattr(live, "BLOCK_ROWS", 4)
    monkeypatch.setattr(live, "SHUFFLE_WINDOW", 6)
    monkeypatch.setattr(live, "FETCH_MICRO_BATCHES", 2)
    monkeypatch.setattr(live, "POLL_S", 0.01)


def test_ranks_read_disjoint_shares_in_data_order_while_the_pass_is_still_writing(tmp_path, small_blocks):
    gate = threading.Semaphore(0)
    prepared = start(tmp_path, "d", [10, 7, 13], gate)
    blocks = LiveManifest(prepared).rank_blocks(2, 0, ["input_ids"])
    first = next(blocks)  # only the first block is written: the pass waits at the gate
    assert first_tokens(first) == [0, 2, 4, 6]
    assert live_pass(prepared).running
    for _ in range(2):
        gate.release()
    rank0 = first_tokens(first) + [t for b in blocks for t in first_tokens(b)]
    rank1 = [t for b in LiveManifest(prepared).rank_blocks(2, 1, ["input_ids"]) for t in first_tokens(b)]
    assert rank0 == list(range(0, N, 2)) and rank1 == list(range(1, N, 2))
    assert live_pass(prepared).wait().n_train == N


def test_micro_batches_are_the_same_whatever_the_timing_and_file_cuts_and_a_resumed_stream_rejoins_them(tmp_path, small_blocks):
    def stream(prepared: Prepared, rank: int) -> LiveStream:
        return LiveStream(prepared.to_json(), micro_batch_size=2, seed=7, world=2, rank=rank)

    def names(examples) -> list[int]:
        return [e.input_ids[0] - 1 for e in examples]

    gate = threading.Semaphore(0)
    while_writing = start(tmp_path, "a", [4, 3, 12, 11], gate)
    threading.Thread(target=lambda: [time.sleep(0.05) or gate.release() for _ in range(3)], daemon=True).start()
    finished = start(tmp_path, "b", [30])
    live_pass(finished).wait()
    per_epoch = (N // 2) // 2  # 7 micro-batches of 2 per rank and epoch
    for rank in (0, 1):
        a, b = stream(while_writing, rank), stream(finished, rank)
        run = [names(a.micro_batch(i)) for i in range(2 * per_epoch + 3)]
        assert run == [names(b.micro_batch(i)) for i in range(2 * per_epoch + 3)]
        epoch1 = sorted(t for batch in run[:per_epoch] for t in batch)
        assert set(epoch1) <= set(range(rank, N, 2)) and len(epoch1) == len(set(epoch1)) == 2 * per_epoch
        assert run[:per_epoch] != sorted(run[:per_epoch])  # shuffled in the window
        assert run[per_epoch:2 * per_epoch] != run[:per_epoch]  # each epoch its own order
        for k in (3, per_epoch, per_epoch + 4):  # a restarted worker asks for its checkpoint's micro-batch first
            assert names(stream(while_writing, rank).micro_batch(k)) == run[k]
    assert stream(while_writing, 0).describe() == "train 30 / eval 0 examples (streamed in the pass's order)"


def test_a_bad_row_the_pass_finds_later_stops_the_workers_and_the_driver_with_its_file_and_line(tmp_path, small_blocks):
    prepared = start(tmp_path, "bad", [10, 7, 13], fail_after=1)
    reader = LiveStream(prepared.to_json(), micro_batch_size=2, seed=0, world=1, rank=0)
    with pytest.raises(DataError, match=r"data\.jsonl:17: not JSON"):
        for i in range(20):
            reader.micro_batch(i)
    with pytest.raises(DataError, match=r"data\.jsonl:17: not JSON"):
        live_pass(prepared).wait()
