"""Batch generation and scoring for evaluation: Ray Data over a pool of model actors.

Each actor holds one base model and runs the serving engine's code on it: answers are
decoded by `serve.generation.Engine` (greedy by default, mixed-adapter batches, stop strings,
`max_tokens`), and registry LoRA adapters are attached by serve's `AdapterPool` (fetched and
verified through the registry, checked against the base), so every adapter of one base shares
one base load. An adapter that peft cannot multiplex (IA3, AdaLoRA, ...) or that comes from a
local directory gets an actor group of its own, holding base + that adapter as a `PeftModel`.

Log-likelihoods (choice accuracy, perplexity) are one forward pass of the same model, under
the engine's lock, with the row's adapter active.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.data import EvalRow, parse_row

#: What an item asks of the actor: an answer, the choices' log-likelihoods, the reference's.
GENERATE, CHOICES, REFERENCE = "generate", "choices", "reference"
#: lm-evaluation-harness requests (evaluation/harness_lm.py): log P(each of the item's `continuations` | the row's
#: prompt) with whether greedy decoding would produce it, and the log-likelihood of a {text} row's every token.
LOGLIKELIHOOD, ROLLING = "loglikelihood", "rolling"


@dataclass
class ModelGroup:
    """Refs served by one kind of actor: one base, plus adapters (pool) or one local/non-LoRA adapter (peft)."""

    base_source: str  # a local model dir, `registry:NAME@V`, s3:// or a hub id
    storage_uri: str
    mode: str = "pool"  # "pool": registry LoRA adapters multiplexed; "peft": one adapter loaded by peft
    adapters: dict[str, Any] = field(default_factory=dict)  # label → registry ref (pool) or {relpath: bytes} (peft)
    base_label: str | None = None  # label of the plain base's rows, if the base itself is evaluated

    @property
    def labels(self) -> list[str]:
        return ([self.base_label] if self.base_label else []) + list(self.adapters)


def adapter_files(directory: str | Path) -> dict[str, bytes]:
    """A local adapter directory as {relative path: bytes}, shipped to actors that may run on other nodes."""
    root = Path(directory)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def prompt_ids(tokenizer: Any, row: EvalRow, room: int) -> list[int]:
    """The row's prompt as token ids (the chat template for chat rows), keeping the last `room` tokens."""
    if row.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"row {row.index + 1} is a chat row but the model has no chat template")
        ids = tokenizer.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tokenizer(row.prompt or "", add_special_tokens=False)["input_ids"]
    ids = list(ids) or ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
    return ids[-room:] if room > 0 else ids


def decoding(settings: dict[str, Any], item: dict) -> dict[str, Any]:
    """max_tokens, temperature, stop and seed of an item's answer: the evaluation's, or the item's own (a harness
    task's generation_kwargs)."""
    return {k: settings[k] for k in ("max_tokens", "temperature", "stop", "seed")} | item.get("params", {})


