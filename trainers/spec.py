"""The fine-tuning job spec: one YAML file in, one validated `JobSpec` out.

Validation happens once, here, at the edge. Every problem in a file is collected and
reported together, each as `field.path: got <value>, <what is allowed>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from storage.configs import ConfigError, raw_get, read_yaml, short as _short, validation_problems
from storage.errors import RayftError
from storage.safety import validate_name
from trainers.eval_spec import EvalSpec, eval_problems
from trainers.ingest.formats import formats_of
from trainers.methods import MethodConfig, known_traits, method_problems, traits
from trainers.objectives import OBJECTIVES, PREFERENCE_OBJECTIVES, ObjectiveConfig
from trainers.tune_spec import TuneSpec, tune_problems


class SpecError(ConfigError):
    """A job spec with one or more problems; `problems` lists each as one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    source: str = Field(
        description="Base model: a local transformers directory, an s3:// URI of one, a registry ref "
        "`registry:NAME[@VERSION]`, or a hub id (needs network).",
        min_length=1,
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the base weights are loaded in; auto follows training precision."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")


class DataSpec(_Strict):
    train: str = Field(
        min_length=1,
        description="Training data: a file, a directory, or a glob pattern, local or s3:// (read with the same S3 "
        "configuration as the rest of rayft). Files: .jsonl, .json, .parquet, .csv; or a Hugging Face datasets "
        "directory written by save_to_disk.",
    )
    eval: str | None = Field(None, description="Eval data, same kinds of source as `train`; if unset, `eval_fraction` of train is held out.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of train rows held out for eval when `eval` is unset (chosen by a seeded hash of each row's position).")
    max_eval_rows: int | None = Field(
        None, ge=1,
        description="Evaluate on at most this many eval examples (the first ones in data order). The held-out share of a "
        "large corpus is too long to evaluate every `training.eval_every` steps; the held-out rows past the cap are still "
        "not trained on (lower eval_fraction to train on them). Not part of preprocessing: changing it reuses the data.",
    )
    format: str = Field(
        "auto",
        description="Row shape: text {text}, prompt_completion {prompt, completion}, messages {messages: [{role, content, "
        "weight?}]} (OpenAI chat files), sharegpt {conversations: [{from, value}]}, alpaca {instruction, input?, output}; "
        "auto detects per file from its first rows and says what it found.",
    )
    columns: dict[str, str] | None = Field(
        None,
        description="Map the format's fields to your columns, e.g. {prompt: question, completion: answer}; "
        "a named column missing from the data is an error before training starts.",
    )
    max_seq_len: int = Field(256, ge=8, le=131072, description="Tokens per example; longer rows are truncated (and counted).")
    packing: bool = Field(False, description="Concatenate examples into full max_seq_len blocks.")
    train_on_prompt: bool = Field(False, description="Also compute loss on prompt/user tokens (default: completion only).")
    on_bad_row: Literal["error", "skip"] = Field("error", description="A malformed row stops the job (naming file and line), or is skipped and counted.")
    preprocess: Literal["before", "during"] = Field(
        "before",
        description="When a first run preprocesses the data. before: the whole pass, every row checked, before any worker "
        "starts. during: the workers start after the checks on each file's first rows and train on the data as the pass "
        "writes it (the first step comes as soon on 3M rows as on 20k); evaluation waits for the pass, and a bad row it "
        "finds later stops the run with its file and line (the checkpoints so far are kept). Needs training.max_steps; "
        "SFT objectives; `rayft tune` always preprocesses first. A rerun with the same setting reuses the finished pass.",
    )

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        # the preference formats are not named here: a preference objective reads its own rows (format auto)
        if value != "auto" and value not in formats_of("text"):
            raise ValueError(f"unknown format {value!r}; use auto or one of {', '.join(formats_of('text'))}")
        return value


