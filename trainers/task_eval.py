"""A task metric measured inside the worker loop: greedy answers to held-out prompts, scored against their completions.

`rayft tune` with `tune.metric: exact_match` ranks trials by it, so each evaluation of a trial also
generates: the first `rows` eval examples are split where their loss mask starts (the prompt: the
tokens before the first trained token; the reference: the trained span that follows), the model
answers each prompt greedily with its own `generate` (transformers/peft: no serving engine in trainers/),
and `trainers.task_metrics` scores the decoded answer against the decoded reference. Each rank answers
its share; the sums are all-reduced, so every rank reports the same value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from storage.errors import RayftError
from trainers.ingest.formats import IGNORE
from trainers.precision import Precision, autocast
from trainers.task_metrics import PAIR_METRICS
from trainers.tune_spec import TaskEval


class TaskEvalError(RayftError):
    """The eval split has no example a task metric can be scored on."""


@dataclass(frozen=True)
class Prompt:
    """One held-out example split for generation: the prompt's ids and the reference text."""

    input_ids: list[int]
    reference: str


def split_prompts(examples: list, tokenizer, rows: int) -> list[Prompt]:
    """The first `rows` examples with a prompt and a trained span after it, as (prompt ids, reference text).

    Works for prompt/completion and chat rows alike, from the tokenized example itself: no second copy of
    the eval data and no format-specific code. Examples whose loss covers their first token (text rows,
    train_on_prompt) have no prompt to answer and are left out.
    """
    out: list[Prompt] = []
    for example in examples:
        labels = example.labels
        start = next((i for i, label in enumerate(labels) if label != IGNORE), None)
        if not start:  # None: nothing trained; 0: no prompt before the answer
            continue
        end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE), len(labels))
        reference = tokenizer.decode(labels[start:end], skip_special_tokens=True)
        out.append(Prompt(list(example.input_ids[:start]), reference))
        if len(out) == rows:
            break
    return out


def generate_answer(model, prompt: Prompt, task: TaskEval, tokenizer, device, precision: Precision, synced: bool) -> str:
    """The model's greedy answer to one prompt, decoded without special tokens. `synced`: ZeRO-3, every rank
    runs the same number of forward passes (transformers' synced_gpus)."""
    ids = torch.tensor([prompt.input_ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with autocast(device, precision):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=task.max_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, synced_gpus=synced)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def task_metric(model, prompts: list[Prompt], task: TaskEval, tokenizer, device, precision: Precision, world: int, rank: int,
                lockstep: bool = False) -> float:
    """Mean of `task.metric` over `prompts` (rank `rank` answers prompts[rank::world]; sums all-reduced)."""
    score = PAIR_METRICS[task.metric]
    mine = prompts[rank::world]
    if lockstep:  # every rank generates as often as the busiest one; the extra answers count nothing
        most = -(-len(prompts) // world)
        mine = mine + [None] * (most - len(mine))
    total = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for prompt in mine:
            answer = generate_answer(model, prompt or prompts[0], task, tokenizer, device, precision, lockstep)
            if prompt is not None:
                total += torch.tensor([score(answer, prompt.reference, task.normalize), 1.0], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(total)
    if was_training:
        model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def task_scorer(task: TaskEval | None, tokenizer, batches, device, precision: Precision, world: int, rank: int, lockstep: bool):
    """The loop's hook: `scorer(model) -> {"eval_<metric>": value}`, or None when no task metric is asked for."""
    if task is None:
        return None
    examples = batches.eval_examples()
    prompts = split_prompts(examples, tokenizer, task.rows)
    if not prompts:
        raise TaskEvalError(
            f"tune.metric: {task.metric} needs eval examples with a prompt and a completion; none of the {len(examples)} "
            "eval examples has a prompt before its trained tokens (text rows, or data.train_on_prompt); use "
            "prompt/completion or messages rows, or tune.metric: eval_loss"
        )
    key = f"eval_{task.metric}"
    return lambda model: {key: task_metric(model, prompts, task, tokenizer, device, precision, world, rank, lockstep)}
