"""`evaluate(refs, spec)`: generate for every row with every ref, score, compare.

Refs are registry names (`name`, `name@3`, `registry:name`: adapters, merged or base models)
or local directories (a peft adapter directory, or a transformers model directory). They are
grouped by base model so that every registry LoRA adapter of one base, and that base itself,
share one model actor pool (evaluation/generate.py); the first ref is the baseline every other
ref's paired difference is measured against.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.actors import run_group
from evaluation.data import EvalRow, load_rows
from evaluation.generate import CHOICES, GENERATE, REFERENCE, ModelGroup, Progress, adapter_files
from evaluation.metrics import Output, RowStats, Summary, paired_difference, row_stats, summarize
from serve.adapters import vllm_unsupported
from storage.artifacts import artifact_traits
from storage.errors import NotFound, RayftError
from storage.registry import ArtifactTraits, Registry, open_registry
from trainers.eval_spec import EvalSpec, MetricSpec

#: Metrics that read a generated answer (the others only need log-likelihoods).
_SCORING_ONLY = {"choice_accuracy", "perplexity"}


class EvalError(RayftError):
    """A ref that cannot be evaluated (unknown name, not a model or adapter, prompt-learning adapter)."""


@dataclass
class Target:
    """One ref, resolved: what to load and where its answers go."""

    label: str
    base_source: str
    adapter: Any = None  # registry ref (pool), {relpath: bytes} (peft), or None for a model
    mode: str = "pool"
    config: dict[str, Any] | None = None  # a registry adapter's adapter_config.json (a peft one's is in its files)
    traits: ArtifactTraits | None = None  # an adapter's, when known (a manifest's); else read off its adapter_config.json


@dataclass
class EvalReport:
    """Every ref's metrics on the same rows, and each ref's paired difference to the first."""

    labels: list[str]
    metrics: list[MetricSpec]
    rows: list[EvalRow]
    outputs: dict[str, list[Output]]
    summaries: dict[str, dict[str, Summary]]
    differences: dict[str, dict[str, Summary]]  # label → metric → (label − labels[0])
    wall_s: float = 0.0
    data: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    #: seconds from the start of generation to the first and the last result (the first includes actor start-up)
    timings: dict[str, Any] = field(default_factory=dict)

    def values(self, label: str) -> dict[str, float]:
        """metric key → value of one ref (what gates compare)."""
        return {key: s.value for key, s in self.summaries[label].items()}

    def to_json(self, label: str | None = None) -> dict[str, Any]:
        """JSON-ready results: of one ref (for its manifest), or of all."""
        def one(lab: str) -> dict[str, Any]:
            out: dict[str, Any] = {k: s.as_dict() for k, s in self.summaries[lab].items()}
            if lab in self.differences:
                out["vs"] = {"baseline": self.labels[0], **{k: s.as_dict() for k, s in self.differences[lab].items()}}
            return out

        head = {"data": self.data, "rows": len(self.rows), "settings": self.settings}
        if label is not None:
            return {**head, "metrics": one(label)}
        return {**head, "refs": {lab: one(lab) for lab in self.labels}, "wall_s": round(self.wall_s, 2)}

    def table(self) -> str:
        """Metrics × refs, value [95% interval]; then each ref's difference to the first."""
        header = ["metric"] + self.labels + [f"Δ {lab} − {self.labels[0]}" for lab in self.labels[1:]]
        body = []
        for m in self.metrics:
            arrow = "↑" if m.higher_is_better else "↓"
            line = [f"{m.key} {arrow}"] + [_cell(self.summaries[lab][m.key]) for lab in self.labels]
            line += [_cell(self.differences[lab][m.key], signed=True) for lab in self.labels[1:]]
            body.append(line)
        widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + body]
        lines.append(f"{len(self.rows)} rows of {self.data}; 95% intervals by bootstrap over rows"
                     + ("; Δ: paired, an interval excluding 0 is a real difference" if len(self.labels) > 1 else ""))
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """One panel per metric: a bar per ref with its 95% interval."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.metrics)
        fig, axes = plt.subplots(1, n, figsize=(max(3.2 * n, 4), 3.4), squeeze=False)
        for ax, m in zip(axes[0], self.metrics):
            summaries = [self.summaries[lab][m.key] for lab in self.labels]
            values = [s.value for s in summaries]
            errors = [[max(0.0, s.value - s.low) if s.low is not None else 0 for s in summaries],
                      [max(0.0, s.high - s.value) if s.high is not None else 0 for s in summaries]]
            ax.bar(range(len(values)), values, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(values))])
            ax.set_xticks(range(len(values)), [lab if len(lab) <= 18 else lab[:17] + "…" for lab in self.labels], rotation=20, ha="right")
            ax.set_title(f"{m.key} ({'higher' if m.higher_is_better else 'lower'} is better)", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(f"{len(self.rows)} rows, 95% bootstrap intervals", fontsize=9)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def answers_jsonl(self) -> str:
        """Every row with each ref's answer, one JSON object a line (to read what the numbers mean)."""
        lines = []
        for i, row in enumerate(self.rows):
            record = {"row": row.index + 1, "reference": row.reference}
            record |= {lab: self.outputs[lab][i].answer for lab in self.labels}
            lines.append(json.dumps(record, ensure_ascii=False))
        return "\n".join(lines) + "\n"


