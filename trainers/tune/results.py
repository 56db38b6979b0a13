"""A search's records and result: the results table (CSV, JSON) and plot saved with the run, and loading them back."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from storage.runs import SEARCH_RESULTS_FILE, TUNE_ROOT, search_prefix, search_results_key
from storage.store import open_store


METRIC, MODE = "eval_loss", "min"
#: Where TuneReportCallback puts the storage path of a report's checkpoint.
CHECKPOINT_PATH = "checkpoint_path"

TUNE_DIR = TUNE_ROOT  # the searches' folder in storage (named by storage.runs)
#: Metrics the training loop reports that a promoted adapter's manifest records.
TRAIN_METRICS = ("step", "train_loss", "eval_loss", "trainable_params", "total_params", "tokens_per_s")


# ---------------------------------------------------------------------------
# Results


class TrialRecord(BaseModel):
    """One row of the results table: a trial's config as trained, how far it got, and its losses."""

    model_config = ConfigDict(extra="forbid")

    trial_id: str = Field(description="Ray Tune's trial id.")
    status: Literal["pending", "running", "completed", "stopped", "errored"] = Field(
        description="completed: ran every step; stopped: cut early by ASHA; errored: failed after its retries."
    )
    config: dict[str, JsonValue] = Field(description="The sampled values, as Tune passed them to the trial.")
    method: str = Field(description="Fine-tuning method of the trial.")
    r: int = Field(description="LoRA rank.")
    alpha: float = Field(description="LoRA alpha (absolute).")
    target_modules: str = Field(description="Target-module set: a preset name, or module names joined by commas.")
    lr: float = Field(description="Peak learning rate.")
    dropout: float = Field(description="Adapter dropout.")
    steps: int = Field(0, description="Last step the trial reported.")
    eval_loss: float | None = Field(None, description="Eval loss at the last reported step (what trials are ranked by).")
    objective: str = Field("sft", description="Training objective of the trial.")
    beta: float | None = Field(None, description="The preference objective's beta.")
    eval_preference_accuracy: float | None = Field(
        None, description="Eval preference accuracy at the last reported step (ranks trials of different objectives).")
    eval_exact_match: float | None = Field(
        None, description="Exact match of greedy answers at the last reported step (tune.metric: exact_match).")
    eval_contains: float | None = Field(
        None, description="Share of greedy answers containing their reference at the last reported step (tune.metric: contains).")
    best_eval_loss: float | None = Field(None, description="Lowest eval loss the trial reported.")
    train_loss: float | None = Field(None, description="Train loss at the last reported step.")
    trainable_params: int | None = Field(None, description="Trainable parameters of the adapter.")
    train_run_id: str = Field(description="The trial's Ray Train run (its checkpoints are under runs/<train_run_id>/).")
    checkpoint: str | None = Field(None, description="Storage path of the trial's last checkpoint.")
    error: str | None = Field(None, description="The error line of a trial that failed.")
    failures: int = Field(0, description="How many times the trial failed (each failure up to max_failures is retried).")
    eval_history: list[tuple[int, float]] = Field(default_factory=list, description="(step, eval loss) at every report.")


