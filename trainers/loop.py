"""The training loop that runs inside each Ray Train worker: `train_func(config)`, for every strategy.

Ray Train owns process groups, placement and restarts. This loop owns the worker's preamble (seeds, model
fetch, tokenizer and pad id, batch source, resume) and the rhythm of a run: per optimizer step the
micro-batches' forward and backward, the optimizer step and the method's per-step hook; every `eval_every`
steps an eval; every `checkpoint_every` steps a checkpoint that makes a restart continue at the same step
and data position; a report to Ray Train at each. Three seams keep it one loop:
  - the strategy (`trainers.strategy`): how the model is held and stepped (single/DDP, or DeepSpeed ZeRO-3);
  - the batch source (`trainers.batches.worker_batches`): where the micro-batches and eval batches come from;
  - the objective (`trainers.objectives.objective_for`): the loss of a micro-batch, given the model.
"""

from __future__ import annotations

import os
import random
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from trainers.batches import Batches, examples_batches, worker_batches
from trainers.ingest.formats import IGNORE
from trainers.checkpoints import rng_state, set_rng_state
from trainers.methods import method_module
from trainers.objectives import objective_for
from trainers.objectives import runtime as objective_runtime
from trainers.precision import Precision, autocast
from trainers.progress import TAIL, ProgressWriter
from trainers.spec import JobSpec
from trainers.strategy import Strategy, Worker, prepare_process, strategy_for
from trainers.task_eval import task_scorer


def say(message: str) -> None:
    """One console line from a worker. Written to the real stdout: Ray Train's print patch
    would otherwise both log and tee it, and the driver would show every line twice."""
    print(message, file=sys.__stdout__, flush=True)
    TAIL.add(message)


#: Optimizer steps left out of `steady_tokens_per_s`: the first steps pay for lazy allocation and kernel set-up.
STEADY_AFTER_STEPS = 2


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class Progress:
    """Rank 0's console line: step, loss, tokens/s, ETA; and the steady-state throughput of the steps alone."""

    def __init__(self, total_steps: int, start_step: int, history: list[dict] | None = None):
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.tokens = 0
        # Tokens of the steps before a resume, as the checkpoint's history recorded them.
        self.tokens_before = int((history or [{}])[-1].get("trained_tokens") or 0)
        self.steady_tokens = 0
        self.steady_s = 0.0

    def add_step(self, step: int, tokens: int, seconds: float) -> None:
        """Count one optimizer step (its tokens, its own time: no eval, no checkpoint) once warm."""
        if step > self.start_step + STEADY_AFTER_STEPS:
            self.steady_tokens += tokens
            self.steady_s += seconds

    @property
    def trained_tokens(self) -> int:
        """Tokens (all ranks, padding excluded) of every optimizer step taken so far, resumes included."""
        return self.tokens_before + self.tokens

    def steady_tokens_per_s(self) -> float | None:
        return self.steady_tokens / self.steady_s if self.steady_s > 0 else None

    def eta_s(self, step: int) -> float:
        """Seconds left at the pace of the steps this process ran."""
        return (self.total - step) * (time.perf_counter() - self.t0) / max(step - self.start_step, 1)

    def line(self, step: int, loss: float, lr: float) -> str:
        elapsed = time.perf_counter() - self.t0
        eta = self.eta_s(step)
        tps = self.tokens / elapsed if elapsed > 0 else 0.0
        return (
            f"[rayft] step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
            f"tok/s {tps:,.0f} eta {int(eta) // 60}:{int(eta) % 60:02d}"
        )


def mean_loss(model, examples: list, batch_size: int, pad_id: int, device, precision: Precision) -> float:
    """Mean token loss of `model` on a list of examples, in one process (for tools and tests)."""
    return token_loss(model, examples_batches(examples, batch_size, pad_id, device), device, precision, world=1)


