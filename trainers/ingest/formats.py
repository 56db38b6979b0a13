"""Row formats: detect a row's shape, check it, and turn a batch of rows into tokenized examples.

Pure functions (no Ray): the Ray Data operators in `trainers.ingest.prepare` call them, and unit
tests call them directly. Two small registries keep this open to new shapes:

- `FORMATS`: what users write (`text`, `prompt_completion`, `messages` incl. OpenAI chat files,
  `sharegpt`, `alpaca`, ...). A format names the fields that detect it, checks a row, and maps it onto
  one of the encoders' canonical shapes.
- `ENCODERS`: canonical shape → a function that tokenizes a batch of canonical rows into columns
  (`input_ids` and `labels` for SFT). An encoder's kind is the rows an objective reads (its `DATA`):
  "text" (the SFT shapes), "paired" or "unpaired" (preference rows, `trainers.ingest.preference`, with
  their own columns: `chosen_input_ids`, `kl_labels`, ...). `format: auto` only detects formats of the
  job objective's kind; packing applies to "text" only.

Loss masks: labels are -100 (IGNORE) on prompt / user / system tokens, on `weight: 0` assistant turns
and on padding; assistant and completion tokens keep their ids.
"""

from __future__ import annotations

from typing import Any

# The registries and their record types live below this module and trainers.ingest.preference, which both fill
# them (the preference shapes register themselves on import); re-exported here, where callers look for them.
import trainers.ingest.preference  # noqa: F401
from trainers.ingest.shapes import (  # noqa: F401
    ENCODERS, FORMATS, IGNORE, ROLES, EncodeOptions, Encoder, Format, register_encoder, register_format, token_ids,
)

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


# --- checks -------------------------------------------------------------------------------------


def _check_text(row: dict) -> str | None:
    if not isinstance(row.get("text"), str) or not row["text"]:
        return 'expected a non-empty string field "text"'
    return None


def _check_prompt_completion(row: dict) -> str | None:
    if not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
        return 'expected string fields "prompt" and "completion"'
    if not row["completion"]:
        return '"completion" is empty: nothing to learn from this row'
    return None


def _check_messages(row: dict) -> str | None:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return 'expected a non-empty list "messages"'
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return f'messages[{i}] must be {{"role": system|user|assistant, "content": string}}'
        if m.get("weight") is not None:  # columnar files (Parquet, Arrow) give every message every field, None if unset
            if m["role"] != "assistant":
                return f'messages[{i}]: "weight" is only allowed on assistant messages'
            if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
                return f'messages[{i}].weight must be 0 or 1, got {m["weight"]!r}'
    if not any(m["role"] == "assistant" and m.get("weight") != 0 for m in msgs):
        return "no assistant message with weight 1: nothing to learn from this row"
    return None


def _check_sharegpt(row: dict) -> str | None:
    conv = row.get("conversations")
    if not isinstance(conv, list) or not conv:
        return 'expected a non-empty list "conversations"'
    for i, m in enumerate(conv):
        if not isinstance(m, dict) or m.get("from") not in SHAREGPT_ROLES or not isinstance(m.get("value"), str):
            return f'conversations[{i}] must be {{"from": system|human|gpt, "value": string}}'
    if not any(SHAREGPT_ROLES[m["from"]] == "assistant" for m in conv):
        return 'no "gpt" turn: nothing to learn from this row'
    return None


def _check_alpaca(row: dict) -> str | None:
    if not isinstance(row.get("instruction"), str) or not isinstance(row.get("output"), str):
        return 'expected string fields "instruction" and "output" (and optionally "input")'
    if row.get("input") is not None and not isinstance(row["input"], str):
        return '"input" must be a string'
    if not row["output"]:
        return '"output" is empty: nothing to learn from this row'
    return None


# --- canonical mapping ----------------------------------------------------------------------------


def _sharegpt_messages(row: dict) -> dict:
    return {"messages": [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in row["conversations"]]}


def _alpaca_messages(row: dict) -> dict:
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}


register_format(Format("messages", ("messages",), _check_messages, "messages", lambda r: r,
                       "chat messages (OpenAI chat fine-tuning shape; assistant turns with weight 0 are not learned)"))
register_format(Format("sharegpt", ("conversations",), _check_sharegpt, "messages", _sharegpt_messages,
                       "ShareGPT conversations (from/value), rendered with the chat template"))
register_format(Format("alpaca", ("instruction", "output"), _check_alpaca, "messages", _alpaca_messages,
                       "Alpaca instruction/input/output, rendered with the chat template"))
register_format(Format("prompt_completion", ("prompt", "completion"), _check_prompt_completion,
                       "prompt_completion", lambda r: r, "prompt/completion (loss on the completion)"))
register_format(Format("text", ("text",), _check_text, "text", lambda r: r, "plain text (loss on every token)"))


def formats_of(kind: str) -> list[str]:
    """The formats whose rows an objective of data kind `kind` reads ("text", "paired", "unpaired")."""
    return [name for name, f in FORMATS.items() if ENCODERS[f.encoder].kind == kind]


