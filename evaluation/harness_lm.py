"""`RayftLM`: lm-evaluation-harness's `LM` interface over rayft's model actors (imports lm_eval; the extra `lm-eval`).

Each method turns the harness's requests into rayft eval items and hands them to an executor
(evaluation/harness.py: a Ray Data actor pool, or one actor in process). The actor answers them with
the serving engine's decode loop and rayft's log-likelihood code (evaluation/generate.py), so no
decode loop or scoring pass of the harness's own runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lm_eval.api.model import LM

from evaluation.generate import GENERATE, LOGLIKELIHOOD, ROLLING


class RayftLM(LM):
    """One ref (label of its model group) answering the harness's loglikelihood / rolling / generate_until requests."""

    def __init__(self, label: str, run: Callable[[list[dict]], list[dict]], max_tokens: int = 256):
        super().__init__()
        self.label, self.run, self.max_tokens = label, run, max_tokens

    def _results(self, items: list[dict]) -> dict[int, dict]:
        return {r["key"]: r for r in self.run(items)} if items else {}

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is greedy) per request; the options of one context share one forward pass."""
        contexts: dict[str, list[tuple[int, str]]] = {}
        for i, request in enumerate(requests):
            context, continuation = request.args
            # As the harness's own models do: a context's trailing spaces belong to the continuation's first token.
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            contexts.setdefault(context, []).append((i, continuation))
        items = [{"key": k, "label": self.label, "row": {"prompt": context}, "want": [LOGLIKELIHOOD],
                  "continuations": [c for _, c in group]} for k, (context, group) in enumerate(contexts.items())]
        results = self._results(items)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for k, group in enumerate(contexts.values()):
            for (i, _), (logprob, _, greedy) in zip(group, results[k]["loglikelihoods"]):
                out[i] = (logprob, greedy)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """log P(text): every token of each text (word/byte perplexity tasks)."""
        items = [{"key": i, "label": self.label, "row": {"text": r.args[0]}, "want": [ROLLING]} for i, r in enumerate(requests)]
        results = self._results(items)
        return [results[i]["rolling_logprob"] for i in range(len(requests))]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """The answer to each context, decoded by the serving engine with the task's until / max_gen_toks / temperature."""
        items = []
        for i, request in enumerate(requests):
            context, kwargs = request.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            params = {"stop": [until] if isinstance(until, str) else list(until), "temperature": temperature,
                      "max_tokens": int(kwargs.get("max_gen_toks", self.max_tokens))}
            items.append({"key": i, "label": self.label, "row": {"prompt": context}, "want": [GENERATE], "params": params})
        results = self._results(items)
        return [results[i]["answer"] for i in range(len(requests))]