class ModelActor:
    """A Ray Data callable class: loads one base model once and answers batches of items."""

    def __init__(self, group: ModelGroup, settings: dict[str, Any]):
        import torch

        from serve.adapters import AdapterPool, linear_shapes
        from serve.deployments import load_model
        from serve.generation import Engine
        from serve.metrics import ModelMetrics
        from serve.spec import AdapterPolicy
        from storage.models import read_model_config, resolve_model_dir
        from storage.registry import base_config_digest, open_registry

        self.settings = settings
        cpus, gpus = settings["cpus"], settings["gpus"]
        if gpus == 0 and cpus >= 1:
            torch.set_num_threads(max(1, int(cpus)))
        model_dir = resolve_model_dir(group.base_source, group.storage_uri)
        model, self.tokenizer = load_model(model_dir, settings["dtype"], gpus)
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.names: dict[str, str] = {}  # label → peft adapter name (BASE_ADAPTER for the base)
        self.solo: dict[str, bool] = {}
        self.pool = None
        if group.mode == "peft":
            import peft

            ((label, files),) = group.adapters.items()
            self._dir = tempfile.TemporaryDirectory(prefix="rayft-eval-adapter-")
            for rel, data in files.items():
                (Path(self._dir.name) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(self._dir.name) / rel).write_bytes(data)
            model = peft.PeftModel.from_pretrained(model, self._dir.name, adapter_name="evaluated", is_trainable=False).eval()
            self.names[label], self.solo[label] = "evaluated", True
        self.engine = Engine(model, self.tokenizer, max_batch_size=settings["batch_size"], max_wait_s=0.0)
        if group.mode == "pool" and group.adapters:
            self.pool = AdapterPool(
                self.engine, open_registry(group.storage_uri), base_name=group.base_source,
                base_digest=base_config_digest(read_model_config(model_dir)),
                reload_base=lambda: load_model(model_dir, settings["dtype"], gpus)[0], shapes=linear_shapes(model),
                policy=AdapterPolicy(max_per_replica=max(1, len(group.adapters)), max_rank=65536), metrics=ModelMetrics(),
            )
        self.group = group
        self.loop = asyncio.new_event_loop()

    def __del__(self) -> None:
        # The engine's scheduling task waits on the actor's loop; end it so exit does not warn about it.
        task = getattr(getattr(self, "engine", None), "_task", None)
        if task is not None and not task.done() and not self.loop.is_closed():
            task.cancel()
            self.loop.run_until_complete(asyncio.gather(task, return_exceptions=True))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        items = [json.loads(text) for text in batch["item"]]
        results = self.loop.run_until_complete(self._process(items))
        return {"item": [json.dumps(r) for r in results]}

    async def _adapter(self, label: str) -> tuple[str, bool]:
        """(peft adapter name, solo) of `label`, attaching a registry adapter on first use."""
        from serve.generation import BASE_ADAPTER

        if label == self.group.base_label:
            return BASE_ADAPTER, False
        if label not in self.names:
            loaded = await self.pool.load(self.group.adapters[label])
            self.pool.acquire(loaded)  # held for the actor's life: an eval never evicts
            self.names[label], self.solo[label] = loaded.peft_name, loaded.solo
        return self.names[label], self.solo[label]

    async def _process(self, items: list[dict]) -> list[dict]:
        from serve.generation import SamplingParams, Sequence

        s = self.settings
        results = [{"key": it["key"], "label": it["label"]} for it in items]
        rows = [parse_row(it["row"], it["key"], f"row {it['key'] + 1}") for it in items]
        adapters = [await self._adapter(it["label"]) for it in items]
        jobs = []
        for result, item, row, (name, solo) in zip(results, items, rows, adapters):
            if GENERATE in item["want"]:
                p = decoding(s, item)
                params = SamplingParams(max_tokens=p["max_tokens"], temperature=p["temperature"], stop=tuple(p["stop"]), seed=p["seed"])
                ids = prompt_ids(self.tokenizer, row, self.max_positions - p["max_tokens"])
                jobs.append(self._generate(Sequence(ids, params, adapter=name, solo=solo), result))
        await asyncio.gather(*jobs)
        for result, item, row, (name, _) in zip(results, items, rows, adapters):
            if {CHOICES, REFERENCE, LOGLIKELIHOOD, ROLLING} & set(item["want"]):
                result.update(await asyncio.to_thread(self.engine.run_locked, lambda: self._score(row, item, name)))
        return results

    async def _generate(self, seq: Any, result: dict) -> None:
        text = []
        async for event in self.engine.generate(seq):
            if event.error is not None:
                raise RuntimeError(event.error)
            text.append(event.text)
        result["answer"] = "".join(text)
        result["finish_reason"] = seq.finish_reason

    def _score(self, row: EvalRow, item: dict, adapter: str) -> dict:
        """Under the engine lock: the item's log-likelihoods with `adapter` active."""
        def scores(context: list[int], continuations: list[list[int]]) -> list[tuple[float, int, bool]]:
            return continuation_scores(self.engine.model, context, continuations, adapter)

        return score_item(self.tokenizer, row, item, scores, self.max_positions)


#: (context ids, continuations' ids) → (Σ log P(continuation | context), token count, greedy would produce it) each.
Scores = Callable[[list[int], list[list[int]]], list[tuple[float, int, bool]]]


def scoring_context(tokenizer: Any, ids: list[int]) -> list[int]:
    """A context to score after; an empty one is the end-of-text token (the harness's prefix token)."""
    if ids:
        return ids
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to score a text from its first token")
    return [prefix]


