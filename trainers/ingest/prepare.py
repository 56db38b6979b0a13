"""Preprocess a job's data once, on the cluster's CPUs, with Ray Data; the workers then stream it.

Driver side, before any worker starts:

1. `resolve` the sources (files, directories, globs; local or s3://) and look at the first rows of each
   file: detect its format (`format: auto`, said on the console), check the column mapping, that the
   tokenizer can mask the format, that the file is what its extension says. Problems here cost seconds.
2. Ray Data reads every file in blocks and maps each block (parse → map columns → check → template →
   tokenize → mask → truncate → split off eval → pack) on the cluster's CPUs. Each block's examples are
   written as Parquet files of at most FILE_ROWS examples and FILE_TOKENS tokens, named by the block's
   source position and the file's number in the block (`<file index>-<row>-<n>.parquet`), so the
   preprocessed dataset's order does not depend on task scheduling. A bad row stops the pass with its
   file and line, or is skipped and counted (`on_bad_row: skip`).
3. `stats.json` (counts, tokens, truncation, packing efficiency, detected formats, file lists) is written
   last: it marks the preprocessed dataset complete. Its location is a hash of the sources (names,
   sizes, mtimes), the tokenizer and the data settings, so a resumed run, a rerun and every `rayft tune`
   trial reuse it instead of tokenizing again.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

from storage.models import resolve_model_dir
from storage.store import pyarrow_filesystem
from trainers.ingest.formats import (
    FORMATS, IGNORE, EncodeOptions, apply_columns, detect_format, detect_hint, encode_rows, encoder_of,
    formats_of, has_generation_markers, missing_columns, pack, sequences, truncate,
)
from trainers.ingest.live import LivePass, live_pass
# What a preprocessed dataset is (and its block size), below this module, the worker stream and the live pass.
from trainers.ingest.prepared import BLOCK_ROWS, Prepared  # noqa: F401
from trainers.ingest.sources import DataError, SourceFile, lower_priority, make_row_source, preview, resolve
from trainers.ingest.stream import micro_batches_per_epoch, steps_per_epoch
from trainers.objectives import objective_module

#: A preprocessed Parquet file holds at most this many examples and FILE_TOKENS tokens. A training worker streams one
#: file as one Ray Data block, so this bounds its memory whatever the dataset's size: files were a whole
#: preprocessing block (up to 1.56M examples, 141 MiB at 3.2M rows in the data bench), and the worker's peak RSS grew
#: by 240 MiB with them. Not much smaller either: each file is a read task while training, and at 4,096 examples per
#: file (782 files) those tasks' overhead took a quarter of the step's CPU (data bench, 2 cores).
FILE_ROWS = 65536
#: (input_ids of every sequence of an example; 2M tokens ≈ 16-32 MiB of token columns)
FILE_TOKENS = 1 << 21
#: Ray Data's block size for the preprocessing pass (each block is one map task). Its default, 128 MiB, made the data
#: bench's 216 MiB file two blocks: two tokenizing tasks whatever the cluster's CPUs, and the first preprocessed file
#: written after 95 s of a 108 s pass. At 8 MiB: 27 tasks, the first file after 9 s, and the same throughput on 2 cores
#: (3.2M rows: 29.7k vs 30.0k rows/s).
PASS_BLOCK_BYTES = 8 << 20
#: The same for a pass that runs while the job trains (`data.preprocess: during`): training starts on the first block's
#: files, and a smaller block is written sooner. (Its own cache key: packing is per block.)
LIVE_PASS_BLOCK_BYTES = 2 << 20
#: The driver says how far the pass has got every this many seconds (see `PassProgress`); 0: after every block.
PROGRESS_EVERY_S = 10.0
#: Bumped whenever preprocessing changes what it writes, so old caches are not reused.
PIPELINE_VERSION = 3
SKIP_HINT = "(set data.on_bad_row: skip to skip such rows)"


# --- the per-block operator (runs in Ray Data tasks) -----------------------------------------------


@functools.lru_cache(maxsize=4)
def _tokenizer(model_source: str, storage_uri: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_dir(model_source, storage_uri))


def _unit_hash(seed: int, src, pos):
    """A uniform [0, 1) number per (seed, file, row) (splitmix64): the held-out eval rows."""
    import numpy as np

    with np.errstate(over="ignore"):
        x = (np.asarray(src, dtype=np.uint64) << np.uint64(40)) ^ np.asarray(pos, dtype=np.uint64) ^ (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def parse_row(raw: bytes, columns: dict | None) -> tuple[dict | None, str | None]:
    """A raw row → (row with `data.columns` applied, None) or (None, why it is not a row)."""
    try:
        row = json.loads(raw)
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    missing = missing_columns(row, columns)
    if missing:
        return None, f"no column {missing[0]!r} (named in data.columns); the row has {', '.join(sorted(row)) or 'no fields'}"
    return apply_columns(row, columns), None


def scan_rows(text: str, fmt: str = "auto", kind: str = "text") -> Iterator[tuple[int, dict | None, str | None, str | None]]:
    """(line number, row or None, the file's format, problem or None) for every non-blank line of JSONL `text`: the
    checks of the pipeline, in one process, for small files (the fine-tuning API checks an upload with it).

    The format is `fmt`, or (auto) the one of `kind` that the first usable row has; every row must have it.
    """
    detected = None if fmt == "auto" else fmt
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row, problem = parse_row(line.encode(), None)
        if problem is None and detected is None:
            detected = detect_format(row, kind)
            if detected is None:
                problem = f"cannot tell the format: {detect_hint(kind)}"
        if problem is None:
            problem = FORMATS[detected].check(row)
        yield line_no, (row if problem is None else None), detected, problem


def encode_block(rows: list[tuple[int, int, bytes]], files: list[SourceFile], formats, cfg: dict, tok) -> dict:
    """Rows (src, row position, raw) → {"examples": [(src, pos, example, is_eval)], counts...}; raises DataError
    on a bad row unless `cfg["on_bad_row"] == "skip"`."""
    opts = EncodeOptions(train_on_prompt=cfg["train_on_prompt"])
    bad, truncated = 0, 0
    good: list[tuple[int, int, dict]] = []

    def reject(src: int, pos: int, problem: str) -> None:
        nonlocal bad
        if cfg["on_bad_row"] != "skip":
            raise DataError(f"{files[src].where(pos)}: {problem} {SKIP_HINT}")
        bad += 1

    for src, pos, raw in rows:
        row, problem = parse_row(raw, cfg["columns"])
        if problem is None:
            problem = FORMATS[formats[src]].check(row)
        if problem is not None:
            reject(src, pos, problem)
            continue
        good.append((src, pos, row))
    examples = []
    by_format: dict[str, list[tuple[int, int, dict]]] = {}
    for item in good:
        by_format.setdefault(formats[item[0]], []).append(item)
    for fmt, items in by_format.items():
        for (src, pos, _), enc in zip(items, encode_rows([r for _, _, r in items], fmt, tok, opts)):
            if isinstance(enc, str):
                reject(src, pos, enc)
                continue
            enc, cut = truncate(enc, cfg["max_seq_len"])
            truncated += cut
            # every sequence the loss reads must keep a trained token (KTO's KL sequence is only a baseline)
            empty = [p for p in trained_sequences(enc) if all(label == IGNORE for label in enc[p + "labels"])]
            if empty:
                what = f" ({empty[0].rstrip('_')})" if empty[0] else ""
                reject(src, pos, f"no trainable tokens{what} after masking and truncation to max_seq_len={cfg['max_seq_len']} "
                                 "(the prompt fills it); raise data.max_seq_len or shorten the prompt")
                continue
            examples.append((src, pos, enc))
    examples.sort(key=lambda e: (e[0], e[1]))
    return {"examples": examples, "bad": bad, "truncated": truncated, "rows": len(rows)}


def trained_sequences(example: dict) -> list[str]:
    """The column prefixes of the sequences the loss trains on (all but KTO's KL baseline)."""
    return [p for p in sequences(example) if p != "kl_"]


def _column(values: list):
    import pyarrow as pa

    if isinstance(values[0], list):
        return pa.array(values, pa.list_(pa.int32()))
    return pa.array(values)


def prepare_block(batch, *, files: list[dict], formats: list[str], cfg: dict, split: str, out_dir: str, out_fs,
                  background: bool = False) -> "Any":
    """The Ray Data operator: one block of raw rows in, its examples written as Parquet, one stats row out.
    `background`: the job trains meanwhile (`data.preprocess: during`), and its processes come first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if background:
        lower_priority()

    sources = [SourceFile(**f) for f in files]
    srcs, poss, raws = batch.column("_src").to_pylist(), batch.column("_row").to_pylist(), batch.column("_raw").to_pylist()
    if not srcs:
        return pa.table({"rows": pa.array([], pa.int64())})
    tok = _tokenizer(cfg["model_source"], cfg["storage_uri"])
    done = encode_block(list(zip(srcs, poss, raws)), sources, formats, cfg, tok)
    examples = done["examples"]
    if split == "auto" and cfg["eval_fraction"] > 0 and examples:
        u = _unit_hash(cfg["seed"], [e[0] for e in examples], [abs(e[1]) for e in examples])
        train = [e for e, x in zip(examples, u) if x >= cfg["eval_fraction"]]
        evals = [e for e, x in zip(examples, u) if x < cfg["eval_fraction"]]
    elif split == "eval":
        train, evals = [], examples
    else:
        train, evals = examples, []
    tokens = sum(len(e[2][p + "input_ids"]) for e in train for p in trained_sequences(e[2]))
    trainable = sum(sum(1 for t in e[2][p + "labels"] if t != IGNORE) for e in train for p in trained_sequences(e[2]))
    name = f"{srcs[0]:05d}-{abs(poss[0]):012d}"
    kept = tokens
    if cfg["packing"] and train:
        blocks = pack([e[2] for e in train], cfg["max_seq_len"])
        kept = len(blocks) * cfg["max_seq_len"]
        train = [(train[0][0], train[0][1], b) for b in blocks]
    written = []
    for part, items in (("train", train), ("eval", evals)):
        # numbered after the block's name, so that sorted names are data order
        for n, chunk in enumerate(file_chunks(items, FILE_ROWS, FILE_TOKENS)):
            table = pa.table({
                **{col: _column([e[2][col] for e in chunk]) for col in chunk[0][2]},
                "_src": pa.array([e[0] for e in chunk], pa.int32()),
                "_row": pa.array([e[1] for e in chunk], pa.int64()),
            })
            pq.write_table(table, f"{out_dir}/{part}/{name}-{n:05d}.parquet", filesystem=out_fs)
            written.append(f"{out_dir}/{part}/{name}-{n:05d}.parquet")
    return pa.table({
        # the files just written, in data order (the manifest of a run that trains during the pass: trainers.ingest.live)
        "files": ["\n".join(written)],
        # the rows' bytes as read (JSONL: the file's bytes less blank lines), for the driver's progress line
        "source_bytes": [sum(len(r) + 1 for r in raws)],
        "rows": [done["rows"]], "bad_rows": [done["bad"]], "truncated": [done["truncated"]],
        "train_examples": [len(train)], "eval_examples": [len(evals)], "tokens": [tokens],
        "trainable_tokens": [trainable], "packed_tokens": [kept],
    })


def file_chunks(items: list, max_rows: int, max_tokens: int) -> Iterator[list]:
    """`items` (`(src, row, example)`) in order, cut into runs of at most `max_rows` examples and `max_tokens` tokens
    (an example longer than that alone)."""
    chunk, tokens = [], 0
    for item in items:
        size = sum(len(v) for k, v in item[2].items() if k.endswith("input_ids"))
        if chunk and (len(chunk) == max_rows or tokens + size > max_tokens):
            yield chunk
            chunk, tokens = [], 0
        chunk.append(item)
        tokens += size
    if chunk:
        yield chunk


# --- the driver side -------------------------------------------------------------------------------


def detect_file_formats(fs, files: list[SourceFile], data, tok, kind: str = "text") -> list[str]:
    """Each file's format (given, or detected among the formats of the objective's `kind` from its first rows),
    after checking those rows up front."""
    formats = []
    opts_cfg = _cfg(data, "", None, 0)
    default = formats_of(kind)[0] if kind != "text" else "text"
    for src, f in enumerate(files):
        rows = preview(fs, f, src)
        if not rows:
            formats.append(data.format if data.format != "auto" else default)
            continue
        fmt = None if data.format == "auto" else data.format
        first_problem = None
        for pos, raw in rows:
            row, problem = parse_row(raw, data.columns)
            if problem is None and fmt is None:
                fmt = detect_format(row, kind)
                if fmt is None:
                    problem = (f"cannot tell the format: {detect_hint(kind)}; "
                               + ("set data.format or map fields with data.columns" if kind == "text" else
                                  f"this job's objective reads {kind} preference rows; map fields with data.columns"))
            if problem is not None:
                if data.columns and problem.startswith("no column"):
                    raise DataError(f"data.columns: {f.where(pos)}: {problem}")
                first_problem = first_problem or (pos, problem)
                if data.on_bad_row != "skip":
                    raise DataError(f"{f.where(pos)}: {problem} {SKIP_HINT}")
                continue
            if fmt is not None:
                break
        if fmt is None:
            pos, problem = first_problem
            raise DataError(f"{f.where(pos)}: {problem}")
        enc = encoder_of(fmt)
        if enc.needs_chat_template and not data.train_on_prompt and not has_generation_markers(tok):
            raise DataError(f"{f.uri}: format {fmt} needs the tokenizer's chat template to mark assistant tokens "
                            "({% generation %} ... {% endgeneration %}), and this tokenizer's template does not; "
                            "use a tokenizer whose template has them, or set data.train_on_prompt: true")
        # the first rows go through the whole operator: a systematic problem (every row too long, masks
        # empty) is reported now, before the cluster pass and before any worker starts
        encode_block([(src, pos, raw) for pos, raw in rows], files, {src: fmt}, opts_cfg, tok)
        formats.append(fmt)
        print(f"[rayft] data: {f.uri}: format {fmt}" + ("" if data.format != "auto" else " (detected)")
              + f": {FORMATS[fmt].describe}", flush=True)
    return formats


def _cfg(data, model_source: str, storage_uri: str | None, seed: int) -> dict:
    return {
        "columns": data.columns, "train_on_prompt": data.train_on_prompt, "max_seq_len": data.max_seq_len,
        "packing": data.packing, "on_bad_row": data.on_bad_row, "eval_fraction": data.eval_fraction if not data.eval else 0.0,
        "seed": seed, "model_source": model_source, "storage_uri": storage_uri,
    }


def tokenizer_fingerprint(model_dir: str) -> str:
    """A hash of the tokenizer's files: a different tokenizer must not reuse preprocessed data."""
    digest = hashlib.sha256()
    for name in sorted(p.name for p in Path(model_dir).iterdir() if "token" in p.name or p.name.endswith((".jinja", "vocab.json", "merges.txt"))):
        digest.update(name.encode())
        digest.update((Path(model_dir) / name).read_bytes())
    return digest.hexdigest()


def cache_key(data, seed: int, files: dict[str, list[SourceFile]], tokenizer_fp: str, kind: str = "text",
              block_bytes: int = PASS_BLOCK_BYTES) -> str:
    # the sources are hashed by name, size and mtime below; max_eval_rows only picks what is evaluated; preprocess
    # only through the pass's block size (`block_bytes`: the files, and with packing the examples, follow its blocks)
    spec = {k: v for k, v in data.model_dump(mode="json").items() if k not in ("train", "eval", "max_eval_rows", "preprocess")}
    raw = json.dumps({
        "v": PIPELINE_VERSION, "kind": kind, "spec": spec, "seed": seed if not data.eval else None, "tok": tokenizer_fp,
        **({"block_bytes": block_bytes} if block_bytes != PASS_BLOCK_BYTES else {}),
        "files": {split: [(f.uri, f.size, f.mtime) for f in fs] for split, fs in files.items()},
    }, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def _ray_error(exc: BaseException) -> DataError | None:
    """The DataError raised inside a Ray Data task, from whatever Ray wrapped it in."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError):
            return DataError(str(e).strip().splitlines()[-1])
        stack += [e.__cause__, e.__context__]
    for line in reversed(str(exc).splitlines()):
        if "DataError: " in line:
            return DataError(line.split("DataError: ", 1)[1].strip())
    return None


def prepare_data(data, *, model_source: str, model_dir: str, storage_uri: str, seed: int, kind: str = "text",
                 during: Callable[[Prepared], None] | None = None) -> Prepared:
    """Preprocess `data` (a DataSpec) for training an objective that reads rows of `kind` ("text", "paired",
    "unpaired"), or reuse an earlier identical preprocessing.

    `during`: train while preprocessing (`data.preprocess: during`): after the checks on each file's first rows, the
    pass runs on a thread (trainers.ingest.live) and the `Prepared` returned is `live`; `during(prepared)` is called
    with the finished dataset and raises the DataError of one the job cannot train on."""
    import pyarrow.fs

    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    fs, train_files = resolve(data.train, "data.train")
    eval_fs, eval_files = resolve(data.eval, "data.eval") if data.eval else (None, [])
    tok = AutoTokenizer.from_pretrained(model_dir)
    key = cache_key(data, seed, {"train": train_files, "eval": eval_files}, tokenizer_fingerprint(model_dir), kind,
                    LIVE_PASS_BLOCK_BYTES if during is not None else PASS_BLOCK_BYTES)
    out_fs, base = pyarrow_filesystem(storage_uri)
    out_dir = f"{base.rstrip('/')}/datasets/{key}"
    uri = f"{storage_uri.rstrip('/')}/datasets/{key}"
    stats_info = out_fs.get_file_info(f"{out_dir}/stats.json")
    if stats_info.type == pyarrow.fs.FileType.File:
        with out_fs.open_input_stream(f"{out_dir}/stats.json") as f:
            prepared = Prepared.from_json(json.loads(f.read()))
        prepared.reused = True
        prepared.live = during is not None  # read in the order a live pass gives (its manifest), as the first run did
        print(f"[rayft] data: reusing preprocessed {uri} ({prepared.n_train} train / {prepared.n_eval} eval examples)", flush=True)
        return prepared

    train_formats = detect_file_formats(fs, train_files, data, tok, kind)
    eval_formats = detect_file_formats(eval_fs, eval_files, data, tok, kind) if eval_files else []
    out_fs.delete_dir_contents(out_dir, missing_dir_ok=True)
    for part in ("train", "eval"):
        out_fs.create_dir(f"{out_dir}/{part}", recursive=True)
    cfg = _cfg(data, model_source, storage_uri, seed)
    passes = [("auto" if not data.eval else "train", fs, train_files, train_formats), ("eval", eval_fs, eval_files, eval_formats)]

    def run(on_block: Callable[[list[str]], None] | None = None) -> Prepared:
        totals: dict[str, int] = {}
        for split, sfs, files, formats in passes:
            if not files:
                continue
            progress = PassProgress("data.eval" if split == "eval" else "data.train", files)
            for row in _run_pass(sfs, files, formats, cfg, split, out_dir, out_fs, ordered=on_block is not None):
                written = row.pop("files")
                for k, v in row.items():
                    totals[k] = totals.get(k, 0) + int(v)
                progress.update(int(row["rows"]), int(row["source_bytes"]))
                if on_block is not None and written:
                    on_block(written.split("\n"))
        prepared = _finish(out_fs, out_dir, uri, key, data, totals, train_files + eval_files,
                           train_formats + eval_formats, time.perf_counter() - t0)
        prepared.kind = kind
        prepared.columns = _columns_written(out_fs, prepared.train_files[0])
        with out_fs.open_output_stream(f"{out_dir}/stats.json") as f:
            f.write(json.dumps(prepared.to_json()).encode())
        return prepared

    if during is None:
        return run()
    live = Prepared(uri=uri, key=key, train_files=[], eval_files=[], n_train=0, n_eval=0, kind=kind, live=True)
    print("[rayft] data: preprocessing while training (data.preprocess: during): the workers start now and read the "
          "data as it is written; evaluation waits for the pass", flush=True)
    return LivePass(run, live, out_fs, out_dir, during).prepared


def _run_pass(fs, files: list[SourceFile], formats: list[str], cfg: dict, split: str, out_dir: str, out_fs,
              ordered: bool = False) -> Iterator[dict]:
    """The preprocessing pass over `files`: one stats row per block, as each block is done (in data order if
    `ordered`: training reads the blocks' files as they come)."""
    import ray.data

    # one read task per file, and Ray Data merges its BLOCK_ROWS-row blocks up to PASS_BLOCK_BYTES: the map tasks
    # run in parallel over those. (Splitting them back to BLOCK_ROWS rows with `repartition` made preprocessing 1.7x
    # slower: data bench, 3.2M rows, 2 cores, 14.7k vs 24.9k rows/s.)
    # reading is light (split lines); it gets a fraction of a CPU so Ray Data does not fuse it with the
    # tokenizing map, which then runs as parallel tasks over the blocks of even a single file
    read_options, map_options = {"num_cpus": 0.25}, {}
    if ordered:
        # training holds the CPUs (a single CPU worker takes the whole machine): a task that waited for a free CPU
        # would never start, so the pass shares them, as many map tasks at once as the cluster has CPUs
        # (reads of many files would otherwise all start at once; one more reader than mappers keeps Ray Data from
        # fusing the two, which would tokenize each file in one task)
        # half of them at once (training and the pass share the CPUs)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // 2)
        read_options = {"num_cpus": 0, "concurrency": cpus + 1}
        map_options = {"num_cpus": 0, "compute": ray.data.TaskPoolStrategy(size=cpus)}
    ds = ray.data.read_datasource(make_row_source(fs, files, BLOCK_ROWS, background=ordered), override_num_blocks=len(files),
                                  **read_options)
    # the Dataset's own copy of the context (its map below shares it): other Datasets of the process keep the default
    ds.context.target_max_block_size = LIVE_PASS_BLOCK_BYTES if ordered else PASS_BLOCK_BYTES
    ds.context.execution_options.preserve_order = ordered
    ds = ds.map_batches(
        prepare_block, batch_size=None, batch_format="pyarrow",
        fn_kwargs={"files": [asdict(f) for f in files], "formats": formats, "cfg": cfg, "split": split,
                   "out_dir": out_dir, "out_fs": out_fs, "background": ordered},
        **map_options,
    )
    if ordered:
        # (Ray Data warns that a one-file pass cannot use every allowed task: expected, and not the user's to fix)
        warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    try:
        yield from ds.iter_rows()
    except Exception as exc:
        err = _ray_error(exc)
        if err is not None:
            raise err from None
        raise


class PassProgress:
    """The console's view of a long preprocessing pass: every PROGRESS_EVERY_S seconds a line with the rows done and
    the rate; with the share of the input and the time left when every source is JSONL (a block's rows are its
    bytes of the file). Ray Data's own progress stays in its log file (the console shows rayft's lines only)."""

    def __init__(self, field: str, files: list[SourceFile], clock=time.monotonic):
        self.field, self.clock = field, clock
        self.total_bytes = sum(f.size for f in files) if all(f.kind == "jsonl" for f in files) else None
        self.rows = self.bytes = 0
        self.start = clock()
        self.next_at = self.start + PROGRESS_EVERY_S
        self.first: tuple[float, int] | None = None  # (time, bytes) at the first finished block

    def update(self, rows: int, source_bytes: int) -> None:
        self.rows += rows
        self.bytes += source_bytes
        now = self.clock()
        if self.first is None:
            self.first = (now, self.bytes)
        if now >= self.next_at:
            print(self.line(now), flush=True)
            self.next_at = now + PROGRESS_EVERY_S

    def line(self, now: float) -> str:
        rate = self.rows / max(now - self.start, 1e-9)
        text = f"[rayft] data: preprocessing {self.field}: {self.rows:,} rows, {rate:,.0f} rows/s"
        if self.total_bytes:
            share = min(self.bytes / self.total_bytes, 0.99)  # blank lines are not counted: never claim 100% early
            text += f", {100 * share:.0f}% of the input"
            left = self._seconds_left(now)
            if left is not None:
                text += f", about {_clock(left)} left"
        return text

    def _seconds_left(self, now: float) -> float | None:
        """At the rate since the first block (None until a later one is done): the time before it is start-up (at
        3.2M rows on 2 cores, the overall rate said 10 min left at 3% when under 2 min were)."""
        t0, b0 = self.first
        if now <= t0 or self.bytes <= b0:
            return None
        return max(self.total_bytes - self.bytes, 0) * (now - t0) / (self.bytes - b0)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _finish(out_fs, out_dir, uri, key, data, totals, files, formats, seconds) -> Prepared:
    import pyarrow.fs

    def listing(part: str) -> list[str]:
        infos = out_fs.get_file_info(pyarrow.fs.FileSelector(f"{out_dir}/{part}", allow_not_found=True))
        return sorted(i.path for i in infos if i.path.endswith(".parquet"))

    n_train, n_eval = totals.get("train_examples", 0), totals.get("eval_examples", 0)
    rows, bad = totals.get("rows", 0), totals.get("bad_rows", 0)
    where = data.train
    if rows == 0:
        raise DataError(f"{where}: empty: no rows in {len(files)} file(s)")
    if n_train == 0:
        if data.packing and totals.get("tokens", 0) and rows > bad:
            raise DataError(f"{where}: too little text to fill one packed block of {data.max_seq_len} tokens; "
                            "lower data.max_seq_len or turn packing off")
        raise DataError(f"{where}: no usable rows ({rows} read, {bad} skipped as bad)")
    if not data.eval and data.eval_fraction > 0 and n_eval == 0:
        raise DataError(f"{where}: {rows} rows are too few to hold out eval_fraction={data.eval_fraction} "
                        "(no row fell into it); give data.eval or set data.eval_fraction: 0")
    tokens = totals.get("tokens", 0)
    stats = {
        "rows_read": rows, "bad_rows_skipped": bad, "truncated": totals.get("truncated", 0),
        "train_examples": n_train, "eval_examples": n_eval, "tokens": tokens,
        "trainable_tokens": totals.get("trainable_tokens", 0),
        "packing_efficiency": (totals.get("packed_tokens", 0) / tokens if data.packing and tokens else None),
        "formats": {f.uri: fmt for f, fmt in zip(files, formats)},
        "preprocess_s": round(seconds, 3), "rows_per_s": round(rows / max(seconds, 1e-9), 1),
    }
    return Prepared(uri=uri, key=key, train_files=listing("train"), eval_files=listing("eval"),
                    n_train=n_train, n_eval=n_eval, stats=stats)


def _columns_written(out_fs, path: str) -> list[str]:
    """The example columns of the preprocessed Parquet files (what the encoders returned)."""
    import pyarrow.parquet as pq

    with out_fs.open_input_file(path) as f:
        return [n for n in pq.read_schema(f).names if not n.startswith("_")]


def stats_line(prepared: Prepared) -> str:
    s = prepared.stats
    eff = f", packing efficiency {100 * s['packing_efficiency']:.1f}%" if s.get("packing_efficiency") is not None else ""
    return (f"[rayft] data: {s['rows_read']:,} rows read, {s['bad_rows_skipped']:,} skipped, {s['truncated']:,} truncated; "
            f"{s['train_examples']:,} train / {s['eval_examples']:,} eval examples, {s['tokens']:,} train tokens "
            f"({s['trainable_tokens']:,} trained on){eff}; {s['rows_per_s']:,.0f} rows/s"
            + (" (reused)" if prepared.reused else ""))


def data_kind(spec, search: bool = False) -> str:
    """The rows the job's objective reads ("text", "paired", "unpaired"); a search's (`search`) trials share one
    preprocessed dataset, so the objectives it tries must read the same kind of rows."""
    tried = spec.tune.space.objective if search and spec.tune is not None else None
    names = list(tried or [spec.objective.name])
    kinds = {objective_module(n).DATA for n in names}
    if len(kinds) > 1:
        raise DataError(f"tune.space.objective: {', '.join(names)} read different rows ({' and '.join(sorted(kinds))}), "
                        "and every trial streams the same data; search objectives of one kind (dpo, orpo, simpo: pairs)")
    return kinds.pop()


def prepare_for_job(spec, storage_uri: str, search: bool = False):
    """The job's data preprocessed (or reused) and the spec with `training.epochs` turned into `max_steps`.

    Everything that can be wrong with the data is reported here, before any worker starts; with `data.preprocess:
    during`, what only the whole pass can find (a bad row deep in the input) is reported when the pass reaches it.
    `search`: for the trials of `rayft tune` (the objectives of `tune.space` decide which rows are read; the trials
    share one finished pass, so they always preprocess first)."""
    model_dir = resolve_model_dir(spec.model.source, storage_uri)
    during = spec.data.preprocess == "during" and not search
    if spec.data.preprocess == "during" and search:
        print("[rayft] data: data.preprocess: during applies to rayft train; a search's trials share one finished pass, "
              "so it preprocesses first", flush=True)
    prepared = prepare_data(spec.data, model_source=spec.model.source, model_dir=str(model_dir),
                            storage_uri=storage_uri, seed=spec.training.seed, kind=data_kind(spec, search),
                            during=(lambda finished: check_enough_examples(spec, finished)) if during else None)
    prepared.eval_limit = spec.data.max_eval_rows
    if prepared.live and not prepared.reused:
        return spec, prepared  # the counts and checks come when the pass ends (finish_live_pass)
    print(stats_line(prepared), flush=True)
    if prepared.n_evaluated < prepared.n_eval:
        print(f"[rayft] data: evaluating the first {prepared.n_evaluated:,} of {prepared.n_eval:,} eval examples "
              "(data.max_eval_rows)", flush=True)
    check_enough_examples(spec, prepared)
    t = spec.training
    if t.epochs is not None:
        steps, per_epoch = steps_for_epochs(spec, prepared)
        print(f"[rayft] data: {t.epochs:g} epoch(s) = {steps} steps of {per_epoch} per epoch", flush=True)
        training = t.model_copy(update={"max_steps": steps, "epochs": None})
        spec = spec.model_copy(update={"training": training})
    return spec, prepared


def check_enough_examples(spec, prepared: Prepared) -> None:
    """A DataError if the preprocessed data does not fill one micro-batch per worker."""
    t, workers = spec.training, spec.resources.num_workers
    if micro_batches_per_epoch(prepared.n_train, workers, t.micro_batch_size) < 1:
        raise DataError(f"{spec.data.train}: {prepared.n_train} training examples are too few for {workers} worker(s) × "
                        f"training.micro_batch_size {t.micro_batch_size}; add data or lower micro_batch_size")


def steps_for_epochs(spec, prepared: Prepared) -> tuple[int, int]:
    """(optimizer steps of `training.epochs`, steps per epoch); a DataError if they are no use."""
    t, workers = spec.training, spec.resources.num_workers
    per_epoch = steps_per_epoch(prepared.n_train, workers, t.micro_batch_size, t.grad_accum)
    steps = int(per_epoch * t.epochs)
    if steps < 1:
        raise DataError(f"training.epochs: {t.epochs} epoch(s) of {prepared.n_train} examples is less than one optimizer step "
                        f"({workers} worker(s) × micro_batch_size {t.micro_batch_size} × grad_accum {t.grad_accum}); "
                        "raise epochs or lower the batch size")
    if t.warmup_steps >= steps:
        raise DataError(f"training.warmup_steps: got {t.warmup_steps}, must be < the {steps} steps that "
                        f"training.epochs={t.epochs} makes")
    return steps, per_epoch


def finish_live_pass(prepared: Prepared, training_failed: bool = False) -> Prepared:
    """On the driver, after training: wait for a pass that ran during training (`data.preprocess: during`) and say
    its statistics; raises its DataError (a bad row it found late fails the run, before anything is published).
    `training_failed`: raise the pass's error if it stopped the workers, without waiting for a pass still running."""
    running = live_pass(prepared)
    if running is None:
        return prepared
    if training_failed:
        error = running.stopped_on(timeout_s=10.0)
        if error is not None:
            raise error
        return prepared
    if running.running:
        print("[rayft] data: waiting for the preprocessing pass to finish (the run publishes after every row is checked)",
              flush=True)
    finished = running.wait()
    finished.eval_limit = prepared.eval_limit
    print(stats_line(finished), flush=True)
    return finished
