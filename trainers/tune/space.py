"""The search space as Ray Tune domains, and a trial's job spec from its sampled config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray import tune

from storage.runs import trial_run_id
from trainers.methods import LORA_FIELDS
from trainers.spec import JobSpec, parse_job_spec
from trainers.tune_spec import Dimension, TuneSpec, target_label, target_value


# ---------------------------------------------------------------------------
# The search space as Ray Tune domains, and a trial's job spec from its config.


def _domain(dim: Dimension, grid: bool, integer: bool):
    if dim.choice is not None:
        if len(dim.choice) == 1:
            return dim.choice[0]
        return tune.grid_search(list(dim.choice)) if grid else tune.choice(list(dim.choice))
    low, high = dim.range
    if integer:  # Tune's integer upper bounds are exclusive; ours are inclusive
        return tune.lograndint(low, high + 1) if dim.log else tune.randint(low, high + 1)
    return tune.loguniform(low, high) if dim.log else tune.uniform(low, high)


def _categorical(values: list, grid: bool):
    if len(values) == 1:
        return values[0]
    return tune.grid_search(list(values)) if grid else tune.choice(list(values))


def param_space(tune_spec: TuneSpec) -> dict[str, Any]:
    """Tune's param_space: a grid_search / sampling domain per searched dimension, a constant for a single value."""
    space, grid = tune_spec.space, tune_spec.searcher == "grid"
    out: dict[str, Any] = {}
    for name in space.dimensions():
        dim = getattr(space, name)
        if name in ("method", "objective"):
            out[name] = _categorical(dim, grid)
        elif name == "target_modules":
            out["target_modules"] = _categorical([target_label(t) for t in dim], grid)
        elif name == "alpha":
            if dim.ratio is not None:
                out["alpha_ratio"] = _domain(dim.ratio, grid, integer=False)
            else:
                out["alpha"] = _domain(Dimension[float](choice=dim.choice, range=dim.range, log=dim.log), grid, integer=False)
        else:
            out[name] = _domain(dim, grid, integer=name == "r")
    return out


def grid_size(tune_spec: TuneSpec) -> int | None:
    """Number of trials of a grid search; None for the sampling searchers (that is num_samples)."""
    if tune_spec.searcher != "grid":
        return None
    size = 1
    for value in param_space(tune_spec).values():
        if isinstance(value, dict) and "grid_search" in value:
            size *= len(value["grid_search"])
    return size


def trial_spec(base: JobSpec, config: dict[str, Any], source: str = "<trial>") -> JobSpec:
    """The base job with a trial's sampled values put in, validated like any job spec.

    Trials checkpoint at every evaluation, so the adapter of any trial (stopped early or not)
    is the one its last reported eval loss measured; they log only their last step, the
    search's table shows progress.
    """
    raw = base.model_dump(mode="json")
    method = raw["method"]
    name = config.get("method", method["name"])
    if name != method["name"]:
        method = {k: method[k] for k in LORA_FIELDS if k in method}  # what the LoRA-family methods share
    method["name"] = name
    if "r" in config:
        method["r"] = int(config["r"])
    if "alpha" in config:
        method["alpha"] = float(config["alpha"])
    if "alpha_ratio" in config:
        method["alpha"] = float(config["alpha_ratio"]) * method["r"]
    if "dropout" in config:
        method["dropout"] = float(config["dropout"])
    if "target_modules" in config:
        method["target_modules"] = target_value(config["target_modules"])
    training = raw["training"]
    if "lr" in config:
        training["lr"] = float(config["lr"])
    objective = raw["objective"]
    if config.get("objective", objective["name"]) != objective["name"]:
        objective = {"name": config["objective"]}
    if "beta" in config:
        objective["beta"] = float(config["beta"])
    training["checkpoint_every"] = training["eval_every"]
    training["log_every"] = training["max_steps"]
    raw.update(method=method, training=training, objective=objective, tune=None)
    return parse_job_spec(raw, source)


@dataclass(frozen=True)
class SearchContext:
    """What every trial needs besides its sampled config (handed to trials by `tune.with_parameters`)."""

    spec: JobSpec  # the base job, with absolute local paths
    run_id: str
    storage_uri: str
    #: The base model as the search's driver resolved it, once: trials plan with it, the winner publishes with it.
    model_dir: str | None = None
    #: The preprocessed data every trial streams (trainers.ingest.prepare.Prepared as JSON): prepared once by the driver.
    data: dict | None = None


def train_run_id(run_id: str, trial_id: str) -> str:
    return trial_run_id(run_id, trial_id)
