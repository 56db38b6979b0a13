"""The ingest registries (`FORMATS`, `ENCODERS`) and what they hold: the row shapes users bring and the encoders that
tokenize them. trainers.ingest.formats (the SFT shapes) and trainers.ingest.preference (the preference shapes)
register into them; see formats.py for what each is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

IGNORE = -100
ROLES = ("system", "user", "assistant")


@dataclass
class Format:
    """A row shape users bring."""

    name: str
    #: Fields whose presence identifies the shape (all of them must be there), for `format: auto`.
    detect_fields: tuple[str, ...]
    #: Why a row is not of this shape, or None.
    check: Callable[[dict], str | None]
    #: The encoder (in `ENCODERS`) its rows go through.
    encoder: str
    #: The row mapped onto that encoder's canonical row.
    canonical: Callable[[dict], dict]
    #: One line for the detection message.
    describe: str = ""


@dataclass
class Encoder:
    """Tokenizes canonical rows. `encode(rows, tokenizer, options)` returns one dict of columns per row."""

    name: str
    kind: str  # the rows an objective reads (its DATA): "text" (input_ids + labels; packable), "paired", "unpaired"
    encode: Callable[[list[dict], Any, "EncodeOptions"], list[dict[str, list[int]] | str]]
    #: The tokenizer needs a chat template with {% generation %} markers.
    needs_chat_template: bool = False


@dataclass
class EncodeOptions:
    train_on_prompt: bool = False
    #: Tokens per sequence (an encoder that builds several sequences per row truncates each; None: the pipeline does)
    max_seq_len: int | None = None
    extra: dict = field(default_factory=dict)


FORMATS: dict[str, Format] = {}
ENCODERS: dict[str, Encoder] = {}


def register_format(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def register_encoder(enc: Encoder) -> Encoder:
    ENCODERS[enc.name] = enc
    return enc


def token_ids(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each text without special tokens: the Rust tokenizer directly when there is one (the same ids
    as `tok(texts, add_special_tokens=False)`, without transformers' per-row Python conversion)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tok(texts, add_special_tokens=False)["input_ids"]
