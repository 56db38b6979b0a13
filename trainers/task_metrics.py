"""Task metrics on one (answer, reference) pair of strings: the pure scoring shared by the worker loop
(`tune.metric: exact_match` ranks trials by it at each evaluation) and `rayft eval` (evaluation/metrics.py).

A leaf module: strings in, a float out, no model and no serving engine, so trainers/ can score
in the worker without importing evaluation/ or serve/, and both floors score identically.
"""

from __future__ import annotations

import re
import string
from typing import Literal, get_args

#: A normalisation step exact_match / contains apply to answer and reference (`normalize` runs them in a fixed order).
Normalizer = Literal["strip", "lower", "punctuation", "whitespace", "articles"]
NORMALIZERS: tuple[str, ...] = get_args(Normalizer)

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str, steps: list[str]) -> str:
    """`text` after the normalisation steps, in a fixed order (case and punctuation before whitespace)."""
    if "lower" in steps:
        text = text.lower()
    if "punctuation" in steps:
        text = text.translate(_PUNCTUATION)
    if "articles" in steps:
        text = _ARTICLES.sub(" ", text)
    if "whitespace" in steps:
        text = " ".join(text.split())
    if "strip" in steps:
        text = text.strip()
    return text


def exact_match(answer: str, reference: str, steps: list[str]) -> float:
    """1.0 when the normalised answer equals the normalised reference, else 0.0."""
    return float(normalize(answer, steps) == normalize(reference, steps))


def contains(answer: str, reference: str, steps: list[str]) -> float:
    """1.0 when the normalised reference occurs in the normalised answer, else 0.0."""
    return float(normalize(reference, steps) in normalize(answer, steps))


#: Metrics scored from an answer and its reference alone (what the worker loop can compute at each evaluation).
PAIR_METRICS = {"exact_match": exact_match, "contains": contains}
