"""Merge registered adapters into one adapter, or one model, with peft's `add_weighted_adapter`.

Train one adapter per task, then combine them so a single artifact serves every task with no
adapter switching. The combination itself is peft's (`LoraModel.add_weighted_adapter` for LoRA,
`IA3Model.add_weighted_adapter` for IA3); this module only picks the inputs, refuses the ones
peft cannot combine correctly, and publishes the result with its lineage.

Everything the caller asked for is checked before anything is stored, every problem found is
reported in one `MergeError`, and a refusal publishes nothing.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage.configs import validation_problems
from storage.errors import RayftError
from storage.models import copy_tokenizer_files, read_model_config, resolve_model_dir
from storage.registry import Manifest, Registry, base_config_digest
from storage.safety import parse_ref, validate_name
from trainers.methods import known_traits

#: peft types (an adapter_config.json's `peft_type`, lower-cased as `Source.family`) that merging tells apart.
#: These are peft's names for what an adapter directory holds, whatever trained it, not rayft method names.
PEFT_LORA, PEFT_IA3, PEFT_ADALORA = "lora", "ia3", "adalora"

#: peft 0.21's `LoraModel.add_weighted_adapter` combination types (its `combination_type` Literal).
CombinationType = Literal[
    "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear",
    "dare_ties_svd", "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd",
]
COMBINATION_TYPES: tuple[str, ...] = get_args(CombinationType)
#: peft combines A and B matrices element-wise for these, so every source needs the same rank.
EQUAL_RANK_TYPES = frozenset({"linear", "ties", "dare_ties", "dare_linear", "magnitude_prune"})
#: Types that prune each task update to `density` before combining.
DENSITY_TYPES = frozenset(t for t in COMBINATION_TYPES if t not in ("svd", "linear", "cat"))
#: Types that elect a sign per parameter (`majority_sign_method`).
SIGN_TYPES = frozenset({"ties", "ties_svd", "dare_ties", "dare_ties_svd"})
#: Types that re-factor the combined update with an SVD (`svd_rank`).
SVD_TYPES = frozenset(t for t in COMBINATION_TYPES if t.endswith("svd"))
#: Types that draw random masks: seeded so a merge is reproducible.
RANDOM_TYPES = frozenset(t for t in COMBINATION_TYPES if t.startswith("dare"))

# peft's `IA3Model.add_weighted_adapter` is a weighted sum of the scaling vectors: nothing else.
_IA3_TYPES = frozenset({"linear"})

# LoRA options whose effect `add_weighted_adapter` does not carry into the combined adapter:
# it rebuilds the result from the A/B matrices with scaling 1, so anything else is lost or wrong.
_UNMERGEABLE_LORA_OPTIONS: dict[str, str] = {
    "use_dora": "peft combines only the A·B matrices, so the learned DoRA magnitudes would be dropped",
    "use_rslora": "peft 0.21 keeps use_rslora on the merged adapter and so scales it sqrt(r) times too much (huggingface/peft#3761)",
    "lora_bias": "the trained LoRA bias is not combined (huggingface/peft#3761)",
    "modules_to_save": "fully trained modules (modules_to_save) are not combined",
    "target_parameters": "adapters on nn.Parameter targets are not supported by add_weighted_adapter",
    "kasa_config": "KaSA adapters are combined wrongly (huggingface/peft#3761)",
    "use_qalora": "QALoRA pooling is not combined",
    "use_bdlora": "block-diagonal LoRA is not combined",
    "velora_config": "VeLoRA adapters are not combined",
    "monteclora_config": "MonteCLoRA adapters are not combined",
    "arrow_config": "Arrow routing adapters are not combined",
    "alora_invocation_tokens": "activated LoRA (invocation tokens) is not combined",
    "layer_replication": "layer replication changes the base model",
    "trainable_token_indices": "trained token embeddings are not combined",
}
# Initialisations that rewrite the base weights: the adapter is only correct over that residual base.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class MergeError(RayftError):
    """A merge that cannot be done as asked; `problems` lists each reason, the message joins them."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"cannot merge: {'; '.join(problems)}")


