"""Held-out rows for evaluation: read, checked once, and split into what is asked and what is expected.

Row shapes (one JSON object per line of JSONL, or the same fields as the columns of Parquet, CSV, Arrow):

    {"prompt": "...", "completion": "..."}            # `answer` or `reference` also name the reference
    {"messages": [..., {"role": "assistant", ...}]}    # the last assistant turn is the reference
    {"prompt": "...", "choices": ["a", "b"], "answer": 1}   # choice_accuracy: index or the choice's text
    {"text": "..."}                                    # perplexity of the whole text

Any other fields stay in the row (a user metric or `regex` reads them, e.g. `pattern`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from storage.errors import RayftError
from trainers.ingest.sources import DataError, read_rows, resolve

REFERENCE_FIELDS = ("completion", "answer", "reference")


class EvalDataError(RayftError):
    """An evaluation file that cannot be read, or a row it cannot score."""


@dataclass(frozen=True)
class EvalRow:
    """One held-out row: the prompt (text or chat turns), the reference, the choices, and the raw fields."""

    index: int
    prompt: str | None  # plain text prompt (None for chat rows)
    messages: list[dict] | None  # chat turns before the reference (chat template applied by the engine side)
    reference: str | None
    choices: list[str] | None
    gold: int | None  # index of the right choice
    raw: dict

    @property
    def generates(self) -> bool:
        """Whether an answer is generated for this row ({text} rows are only scored for perplexity)."""
        return self.prompt is not None or self.messages is not None


def parse_row(raw: Any, index: int, line: str) -> EvalRow:
    """Row number `index`, checked; EvalDataError names `line` (`file:N`) and the fix."""
    if not isinstance(raw, dict):
        raise EvalDataError(f"{line}: a row must be a JSON object, got {type(raw).__name__}")
    if "messages" in raw:
        turns = raw["messages"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) and "role" in t and "content" in t for t in turns):
            raise EvalDataError(f"{line}: messages must be a list of {{role, content}} objects")
        if not turns or turns[-1]["role"] != "assistant":
            raise EvalDataError(f"{line}: the last message must be the assistant's reference answer")
        return EvalRow(index, None, turns[:-1], str(turns[-1]["content"]), None, None, raw)
    if "choices" in raw:
        choices, answer = raw["choices"], raw.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise EvalDataError(f"{line}: choices must be a list of at least two strings")
        if isinstance(answer, bool) or not (isinstance(answer, int) and 0 <= answer < len(choices)) and answer not in choices:
            raise EvalDataError(f"{line}: answer must be the index (0..{len(choices) - 1}) or the text of the right choice, got {answer!r}")
        gold = answer if isinstance(answer, int) else choices.index(answer)
        return EvalRow(index, str(raw.get("prompt", "")), None, choices[gold], list(choices), gold, raw)
    if "prompt" in raw:
        reference = next((raw[f] for f in REFERENCE_FIELDS if f in raw), None)
        return EvalRow(index, str(raw["prompt"]), None, None if reference is None else str(reference), None, None, raw)
    if "text" in raw:
        return EvalRow(index, None, None, str(raw["text"]), None, None, raw)
    raise EvalDataError(f"{line}: a row needs prompt (+ completion), messages, prompt + choices + answer, or text; got fields {sorted(raw)}")


#: File kinds whose rows all have every column of the file.
COLUMNAR = ("parquet", "csv", "arrow")


def load_rows(uri: str, max_rows: int | None = None) -> list[EvalRow]:
    """The rows of `uri` (at most `max_rows`): a file, a directory or a glob, local or s3://, in any format the
    training data may be in (JSONL, JSON, Parquet, CSV, a `datasets` directory), read by the same readers
    (trainers.ingest.sources), so a bad row is named by file and line (or row index) the same way."""
    rows: list[EvalRow] = []
    try:
        fs, files = resolve(uri, "eval data")
        for src, f in enumerate(files):
            left = None if max_rows is None else max_rows - len(rows)
            for pos, raw in read_rows(fs, f, src, limit=left):
                try:
                    row = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as err:
                    raise EvalDataError(f"{f.where(pos)}: not valid JSON ({getattr(err, 'msg', err)})") from None
                if f.kind in COLUMNAR and isinstance(row, dict):  # a column this row does not use reads as null
                    row = {k: v for k, v in row.items() if v is not None}
                rows.append(parse_row(row, len(rows), f.where(pos)))
            if max_rows is not None and len(rows) >= max_rows:
                break
    except DataError as exc:
        raise EvalDataError(f"{exc}; pass evaluation rows with --data (or eval.data)") from None
    if not rows:
        raise EvalDataError(f"{uri}: holds no rows")
    return rows