def token_loss(model, batches, device, precision: Precision, world: int) -> float:
    """Mean next-token loss over `batches` ((batch, counts) pairs; this rank's share), summed over the ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for b, counts in batches:
            with autocast(device, precision):
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            n_virtual = logits.shape[1] - b["input_ids"].shape[1]  # prefix tuning prepends none to logits, but be safe
            logits = logits[:, n_virtual:, :]
            shift_logits = logits[:, :-1, :].float()
            shift_labels = b["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=IGNORE, reduction="sum",
            )
            if counts:
                total += torch.tensor([loss.item(), (shift_labels != IGNORE).sum().item()], dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(total)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def probe_logits(model, input_ids: torch.Tensor, device, precision: Precision) -> dict[str, torch.Tensor]:
    """Logits of the final model on one fixed example, kept with the last checkpoint so anyone
    can check that the published artifact reproduces the model as it was at the end of training."""
    model.eval()
    with torch.no_grad(), autocast(device, precision):
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits.float().cpu()
    model.train()
    return {"input_ids": input_ids.cpu(), "logits": logits}


def maybe_inject_fault(faults: dict | None, step: int, rank: int) -> None:
    """Fault injection for the fault-tolerance tests (Python API only, never from a job file).

    `crash_at_step` exits the worker process (not an exception) once: a marker file makes
    the restarted worker carry on. `fail_at_step` raises on every attempt.
    """
    if not faults:
        return
    if faults.get("crash_at_step") == step and rank == faults.get("rank", 0):
        marker = Path(faults["marker"])
        if not marker.exists():
            marker.write_text(str(step))
            os._exit(1)
    if faults.get("fail_at_step") == step:
        raise RuntimeError(f"injected failure at step {step}")


def fetch_model_dir(spec: JobSpec, storage_uri: str | None, local_rank: int, world: int) -> str:
    """The base model as a local directory, fetched by one rank per node first so no two write the same cache files."""
    from storage.models import resolve_model_dir

    if world == 1:
        return resolve_model_dir(spec.model.source, storage_uri)
    if local_rank == 0:
        path = resolve_model_dir(spec.model.source, storage_uri)
    torch.distributed.barrier()
    if local_rank != 0:
        path = resolve_model_dir(spec.model.source, storage_uri)
    return path


def all_rng_states(world: int) -> list[dict]:
    """Every rank's RNG state (collective): a checkpoint holds them all so a restart replays dropout exactly."""
    mine = rng_state()
    if world == 1:
        return [mine]
    states = [None] * world
    torch.distributed.all_gather_object(states, mine)
    return states