class MergeOptions(BaseModel):
    """What to merge and how: the `rayft merge` options, validated once."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(
        min_length=2, description="Registered adapters to merge, NAME (latest version) or NAME@VERSION; at least two."
    )
    into: str = Field(description="Registry name of the result; it is published as that name's next version.")
    method: CombinationType = Field(
        "svd",
        description="peft combination type. svd: exact sum of the updates re-factored to rank svd_rank; "
        "linear/ties/dare_*/magnitude_prune: combine the A and B matrices (equal ranks); cat: stack them (rank = sum).",
    )
    weights: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(
        None, description="One weight per source (negative subtracts a task); default 1.0 each."
    )
    density: float | None = Field(
        None, gt=0, le=1, description="Share of each task update kept by ties/dare/magnitude_prune (required there, e.g. 0.5)."
    )
    majority_sign: Literal["total", "frequency"] | None = Field(
        None, description="How ties/dare_ties elect the sign of each parameter; default 'total'."
    )
    svd_rank: int | None = Field(None, ge=1, description="Rank of the result for the *svd types; default the largest source rank.")
    seed: int = Field(0, ge=0, description="Seed for the random masks of the dare types.")
    full: bool = Field(False, description="Publish base + merged adapter as one transformers model instead of an adapter.")


def option_problems(raw: Mapping[str, Any]) -> list[str]:
    """Rules that span several options, checked on the raw values so they join pydantic's errors."""
    problems: list[str] = []
    method = raw.get("method", "svd")
    sources = raw.get("sources") or []
    weights = raw.get("weights")
    if isinstance(sources, list):
        if len(sources) < 2:
            problems.append(f"sources: got {len(sources)} adapter(s) {sources!r}; a merge needs at least two")
        for i, ref in enumerate(sources):
            try:
                parse_ref(ref)
            except RayftError as exc:
                problems.append(f"sources[{i}]: {exc}")
        repeated = sorted({ref for ref in sources if isinstance(ref, str) and sources.count(ref) > 1})
        if repeated:
            problems.append(f"sources: {', '.join(repeated)} given more than once; each adapter may appear once (use its weight instead)")
        if isinstance(weights, list) and len(weights) != len(sources):
            problems.append(f"weights: got {len(weights)} weight(s) for {len(sources)} source(s); give one weight per source, in the same order")
    if isinstance(weights, list) and weights and all(isinstance(w, (int, float)) and w == 0 for w in weights):
        problems.append("weights: all zero, which merges nothing; give at least one non-zero weight")
    into = raw.get("into")
    if isinstance(into, str):
        try:
            validate_name(into)
        except RayftError as exc:
            problems.append(f"into: {exc}")
    if method in COMBINATION_TYPES:
        if method in DENSITY_TYPES and raw.get("density") is None:
            problems.append(f"density: required by method {method!r} (the share of each update kept, in (0, 1], e.g. 0.5)")
        if method not in DENSITY_TYPES and raw.get("density") is not None:
            problems.append(f"density: method {method!r} does not prune; drop density or use one of {sorted(DENSITY_TYPES)}")
        if method not in SIGN_TYPES and raw.get("majority_sign") is not None:
            problems.append(f"majority_sign: method {method!r} elects no sign; drop it or use one of {sorted(SIGN_TYPES)}")
        if method not in SVD_TYPES and raw.get("svd_rank") is not None:
            problems.append(f"svd_rank: method {method!r} does no SVD; drop it or use one of {sorted(SVD_TYPES)}")
    return problems


def parse_merge_options(raw: Mapping[str, Any]) -> MergeOptions:
    """Validate merge options; raise one MergeError listing every problem."""
    try:
        options = MergeOptions.model_validate(dict(raw))
        problems: list[str] = []
    except ValidationError as exc:
        options, problems = None, validation_problems(exc.errors())
    cross = option_problems(raw)
    # a cross-option rule explains its field better than pydantic's generic message
    covered = {p.split(":", 1)[0] for p in cross}
    problems = [p for p in problems if p.split(":", 1)[0] not in covered] + cross
    if problems:
        raise MergeError(problems)
    return options


# --------------------------------------------------------------------------- the sources


