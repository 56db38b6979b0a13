"""Metrics over generated answers, each with a bootstrap 95% interval, and paired differences of two refs.

A metric turns the rows and one ref's outputs into a matrix of per-row statistics plus an
aggregate of any subset of rows: the mean for per-row scores, sacrebleu's own corpus formula
over summed sentence statistics for BLEU and chrF, exp(Σ nll / Σ tokens) for perplexity. The
bootstrap resamples rows and re-aggregates; a paired difference resamples the same rows for
both refs, so "better" is a statement about this data set, with its uncertainty.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluation.data import EvalRow
from storage.errors import RayftError
from trainers.eval_spec import MetricSpec
from trainers.task_metrics import PAIR_METRICS


class MetricError(RayftError):
    """A metric that cannot be computed on this data (missing field, user function failed, ...)."""


@dataclass(frozen=True)
class Output:
    """What the model actors return for one row of one ref."""

    answer: str | None = None  # generated text (None for rows that only score)
    finish_reason: str | None = None
    choice_logprobs: list[float] | None = None  # log P(choice | prompt), summed over the choice's tokens
    ref_nll: float | None = None  # -log P(reference | prompt), summed
    ref_tokens: int | None = None


@dataclass(frozen=True)
class RowStats:
    """Per-row statistics (rows × k) and how a subset of rows becomes the metric's value."""

    values: np.ndarray
    aggregate: Callable[[np.ndarray], float]


@dataclass(frozen=True)
class Summary:
    """A metric's value on all rows, with its bootstrap 95% interval (None without bootstrap)."""

    value: float
    low: float | None
    high: float | None
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {"value": self.value, "ci95": [self.low, self.high] if self.low is not None else None, "n": self.n}


def _mean(values: np.ndarray) -> float:
    return float(values[:, 0].mean())


def _per_row(scores: list[float]) -> RowStats:
    return RowStats(np.asarray(scores, dtype=np.float64).reshape(-1, 1), _mean)


def _need(rows: list[EvalRow], outputs: list[Output], metric: str, what: str) -> None:
    for row, out in zip(rows, outputs):
        if what == "reference" and row.reference is None:
            raise MetricError(f"{metric}: row {row.index + 1} has no reference (completion, answer or an assistant turn)")
        if what == "answer" and out.answer is None:
            raise MetricError(f"{metric}: row {row.index + 1} has no generated answer (a {{text}} row scores perplexity only)")


def row_stats(metric: MetricSpec, rows: list[EvalRow], outputs: list[Output]) -> RowStats:
    """Per-row statistics of `metric` on one ref's outputs."""
    name = metric.name
    if name in ("exact_match", "contains", "bleu", "chrf", "rouge_l"):
        _need(rows, outputs, name, "reference")
        _need(rows, outputs, name, "answer")
    answers = [out.answer or "" for out in outputs]
    references = [row.reference or "" for row in rows]
    if name in PAIR_METRICS:  # the same scoring the worker loop ranks tune trials by
        score = PAIR_METRICS[name]
        return _per_row([score(a, r, metric.normalize) for a, r in zip(answers, references)])
    if name == "regex":
        _need(rows, outputs, name, "answer")
        scores = []
        for row, answer in zip(rows, answers):
            pattern = metric.pattern or row.raw.get("pattern")
            if not isinstance(pattern, str):
                raise MetricError(f"regex: row {row.index + 1} has no `pattern` field and the metric sets no pattern")
            scores.append(float(re.search(pattern, answer) is not None))
        return _per_row(scores)
    if name == "choice_accuracy":
        # Over the rows that have choices (a file may mix them with open questions); `n` says how many.
        scores = [float(int(np.argmax(out.choice_logprobs)) == row.gold)
                  for row, out in zip(rows, outputs) if row.choices is not None and out.choice_logprobs is not None]
        if not scores:
            raise MetricError("choice_accuracy: no row has choices; give rows of prompt, choices and answer")
        return _per_row(scores)
    if name in ("bleu", "chrf"):
        return _sacrebleu_stats(name, answers, references)
    if name == "rouge_l":
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        return _per_row([scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references)])
    if name == "perplexity":
        pairs = []
        for row, out in zip(rows, outputs):
            if out.ref_nll is None or not out.ref_tokens:
                raise MetricError(f"perplexity: row {row.index + 1} has no reference tokens to score")
            pairs.append((out.ref_nll, out.ref_tokens))
        return RowStats(np.asarray(pairs, dtype=np.float64), lambda v: float(math.exp(v[:, 0].sum() / v[:, 1].sum())))
    return _per_row(_user_metric(name, rows, answers))


