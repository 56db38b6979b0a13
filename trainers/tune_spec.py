"""The `tune:` section of a job spec: the search `rayft tune` runs over LoRA-family runs.

The rest of the job spec is the base every trial starts from; each trial replaces the
searched values (method, rank, alpha, target modules, learning rate, dropout) and is
validated as an ordinary job spec again. A searched value is written as:

    r: 8                        # fixed
    r: [4, 8, 16]               # a choice (same as {choice: [4, 8, 16]})
    r: {range: [4, 64], log: true}   # a range (random / model-based searchers only)
    alpha: 2r                   # alpha as a ratio of the rank; also [1r, 2r] or {ratio: [1, 2]}
    target_modules: [qv, attn, all-linear, [q_proj, o_proj]]   # presets, or explicit lists

Rules that need the base model (rank ≤ hidden size) are in `problems_for_model`, run
before the search starts.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from storage.configs import raw_get
from trainers.methods import TUNABLE_METHODS
from trainers.task_metrics import PAIR_METRICS, Normalizer

#: Methods whose runs tune can vary (their traits say so): they all take r, alpha, dropout and target_modules.
TunableMethod = Literal[TUNABLE_METHODS]

#: Target-module presets (module names of the Llama family: Llama, Mistral, Qwen, Gemma...).
#: `default` is peft's per-architecture default; `all-linear` every linear layer but the head.
TARGET_PRESETS: dict[str, str | list[str]] = {
    "default": "default",
    "qv": ["q_proj", "v_proj"],
    "qkv": ["q_proj", "k_proj", "v_proj"],
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "all-linear": "all-linear",
}

SEARCHERS = ("grid", "random", "optuna", "hyperopt")
#: What `tune.metric` may rank trials by: eval loss, or a task metric scored on generated answers at each evaluation.
TUNE_METRICS = ("eval_loss", *PAIR_METRICS)
#: Searchers that come from another library, and the PyPI package each needs.
LIBRARY_SEARCHERS = {"optuna": "optuna", "hyperopt": "hyperopt"}
DEFAULT_SAMPLES = 8

T = TypeVar("T")
_RATIO = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)?\s*\*?\s*r\s*$", re.IGNORECASE)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _as_choice(value: Any) -> Any:
    """Shorthands: a scalar is a one-value choice, a list is a choice."""
    if isinstance(value, (int, float, str, bool)):
        return {"choice": [value]}
    if isinstance(value, list):
        return {"choice": value}
    return value


def _require_values(value: list | None) -> list | None:
    if value is not None and not value:
        raise PydanticCustomError("empty_choice", "an empty choice searches nothing; give at least one value")
    return value


class Dimension(_Strict, Generic[T]):
    """One searched number: a choice of values, or a range to sample from."""

    choice: list[T] | None = Field(None, description="Values to try; grid search tries each one.")
    range: tuple[T, T] | None = Field(None, description="[low, high], both included; sampled by random/optuna/hyperopt.")
    log: bool = Field(False, description="Sample the range on a log scale (e.g. learning rates, ranks).")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return _as_choice(value)

    @field_validator("choice")
    @classmethod
    def _not_empty(cls, value: list | None) -> list | None:
        return _require_values(value)

    @model_validator(mode="after")
    def _one_kind(self) -> "Dimension":
        if (self.choice is None) == (self.range is None):
            raise PydanticCustomError("dimension_kind", "give exactly one of `choice: [...]` or `range: [low, high]`")
        if self.range is not None:
            low, high = self.range
            if low > high:
                raise PydanticCustomError("range_order", "range is [low, high] with low ≤ high")
            if self.log and low <= 0:
                raise PydanticCustomError("log_range", "a log range needs low > 0")
        elif self.log:
            raise PydanticCustomError("log_choice", "`log` applies to a range only; remove it or give a range")
        return self

    @property
    def values(self) -> list:
        """Every value the dimension can take when it is a choice; the two ends when it is a range."""
        return list(self.choice) if self.choice is not None else list(self.range)


Rank = Annotated[int, Field(ge=1, le=4096)]
Ratio = Annotated[float, Field(gt=0, le=1024)]
Alpha = Annotated[float, Field(gt=0, le=1e6)]
LearningRate = Annotated[float, Field(gt=0, le=1)]
Dropout = Annotated[float, Field(ge=0, lt=1)]
Beta = Annotated[float, Field(gt=0, le=100)]


def _ratio_of(value: Any) -> float | None:
    """`2r` → 2.0, `r` → 1.0, `0.5*r` → 0.5; None for anything else."""
    if not isinstance(value, str):
        return None
    match = _RATIO.match(value)
    if not match:
        return None
    return float(match.group(1)) if match.group(1) else 1.0


class AlphaDimension(_Strict):
    """LoRA alpha: absolute values (`choice`/`range`), or `ratio` × r of the same trial."""

    choice: list[Alpha] | None = Field(None, description="Absolute alpha values to try.")
    range: tuple[Alpha, Alpha] | None = Field(None, description="Absolute alpha range [low, high].")
    log: bool = Field(False, description="Sample the absolute range on a log scale.")
    ratio: Dimension[Ratio] | None = Field(None, description="alpha = ratio × r, e.g. 2 for the common alpha = 2r.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        ratios = [_ratio_of(v) for v in items]
        if items and all(r is not None for r in ratios):
            return {"ratio": {"choice": ratios}}
        bad = next((v for v, r in zip(items, ratios) if isinstance(v, str) and r is None), None)
        if bad is not None:
            raise PydanticCustomError("alpha_form", "alpha is a number, or a ratio of r written like 2r; {bad} is neither", {"bad": repr(bad)})
        if any(r is not None for r in ratios):
            raise PydanticCustomError("alpha_mixed", "give alpha either as numbers or as ratios of r (2r), not both in one list")
        return _as_choice(value)

    @field_validator("choice")
    @classmethod
    def _not_empty(cls, value: list | None) -> list | None:
        return _require_values(value)

    @model_validator(mode="after")
    def _one_kind(self) -> "AlphaDimension":
        given = [k for k in ("choice", "range", "ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PydanticCustomError("alpha_kind", "give exactly one of `choice`, `range` or `ratio` (alpha = ratio × r)")
        if self.range is not None and self.range[0] > self.range[1]:
            raise PydanticCustomError("range_order", "range is [low, high] with low ≤ high")
        if self.log and self.range is None:
            raise PydanticCustomError("log_choice", "`log` applies to an absolute range only")
        return self


def _target_set(value: Any) -> str | list[str]:
    """A preset name, or an explicit non-empty list of module names."""
    if isinstance(value, str):
        if value not in TARGET_PRESETS:
            raise PydanticCustomError(
                "unknown_preset",
                "unknown target-module preset {value}; use one of {presets}, or an explicit list of module "
                "names such as [q_proj, o_proj]",
                {"value": repr(value), "presets": ", ".join(TARGET_PRESETS)},
            )
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) and v and "," not in v for v in value):
        return list(value)
    raise PydanticCustomError(
        "target_set", "a target set is a preset name ({presets}) or a non-empty list of module names",
        {"presets": ", ".join(TARGET_PRESETS)},
    )


class SearchSpace(_Strict):
    """What varies between trials. An unset dimension keeps the base spec's value."""

    method: list[TunableMethod] | None = Field(
        None, description="Methods to try (lora, qlora, dora, rslora); other fields of the base method block carry over when the name matches."
    )
    r: Dimension[Rank] | None = Field(None, description="LoRA rank.")
    alpha: AlphaDimension | None = Field(None, description="LoRA alpha: absolute, or a ratio of r such as `2r`.")
    target_modules: list[Any] | None = Field(
        None, description="Target-module sets to try: presets (default, qv, qkv, attn, mlp, all-linear) or lists of module names."
    )
    lr: Dimension[LearningRate] | None = Field(None, description="Peak learning rate (training.lr).")
    dropout: Dimension[Dropout] | None = Field(None, description="Dropout on the adapter input.")
    objective: list[Literal["sft", "dpo", "orpo", "simpo", "kto"]] | None = Field(
        None, description="Objectives to try (the base job's objective block carries over when the name matches). Trials of "
        "different objectives are ranked by eval preference accuracy."
    )
    beta: Dimension[Beta] | None = Field(None, description="The preference objective's beta (objective.beta).")

    @field_validator("method", "objective", mode="before")
    @classmethod
    def _method_shorthand(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("method", "target_modules", "objective")
    @classmethod
    def _choice_not_empty(cls, value: list | None) -> list | None:
        return _require_values(value)

    @field_validator("target_modules", mode="before")
    @classmethod
    def _target_shorthand(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("target_modules")
    @classmethod
    def _target_sets(cls, value: list | None) -> list | None:
        if value is None:
            return None
        problems = []
        sets = []
        for i, item in enumerate(value):
            try:
                sets.append(_target_set(item))
            except PydanticCustomError as exc:
                problems.append(f"[{i}] {exc}")
        if problems:
            raise PydanticCustomError("target_sets", "{problems}", {"problems": "; ".join(problems)})
        return sets

    def dimensions(self) -> list[str]:
        """Names of the dimensions that are set."""
        return [name for name in ("lr", "dropout", "method", "r", "alpha", "target_modules", "objective", "beta")
                if getattr(self, name) is not None]

    def ranking(self) -> tuple[str, str]:
        """(metric, mode) trials are ranked by: eval loss, unless they train different objectives, whose losses do not
        compare; then eval preference accuracy."""
        if self.objective is not None and len(set(self.objective)) > 1:
            return "eval_preference_accuracy", "max"
        return "eval_loss", "min"


class AshaSpec(_Strict):
    """Asynchronous successive halving: at each rung a trial continues only if its eval loss is in the best 1/reduction_factor."""

    grace_period: int | None = Field(
        None, ge=1, description="Steps every trial runs before it can be stopped; default: training.eval_every."
    )
    reduction_factor: float = Field(2.0, gt=1, le=16, description="Rungs are grace_period × factor^k steps; the best 1/factor go on.")


class TaskEvalSpec(_Strict):
    """How a task metric (`tune.metric: exact_match`) is measured at each evaluation of a trial: greedy answers to
    the first `rows` prompts of the eval split, compared with their completions."""

    rows: int = Field(32, ge=1, le=10000, description="Eval examples answered at each evaluation (the first ones of the eval split).")
    max_tokens: int = Field(32, ge=1, le=4096, description="Most tokens generated per answer (greedy; stops at EOS).")
    normalize: list[Normalizer] = Field(
        default_factory=lambda: ["strip"],
        description="Applied to answer and reference before comparing: strip, lower, punctuation, whitespace, articles.",
    )


class TaskEval(TaskEvalSpec):
    """A task metric and how to measure it: what the worker loop receives (`train_loop_config["task_eval"]`)."""

    metric: Literal[tuple(PAIR_METRICS)] = Field(description="The task metric scored at each evaluation, reported as eval_<metric>.")


class TuneSpec(_Strict):
    """A search over LoRA-family runs; trials are ranked by `metric` (default eval loss, lower is better)."""

    space: SearchSpace = Field(description="The searched dimensions.")
    searcher: Literal["grid", "random", "optuna", "hyperopt"] = Field(
        "grid",
        description="grid: every combination of the choices; random: num_samples draws; optuna/hyperopt: Ray Tune's "
        "model-based searchers (need the optuna / hyperopt package).",
    )
    num_samples: int | None = Field(
        None, ge=1, le=10000, description=f"Trials for random/optuna/hyperopt (default {DEFAULT_SAMPLES}); grid runs each combination once."
    )
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha stops weak trials early on eval loss; fifo runs every trial to the end.")
    asha: AshaSpec = Field(default_factory=AshaSpec, description="ASHA settings (scheduler: asha).")
    max_concurrent_trials: int | Literal["auto"] = Field(
        "auto", description="Trials running at once; auto: as many as the cluster's CPUs/GPUs fit at the job's resources."
    )
    max_failures: int = Field(
        1, ge=0, le=100, description="Retries of a failed trial (it resumes from its last checkpoint); after that it is recorded as errored and the search goes on."
    )
    seed: int = Field(0, ge=0, description="Seeds the random draws of the searcher.")
    metric: Literal[TUNE_METRICS] = Field(
        "eval_loss",
        description="What ranks trials (ASHA's cuts and the promoted winner): eval_loss, or a task metric (exact_match, "
        "contains) scored on greedy answers to held-out prompts at each evaluation (see task_eval); reported as eval_<metric>.",
    )
    mode: Literal["min", "max"] | None = Field(
        None, description="min or max; default the metric's own (eval_loss: min, exact_match/contains: max). A mode against "
        "the metric's direction is refused."
    )
    task_eval: TaskEvalSpec = Field(default_factory=TaskEvalSpec, description="How a task metric is measured (metric: exact_match/contains).")

    @field_validator("max_concurrent_trials")
    @classmethod
    def _positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise PydanticCustomError("concurrency", "must be ≥ 1, or auto")
        return value

    @property
    def task_metric(self) -> str | None:
        """The task metric trials compute at each evaluation, or None when they are ranked by a loss."""
        return None if self.metric == "eval_loss" else self.metric

    def task_eval_for_workers(self) -> "TaskEval | None":
        """What a trial's workers score at each evaluation, or None when trials are ranked by a loss."""
        if self.task_metric is None:
            return None
        return TaskEval(metric=self.task_metric, **self.task_eval.model_dump())

    def ranking(self) -> tuple[str, str]:
        """(reported metric, mode) Tune's scheduler and the promotion rank trials by."""
        if self.task_metric is not None:
            return f"eval_{self.task_metric}", "max"
        return self.space.ranking()


# ---------------------------------------------------------------------------
# Rules across the tune section and the rest of the spec (run on the raw mapping by
# trainers.spec.cross_field_problems, so they are reported with every other problem).


def tune_problems(raw: dict) -> list[str]:
    """Problems of a job's tune section against the rest of the job; [] when it has none (or does not parse)."""
    if raw_get(raw, "tune") is None:
        return []
    try:
        tune = TuneSpec.model_validate(raw["tune"])
    except ValidationError:
        return []  # its field errors are reported by the spec's own validation
    problems: list[str] = []
    method = raw_get(raw, "method", "name")
    if isinstance(method, str) and method not in TUNABLE_METHODS:
        problems.append(
            f"method.name: got {method!r}, tune searches rank/alpha/target modules of {', '.join(TUNABLE_METHODS)}; "
            "set the base method to one of them"
        )
    space = tune.space
    objective = raw_get(raw, "objective")
    base_objective = objective if isinstance(objective, str) else raw_get(raw, "objective", "name") or "sft"
    if space.beta is not None and "sft" in (space.objective or [base_objective]):
        problems.append("tune.space.beta: sft has no beta; set the job's objective (or tune.space.objective) to dpo, orpo, simpo or kto")
    if space.objective is not None and len(set(space.objective)) > 1 and "sft" in space.objective:
        problems.append("tune.space.objective: sft reports no preference accuracy to rank it against preference objectives; remove sft")
    if not space.dimensions():
        problems.append("tune.space: empty; give at least one of method, r, alpha, target_modules, lr, dropout")
    if tune.searcher == "grid":
        for name in space.dimensions():
            dim = getattr(space, name)
            ranged = getattr(dim, "range", None) is not None or (name == "alpha" and dim.ratio is not None and dim.ratio.range is not None)
            if ranged:
                problems.append(
                    f"tune.space.{name}: a range cannot be grid-searched; list values (e.g. [4, 8, 16]) or use searcher: random"
                )
        if tune.num_samples is not None and tune.num_samples != 1:
            problems.append(
                f"tune.num_samples: got {tune.num_samples}, grid search runs each combination once; "
                "remove num_samples, or use searcher: random/optuna/hyperopt"
            )
    data = raw_get(raw, "data") or {}
    if isinstance(data, dict) and not data.get("eval") and data.get("eval_fraction", 0.1) == 0:
        problems.append(f"data.eval_fraction: got 0, tune ranks trials by {tune.ranking()[0]}; set data.eval or an eval_fraction > 0")
    problems += _metric_problems(tune, base_objective, data if isinstance(data, dict) else {})
    max_steps = raw_get(raw, "training", "max_steps") or 100
    eval_every = raw_get(raw, "training", "eval_every") or 50
    if tune.scheduler == "asha" and isinstance(max_steps, int) and isinstance(eval_every, int):
        grace = tune.asha.grace_period or eval_every
        if eval_every * 2 > max_steps:
            problems.append(
                f"training.eval_every: got {eval_every}, ASHA compares trials at evaluations and needs at least two per trial "
                f"(max_steps {max_steps}); lower eval_every, or use tune.scheduler: fifo"
            )
        elif grace >= max_steps:
            problems.append(
                f"tune.asha.grace_period: got {grace}, must be < training.max_steps ({max_steps}) or ASHA can never stop a trial early"
            )
    return problems


def _metric_problems(tune: TuneSpec, base_objective: str, data: dict) -> list[str]:
    """tune.metric / tune.mode against each other and the job: a task metric needs prompts and their completions."""
    problems: list[str] = []
    metric, mode = tune.metric, tune.mode
    if metric == "eval_loss":
        ranked_by, direction = tune.space.ranking()
        if mode is not None and mode != direction:
            better = "lower" if direction == "min" else "higher"
            problems.append(f"tune.mode: got {mode!r}, {ranked_by} is better when {better}; use mode: {direction}, or leave mode unset")
        return problems
    if mode is not None and mode != "max":
        problems.append(f"tune.mode: got {mode!r}, {metric} is better when higher; use mode: max, or leave mode unset")
    objectives = tune.space.objective or [base_objective]
    if any(o != "sft" for o in objectives):
        problems.append(
            f"tune.metric: got {metric!r}, a task metric compares generated answers with completions, which the preference "
            f"objective(s) {', '.join(o for o in objectives if o != 'sft')} do not have; use metric: eval_loss, or objective: sft"
        )
    if data.get("format") == "text":
        problems.append(
            f"tune.metric: got {metric!r}, a task metric needs prompts and completions to compare, and data.format is text; "
            "use prompt/completion or messages rows, or metric: eval_loss"
        )
    if data.get("train_on_prompt"):
        problems.append(
            f"tune.metric: got {metric!r}, with data.train_on_prompt the eval examples do not say where the prompt ends; "
            "set train_on_prompt: false, or metric: eval_loss"
        )
    return problems


def problems_for_model(tune: TuneSpec, model_config: dict) -> list[str]:
    """Rules that need the base model's config: a rank cannot exceed the width of the layers it adapts."""
    hidden = model_config.get("hidden_size") or model_config.get("n_embd") or model_config.get("d_model")
    problems = []
    if tune.space.r is not None and isinstance(hidden, int):
        too_big = [r for r in tune.space.r.values if r > hidden]
        if too_big:
            problems.append(
                f"tune.space.r: got {max(too_big)}, above the model's hidden size ({hidden}); a LoRA rank beyond the layer "
                f"width adds parameters but no capacity: use ranks ≤ {hidden}"
            )
    return problems


def target_value(label: str) -> str | list[str]:
    """The method's `target_modules` for a target-set label (a preset name, or module names joined by commas)."""
    if label in TARGET_PRESETS:
        return TARGET_PRESETS[label]
    return label.split(",")


def target_label(target_set: str | list[str]) -> str:
    """The label a target set carries in a trial's config: the preset name, or module names joined by commas."""
    return target_set if isinstance(target_set, str) else ",".join(target_set)