def _cell(s: Summary, signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    text = fmt.format(s.value)
    if s.low is not None:
        text += f" [{fmt.format(s.low)}, {fmt.format(s.high)}]"
    return text


# --------------------------------------------------------------------------- refs


def _registry_base(source: str, registry: Registry) -> str:
    """A registry base source with its version made explicit, so adapters and the base group together."""
    if source.startswith("registry:"):
        try:
            return "registry:" + registry.resolve(source.removeprefix("registry:")).ref
        except NotFound:
            return source
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def resolve_target(ref: str, registry: Registry, base: str | None = None) -> Target:
    """What `ref` is and which base it runs on; EvalError with the fix when it is neither model nor adapter."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            config = json.loads((path / "adapter_config.json").read_text())
            traits = _evaluable(ref, artifact_traits(None, config), config)
            source = base or config.get("base_model_name_or_path")
            if not source:
                raise EvalError(f"{ref}: the adapter names no base model; pass --base MODEL")
            return Target(str(path), _registry_base(source, registry), adapter_files(path), mode="peft", traits=traits)
        if (path / "config.json").is_file():
            return Target(str(path), str(path.resolve()))
        raise EvalError(f"{ref}: a local directory must be a peft adapter (adapter_config.json) or a transformers model (config.json)")
    try:
        manifest = registry.resolve(ref.removeprefix("registry:"))
    except NotFound as err:
        raise EvalError(f"{ref}: not a local directory and not in the registry ({err})") from None
    if manifest.kind == "model":
        return Target(manifest.ref, f"registry:{manifest.ref}")
    directory = registry.download(manifest.ref)
    config = json.loads((directory / "adapter_config.json").read_text())
    traits = _evaluable(manifest.ref, artifact_traits(manifest, config), config)
    source = _registry_base(base or manifest.base_model, registry)
    if traits.serving == "multiplexed":  # shares the base's pool, beside the other adapters
        return Target(manifest.ref, source, manifest.ref, config=config, traits=traits)
    return Target(manifest.ref, source, adapter_files(directory), mode="peft", traits=traits)


def _evaluable(ref: str, traits: ArtifactTraits, config: dict) -> ArtifactTraits:
    """`traits`, unless the adapter serves not at all: prompt-learning adapters change the prompt, which the engine
    does not build."""
    if traits.serving == "none":
        raise EvalError(f"{ref}: {config.get('peft_type')} adapters work through the prompt and are not evaluated by the serving engine")
    return traits


def check_engine(targets: list[Target], engine: str) -> None:
    """EvalError naming every ref `engine` cannot run (vLLM: plain LoRA adapters only), before any actor starts."""
    if engine != "vllm":
        return
    problems = []
    for t in targets:
        if t.adapter is None:
            continue
        config = json.loads(t.adapter["adapter_config.json"]) if isinstance(t.adapter, dict) else (t.config or {})
        for what, detail in vllm_unsupported(t.traits or artifact_traits(None, config), config)[:1]:
            problems.append({
                "type": f"{t.label} is {detail or 'not a LoRA adapter'} (vLLM runs LoRA adapters only)",
                "dora": f"{t.label} is a DoRA adapter (vLLM does not run DoRA)",
                "modules_to_save": f"{t.label} carries full copies of {detail} (modules_to_save; vLLM does not run those)",
            }[what])
    if problems:
        raise EvalError("engine: vllm cannot evaluate " + "; ".join(problems) + ". Evaluate them with engine: transformers "
                        "(--engine transformers), which runs every peft method")


def group_targets(targets: list[Target], storage_uri: str, engine: str = "transformers") -> list[ModelGroup]:
    """One pool group per base (its registry LoRA adapters and the base itself), one group per peft-mode adapter.

    With vLLM every adapter is a LoRA adapter (check_engine) that its engine multiplexes, local ones included:
    one group per base."""
    pools: dict[str, ModelGroup] = {}
    groups: list[ModelGroup] = []
    for t in targets:
        if t.mode == "peft" and engine != "vllm":
            groups.append(ModelGroup(t.base_source, storage_uri, "peft", {t.label: t.adapter}))
            continue
        group = pools.get(t.base_source)
        if group is None:
            group = pools[t.base_source] = ModelGroup(t.base_source, storage_uri)
            groups.append(group)
        if t.adapter is None:
            group.base_label = t.label
        else:
            group.adapters[t.label] = t.adapter
    return groups


# --------------------------------------------------------------------------- evaluate


def _wants(row: EvalRow, metrics: list[MetricSpec]) -> list[str]:
    names = {m.name for m in metrics}
    want = []
    if row.generates and names - _SCORING_ONLY:
        want.append(GENERATE)
    if "choice_accuracy" in names and row.choices is not None:
        want.append(CHOICES)
    if "perplexity" in names and row.reference is not None:
        want.append(REFERENCE)
    return want


def actor_settings(spec: EvalSpec) -> dict[str, Any]:
    """What a model actor needs of the spec (decoding defaults and its resources)."""
    return {
        "max_tokens": spec.max_tokens, "stop": list(spec.stop), "temperature": spec.temperature, "seed": spec.seed,
        "batch_size": spec.batch_size, "cpus": spec.cpus_per_actor, "gpus": spec.gpus_per_actor, "dtype": spec.dtype,
        "engine": spec.engine, "kv_cache_gib": spec.kv_cache_gib,
    }


def evaluate(refs: list[str], spec: EvalSpec, *, storage_uri: str, data: str | None = None, base: str | None = None,
             targets: list[Target] | None = None, quiet: bool = False) -> EvalReport:
    """Generate and score `spec.data` (or `data`) for every ref; the first ref is the baseline of the differences.

    `targets` (already resolved) replaces `refs`: the pipeline after training passes its unpublished adapter so.
    """
    started = time.perf_counter()
    source = data or spec.data
    if not source:
        raise EvalError("no evaluation data: pass --data FILE (or set eval.data)")
    rows = load_rows(source, spec.max_rows)
    registry = open_registry(storage_uri)
    if targets is None:
        targets = [resolve_target(ref, registry, base) for ref in refs]
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise EvalError(f"a ref is listed twice: {labels}")
    check_engine(targets, spec.engine)
    settings = actor_settings(spec)
    wants = [_wants(row, spec.metrics) for row in rows]
    groups = group_targets(targets, storage_uri, spec.engine)
    total = sum(len(g.labels) for g in groups) * sum(1 for w in wants if w)
    progress = Progress(total, "rows scored", quiet)
    if not quiet:
        print(f"[rayft] eval: {len(rows)} rows × {len(labels)} ref(s) on {len(groups)} model group(s), "
              f"{spec.actors} {spec.engine} actor(s) each", flush=True)
    def run(group: ModelGroup) -> list[dict]:
        # Rows come ref by ref, so a batch holds one adapter and decodes on the engine's single-adapter pass:
        # peft's mixed-adapter pass splits every matmul by row: a third of the rows/s at 8 adapters (bench/eval_bench.py).
        items = [{"key": i, "label": lab, "row": row.raw, "want": wants[i]}
                 for lab in group.labels for i, row in enumerate(rows) if wants[i]]
        return run_group(group, items, settings, actors=spec.actors, progress=progress)

    raw: dict[tuple[str, int], dict] = {}
    # Groups run at once: each is its own Ray Data pipeline and actor pool, so their model loads overlap.
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(groups)) as pool:
        for results in pool.map(run, groups):
            for result in results:
                raw[(result["label"], result["key"])] = result
    outputs = {
        lab: [Output(**{k: v for k, v in raw.get((lab, i), {}).items() if k not in ("key", "label")}) for i in range(len(rows))]
        for lab in labels
    }
    stats: dict[str, dict[str, RowStats]] = {lab: {m.key: row_stats(m, rows, outputs[lab]) for m in spec.metrics} for lab in labels}
    summaries = {lab: {k: summarize(s, spec.bootstrap, spec.seed) for k, s in stats[lab].items()} for lab in labels}
    differences = {
        lab: {k: paired_difference(stats[labels[0]][k], stats[lab][k], spec.bootstrap, spec.seed) for k in stats[lab]}
        for lab in labels[1:]
    }
    return EvalReport(labels, spec.metrics, rows, outputs, summaries, differences, time.perf_counter() - started, source,
                      {k: v for k, v in settings.items() if k in ("max_tokens", "stop", "temperature")},
                      {"first_result_s": progress.first, "last_result_s": progress.last, "results": progress.done})