class TrainingSpec(_Strict):
    max_steps: int = Field(100, ge=1, description="Optimizer steps to run (with `epochs`, computed from the preprocessed data before training).")
    epochs: float | None = Field(
        None, gt=0, le=10000,
        description="Passes over the training examples, instead of max_steps: the step count is computed from the "
        "preprocessed dataset before any worker starts (examples per worker // (micro_batch_size × grad_accum) × epochs).",
    )
    micro_batch_size: int = Field(4, ge=1, le=4096, description="Examples per worker per forward pass.")
    grad_accum: int = Field(1, ge=1, le=4096, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps before the schedule.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR schedule after warmup.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, else fp32. fp16 needs CUDA."
    )
    seed: int = Field(0, ge=0, description="Seeds model init of adapters, data order and dropout.")
    eval_every: int = Field(50, ge=1, description="Steps between evaluations (each also reports to Ray Train).")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints written to the run's storage.")
    keep_checkpoints: int = Field(2, ge=1, le=100, description="How many most recent checkpoints to keep.")
    log_every: int = Field(10, ge=1, description="Steps between progress lines on the console.")


class ResourcesSpec(_Strict):
    num_workers: int = Field(1, ge=1, le=4096, description="Ray Train workers (one per GPU).")
    use_gpu: bool | Literal["auto"] = Field("auto", description="Train on GPUs; auto = if the cluster has any.")
    cpus_per_worker: float | None = Field(
        None, gt=0,
        description="CPUs reserved per worker; Ray sets the worker's OMP_NUM_THREADS (torch's threads) to it. "
        "Unset: 1 per worker on GPUs; on CPU the most whole CPUs each worker can hold with all workers placed "
        "at once on the cluster's nodes (a single CPU worker gets the whole machine). `rayft tune` trials take 1.",
    )
    strategy: Literal["auto", "single", "ddp", "deepspeed_zero3"] = Field(
        "auto", description="auto: single for 1 worker, ddp for several (deepspeed_zero3 for full FT on several)."
    )
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts from the last checkpoint (-1 = unlimited).")


class DeepSpeedSpec(_Strict):
    """DeepSpeed ZeRO-3 settings (strategy deepspeed_zero3). rayft writes the DeepSpeed config from the whole
    job spec (trainers/deepspeed.py:deepspeed_config); this section adds what the rest of the spec cannot say."""

    offload_params: bool = Field(False, description="Keep ZeRO-3 parameter shards in CPU memory (pinned on GPUs); saves device memory, costs PCIe traffic every step.")
    offload_optimizer: bool = Field(
        False, description="Keep fp32 master weights and Adam states in CPU memory and step them with DeepSpeed's CPU Adam (a C++ op built on first use)."
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="More DeepSpeed config keys (https://www.deepspeed.ai/docs/config-json/), e.g. "
        "{zero_optimization: {stage3_max_live_parameters: 1e9}}. Unknown keys are rejected; a key rayft sets from the "
        "spec (batch sizes, optimizer, schedule, clipping, precision, ZeRO stage and offload) is an error naming the "
        "spec field to change instead.",
    )


#: DeepSpeed config keys rayft writes, each with what sets it. `deepspeed.extra` may not give them.
DEEPSPEED_OWNED_KEYS: dict[str, str] = {
    "train_batch_size": "from training.micro_batch_size × training.grad_accum × resources.num_workers; change those instead",
    "train_micro_batch_size_per_gpu": "from training.micro_batch_size; change that instead",
    "gradient_accumulation_steps": "from training.grad_accum; change that instead",
    "gradient_clipping": "from training.max_grad_norm; change that instead",
    "optimizer": "AdamW from training.lr and training.weight_decay; change those instead",
    "scheduler": "from training.schedule and training.warmup_steps; change those instead",
    "bf16": "from training.precision; change that instead",
    "bfloat16": "from training.precision; change that instead",
    "fp16": "from training.precision; change that instead",
    "amp": "from training.precision; change that instead",
    "torch_autocast": "from training.precision; change that instead",
}
#: Keys under `zero_optimization` rayft writes (DeepSpeedZeroConfig field names; aliases map onto them).
DEEPSPEED_OWNED_ZERO_KEYS: dict[str, str] = {
    "stage": "to 3 (strategy deepspeed_zero3); remove it",
    "offload_param": "from deepspeed.offload_params; change that instead",
    "offload_optimizer": "from deepspeed.offload_optimizer; change that instead",
    "gather_16bit_weights_on_model_save": "to true, so the final model can be gathered from the shards and published; remove it",
}

