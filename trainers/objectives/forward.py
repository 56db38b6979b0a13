"""From a model and a batch to an objective's loss: the forward passes, and where the reference comes from.

The reference is never a second copy of the weights: for adapter methods it is the same model inside
`reference_context` (peft's `disable_adapter()`, given by the loop); for full fine-tuning it is a table of the frozen
base's log-probabilities computed before the first step (`reference_table`) and carried in the batch (`ref_sums`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import ContextManager

import torch
import torch.nn.functional as F

from trainers.objectives._table import objective_module
from trainers.objectives._common import METRIC_KEYS, SequenceLogps

IGNORE = -100

#: A zero-argument callable whose context makes the policy model act as the reference (or None: precomputed).
ReferenceContext = Callable[[], ContextManager] | None


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the log-probabilities of the label tokens, number of label tokens) for each row."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, logits.shape[1] - input_ids.shape[1]:, :]  # prompt-learning adapters prepend virtual tokens
    shift_logits, shift_labels = logits[:, :-1, :].float(), labels[:, 1:]
    nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE, reduction="none")
    return -nll.sum(-1), (shift_labels != IGNORE).sum(-1)


def batch_logps(model, batch: dict[str, torch.Tensor], kl: bool) -> SequenceLogps:
    """The batch's sequences (and, for KTO, its mismatched KL sequences, without gradient) under `model`."""
    sums, tokens = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    out = SequenceLogps(sums, tokens, labels=batch.get("kto_labels"))
    if kl:
        with torch.no_grad():
            out.kl_sums = sequence_logps(model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])[0]
    return out


def reference_logps(model, batch: dict[str, torch.Tensor], reference_context: ReferenceContext, kl: bool) -> SequenceLogps:
    """The reference's log-probabilities: precomputed in the batch, else `model` inside `reference_context`."""
    if "ref_sums" in batch:
        return SequenceLogps(batch["ref_sums"], batch["labels"][:, 1:].ne(IGNORE).sum(-1), batch.get("kto_labels"),
                             batch.get("ref_kl_sums"))
    if reference_context is None:
        raise RuntimeError("this objective needs reference log-probabilities: none in the batch and no reference model")
    with torch.no_grad(), reference_context():
        return batch_logps(model, batch, kl)


def sft_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Supervised fine-tuning: transformers' causal-LM loss (labels = input ids, IGNORE where no loss is taken)."""
    return model(**batch).loss, {}


def make_loss_fn(objective_cfg, live_reference: bool) -> Callable[[object, dict], tuple[torch.Tensor, dict[str, float]]]:
    """`loss_fn(model, batch) -> (loss, metrics)` for the objective (the worker loop's objective seam). SFT is the
    model's own token loss. `live_reference`: the reference is `model` with its adapter switched off (adapter methods);
    otherwise it is precomputed and carried in the batch (`ref_sums`)."""
    module = objective_module(objective_cfg.name)
    if module.DATA == "text":
        return sft_loss
    kl = module.DATA == "unpaired"

    def loss_fn(model, batch):
        policy = batch_logps(model, batch, kl)
        inner = _inner(model)  # the reference pass needs no gradient sync: it runs on the unwrapped module
        context = adapter_reference(model) if live_reference else None
        reference = reference_logps(inner, batch, context, kl) if module.REFERENCE else None
        loss, metrics = module.loss(objective_cfg, policy, reference)
        if not kl:  # does the model itself give the chosen response the higher likelihood (whatever the reference)?
            metrics["logp_accuracy"] = (policy.chosen > policy.rejected).float().mean()
        return loss, {key: float(value) for key, value in metrics.items()}

    return loss_fn


def _inner(model):
    """The module under a DDP or DeepSpeed wrapper."""
    return model.module if hasattr(model, "module") and not hasattr(model, "peft_config") else model


def adapter_reference(model) -> Callable[[], ContextManager]:
    """The base model under a peft adapter: the adapter switched off (no second copy of the weights)."""
    return _inner(model).disable_adapter