@dataclass(frozen=True)
class Source:
    """One adapter to merge: its manifest, its verified local directory and its peft config."""

    manifest: Manifest
    directory: Path
    config: dict[str, Any]

    @property
    def ref(self) -> str:
        return self.manifest.ref

    @property
    def family(self) -> str:
        """The peft type in lower case: lora, ia3, adalora, prefix_tuning, ..."""
        return str(self.config.get("peft_type", "unknown")).lower()

    @property
    def rank(self) -> int:
        """The largest rank of the adapter, as peft counts it when sizing the combined adapter."""
        pattern = self.config.get("rank_pattern") or {}
        return max([int(self.config["r"]), *map(int, pattern.values())])


def resolve_sources(registry: Registry, refs: list[str]) -> tuple[list[Manifest], list[str]]:
    """The manifest of each ref, and a problem line for each that is not published."""
    manifests, problems = [], []
    for ref in refs:
        try:
            manifests.append(registry.resolve(ref))
        except RayftError as exc:
            problems.append(f"source {ref}: {exc}")
    return manifests, problems


def manifest_problems(manifests: list[Manifest]) -> list[str]:
    """Sources that are not adapters, appear twice, or were trained on different bases."""
    problems = []
    for m in manifests:
        if m.kind != "adapter":
            problems.append(f"source {m.ref} is a {m.kind}, not an adapter; only adapters can be merged")
    refs = [m.ref for m in manifests]
    for ref in sorted({r for r in refs if refs.count(r) > 1}):
        problems.append(f"source {ref} is given more than once (e.g. as NAME and NAME@VERSION); each adapter may appear once")
    digests = {m.base_config_digest for m in manifests}
    if len(digests) > 1:
        by_base = "; ".join(f"{m.ref}: {m.base_model} (config {m.base_config_digest[:12]})" for m in manifests)
        problems.append(f"the sources were trained on different base models ({by_base}); adapters merge only over the same base")
    return problems


def load_source(registry: Registry, manifest: Manifest) -> Source:
    """Download (verified, cached) an adapter and read its peft config."""
    directory = registry.download(manifest.ref)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    return Source(manifest, directory, config)


def config_problems(sources: list[Source], options: MergeOptions) -> list[str]:
    """Adapters peft cannot combine, or cannot combine with the chosen method."""
    problems = []
    for s in sources:
        if not s.config:
            problems.append(f"source {s.ref} has no adapter_config.json; it is not a peft adapter")
        elif s.family == PEFT_ADALORA:
            problems.append(f"source {s.ref} is an AdaLoRA adapter: peft's AdaLoRA does not support add_weighted_adapter; train the tasks with lora to merge them")
        elif s.family not in (PEFT_LORA, PEFT_IA3):
            problems.append(f"source {s.ref} is a {s.family} adapter: peft merges only LoRA adapters (lora, qlora) or IA3 with IA3")
        elif s.family == PEFT_LORA:
            problems += lora_option_problems(s)
    families = {s.family for s in sources if s.family in (PEFT_LORA, PEFT_IA3)}
    if len(families) > 1:
        groups = "; ".join(f"{f}: {', '.join(s.ref for s in sources if s.family == f)}" for f in sorted(families))
        problems.append(f"cannot merge adapters of different types ({groups}); peft combines adapters of one type only")
    elif families == {PEFT_IA3} and options.method not in _IA3_TYPES:
        problems.append(f"method {options.method!r}: IA3 adapters merge only with method 'linear' (peft's IA3 merge is a weighted sum)")
    lora = [s for s in sources if s.family == PEFT_LORA and s.config]
    if families == {PEFT_LORA} and options.method in EQUAL_RANK_TYPES:
        ranks = {s.rank for s in lora}
        if len(ranks) > 1:
            listed = ", ".join(f"r={s.rank} ({s.ref})" for s in lora)
            problems.append(
                f"method {options.method!r} combines A and B matrices element-wise and needs equal ranks, got {listed}; "
                "use svd (result rank = --svd-rank or the largest) or cat (result rank = the sum)"
            )
        patterned = [s.ref for s in lora if s.config.get("rank_pattern")]
        if patterned:
            problems.append(f"method {options.method!r} needs one rank per adapter, but {', '.join(patterned)} set per-layer ranks (rank_pattern); use svd or cat")
    target_kinds = {isinstance(s.config.get("target_modules"), str) for s in sources if s.family in families and s.config}
    if len(target_kinds) > 1:
        listed = ", ".join(f"{s.ref}: {'regex' if isinstance(s.config.get('target_modules'), str) else 'list'}" for s in sources if s.config)
        problems.append(f"target_modules mix a regex and a list ({listed}); peft cannot combine them: retrain with the same form")
    task_types = {s.config.get("task_type") for s in sources if s.config}
    if len(task_types) > 1:
        problems.append(f"the sources have different task types ({', '.join(sorted(map(str, task_types)))}); merge adapters of one task type")
    return problems


