"""JSONL data in three shapes, tokenized with loss masks, split, packed and batched.

Rows: {"text": ...} | {"prompt": ..., "completion": ...} | {"messages": [{"role","content"}...]}.
Loss is on completion / assistant tokens only unless `train_on_prompt` is set.
The batch order is a pure function of (seed, step), so a resumed run sees exactly the
data an uninterrupted one would have seen from that step on.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Iterator

import torch

from storage.errors import RayftError
from trainers.spec import DataSpec

IGNORE = -100
FORMATS = ("text", "prompt_completion", "messages")


class DataError(RayftError):
    """A data file that cannot be used: unreadable, empty, or with a malformed row."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class Datasets:
    train: list[Example]
    eval: list[Example]
    skipped_rows: int = 0
    formats: dict[str, str] = field(default_factory=dict)


def read_text(uri: str) -> str:
    """A whole text file from a local path or an s3:// URI."""
    from storage.store import open_store

    if uri.startswith("s3://"):
        parent, _, key = uri.rpartition("/")
        try:
            return open_store(parent).get_bytes(key).decode("utf-8")
        except RayftError as exc:
            raise DataError(f"{uri}: cannot read data file: {exc}") from None
    try:
        with open(uri, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        raise DataError(f"{uri}: data file not found; check data.train / data.eval in the job spec") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{uri}: not UTF-8 text ({exc.reason} at byte {exc.start}); JSONL must be UTF-8") from None


def detect_format(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    return None


def _check_row(row: object, fmt: str) -> str | None:
    """Why `row` is not a valid row of `fmt`, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if fmt == "text":
        if not isinstance(row.get("text"), str) or not row["text"]:
            return 'expected a non-empty string field "text"'
    elif fmt == "prompt_completion":
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            return 'expected string fields "prompt" and "completion"'
        if not row["completion"]:
            return '"completion" is empty: nothing to learn from this row'
    elif fmt == "messages":
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return 'expected a non-empty list "messages"'
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                return f'messages[{i}] must be {{"role": system|user|assistant, "content": string}}'
        if not any(m["role"] == "assistant" for m in msgs):
            return "no assistant message: nothing to learn from this row"
    return None


def encode_row(row: dict, fmt: str, tokenizer, max_seq_len: int, train_on_prompt: bool) -> Example:
    eos = tokenizer.eos_token_id
    if fmt == "text":
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"] + [eos]
        labels = list(ids)
    elif fmt == "prompt_completion":
        p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [eos]
        ids = p + c
        labels = (list(p) if train_on_prompt else [IGNORE] * len(p)) + c
    else:
        enc = tokenizer.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        ids = list(enc["input_ids"])
        mask = enc["assistant_masks"]
        labels = list(ids) if train_on_prompt else [t if m else IGNORE for t, m in zip(ids, mask)]
    return Example(ids[:max_seq_len], labels[:max_seq_len])


def scan_rows(text: str, fmt: str) -> Iterator[tuple[int, dict | None, str, str | None]]:
    """(line number, row or None, the file's format, problem or None) for every non-blank line of JSONL `text`.

    The format is `fmt`, or (auto) the one the first usable row has; every row must have it.
    """
    detected = None if fmt == "auto" else fmt
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = None
        except json.JSONDecodeError as exc:
            row, problem = None, f"not valid JSON ({exc.msg} at column {exc.colno})"
        if problem is None and not isinstance(row, dict):
            problem = f"expected a JSON object, got {type(row).__name__}"
        if problem is None and detected is None:
            detected = detect_format(row)
            if detected is None:
                problem = 'cannot tell the format: expected "text", "prompt"+"completion" or "messages"'
        if problem is None:
            problem = _check_row(row, detected)
        yield line_no, (row if problem is None else None), detected, problem


def load_rows(uri: str, fmt: str, on_bad_row: str) -> tuple[list[dict], str, int]:
    """Parse a JSONL file; returns (rows, format, skipped). Errors name the file and line."""
    rows: list[dict] = []
    skipped = 0
    detected = None
    for line_no, row, detected, problem in scan_rows(read_text(uri), fmt):
        if problem is not None:
            if on_bad_row == "skip":
                skipped += 1
                continue
            raise DataError(f"{uri}:{line_no}: {problem} (set data.on_bad_row: skip to skip such rows)")
        rows.append(row)
    if not rows:
        raise DataError(f"{uri}: no usable rows ({skipped} skipped); a JSONL file needs one JSON object per line")
    return rows, detected, skipped


def pack(examples: list[Example], block: int) -> list[Example]:
    """Concatenate examples into blocks of exactly `block` tokens (the tail is dropped)."""
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        ids += ex.input_ids
        labels += ex.labels
    n = len(ids) // block
    return [Example(ids[i * block : (i + 1) * block], labels[i * block : (i + 1) * block]) for i in range(n)]


def build_datasets(spec: DataSpec, tokenizer, seed: int) -> Datasets:
    train_rows, train_fmt, skipped = load_rows(spec.train, spec.format, spec.on_bad_row)
    formats = {spec.train: train_fmt}
    if spec.eval:
        eval_rows, eval_fmt, eval_skipped = load_rows(spec.eval, spec.format, spec.on_bad_row)
        formats[spec.eval] = eval_fmt
        skipped += eval_skipped
        encode = lambda rows, fmt: [encode_row(r, fmt, tokenizer, spec.max_seq_len, spec.train_on_prompt) for r in rows]
        train, evals = encode(train_rows, train_fmt), encode(eval_rows, eval_fmt)
    else:
        order = list(range(len(train_rows)))
        random.Random(seed).shuffle(order)
        n_eval = int(round(len(order) * spec.eval_fraction))
        if spec.eval_fraction > 0 and n_eval == 0:
            n_eval = 1
        if n_eval >= len(order):
            raise DataError(f"{spec.train}: {len(order)} rows are too few to hold out eval_fraction={spec.eval_fraction}")
        enc = [encode_row(train_rows[i], train_fmt, tokenizer, spec.max_seq_len, spec.train_on_prompt) for i in order]
        evals, train = enc[:n_eval], enc[n_eval:]
    if spec.packing:
        train = pack(train, spec.max_seq_len)
        if not train:
            raise DataError(f"{spec.train}: too little text to fill one packed block of {spec.max_seq_len} tokens")
    return Datasets(train=train, eval=evals, skipped_rows=skipped, formats=formats)


def micro_batch_indices(n: int, *, step_micro: int, micro_batch_size: int, world: int, rank: int, seed: int) -> list[int]:
    """Indices of rank `rank`'s micro-batch number `step_micro` in a seeded, epoch-wise shuffled stream."""
    start = (step_micro * world + rank) * micro_batch_size
    out = []
    for pos in range(start, start + micro_batch_size):
        epoch, offset = divmod(pos, n)
        out.append(_epoch_order(n, seed, epoch)[offset])
    return out


_ORDER_CACHE: dict[tuple[int, int, int], list[int]] = {}


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _ORDER_CACHE:
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        _ORDER_CACHE.clear()  # only the current epoch is ever needed
        _ORDER_CACHE[key] = order
    return _ORDER_CACHE[key]


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        attn[i, : len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def eval_batches(examples: list[Example], batch_size: int, world: int, rank: int) -> Iterator[list[Example]]:
    """This rank's share of the eval set, in fixed order."""
    mine = examples[rank::world]
    for i in range(0, len(mine), batch_size):
        yield mine[i : i + batch_size]