def detect_format(row: Any, kind: str = "text") -> str | None:
    """The first registered format of `kind` whose detect fields are all in `row` (registration order = priority)."""
    if not isinstance(row, dict):
        return None
    for name in formats_of(kind):
        if all(f in row for f in FORMATS[name].detect_fields):
            return name
    return None


def detect_hint(kind: str = "text") -> str:
    return "expected one of: " + "; ".join(f"{name} ({'+'.join(FORMATS[name].detect_fields)})" for name in formats_of(kind))


def apply_columns(row: dict, columns: dict[str, str] | None) -> dict:
    """`data.columns` ({canonical field: source column}) applied to one row; other fields are kept."""
    if not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns.values()}
    for target, source in columns.items():
        if source in row:
            out[target] = row[source]
    return out


def missing_columns(row: dict, columns: dict[str, str] | None) -> list[str]:
    """Source columns named by `data.columns` that `row` does not have."""
    return [source for source in (columns or {}).values() if source not in row]


# --- encoders -----------------------------------------------------------------------------------


def _encode_text(rows: list[dict], tok, opts: EncodeOptions) -> list[dict[str, list[int]]]:
    eos = tok.eos_token_id
    ids = token_ids(tok, [r["text"] for r in rows])
    return [{"input_ids": list(i) + [eos], "labels": list(i) + [eos]} for i in ids]


def _encode_prompt_completion(rows: list[dict], tok, opts: EncodeOptions) -> list[dict[str, list[int]]]:
    eos = tok.eos_token_id
    prompts = token_ids(tok, [r["prompt"] for r in rows])
    completions = token_ids(tok, [r["completion"] for r in rows])
    out = []
    for p, c in zip(prompts, completions):
        c = list(c) + [eos]
        out.append({"input_ids": list(p) + c, "labels": (list(p) if opts.train_on_prompt else [IGNORE] * len(p)) + c})
    return out


def assistant_spans(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of 1s in a token mask."""
    spans, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _encode_messages(rows: list[dict], tok, opts: EncodeOptions) -> list[dict[str, list[int]] | str]:
    convs = [[{"role": m["role"], "content": m["content"]} for m in r["messages"]] for r in rows]
    enc = tok.apply_chat_template(convs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    out: list[dict[str, list[int]] | str] = []
    for row, ids, mask in zip(rows, enc["input_ids"], enc["assistant_masks"]):
        ids, mask = list(ids), list(mask)
        weights = [0 if m.get("weight") == 0 else 1 for m in row["messages"] if m["role"] == "assistant"]
        spans = assistant_spans(mask)
        keep = [1] * len(ids) if opts.train_on_prompt else list(mask)
        if any(w == 0 for w in weights):
            if len(spans) != len(weights):
                out.append(f"the chat template marks {len(spans)} assistant spans for {len(weights)} assistant messages, "
                           "so weight 0 cannot be applied per turn")
                continue
            for (a, b), w in zip(spans, weights):
                if w == 0:
                    keep[a:b] = [0] * (b - a)
        out.append({"input_ids": ids, "labels": [t if k else IGNORE for t, k in zip(ids, keep)]})
    return out


register_encoder(Encoder("text", "text", _encode_text))
register_encoder(Encoder("prompt_completion", "text", _encode_prompt_completion))
register_encoder(Encoder("messages", "text", _encode_messages, needs_chat_template=True))


def has_generation_markers(tok) -> bool:
    template = getattr(tok, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    return "generation" in template and "endgeneration" in template


def encode_rows(rows: list[dict], fmt: str, tok, opts: EncodeOptions) -> list[dict[str, list[int]] | str]:
    """Checked rows of format `fmt` (already column-mapped) → one dict of columns, or a problem string, per row."""
    f = FORMATS[fmt]
    return ENCODERS[f.encoder].encode([f.canonical(r) for r in rows], tok, opts)


def encoder_of(fmt: str) -> Encoder:
    """The encoder a format's rows go through."""
    return ENCODERS[FORMATS[fmt].encoder]


def sequences(example: dict) -> list[str]:
    """The column prefixes of an example's token sequences: "" (input_ids/labels), "chosen_", "kl_", ..."""
    return [k[: -len("input_ids")] for k in example if k.endswith("input_ids")]


def truncate(example: dict, max_len: int) -> tuple[dict, bool]:
    """Keep the first `max_len` tokens of each sequence; returns (example, whether anything was cut)."""
    long = [p for p in sequences(example) if len(example[p + "input_ids"]) > max_len]
    if not long:
        return example, False
    out = dict(example)
    for p in long:
        out[p + "input_ids"], out[p + "labels"] = example[p + "input_ids"][:max_len], example[p + "labels"][:max_len]
    return out, True


def pack(examples: list[dict[str, list[int]]], block: int) -> list[dict[str, list[int]]]:
    """Concatenate examples into blocks of exactly `block` tokens, in order; the tail is dropped."""
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        ids += ex["input_ids"]
        labels += ex["labels"]
    n = len(ids) // block
    return [{"input_ids": ids[i * block:(i + 1) * block], "labels": labels[i * block:(i + 1) * block]} for i in range(n)]