def lora_option_problems(source: Source) -> list[str]:
    """LoRA options whose effect `add_weighted_adapter` would lose or get wrong."""
    problems = []
    for option, why in _UNMERGEABLE_LORA_OPTIONS.items():
        value = source.config.get(option)
        if value not in (None, False, {}, [], ""):
            problems.append(f"source {source.ref} sets {option}={_short(value)}, which cannot be merged: {why}")
    if source.config.get("bias", "none") != "none":
        problems.append(f"source {source.ref} trains biases (bias={source.config['bias']!r}), which add_weighted_adapter does not combine")
    init = source.config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        problems.append(f"source {source.ref} was initialised with {init!r}, which rewrites the base weights; convert it to a plain LoRA adapter first")
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_base(sources: list[Source], storage_uri: str) -> str:
    """The base model directory (or hub id) of the first source, after checking that every source's base
    model is still the one it was trained on (same config digest)."""
    problems, base_dirs = [], {}
    for s in sources:
        m = s.manifest
        if m.base_model in base_dirs:
            continue
        base_dirs[m.base_model] = resolve_model_dir(m.base_model, storage_uri)
        digest = base_config_digest(read_model_config(base_dirs[m.base_model]))
        if digest != m.base_config_digest:
            problems.append(
                f"base model {m.base_model!r} of {m.ref} now has config digest {digest[:12]}, but {m.ref} was trained on "
                f"{m.base_config_digest[:12]}: the base changed since training, so the adapter no longer fits it"
            )
    if problems:
        raise MergeError(problems)
    return base_dirs[sources[0].manifest.base_model]


# --------------------------------------------------------------------------- the merge

MERGED_ADAPTER = "default"  # peft saves the adapter named "default" at the top of the directory


def combine(sources: list[Source], options: MergeOptions, base_dir: str):
    """A PeftModel holding the sources and their combination, named MERGED_ADAPTER and active."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    names = [f"source{i}" for i in range(len(sources))]
    model = peft.PeftModel.from_pretrained(base, str(sources[0].directory), adapter_name=names[0])
    for name, source in zip(names[1:], sources[1:]):
        model.load_adapter(str(source.directory), adapter_name=name)
    weights = options.weights or [1.0] * len(sources)
    try:
        if sources[0].family == PEFT_IA3:
            model.add_weighted_adapter(names, weights, MERGED_ADAPTER)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(options.seed)
                model.add_weighted_adapter(
                    names, weights, MERGED_ADAPTER, combination_type=options.method, svd_rank=options.svd_rank,
                    density=options.density, majority_sign_method=options.majority_sign or "total",
                )
    except (ValueError, TypeError) as exc:  # peft's own refusals, e.g. overlapping modules_to_save
        raise MergeError([f"peft refused the merge: {exc}"]) from None
    model.set_adapter(MERGED_ADAPTER)
    return model.eval()


def write_adapter(model, out: Path) -> Path:
    """The combined adapter as a standard peft directory."""
    model.save_pretrained(out, selected_adapters=[MERGED_ADAPTER], safe_serialization=True)
    return out


def write_merged_model(model, base_dir: str, out: Path) -> Path:
    """Base + combined adapter as one plain transformers model (safetensors) with the base's tokenizer."""
    merged = model.merge_and_unload(adapter_names=[MERGED_ADAPTER])
    merged.save_pretrained(out, safe_serialization=True)
    copy_tokenizer_files(base_dir, out)
    return out


