"""Token generation for many requests at once on one model.

`Engine` decodes every request of a replica together: requests that arrive together form
a group whose prompts are read in one pass; after that first pass the group joins the
group already decoding (their KV caches are left-padded to one length and stacked), so
one forward pass per step serves every running request, each row with its own
adapter (peft's `adapter_names`, where `__base__` is the plain base model), its own
sampling settings (temperature, top_p, seed) and its own stop conditions. transformers'
`generate` takes one generation config and one adapter per call, so the decoding loop is
here; the model, the KV cache (`DynamicCache`), the attention masking and the top-p
warper are transformers'.

peft cannot mix DoRA adapters with others in one pass, so a request for a DoRA adapter
is decoded in a group of its own adapter (`Sequence.solo`), stepped in turn with the
others. Everything that changes the model's adapters runs under `Engine.lock`, which
also covers each forward pass.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" inside adapter_names
logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; temperature 0 is greedy decoding."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Event:
    """One step of one request: new text and token, or the end (finish_reason), or an error."""

    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None  # "stop" | "length"
    error: str | None = None


class TextStream:
    """Incremental detokenization that never sends text a stop string could still claim.

    Held back: a suffix that is the start of a stop string, and a trailing incomplete
    UTF-8 character (byte-level BPE can split one across tokens).
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.sent = 0  # characters of the decoded text already sent

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def update(self, ids: list[int]) -> tuple[str, bool]:
        """(text to send now, whether a stop string ended the output)."""
        text = self._decode(ids)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            text = text[: min(hits)]
            delta, self.sent = text[self.sent :], len(text)
            return delta, True
        safe = len(text) - 1 if text.endswith("\ufffd") else len(text)
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    safe = min(safe, len(text) - k)
                    break
        if safe <= self.sent:
            return "", False
        delta, self.sent = text[self.sent : safe], safe
        return delta, False

    def flush(self, ids: list[int]) -> str:
        """Whatever is still held back, at the end of the output."""
        text = self._decode(ids)
        delta, self.sent = text[self.sent :], len(text)
        return delta


class Sequence:
    """One request inside the engine: prompt, sampling state, and the queue its events go to."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        adapter: str = BASE_ADAPTER,
        solo: bool = False,
        on_done: Callable[[], None] | None = None,
    ):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.adapter = adapter  # peft adapter name, or BASE_ADAPTER
        self.solo = solo  # decode only with requests for the same adapter (DoRA)
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self.cancelled = False
        self.submitted = False  # handed to an engine (which then calls `done`)
        self.stream: TextStream | None = None
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.rng = torch.Generator().manual_seed(seed % (1 << 64))
        self._on_done = on_done

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def done(self) -> None:
        """Leave the engine: runs `on_done` (e.g. an adapter's in-use count) exactly once."""
        callback, self._on_done = self._on_done, None
        if callback is not None:
            callback()


class DecodeGroup:
    """Sequences decoded by one forward pass per step, sharing one KV cache (left-padded)."""

    def __init__(self, seqs: list[Sequence], pad_id: int, device: torch.device):
        self.seqs = seqs
        self.solo_adapter = seqs[0].adapter if seqs[0].solo else None
        longest = max(len(s.prompt_ids) for s in seqs)
        ids = [[pad_id] * (longest - len(s.prompt_ids)) + s.prompt_ids for s in seqs]
        mask = [[0] * (longest - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in seqs]
        self.input_ids = torch.tensor(ids, dtype=torch.long, device=device)
        self.mask = torch.tensor(mask, dtype=torch.long, device=device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache: Any = None

    @property
    def adapters(self) -> set[str]:
        return {s.adapter for s in self.seqs}

    def forward(self, model: Any) -> torch.Tensor:
        """Next-token logits (float32, [rows, vocab]) for every row."""
        kwargs: dict[str, Any] = {}
        adapters = self.adapters
        only = self.solo_adapter or (next(iter(adapters)) if len(adapters) == 1 else None)
        if only is not None and only != BASE_ADAPTER:
            # One adapter in the pass: the active adapter's plain forward. peft's `adapter_names`
            # path registers hooks on every layer and splits every matmul by row, which costs
            # 1.3-3.4x the merged model's latency on small models (measured; bench/serve_bench.py).
            if model.active_adapter != only:
                model.set_adapter(only)
        elif hasattr(model, "peft_config"):
            kwargs["adapter_names"] = [s.adapter for s in self.seqs]
        with torch.inference_mode():
            out = model(
                input_ids=self.input_ids, attention_mask=self.mask, position_ids=self.positions,
                cache=self.cache, use_cache=True, logits_to_keep=1, **kwargs,
            )
        self.cache = out.cache
        return out.logits[:, -1, :].float()

    @property
    def mergeable(self) -> bool:
        """Past its prompt pass, with a cache made only of plain growing layers (no sliding windows)."""
        from transformers.cache_utils import DynamicLayer

        layers = getattr(self.cache, "layers", None)
        return bool(self.seqs) and bool(layers) and all(type(layer) is DynamicLayer for layer in layers)

    def absorb(self, other: DecodeGroup) -> None:
        """Take `other`'s rows: both caches left-padded (masked out) to the longer one, then stacked."""
        length = max(self.cache.get_seq_length(), other.cache.get_seq_length())
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, length, -2), _pad_left(theirs.keys, length, -2)])
            mine.values = torch.cat([_pad_left(mine.values, length, -2), _pad_left(theirs.values, length, -2)])
        # Each mask covers the cache plus the token about to be fed.
        self.mask = torch.cat([_pad_left(self.mask, length + 1, -1), _pad_left(other.mask, length + 1, -1)])
        self.input_ids = torch.cat([self.input_ids, other.input_ids])
        self.positions = torch.cat([self.positions, other.positions])
        self.seqs = self.seqs + other.seqs
        other.seqs = []

    def advance(self, keep: list[int], next_tokens: list[int]) -> None:
        """Keep rows `keep` (the unfinished ones) and feed each its new token."""
        if len(keep) < len(self.seqs):
            index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.positions = self.mask[index], self.positions[index]
            self.seqs = [self.seqs[i] for i in keep]
        if not self.seqs:
            return
        device = self.mask.device
        self.input_ids = torch.tensor([[t] for t in next_tokens], dtype=torch.long, device=device)
        self.positions = self.positions[:, -1:] + 1
        self.mask = torch.cat([self.mask, torch.ones((len(self.seqs), 1), dtype=torch.long, device=device)], dim=1)


