"""Preference rows in the ingest registries: {prompt, chosen, rejected} pairs (DPO, ORPO, SimPO) and KTO's
{prompt, completion, label} rows. They go through the same Ray Data pass as the SFT shapes (sources, `data.columns`,
bad rows named by file and line, eval split, cache, stats); only their encoders differ.

Prompt and responses are strings, or lists of chat messages (the tokenizer's chat template is applied to prompt +
response, and the loss mask comes from the template's assistant mask). The loss is on the response tokens only.
Columns: pairs → `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`, `rejected_labels`; KTO → `input_ids`,
`labels` (prompt + completion), `kl_input_ids`, `kl_labels` and `label`. KTO's KL term compares each prompt with
another row's completion: row i is paired with the completion of row i+1 of the same block of rows.

Pure functions (no Ray, no torch): the worker-side examples and their collate are in `trainers.ingest.stream`.
"""

from __future__ import annotations

import json

from trainers.ingest.shapes import IGNORE, ROLES, EncodeOptions, Encoder, Format, register_encoder, register_format, token_ids

PAIRED_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("prompt", "completion", "label")


def _is_messages(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value
    )


def _text_or_messages(row: dict, key: str) -> str | None:
    value = row.get(key)
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


def encode_responses(prompts: list, responses: list, tok, max_seq_len: int | None) -> list[dict[str, list[int]]]:
    """Prompt + response of each row as token ids, labels on the response tokens only (each truncated to max_seq_len)."""
    out: list[dict[str, list[int]] | None] = [None] * len(prompts)
    plain = [i for i, r in enumerate(responses) if isinstance(r, str)]
    if plain:
        p_ids = token_ids(tok, [prompts[i] or "" for i in plain])
        r_ids = token_ids(tok, [responses[i] for i in plain])
        for i, p, r in zip(plain, p_ids, r_ids):
            p, r = list(p), list(r) + [tok.eos_token_id]
            out[i] = {"input_ids": p + r, "labels": [IGNORE] * len(p) + r}
    chats = [i for i, r in enumerate(responses) if not isinstance(r, str)]
    if chats:
        convs = [[{"role": m["role"], "content": m["content"]} for m in list(prompts[i] or []) + list(responses[i])] for i in chats]
        enc = tok.apply_chat_template(convs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        for i, ids, mask in zip(chats, enc["input_ids"], enc["assistant_masks"]):
            ids = list(ids)
            out[i] = {"input_ids": ids, "labels": [t if m else IGNORE for t, m in zip(ids, mask)]}
    cut = max_seq_len or None
    return [{"input_ids": e["input_ids"][:cut], "labels": e["labels"][:cut]} for e in out]


def _prefixed(prefix: str, example: dict) -> dict:
    return {prefix + k: v for k, v in example.items()}


def _encode_pairs(rows: list[dict], tok, opts: EncodeOptions) -> list[dict]:
    prompts = [r.get("prompt") for r in rows]
    chosen = encode_responses(prompts, [r["chosen"] for r in rows], tok, opts.max_seq_len)
    rejected = encode_responses(prompts, [r["rejected"] for r in rows], tok, opts.max_seq_len)
    return [{**_prefixed("chosen_", c), **_prefixed("rejected_", r)} for c, r in zip(chosen, rejected)]


def _encode_unpaired(rows: list[dict], tok, opts: EncodeOptions) -> list[dict]:
    prompts = [r.get("prompt") for r in rows]
    completions = [r["completion"] for r in rows]
    # the KL sequence: this row's prompt with the next row's completion (its own when the shapes differ)
    others = [completions[(i + 1) % len(rows)] for i in range(len(rows))]
    others = [o if isinstance(o, type(c)) else c for o, c in zip(others, completions)]
    own = encode_responses(prompts, completions, tok, opts.max_seq_len)
    kl = encode_responses(prompts, others, tok, opts.max_seq_len)
    return [{**e, **_prefixed("kl_", k), "label": bool(r["label"])} for e, k, r in zip(own, kl, rows)]


register_format(Format("preference", ("chosen", "rejected"), lambda row: check_row(row, "paired"), "preference",
                       lambda r: r, "preference pairs {prompt, chosen, rejected} (loss on the responses)"))
register_format(Format("kto", ("completion", "label"), lambda row: check_row(row, "unpaired"), "kto",
                       lambda r: r, "KTO rows {prompt, completion, label} (loss on the completion)"))
register_encoder(Encoder("preference", "paired", _encode_pairs))
register_encoder(Encoder("kto", "unpaired", _encode_unpaired))