def _sacrebleu_stats(name: str, answers: list[str], references: list[str]) -> RowStats:
    """Sentence statistics of sacrebleu's corpus metric; the aggregate is sacrebleu's formula on their sum.

    On all rows that is exactly `sacrebleu.corpus_bleu` / `corpus_chrf` (the tests check it); the sums
    make each bootstrap resample cost one formula, not a new corpus pass.
    """
    from sacrebleu.metrics import BLEU, CHRF

    scorer = BLEU() if name == "bleu" else CHRF()
    # sacrebleu keeps its per-sentence statistics private; they are what its own bootstrap resamples.
    stats = np.asarray(scorer._extract_corpus_statistics(answers, [references]), dtype=np.float64)

    def aggregate(values: np.ndarray) -> float:
        summed = [int(round(x)) for x in values.sum(axis=0)]
        return float(scorer._compute_score_from_stats(summed).score)

    return RowStats(stats, aggregate)


def _user_metric(spec: str, rows: list[EvalRow], answers: list[str]) -> list[float]:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise MetricError(f"metric {spec}: cannot import it ({err}); the module must be importable from the working directory") from None
    scores = []
    for row, answer in zip(rows, answers):
        try:
            value = float(fn(row.raw, answer))
        except Exception as err:  # the user's code: report which row broke it
            raise MetricError(f"metric {spec} failed on row {row.index + 1}: {type(err).__name__}: {err}") from None
        scores.append(value)
    return scores


def _resample(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(samples: list[float] | np.ndarray) -> tuple[float, float]:
    finite = np.asarray([s for s in samples if math.isfinite(s)])
    if finite.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def summarize(stats: RowStats, resamples: int = 1000, seed: int = 0) -> Summary:
    """The metric on all rows and a percentile-bootstrap 95% interval over rows."""
    n = len(stats.values)
    value = stats.aggregate(stats.values)
    if resamples <= 0 or n < 2:
        return Summary(value, None, None, n)
    draws = _resample(n, resamples, seed)
    if stats.aggregate is _mean:  # vectorised: one matrix mean instead of `resamples` calls
        samples = stats.values[:, 0][draws].mean(axis=1)
    else:
        samples = [stats.aggregate(stats.values[d]) for d in draws]
    return Summary(value, *_interval(samples), n)


def paired_difference(a: RowStats, b: RowStats, resamples: int = 1000, seed: int = 0) -> Summary:
    """metric(b) − metric(a) on the same rows, with a paired bootstrap 95% interval (the same resampled rows for both)."""
    n = len(a.values)
    if len(b.values) != n:
        raise MetricError(f"a paired difference needs the same rows for both refs ({n} vs {len(b.values)})")
    value = b.aggregate(b.values) - a.aggregate(a.values)
    if resamples <= 0 or n < 2:
        return Summary(value, None, None, n)
    draws = _resample(n, resamples, seed)
    if a.aggregate is _mean and b.aggregate is _mean:
        samples = (b.values[:, 0] - a.values[:, 0])[draws].mean(axis=1)
    else:
        samples = [b.aggregate(b.values[d]) - a.aggregate(a.values[d]) for d in draws]
    return Summary(value, *_interval(samples), n)