#: Every top-level key DeepSpeed 0.19's config reader looks up (deepspeed/runtime/config.py and the
#: sub-configs it builds). A key outside this set would be ignored by DeepSpeed without a word.
DEEPSPEED_KNOWN_KEYS = frozenset({
    *DEEPSPEED_OWNED_KEYS, "zero_optimization", "activation_checkpointing", "aio", "autotuning", "checkpoint",
    "comet", "comms_logger", "communication_data_type", "compile", "compression_training", "csv_monitor",
    "curriculum_learning", "data_efficiency", "data_types", "dataloader_drop_last", "datastates_ckpt",
    "disable_allgather", "disable_python_gc", "dump_state", "eigenvalue", "elasticity", "expert_parallel",
    "flops_profiler", "gradient_allreduce_op", "gradient_predivide_factor", "graph_harvesting", "hybrid_engine",
    "log_level", "managed_gradient_accumulation", "memory_breakdown", "nebula", "pipeline", "prescale_gradients",
    "progressive_layer_drop", "quantize_training", "seq_parallel_communication_data_type", "sequence_parallel_size",
    "sparse_attention", "sparse_gradients", "steps_per_print", "tensor_parallel", "tensorboard", "timers",
    "use_data_before_expert_parallelism", "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
})


def deepspeed_extra_problems(extra: Any) -> list[str]:
    """Every problem with `deepspeed.extra`: unknown keys, keys rayft owns, bad ZeRO values (checked by DeepSpeed's own model)."""
    import difflib

    if not isinstance(extra, dict) or not extra:
        return []
    problems = []
    for key in extra:
        if key in DEEPSPEED_OWNED_KEYS:
            problems.append(f"deepspeed.extra.{key}: set by rayft {DEEPSPEED_OWNED_KEYS[key]}")
        elif key not in DEEPSPEED_KNOWN_KEYS:
            near = difflib.get_close_matches(str(key), DEEPSPEED_KNOWN_KEYS, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            problems.append(f"deepspeed.extra.{key}: not a DeepSpeed config key; {hint}see https://www.deepspeed.ai/docs/config-json/")
    zero = extra.get("zero_optimization")
    if zero is not None:
        problems += _zero_extra_problems(zero)
    return problems


def _zero_extra_problems(zero: Any) -> list[str]:
    """`deepspeed.extra.zero_optimization` checked against DeepSpeed's own ZeRO config model (imported only here)."""
    import difflib

    if not isinstance(zero, dict):
        return [f"deepspeed.extra.zero_optimization: got {_short(zero)}, must be a mapping of ZeRO settings"]
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError as DeepSpeedValidationError

    fields = DeepSpeedZeroConfig.model_fields
    canonical = {name: {name} for name in fields} | {f.alias: {name} for name, f in fields.items() if f.alias}
    for name, f in fields.items():  # deprecated keys write their replacement (e.g. cpu_offload -> offload_optimizer)
        new = (f.json_schema_extra or {}).get("new_param") if isinstance(f.json_schema_extra, dict) else None
        if new:
            canonical[name] = {part.split(".")[0].strip() for part in new.split(" or ")}
    problems, free = [], {}
    for key, value in zero.items():
        where = f"deepspeed.extra.zero_optimization.{key}"
        owned = sorted(canonical.get(key, set()) & set(DEEPSPEED_OWNED_ZERO_KEYS))
        if owned:
            problems.append(f"{where}: set by rayft {DEEPSPEED_OWNED_ZERO_KEYS[owned[0]]}")
        elif key not in canonical:
            near = difflib.get_close_matches(str(key), canonical, n=1)
            problems.append(f"{where}: not a DeepSpeed ZeRO setting" + (f"; did you mean {near[0]!r}?" if near else ""))
        else:
            free[key] = value
    if free:
        try:
            DeepSpeedZeroConfig(stage=3, **free)
        except DeepSpeedValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                problems.append(f"deepspeed.extra.zero_optimization.{loc}: got {_short(err.get('input'))}, {err['msg'][0].lower()}{err['msg'][1:]}")
    return problems


class OutputSpec(_Strict):
    name: str = Field(description="Registry name the result is published under (a new version each run).")
    merge: bool = Field(False, description="Also publish the merged full model as `<name>-merged`.")
    require: dict[str, str] = Field(
        default_factory=dict,
        description='Gates on eval metrics, e.g. {exact_match: ">= 0.8"}: publish only if every one holds (needs an eval: '
        "section); otherwise the run fails with the figure and the threshold, and the adapter stays under runs/.",
    )


class StorageSpec(_Strict):
    uri: str | None = Field(
        None, description="Where runs and the registry live: s3://bucket/prefix or a local path. Default: $RAYFT_STORAGE or ~/.rayft/storage."
    )


class JobSpec(_Strict):
    """A fine-tuning job. Sections follow the flow: what to train, on what, how, where."""

    model: ModelSpec
    data: DataSpec
    method: MethodConfig = Field(description="Fine-tuning method and its parameters, chosen by `name`.")
    objective: ObjectiveConfig = Field(
        default_factory=lambda: OBJECTIVES["sft"].Config(),
        description="What the loss is, chosen by `name` (trainers/objectives/): sft (next-token, the default), dpo, orpo, "
        "simpo (pairs {prompt, chosen, rejected}) or kto ({prompt, completion, label}); `objective: dpo` is short for "
        "`{name: dpo}`. Any objective works with any method and strategy.",
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    output: OutputSpec
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tune: TuneSpec | None = Field(None, description="The search `rayft tune` runs over this job (trainers/tune_spec.py); ignored by `rayft train`.")
    eval: EvalSpec | None = Field(
        None, description="Score generations after training (trainers/eval_spec.py); results go into the published manifest and the run's folder."
    )

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "JobSpec":
        problems = cross_field_problems(self.model_dump(exclude_unset=True))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def resolved_strategy(self) -> str:
        """The strategy `auto` stands for, given method and worker count."""
        s = self.resources.strategy
        if s != "auto":
            return s
        return auto_strategy(self.method.name, self.resources.num_workers)


def auto_strategy(method: str, workers: int) -> str:
    """What strategy `auto` stands for: single on one worker, else the method's own choice (its traits).
    The planner resolves `auto` through this too."""
    return "single" if workers == 1 else traits(method).many_workers_strategy


# ---------------------------------------------------------------------------
# Cross-field rules. They run on the raw mapping too, so a file with both a field
# error and a cross-field error reports both at once.


def strategy_problems(raw: dict) -> list[str]:
    """The rules between method, strategy and worker count (the planner checks its requests with them too)."""
    problems = method_problems(raw)
    strategy = raw_get(raw, "resources", "strategy")
    workers = raw_get(raw, "resources", "num_workers")
    if strategy == "single" and isinstance(workers, int) and workers > 1:
        problems.append(
            f"resources.num_workers: got {workers}, strategy 'single' runs one worker; "
            "set num_workers: 1 or strategy: ddp / deepspeed_zero3"
        )
    return problems


def cross_field_problems(raw: dict) -> list[str]:
    problems: list[str] = []
    method = raw_get(raw, "method", "name")
    strategy = raw_get(raw, "resources", "strategy")
    problems += strategy_problems(raw)
    if raw_get(raw, "data", "eval") and raw_get(raw, "data", "eval_fraction") not in (None, 0, 0.0):
        if "eval_fraction" in (raw_get(raw, "data") or {}):
            problems.append("data.eval_fraction: set together with data.eval; give one of them (a file or a fraction)")
    if raw_get(raw, "data", "max_eval_rows") is not None and not raw_get(raw, "data", "eval") \
            and raw_get(raw, "data", "eval_fraction") in (0, 0.0):
        problems.append("data.max_eval_rows: set, but nothing is evaluated (data.eval unset and data.eval_fraction 0); "
                        "remove it, or give data.eval or an eval_fraction")
    max_steps = raw_get(raw, "training", "max_steps")
    if raw_get(raw, "data", "preprocess") == "during":
        if raw_get(raw, "training", "epochs") is not None:
            problems.append("data.preprocess: got 'during', but training.epochs needs the dataset's size before training "
                            "starts; give training.max_steps, or set data.preprocess: before")
        objective = raw_get(raw, "objective")
        name = objective if isinstance(objective, str) else raw_get(raw, "objective", "name")
        if name in PREFERENCE_OBJECTIVES:
            problems.append(f"data.preprocess: got 'during', which streams SFT rows; objective {name} reads preference "
                            "rows, preprocessed before training: set data.preprocess: before")
    if raw_get(raw, "training", "epochs") is not None and max_steps is not None:
        problems.append("training.epochs: set together with training.max_steps; give one of them")
    warmup = raw_get(raw, "training", "warmup_steps")
    if isinstance(max_steps, int) and isinstance(warmup, int) and warmup >= max_steps > 0:
        problems.append(f"training.warmup_steps: got {warmup}, must be < training.max_steps ({max_steps})")
    precision = raw_get(raw, "training", "precision")
    if precision == "fp16" and raw_get(raw, "resources", "use_gpu") is False:
        problems.append("training.precision: got 'fp16', which needs CUDA but resources.use_gpu is false; use bf16 or fp32 on CPU")
    name = raw_get(raw, "output", "name")
    if isinstance(name, str):
        try:
            validate_name(name)
        except RayftError as exc:
            problems.append(f"output.name: {exc}")
    ds_extra = raw_get(raw, "deepspeed", "extra")
    auto_zero3 = strategy in (None, "auto") and getattr(known_traits(method), "many_workers_strategy", None) == "deepspeed_zero3"
    if ds_extra and strategy != "deepspeed_zero3" and not auto_zero3:
        problems.append("deepspeed.extra: set, but the job does not use strategy deepspeed_zero3; remove it or set the strategy")
    problems += deepspeed_extra_problems(ds_extra)
    problems += objective_problems(raw)
    problems += tune_problems(raw)
    problems += eval_problems(raw)
    return problems


def objective_problems(raw: dict) -> list[str]:
    """Data options that mean nothing for a preference objective (its rows are pairs or labelled completions)."""
    objective = raw_get(raw, "objective")
    name = objective if isinstance(objective, str) else raw_get(raw, "objective", "name")
    if name not in PREFERENCE_OBJECTIVES:
        return []
    rows = "{prompt, completion, label}" if name == "kto" else "{prompt, chosen, rejected}"
    problems = []
    if raw_get(raw, "data", "format") not in (None, "auto"):
        problems.append(f"data.format: got {raw_get(raw, 'data', 'format')!r}, objective {name} reads {rows} rows; remove data.format")
    if raw_get(raw, "data", "packing"):
        problems.append(f"data.packing: objective {name} compares whole responses, which packing would mix; remove data.packing")
    if raw_get(raw, "data", "train_on_prompt"):
        problems.append(f"data.train_on_prompt: objective {name} scores the responses only; remove data.train_on_prompt")
    return problems


def format_errors(exc: ValidationError) -> list[str]:
    """pydantic's errors as problem lines, less the cross-field rules (gathered from the raw mapping)."""
    errors = [e for e in exc.errors() if not (e["type"] == "value_error" and e["loc"] == ())]
    return validation_problems(errors, "check the spelling against the docs of trainers/spec.py")


def parse_job_spec(raw: Any, source: str = "<spec>") -> JobSpec:
    """Validate a mapping as a JobSpec; raise one SpecError listing every problem."""
    if not isinstance(raw, dict):
        raise SpecError(source, [f"<top level>: got {_short(raw)}, must be a mapping with model, data, method, output"])
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        cross = cross_field_problems(raw)
        # a cross-field rule explains its field better than pydantic's generic message
        covered = {p.split(":", 1)[0] for p in cross}
        problems = [p for p in format_errors(exc) if p.split(":", 1)[0] not in covered] + cross
        raise SpecError(source, problems) from None


def load_job_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read and validate a job YAML file. `overrides` (dotted field path → value, e.g. command-line flags such as
    `{"storage.uri": ...}`) are set in the file's mapping first, so they are validated with everything else."""
    raw = read_yaml(path, SpecError, "a job YAML file")
    for dotted, value in (overrides or {}).items():
        if isinstance(raw, dict):
            *parents, leaf = dotted.split(".")
            node = raw
            for key in parents:
                node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else {}
            node[leaf] = value
    return parse_job_spec(raw, str(path))