def start_worker(config: dict) -> Worker:
    """The worker preamble shared by every strategy: who this worker is, its threads and its seeds."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device, world = ray.train.torch.get_device(), ctx.get_world_size()
    prepare_process(device, world)  # before anything imports deepspeed
    spec: JobSpec = config["spec"]  # validated by the driver; unpickled as it is
    worker = Worker(spec=spec, config=config, rank=ctx.get_world_rank(), world=world,
                    local_rank=ctx.get_local_rank(), device=device)
    torch.manual_seed(spec.training.seed)
    random.seed(spec.training.seed)
    np.random.seed(spec.training.seed)
    return worker


def train_func(config: dict) -> None:
    """Ray Train worker entry point. `config = {"spec": JobSpec, "storage_uri": str, "run_id": str, "faults": dict|None,
    "task_eval": TaskEval|None, "data": the preprocessed data (trainers.ingest.prepare.Prepared as JSON)}`; the train
    shard comes from Ray Train."""
    from transformers import AutoTokenizer

    w = start_worker(config)
    spec, tcfg, rank, world = w.spec, w.spec.training, w.rank, w.world
    strategy = strategy_for(w)
    strategy.start()
    model_dir = fetch_model_dir(spec, config.get("storage_uri"), w.local_rank, world)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = worker_batches(spec, config, world, rank, pad_id, w.device)
    strategy.build(model_dir)

    start_step, history, resumes = 0, [], []
    state = strategy.restore()
    # full fine-tuning with a reference objective: the base's log-probabilities, before step 1 (or as checkpointed)
    kept = objective_runtime.prepare_reference(
        spec, strategy.inner, batches, state, w.device, world, rank, lambda: autocast(w.device, strategy.precision),
        strategy.lockstep_eval)
    if state is not None:
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        start_step, history, resumes = state["step"], state["history"], state["resumes"] + [state["step"]]
        if rank == 0:
            say(f"[rayft] resumed from checkpoint at step {start_step}")
    if rank == 0:
        say(
            f"[rayft] {spec.method.name}{strategy.label}: trainable {strategy.trainable:,} / {strategy.total:,} params"
            f"{strategy.banner_extra()}, precision {strategy.precision.name}, workers {world}, "
            f"{batches.describe()}"
        )
    # tune.metric: exact_match — the trial's workers also answer held-out prompts at each evaluation
    scorer = task_scorer(config.get("task_eval"), tokenizer, batches, w.device, strategy.precision, world, rank,
                         strategy.lockstep_eval)
    run_steps(w, strategy, batches, start_step, history, resumes, kept, scorer)


def run_steps(w: Worker, strategy: Strategy, batches: Batches, start_step: int, history: list, resumes: list,
              kept: dict | None = None, scorer: Callable[[torch.nn.Module], dict[str, float]] | None = None) -> None:
    """Steps `start_step + 1 ..= max_steps` with their evals, checkpoints and reports. `scorer`: a task metric
    measured on the model at each evaluation, reported with the eval loss (trainers.task_eval)."""
    import ray.train

    spec, tcfg, rank, world = w.spec, w.spec.training, w.rank, w.world
    objective = objective_for(spec)
    after_step = method_module(spec.method.name).after_optimizer_step
    progress = Progress(tcfg.max_steps, start_step, history)
    record = ProgressWriter(w.config, tcfg.max_steps) if rank == 0 else None
    running_loss, running_n, eval_loss = 0.0, 0, None
    running_metrics: dict[str, float] = {}
    step_s: list[float] = []
    preference = objective_runtime.is_preference(spec)
    eval_metrics: dict[str, float] = {}

    def evaluate_now() -> float:
        """Eval loss; a preference objective also fills `eval_metrics` (preference accuracy, reward margin...), a task
        metric its eval_<metric>."""
        lockstep = strategy.lockstep_eval
        if not preference:
            loss = token_loss(strategy.model, batches.eval_batches(lockstep), w.device, strategy.precision, world)
            if scorer is not None:
                eval_metrics.update(scorer(strategy.inner))  # the unwrapped (peft) model: DDP's wrapper has no generate
                if rank == 0:
                    say("[rayft] " + " ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
            return loss
        eval_metrics.update(objective_runtime.evaluate(objective, strategy.model, batches.eval_batches(lockstep), w.device, world,
                                                       lambda: autocast(w.device, strategy.precision)))
        return eval_metrics["eval_loss"]

    if preference and start_step == 0 and batches.eval_size:  # where preference accuracy starts (rewards are 0)
        evaluate_now()
        history.append({"step": 0, "train_loss": None, **eval_metrics})
        if rank == 0:
            say(f"[rayft] before training: {objective_runtime.format_eval(eval_metrics)}")

    for step in range(start_step + 1, tcfg.max_steps + 1):
        maybe_inject_fault(w.config.get("faults"), step, rank)
        step_t0, step_tokens0 = time.perf_counter(), progress.tokens
        for micro in range(tcfg.grad_accum):
            batch = batches.train_batch(step, micro)
            with strategy.forward_context(last_micro=micro == tcfg.grad_accum - 1):
                loss, extra = objective(strategy.model, batch)
            strategy.backward(loss)
            running_loss += loss.item() / tcfg.grad_accum
            for key, value in extra.items():
                running_metrics[key] = running_metrics.get(key, 0.0) + value / tcfg.grad_accum
            progress.tokens += int(batch["attention_mask"].sum().item()) * world
        running_n += 1
        strategy.step()
        after_step(strategy.inner, step)  # the method's hook sees this step's gradients
        strategy.zero_grad()
        step_s.append(time.perf_counter() - step_t0)
        progress.add_step(step, progress.tokens - step_tokens0, step_s[-1])

        if rank == 0 and (step % tcfg.log_every == 0 or step == tcfg.max_steps):
            say(progress.line(step, running_loss / running_n, strategy.lr())
                + objective_runtime.progress_suffix(running_metrics, running_n))
            record.write(step, history, progress.eta_s(step), throttled=True)
        train_loss = running_loss / running_n
        do_eval = step % tcfg.eval_every == 0 or step == tcfg.max_steps
        do_ckpt = step % tcfg.checkpoint_every == 0 or step == tcfg.max_steps
        if not (do_eval or do_ckpt):
            continue
        extra_metrics, extra_state = strategy.report_extras()  # before eval: ZeRO-3 measures its shards between steps
        if do_eval and batches.eval_size:
            eval_loss = evaluate_now()
            if preference and rank == 0:
                say(f"[rayft] step {step} {objective_runtime.format_eval(eval_metrics)}")
        train_metrics = {f"train_{key}": value / running_n for key, value in running_metrics.items()}
        history.append({"step": step, "train_loss": train_loss, **train_metrics,
                        **({"eval_loss": eval_loss, **eval_metrics} if do_eval else {"eval_loss": None}),
                        "trained_tokens": progress.trained_tokens})
        if record is not None:
            record.write(step, history, progress.eta_s(step))
        metrics = {
            "step": step, "train_loss": train_loss, "eval_loss": eval_loss,
            "trainable_params": strategy.trainable, "total_params": strategy.total, "trained_tokens": progress.trained_tokens,
            "tokens_per_s": progress.tokens / max(time.perf_counter() - progress.t0, 1e-9),
            "steady_tokens_per_s": progress.steady_tokens_per_s(), "peak_rss_bytes": peak_rss_bytes(),
            "step_time_s": sum(step_s) / len(step_s),
            **train_metrics, **eval_metrics,
            **extra_metrics,
        }
        running_loss, running_n, running_metrics = 0.0, 0, {}
        if not do_ckpt:
            ray.train.report(metrics)
            continue
        final = step == tcfg.max_steps
        probe = probe_logits(strategy.model, batches.probe_input_ids(), w.device, strategy.precision) if final else None
        state = {"step": step, "history": history, "resumes": resumes, "data": batches.stats, **extra_state, **(kept or {}),
                 "rng": all_rng_states(world)}
        strategy.report_checkpoint(metrics, state, probe)