def rolling_logprob(tokenizer: Any, ids: list[int], scores: Scores, max_positions: int) -> float:
    """Σ log P(token | what precedes it) over every token of a text, in windows the model's positions hold.

    Like the harness's rolling windows (context length 1): the first token is scored after the prefix
    token, each later window predicts its tokens given the tokens right before it, so none is scored twice.
    """
    width = min(max_positions, 1 << 20)
    total, start = 0.0, 0
    while start < len(ids):
        chunk = ids[start : start + width - 1]
        context = scoring_context(tokenizer, ids[max(0, start - (width - len(chunk))) : start])
        ((lp, _, _),) = scores(context, [chunk])
        total, start = total + lp, start + len(chunk)
    return total


def score_item(tokenizer: Any, row: EvalRow, item: dict, scores: Scores, max_positions: int) -> dict:
    """What an item wants of log-likelihoods (choices, reference, harness requests), from one engine's `scores`."""
    out: dict[str, Any] = {}
    tok, want = tokenizer, item["want"]
    if LOGLIKELIHOOD in want:
        conts = [tok(c, add_special_tokens=False)["input_ids"] for c in item["continuations"]]
        # The context keeps its last tokens when context + continuation exceed the model's positions (as the harness does).
        room = max(1, max_positions - max(len(c) for c in conts))
        context = scoring_context(tok, prompt_ids(tok, row, 0))[-room:]
        out["loglikelihoods"] = scores(context, conts)
        return out
    if ROLLING in want:
        out["rolling_logprob"] = rolling_logprob(tok, tok(row.reference, add_special_tokens=False)["input_ids"], scores, max_positions)
        return out
    if row.generates:
        context = prompt_ids(tok, row, 0)
    else:  # {text}: every token after the first, given what precedes it
        context = []
    if CHOICES in want:
        conts = [tok(c, add_special_tokens=False)["input_ids"] for c in row.choices]
        out["choice_logprobs"] = [lp for lp, _, _ in scores(context, conts)]
    if REFERENCE in want:
        ids = tok(row.reference, add_special_tokens=False)["input_ids"]
        if not context:
            context, ids = ids[:1], ids[1:]
        ((lp, n, _),) = scores(context, [ids])
        out["ref_nll"], out["ref_tokens"] = -lp, n
    return out


def continuation_scores(model: Any, context: list[int], continuations: list[list[int]], adapter: str) -> list[tuple[float, int, bool]]:
    """(Σ log P(continuation token | everything before it), token count, whether greedy decoding would produce it
    (the harness's is_greedy)) for each continuation after `context`.

    Context and continuation are tokenized apart and concatenated (as lm-evaluation-harness does),
    one right-padded batch, with `adapter` (a peft adapter name, or `__base__`) active.
    """
    import contextlib

    import torch

    from serve.generation import BASE_ADAPTER

    seqs = [context + c for c in continuations]
    longest = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (longest - len(s)) for s in seqs], dtype=torch.long)
    mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in seqs], dtype=torch.long)
    device = next(model.parameters()).device
    scope: Any = contextlib.nullcontext()
    if hasattr(model, "peft_config"):
        if adapter == BASE_ADAPTER:
            scope = model.disable_adapter()
        elif model.active_adapter != adapter:
            model.set_adapter(adapter)
    with scope, torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = ids[:, 1:].to(device)
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    best = logprobs.argmax(dim=-1)
    results = []
    for i, cont in enumerate(continuations):
        start = len(context) - 1  # logits at position p predict token p + 1
        span = slice(start, start + len(cont))
        results.append((float(picked[i, span].sum()), len(cont), bool((best[i, span] == targets[i, span]).all())))
    return results


class Progress:
    """`[rayft] eval: done/total answers, rows/s` lines, about ten per run."""

    def __init__(self, total: int, what: str, quiet: bool = False):
        self.total, self.what, self.done, self.quiet = total, what, 0, quiet
        self.step = max(1, total // 10)
        self.started = time.perf_counter()
        self.first: float | None = None  # seconds to the first result: actor start-up and model load
        self.last: float | None = None
        self.lock = threading.Lock()  # model groups report from threads of their own

    def __call__(self, n: int) -> None:
        with self.lock:
            now = time.perf_counter() - self.started
            self.first = now if self.first is None else self.first
            self.last = now
            self.done += n
            if self.quiet:
                return
            if self.done % self.step == 0 or self.done == self.total:
                rate = self.done / max(time.perf_counter() - self.started, 1e-9)
                print(f"[rayft] eval: {self.done}/{self.total} {self.what} ({rate:.1f}/s)", flush=True)