@dataclass
class MergeResult:
    manifest: Manifest  # what was published (kind adapter, or model with options.full)
    sources: list[Manifest]  # the merged adapters, in the order given
    rank: int | None  # rank of the combined adapter (None for IA3)
    wall_s: float


def merged_method(sources: list[Source]) -> str:
    """The manifest method of the result: the sources' shared method, else their peft type (lora / ia3)."""
    methods = {s.manifest.method for s in sources}
    if len(methods) == 1 and None not in methods:
        return methods.pop()
    return sources[0].family


def merge_record(sources: list[Source], options: MergeOptions) -> dict[str, Any]:
    """How the result was made, as the manifest's lineage records it."""
    import peft

    weights = options.weights or [1.0] * len(sources)
    return {
        "merged_from": [
            {"ref": s.ref, "name": s.manifest.name, "version": s.manifest.version, "method": s.manifest.method,
             "peft_type": s.family, "r": s.config.get("r"), "weight": w}
            for s, w in zip(sources, weights)
        ],
        "combination_type": "linear" if sources[0].family == PEFT_IA3 else options.method,
        "weights": weights,
        "density": options.density,
        "majority_sign_method": (options.majority_sign or "total") if options.method in SIGN_TYPES else None,
        "svd_rank": options.svd_rank,
        "seed": options.seed if options.method in RANDOM_TYPES else None,
        "peft_version": peft.__version__,
    }


def merge_adapters(options: MergeOptions, registry: Registry) -> MergeResult:
    """Combine the registered adapters as `options` says and publish the result as `options.into`.

    Every refusal (missing, duplicate or non-adapter sources, different bases, adapter types or
    options peft cannot combine, ranks the method cannot mix) is raised as one MergeError before
    anything is published.
    """
    t0 = time.perf_counter()
    manifests, problems = resolve_sources(registry, options.sources)
    problems += manifest_problems(manifests)
    sources = [load_source(registry, m) for m in manifests if m.kind == "adapter"]
    problems += config_problems(sources, options)
    if problems:
        raise MergeError(problems)
    base_dir = check_base(sources, registry.store.uri)
    if any(getattr(known_traits(s.manifest.method), "quantized_base", False) for s in sources) and options.full:
        print("[rayft] merging QLoRA adapters into the full-precision base (not the 4-bit one they were trained on)", flush=True)
    model = combine(sources, options, base_dir)
    lineage = merge_record(sources, options)
    params = merged_params(model.peft_config[MERGED_ADAPTER], sources[0].family, lineage)
    with tempfile.TemporaryDirectory(prefix="rayft-merge-") as work:
        if options.full:
            artifact, kind = write_merged_model(model, base_dir, Path(work) / "model"), "model"
        else:
            artifact, kind = write_adapter(model, Path(work) / "adapter"), "adapter"
        method = merged_method(sources)
        # The combined adapter is one of the sources' method (a model serves as a base of its own); a method rayft
        # does not know leaves the traits to storage.artifacts.artifact_traits' reading of adapter_config.json.
        method_traits = known_traits(method) if kind == "adapter" else None
        manifest = registry.publish(
            options.into, artifact, kind=kind, base_model=manifests[0].base_model,
            base_config_digest=manifests[0].base_config_digest, method=method,
            params=params, metrics={}, lineage=lineage,
            traits=method_traits.for_manifest() if method_traits is not None else None,
        )
    return MergeResult(manifest=manifest, sources=manifests, rank=params["r"], wall_s=time.perf_counter() - t0)


def merged_params(config, peft_type: str, lineage: dict[str, Any]) -> dict[str, Any]:
    """The manifest params of the result: the combined adapter's shape and how it was combined."""
    return {
        "peft_type": peft_type,
        "r": getattr(config, "r", None),  # LoRA: the combined rank (peft chooses it from the method)
        "lora_alpha": getattr(config, "lora_alpha", None),
        "target_modules": _plain(config.target_modules),
        **{key: lineage[key] for key in ("combination_type", "weights", "density")},
    }


def _plain(target_modules: Any) -> Any:
    """target_modules as JSON: peft keeps a set (sorted here) or a regex string."""
    if isinstance(target_modules, (set, frozenset, list, tuple)):
        return sorted(target_modules)
    return target_modules