class SearchResult(BaseModel):
    """A finished search: every trial, the winner and where it was published."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(description="The search's run id (`rayft tune --resume RUN_ID`).")
    storage_uri: str = Field(description="Storage the search, its trials and the registry live in.")
    searcher: str = Field(description="grid, random, optuna or hyperopt.")
    scheduler: str = Field(description="asha or fifo.")
    max_steps: int = Field(description="Steps a trial runs when nothing stops it.")
    max_concurrent_trials: int = Field(description="Trials that ran at once.")
    wall_s: float = Field(description="Wall time of the search (the last session, when resumed), seconds.")
    trials: list[TrialRecord] = Field(description="Every trial, in trial-id order.")
    winner: str | None = Field(None, description="trial_id of the promoted trial.")
    published: list[str] = Field(default_factory=list, description="Registry refs (name@version) the winner was published as.")
    files: list[str] = Field(default_factory=list, description="Storage URIs of the results table and plot.")
    steps_run: int = Field(0, description="Optimizer steps run by the trials that did not error.")
    steps_saved: int = Field(0, description="Steps ASHA saved: for every trial it stopped, max_steps minus the steps it ran.")

    def trial(self, trial_id: str) -> TrialRecord:
        return next(t for t in self.trials if t.trial_id == trial_id)


# ---------------------------------------------------------------------------
# Results table and plot, saved with the run


RESULTS_JSON, RESULTS_CSV, RESULTS_PNG = SEARCH_RESULTS_FILE, "results.csv", "search.png"
CSV_COLUMNS = ("trial_id", "status", "method", "r", "alpha", "target_modules", "lr", "dropout", "steps",
               "eval_loss", "eval_exact_match", "eval_contains", "best_eval_loss", "train_loss", "trainable_params", "failures", "error", "train_run_id", "checkpoint")


def results_csv(result: SearchResult) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for trial in result.trials:
        writer.writerow({k: getattr(trial, k) for k in CSV_COLUMNS})
    return buf.getvalue()


def plot_search(result: SearchResult, out: Path) -> Path:
    """Left: eval loss by step for every trial (ASHA's cuts show as short curves). Right: final eval loss by rank, one series per target set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, by_rank) = plt.subplots(1, 2, figsize=(11, 4))
    for trial in result.trials:
        if trial.eval_history:
            steps, losses = zip(*trial.eval_history)
            style = "-" if trial.status == "completed" else "--"
            curves.plot(steps, losses, style, marker="o", ms=3, label=f"{trial.trial_id[-5:]} ({trial.status})")
    curves.set_xlabel("step")
    curves.set_ylabel("eval loss")
    curves.set_title("eval loss by trial")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7)
    sets = sorted({t.target_modules for t in result.trials})
    for target_set in sets:
        points = sorted((t.r, t.eval_loss) for t in result.trials if t.target_modules == target_set and t.eval_loss is not None)
        if points:
            by_rank.plot(*zip(*points), marker="s", linestyle="none", label=target_set)
    if result.winner:
        w = result.trial(result.winner)
        by_rank.plot([w.r], [w.eval_loss], marker="o", ms=15, markerfacecolor="none", markeredgecolor="black",
                     markeredgewidth=1.5, linestyle="none", label="winner")
    by_rank.set_xscale("log", base=2)
    by_rank.set_xlabel("rank r")
    by_rank.set_ylabel("last eval loss")
    by_rank.set_title("eval loss by rank and target set")
    by_rank.grid(alpha=0.3)
    by_rank.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def save_results(result: SearchResult) -> SearchResult:
    """Write results.csv and search.png, then results.json (last: its presence marks the search finished)."""
    store = open_store(result.storage_uri)
    prefix = search_prefix(result.run_id)
    with tempfile.TemporaryDirectory(prefix="rayft-tune-") as tmp:
        png = plot_search(result, Path(tmp) / RESULTS_PNG)
        store.put_file(png, f"{prefix}/{RESULTS_PNG}")
    store.put_bytes(results_csv(result).encode(), f"{prefix}/{RESULTS_CSV}")
    files = [store.uri_for(f"{prefix}/{name}") for name in (RESULTS_CSV, RESULTS_JSON, RESULTS_PNG)]
    result = result.model_copy(update={"files": files})
    store.put_bytes(result.model_dump_json(indent=1).encode(), f"{prefix}/{RESULTS_JSON}")
    return result


def load_search(run_id: str, storage_uri: str) -> SearchResult | None:
    """The saved result of a finished search, or None if it has not finished."""
    store = open_store(storage_uri)
    key = search_results_key(run_id)
    if not store.exists(key):
        return None
    return SearchResult.model_validate_json(store.get_bytes(key))