@dataclass
class EngineStats:
    """Counters a replica reports: how much batching actually happened."""

    steps: int = 0  # forward passes
    rows: int = 0  # sequence-steps computed (rows summed over passes)
    groups: int = 0
    max_rows_in_pass: int = 0
    max_adapters_in_pass: int = 0  # distinct adapters (base counts as one) in one pass
    merges: int = 0  # groups that joined a running group after their prompt pass
    mixed_passes: int = 0  # passes that served more than one adapter
    finished: int = 0
    errors: int = 0


class Engine:
    """Schedules the sequences of one replica onto `model`, a few rows per forward pass."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int, max_wait_s: float):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
        self.eos_ids = {e for e in eos_ids if e is not None}
        #: Held for every forward pass and every change to the model's adapters.
        self.lock = threading.Lock()
        #: Run under `lock` before each pass; each may return a replacement model (e.g. adapters unloaded).
        self.maintenance: list[Callable[[Any], Any]] = []
        self.stats = EngineStats()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._groups: list[DecodeGroup] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def loop_error(self) -> BaseException | None:
        """The exception that stopped the scheduling loop, if it stopped (a replica health check reads it)."""
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    def run_locked(self, fn: Callable[[], Any]) -> Any:
        """Call `fn` holding the model lock (from a worker thread: it may wait for a pass)."""
        with self.lock:
            return fn()

    async def generate(self, seq: Sequence) -> AsyncIterator[Event]:
        """Decode `seq`; yields its events up to and including the final one."""
        seq.stream = TextStream(self.tokenizer, seq.params.stop)
        self._submit(seq)
        try:
            while True:
                event = await seq.queue.get()
                yield event
                if event.finish_reason is not None or event.error is not None:
                    return
        finally:
            if not seq.finished:
                seq.cancelled = True  # the caller went away: its row is dropped before the next pass

    def _submit(self, seq: Sequence) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        seq.submitted = True
        self._waiting.append(seq)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._groups:
                if not self._waiting:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                # An idle replica starting a batch gives requests arriving together a moment to join it.
                deadline = loop.time() + self.max_wait_s
                while len(self._waiting) < self.max_batch_size and (left := deadline - loop.time()) > 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), left)
                    except TimeoutError:
                        break
            self._admit()
            for group in list(self._groups):
                await self._step(group)
            self._groups = [g for g in self._groups if g.seqs]
            if len(self._groups) > 1:
                await asyncio.to_thread(self._merge_groups)

    def _admit(self) -> None:
        """Start groups for waiting sequences, as many rows as the batch bound leaves room for."""
        room = self.max_batch_size - sum(len(g.seqs) for g in self._groups)
        mixed: list[Sequence] = []
        solo: dict[str, list[Sequence]] = {}
        while self._waiting and room > 0:
            seq = self._waiting.popleft()
            if seq.cancelled:
                seq.done()
                continue
            room -= 1
            if seq.solo:
                solo.setdefault(seq.adapter, []).append(seq)
            else:
                mixed.append(seq)
        for seqs in ([mixed] if mixed else []) + list(solo.values()):
            self._groups.append(DecodeGroup(seqs, self.pad_id, self.device))
            self.stats.groups += 1

    async def _step(self, group: DecodeGroup) -> None:
        try:
            events, dropped = await asyncio.to_thread(self._step_locked, group)
        except Exception as exc:  # a failed pass ends its group's requests, never the replica
            logger.exception("decoding step failed")
            self.stats.errors += len(group.seqs)
            events = [(seq, Event(error=f"generation failed: {type(exc).__name__}: {exc}")) for seq in group.seqs]
            dropped, group.seqs = [], []
        for seq in dropped:
            seq.done()
        for seq, event in events:
            if event.finish_reason is not None or event.error is not None:
                seq.done()
            seq.queue.put_nowait(event)

    def _merge_groups(self) -> None:
        """Fold running groups that may share a pass (same solo adapter, or both mixed) into one."""
        kept: dict[str | None, DecodeGroup] = {}
        survivors = []
        for group in self._groups:
            if not group.mergeable:
                survivors.append(group)
                continue
            target = kept.get(group.solo_adapter)
            if target is None:
                kept[group.solo_adapter] = group
                survivors.append(group)
            else:
                target.absorb(group)
                self.stats.merges += 1
        self._groups = survivors

    def _step_locked(self, group: DecodeGroup) -> tuple[list[tuple[Sequence, Event]], list[Sequence]]:
        """One pass for `group`: (events per row, rows dropped because their caller went away)."""
        with self.lock:
            for fn in self.maintenance:
                self.model = fn(self.model)
            dropped = [s for s in group.seqs if s.cancelled]
            if dropped:
                _drop_rows(group, [i for i, s in enumerate(group.seqs) if not s.cancelled])
            if not group.seqs:
                return [], dropped
            logits = group.forward(self.model)
        self._count_pass(group)
        tokens = self._sample(group.seqs, logits)
        events, keep, next_tokens = [], [], []
        for i, (seq, token) in enumerate(zip(group.seqs, tokens)):
            events.append((seq, self._append(seq, token)))
            if seq.finish_reason is None:
                keep.append(i)
                next_tokens.append(token)
            else:
                self.stats.finished += 1
        group.advance(keep, next_tokens)
        return events, dropped

    def _count_pass(self, group: DecodeGroup) -> None:
        rows, adapters = len(group.seqs), len(group.adapters)
        self.stats.steps += 1
        self.stats.rows += rows
        self.stats.max_rows_in_pass = max(self.stats.max_rows_in_pass, rows)
        self.stats.max_adapters_in_pass = max(self.stats.max_adapters_in_pass, adapters)
        self.stats.mixed_passes += adapters > 1

    @staticmethod
    def _sample(seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        from transformers import TopPLogitsWarper

        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for i, seq in enumerate(seqs):
            params = seq.params
            if params.temperature == 0:
                tokens.append(greedy[i])
                continue
            scores = logits[i : i + 1] / params.temperature
            if params.top_p < 1.0:
                scores = TopPLogitsWarper(params.top_p)(None, scores)
            probs = torch.softmax(scores, dim=-1)[0]
            tokens.append(int(torch.multinomial(probs, 1, generator=seq.rng).item()))
        return tokens

    def _append(self, seq: Sequence, token: int) -> Event:
        """Add one token to `seq`; the event carries the text it makes visible and, at the end, why it ended."""
        assert seq.stream is not None
        seq.generated.append(token)
        if token in self.eos_ids:
            seq.finish_reason = "stop"
            return Event(text=seq.stream.flush(seq.generated), token_id=token, finish_reason="stop")
        text, stopped = seq.stream.update(seq.generated)
        if stopped:
            seq.finish_reason = "stop"
        elif len(seq.generated) >= seq.params.max_tokens:
            seq.finish_reason = "length"
            text += seq.stream.flush(seq.generated)
        return Event(text=text, token_id=token, finish_reason=seq.finish_reason)


def _pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`t` with zeros prepended along `dim` up to `length`."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _drop_rows(group: DecodeGroup, keep: list[int]) -> None:
    """Remove rows (cancelled requests) before a pass, without feeding new tokens."""
    if not keep:
        group.seqs = []
        return
    index = torch.tensor(keep, dtype=torch.long, device=group.mask.device)
    if group.cache is not None:
        group.cache.batch_select_indices(index)
    group.input_ids, group.mask, group.positions = group.input_ids[index], group.mask[index], group.positions[index]
    group.seqs = [group.seqs[i] for i in keep]
