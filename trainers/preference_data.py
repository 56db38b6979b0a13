"""Preference data: {"prompt", "chosen", "rejected"} pairs and KTO's {"prompt", "completion", "label"} rows.

Prompt and responses are strings, or lists of chat messages (the tokenizer's chat template is applied to prompt +
response, and the loss mask comes from the template's assistant mask). The loss is on the response tokens only.
Rows are checked one by one as they are read; a bad row is reported with its file and line. KTO's KL term compares
each prompt with another row's completion: row i is paired with the completion of row i+1 of the same split.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import torch

from trainers.data import IGNORE, DataError, Example, collate, read_text
from trainers.spec import DataSpec

PAIRED_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("prompt", "completion", "label")


@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    #: reference log-probabilities (chosen, rejected), when precomputed (full fine-tuning)
    ref: tuple[float, float] | None = None


@dataclass
class UnpairedExample:
    completion: Example
    kl: Example  # this row's prompt with another row's completion
    label: bool
    ref: tuple[float] | None = None
    ref_kl: float | None = None


@dataclass
class PreferenceDatasets:
    train: list
    eval: list
    skipped_rows: int = 0
    formats: dict[str, str] = field(default_factory=dict)


def _is_messages(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
        for m in value
    )


def _text_or_messages(row: dict, key: str, required: bool = True) -> str | None:
    value = row.get(key)
    if key not in row:
        return None if not required else f'missing field "{key}"'
    if isinstance(value, str):
        return None if value or key == "prompt" else f'"{key}" is empty: nothing to learn from this row'
    if _is_messages(value):
        return None
    return f'"{key}" must be a string or a non-empty list of {{"role": system|user|assistant, "content": string}} messages'


def check_row(row: object, kind: str) -> str | None:
    """Why `row` is not a valid row for `kind` ("paired" or "unpaired"), or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    needed = PAIRED_FIELDS if kind == "paired" else UNPAIRED_FIELDS
    responses = needed[1:] if kind == "paired" else ("completion",)
    missing = [f for f in needed if f not in row and not (f == "prompt" and all(_is_messages(row.get(r)) for r in responses))]
    if missing:
        names = ", ".join(f'"{f}"' for f in missing)
        shape = "{" + ", ".join(f'"{f}"' for f in needed) + "}"
        what = "a preference row" if kind == "paired" else "a KTO row"
        return f"missing field{'s' if len(missing) > 1 else ''} {names}: {what} is {shape}"
    for key in (("prompt",) if "prompt" in row else ()) + responses:
        problem = _text_or_messages(row, key)
        if problem:
            return problem
    kinds = {isinstance(row[k], str) for k in responses + (("prompt",) if "prompt" in row else ())}
    if len(kinds) > 1:
        return "prompt and responses must all be strings or all be message lists"
    if kind == "unpaired" and not isinstance(row["label"], bool):
        return f'"label" must be true (desirable) or false (undesirable), got {json.dumps(row["label"])}'
    return None


def encode_response(prompt, response, tokenizer, max_seq_len: int) -> Example:
    """Prompt + response as token ids, with labels on the response tokens only (truncated to `max_seq_len`)."""
    if isinstance(response, str):
        p = tokenizer(prompt or "", add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, labels = p + r, [IGNORE] * len(p) + r
    else:
        messages = list(prompt or []) + list(response)
        enc = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])
        labels = [t if m else IGNORE for t, m in zip(ids, enc["assistant_masks"])]
    return Example(ids[:max_seq_len], labels[:max_seq_len])


def encode_pair(row: dict, tokenizer, max_seq_len: int) -> PairExample:
    prompt = row.get("prompt")
    return PairExample(encode_response(prompt, row["chosen"], tokenizer, max_seq_len),
                       encode_response(prompt, row["rejected"], tokenizer, max_seq_len))