@torch.no_grad()
def reference_table(model, examples: Iterable, n: int, collate: Callable[[list], dict], batch_size: int, world: int,
                    rank: int, device: torch.device, autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                    lockstep: bool = False) -> dict[str, torch.Tensor]:
    """The reference log-probabilities of the `n` `examples` under `model` as it is now (the frozen base, before
    step 1). `examples` may be a stream (the preprocessed data read in file order): it is read once.

    Each rank scores its share (every `world`-th example from `rank`) and the shares are gathered, so every rank holds
    the whole table, indexed like `examples`: {"sums": [n, k], "kl_sums": [n]} (k = 2 for pairs: chosen, rejected).
    `lockstep`: every rank runs the same number of forward passes (ZeRO-3 gathers each layer from all ranks).
    """
    was_training = model.training
    model.eval()
    first: list = []
    kl = width = None
    sums, kl_sums, passes = [], [], 0

    def score(batch_examples: list) -> tuple[SequenceLogps, int]:
        nonlocal kl, width
        batch = collate(batch_examples)
        kl = "kl_input_ids" in batch
        width = batch["input_ids"].shape[0] // len(batch_examples)  # rows per example: 2 for pairs, 1 for KTO
        with autocast():
            return batch_logps(model, {k: v.to(device) for k, v in batch.items()}, kl), len(batch_examples)

    def keep(out: SequenceLogps, count: int) -> None:
        sums.append(out.sums.float().cpu().reshape(width, count).T)  # pairs: [chosen; rejected] -> one row per example
        if kl:
            kl_sums.append(out.kl_sums.float().cpu())

    mine: list = []
    for i, example in enumerate(examples):
        if i == 0:
            first.append(example)
        if i % world == rank:
            mine.append(example)
            if len(mine) == batch_size:
                keep(*score(mine))
                passes, mine = passes + 1, []
    if mine:
        keep(*score(mine))
        passes += 1
    most = math.ceil(math.ceil(n / world) / batch_size) if lockstep else passes
    for _ in range(most - passes):
        score(first)  # a pass that only keeps ZeRO-3's ranks in step
    if width is None:  # nothing scored here (and no lockstep): the table's shape from the first example
        width = collate(first)["input_ids"].shape[0] if first else 1
        kl = bool(first) and "kl_input_ids" in collate(first)
    indices = list(range(rank, n, world))
    local = torch.cat(sums) if sums else torch.zeros(0, width)
    table = {"sums": _gather_rows(local, indices, n, world)}
    if kl:
        local_kl = torch.cat(kl_sums).unsqueeze(1) if kl_sums else torch.zeros(0, 1)
        table["kl_sums"] = _gather_rows(local_kl, indices, n, world)[:, 0]
    if was_training:
        model.train()
    return table


def _gather_rows(local: torch.Tensor, indices: list[int], n: int, world: int) -> torch.Tensor:
    """The full [n, k] table from every rank's rows at `indices`."""
    out = torch.zeros(n, local.shape[1], dtype=torch.float32)
    if world == 1:
        out[indices] = local
        return out
    parts = [None] * world
    torch.distributed.all_gather_object(parts, (indices, local))
    for idx, rows in parts:
        out[idx] = rows
    return out


class MetricMeter:
    """Running means of an objective's per-batch metrics between two reports (each key over the batches that had it)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.counts[key] = self.counts.get(key, 0) + 1

    def means(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": self.sums[k] / self.counts[k] for k in self.sums}

    def reset(self) -> None:
        self.sums, self.counts = {}, {}


@torch.no_grad()
def evaluate_objective(loss_fn: Callable, model, batches, device: torch.device, world: int,
                       autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> dict[str, float]:
    """The objective's loss and metrics over `batches` ((batch, counts) pairs: this rank's share of the eval set, as
    the worker's batch source yields them), weighted by examples, all ranks combined:
    {"eval_loss", "eval_preference_accuracy", "eval_reward_margin", ...}."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    for batch, counts in batches:
        with autocast():
            loss, metrics = loss_fn(model, batch)
        if not counts:
            continue  # a pass that only keeps ZeRO-3's ranks in step
        n = len(batch["kto_labels"]) if "kto_labels" in batch else len(batch["input_ids"]) // 2
        for key, value in {"loss": loss, **metrics}.items():
            totals[key] = totals.get(key, 0.0) + float(value) * n
            totals[f"{key}__n"] = totals.get(f"{key}__n", 0.0) + n
    keys = ["loss", *METRIC_KEYS]  # the same vector on every rank, whatever each one's batches reported
    vec = torch.tensor([totals.get(k, 0.0) for k in keys] + [totals.get(f"{k}__n", 0.0) for k in keys], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(vec)
    if was_training:
        model.train()
    n = len(keys)
    return {f"eval_{k}": (vec[i] / vec[n + i]).item() for i, k in enumerate(keys) if vec[n + i] > 0}