def encode_unpaired(rows: list[dict], tokenizer, max_seq_len: int) -> list[UnpairedExample]:
    """KTO rows; each also carries its KL sequence: its prompt with the next row's completion."""
    out = []
    for i, row in enumerate(rows):
        other = rows[(i + 1) % len(rows)]
        kl_response = other["completion"] if isinstance(other["completion"], type(row["completion"])) else row["completion"]
        out.append(UnpairedExample(
            encode_response(row.get("prompt"), row["completion"], tokenizer, max_seq_len),
            encode_response(row.get("prompt"), kl_response, tokenizer, max_seq_len),
            bool(row["label"]),
        ))
    return out


def load_preference_rows(uri: str, kind: str, on_bad_row: str) -> tuple[list[dict], int]:
    """Parse a JSONL file of preference rows; returns (rows, skipped). Errors name the file and line."""
    rows, skipped = [], 0
    for line_no, line in enumerate(read_text(uri).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problem = check_row(row, kind)
        except json.JSONDecodeError as exc:
            problem = f"not valid JSON ({exc.msg} at column {exc.colno})"
        if problem is not None:
            if on_bad_row == "skip":
                skipped += 1
                continue
            raise DataError(f"{uri}:{line_no}: {problem} (set data.on_bad_row: skip to skip such rows)")
        rows.append(row)
    if not rows:
        raise DataError(f"{uri}: no usable rows ({skipped} skipped); a JSONL file needs one JSON object per line")
    return rows, skipped


def build_preference_datasets(spec: DataSpec, tokenizer, seed: int, kind: str) -> PreferenceDatasets:
    """Train and eval examples for a paired or unpaired objective; the split follows `trainers.data.build_datasets`."""
    train_rows, skipped = load_preference_rows(spec.train, kind, spec.on_bad_row)
    if spec.eval:
        eval_rows, eval_skipped = load_preference_rows(spec.eval, kind, spec.on_bad_row)
        skipped += eval_skipped
    else:
        order = list(range(len(train_rows)))
        random.Random(seed).shuffle(order)
        n_eval = int(round(len(order) * spec.eval_fraction))
        if spec.eval_fraction > 0 and n_eval == 0:
            n_eval = 1
        if n_eval >= len(order):
            raise DataError(f"{spec.train}: {len(order)} rows are too few to hold out eval_fraction={spec.eval_fraction}")
        eval_rows, train_rows = [train_rows[i] for i in order[:n_eval]], [train_rows[i] for i in order[n_eval:]]
    if kind == "paired":
        encode = lambda rows: [encode_pair(r, tokenizer, spec.max_seq_len) for r in rows]
    else:
        encode = lambda rows: encode_unpaired(rows, tokenizer, spec.max_seq_len) if rows else []
    fmt = "preference" if kind == "paired" else "kto"
    formats = {spec.train: fmt, **({spec.eval: fmt} if spec.eval else {})}
    return PreferenceDatasets(encode(train_rows), encode(eval_rows), skipped, formats)


def _pad(examples: list[Example], pad_id: int, prefix: str = "") -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in collate(examples, pad_id).items()}


def collate_preference(examples: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Pairs as one batch of 2·B rows (every chosen, then every rejected); KTO rows with labels and KL sequences.
    Precomputed reference log-probabilities ride along as `ref_sums` (and `ref_kl_sums`)."""
    if isinstance(examples[0], PairExample):
        batch = _pad([e.chosen for e in examples] + [e.rejected for e in examples], pad_id)
        if all(e.ref is not None for e in examples):
            batch["ref_sums"] = torch.tensor([e.ref[0] for e in examples] + [e.ref[1] for e in examples])
        return batch
    batch = {**_pad([e.completion for e in examples], pad_id), **_pad([e.kl for e in examples], pad_id, "kl_")}
    batch["kto_labels"] = torch.tensor([e.label for e in examples])
    if all(e.ref is not None for e in examples):
        batch["ref_sums"] = torch.tensor([e.ref[0] for e in examples])
        batch["ref_kl_sums"] = torch.tensor([e.ref_kl for e in examples])
    return batch


def attach_reference(examples: list, table: dict[str, torch.Tensor]) -> None:
    """Store each example's row of a `reference_table` on it, so batches carry it."""
    for i, e in enumerate(examples):
        e.ref = tuple(table["sums"][i].tolist())
        if "kl_sums" in table:
            e.ref_kl = float(table["kl_sums"][i])

