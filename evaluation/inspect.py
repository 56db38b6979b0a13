"""What a fine-tune changed, from its weights alone (`rayft inspect REF`).

For every adapted linear layer (a LoRA adapter) or every changed linear weight inside the
transformer blocks (a fully fine-tuned model against its base), per layer and module:

- **norm** of the update ΔW: Frobenius ‖ΔW‖ with ΔW = B·A·scale for LoRA (scale = alpha/r, or
  alpha/√r with rsLoRA; rank_pattern / alpha_pattern respected) and ΔW = W_tuned − W_base for a
  full fine-tune; also ‖ΔW‖/‖W‖ when the base is at hand.
- **spectrum**: the singular values of ΔW (largest first), its numerical rank, and its
  **effective rank**: the fewest singular values that hold `energy` (default 90%) of
  Σσ², i.e. of ‖ΔW‖². A rank-8 adapter whose update is dominated by one direction has
  effective rank 1.
- **intruder dimensions** (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of
  Equivalence", arXiv:2410.21228): among the `top_k` (default 10) left singular vectors of the
  tuned weight W+ΔW, those whose largest |cosine similarity| with every left singular vector
  of the base W is below `epsilon` (default 0.5): new directions the fine-tune put among the
  weight's most important ones. Needs the base weights; counted per module and per layer.

Weights are read from safetensors only. The spectrum of a LoRA ΔW comes from the r×r core of
QR factors of B and Aᵀ (exact, no out×in SVD); intruders need an SVD of W and of W+ΔW per
module, which is the cost of this command on a large model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from storage.artifacts import artifact_traits
from storage.errors import InvalidArtifact, NotFound, RayftError
from storage.models import resolve_model_dir
from storage.registry import Manifest, open_registry
from storage.safety import check_weight_files, load_safetensors

if TYPE_CHECKING:
    import torch

DEFAULT_ENERGY = 0.9
DEFAULT_TOP_K = 10
DEFAULT_EPSILON = 0.5
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# `...layers.<i>.<anything>.<module>`: the layer index and the module's short name.
_LAYER_MODULE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(?:.*\.)?([A-Za-z0-9_]+)$")
# Relative tolerance under which a singular value counts as zero (float32 round-off).
_RANK_RTOL = 1e-5


class ModuleReport(BaseModel):
    """What the fine-tune did to one linear weight."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Module path in the base model, e.g. model.layers.3.self_attn.q_proj.")
    layer: int | None = Field(description="Transformer block index, None outside the blocks.")
    module: str = Field(description="Short module name (q_proj, down_proj, ...).")
    shape: tuple[int, int] = Field(description="(out_features, in_features) of the weight.")
    delta_norm: float = Field(description="Frobenius norm of ΔW.")
    relative_norm: float | None = Field(description="‖ΔW‖ / ‖W‖, None without the base weights.")
    rank: int = Field(description="Numerical rank of ΔW (singular values above 1e-5 of the largest).")
    effective_rank: int = Field(description="Fewest singular values holding `energy` of ‖ΔW‖² (0 for ΔW = 0).")
    singular_values: list[float] = Field(description="Largest singular values of ΔW, at most 16.")
    intruders: int | None = Field(description="Intruder dimensions among the tuned weight's top-k directions; None without the base.")


class InspectReport(BaseModel):
    """Every module a fine-tune changed, and the thresholds the figures were computed with."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(description="What was inspected (ref or directory).")
    kind: str = Field(description="'lora' (adapter) or 'full' (model against its base).")
    base: str | None = Field(description="The base the tuned weights were compared with, if any.")
    energy: float = Field(description="Share of ‖ΔW‖² the effective rank keeps.")
    top_k: int = Field(description="Top singular directions of W+ΔW examined for intruders.")
    epsilon: float = Field(description="Cosine similarity below which a direction is an intruder.")
    modules: list[ModuleReport] = Field(description="One entry per changed linear weight, by layer then module.")
    notes: list[str] = Field(default_factory=list, description="What could not be computed, and why.")

    def intruders_per_layer(self) -> dict[int, int]:
        """Layer index → intruder dimensions summed over its modules (layers with base weights only)."""
        totals: dict[int, int] = {}
        for m in self.modules:
            if m.layer is not None and m.intruders is not None:
                totals[m.layer] = totals.get(m.layer, 0) + m.intruders
        return dict(sorted(totals.items()))

    def table(self) -> str:
        """The per-module report as an aligned text table, with per-layer intruder totals below."""
        header = ("layer", "module", "shape", "|dW|", "|dW|/|W|", "rank", f"eff@{self.energy:.0%}", "top sv", "intruders")
        rows = [header]
        for m in self.modules:
            rows.append((
                "-" if m.layer is None else str(m.layer), m.module, f"{m.shape[0]}x{m.shape[1]}", f"{m.delta_norm:.4g}",
                "-" if m.relative_norm is None else f"{m.relative_norm:.3g}", str(m.rank), str(m.effective_rank),
                ", ".join(f"{s:.3g}" for s in m.singular_values[:3]) or "-", "-" if m.intruders is None else str(m.intruders),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        per_layer = self.intruders_per_layer()
        if per_layer:
            lines.append("intruder dimensions per layer: " + ", ".join(f"{k}: {v}" for k, v in per_layer.items()))
        return "\n".join(lines)

    def heatmap(self, out: str | Path) -> Path:
        """A PNG: ‖ΔW‖ per layer × module (and intruders per layer × module when the base was read)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        in_layers = [m for m in self.modules if m.layer is not None]
        layers = sorted({m.layer for m in in_layers})
        names = list(dict.fromkeys(m.module for m in in_layers))
        panels = [("‖ΔW‖ (Frobenius)", "delta_norm")]
        if any(m.intruders is not None for m in in_layers):
            panels.append((f"intruder dimensions (top {self.top_k}, ε={self.epsilon:g})", "intruders"))
        fig, axes = plt.subplots(1, len(panels), squeeze=False,
                                 figsize=((2.2 + 0.55 * len(names)) * len(panels), 2.2 + 0.3 * max(len(layers), 1)))
        for ax, (title, field) in zip(axes[0], panels):
            grid = np.full((max(len(layers), 1), max(len(names), 1)), np.nan)
            for m in in_layers:
                value = getattr(m, field)
                if value is not None:
                    grid[layers.index(m.layer), names.index(m.module)] = value
            image = ax.imshow(grid, aspect="auto", cmap="viridis")
            if grid.size <= 200:  # small grids: the figures themselves, readable
                for (row, col), value in np.ndenumerate(grid):
                    if not np.isnan(value):
                        ax.text(col, row, f"{value:.3g}", ha="center", va="center", fontsize=7, color="w")
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
            ax.set_yticks(range(len(layers)), [str(i) for i in layers])
            ax.set_ylabel("layer")
            ax.set_title(title, fontsize=9)
            fig.colorbar(image, ax=ax)
        fig.suptitle(self.target, fontsize=9)
        fig.tight_layout()
        out = Path(out)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


# --------------------------------------------------------------------------- the linear algebra


def effective_rank(singular_values: torch.Tensor, energy: float = DEFAULT_ENERGY) -> int:
    """The fewest largest singular values whose squares sum to at least `energy` of the total (0 if all are 0)."""
    import torch

    squares = singular_values.double().pow(2)
    total = float(squares.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(torch.sort(squares, descending=True).values, 0) / total
    # The tolerance keeps an exact split (e.g. 0.9 of the energy in k values) from needing k+1 by round-off.
    return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-9, dtype=cumulative.dtype)).item()) + 1


def numerical_rank(singular_values: torch.Tensor) -> int:
    """Singular values above _RANK_RTOL of the largest."""
    if singular_values.numel() == 0 or float(singular_values.max()) == 0.0:
        return 0
    return int((singular_values > _RANK_RTOL * singular_values.max()).sum())


def lora_singular_values(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Singular values of ΔW = scale·B·A (B: out×r, A: r×in) from the r×r core of their QR factors:
    B = Q_b R_b, Aᵀ = Q_a R_a, so ΔW = Q_b (scale R_b R_aᵀ) Q_aᵀ has the core's singular values."""
    import torch

    _, r_b = torch.linalg.qr(b.double())
    _, r_a = torch.linalg.qr(a.double().T)
    return torch.linalg.svdvals(scale * r_b @ r_a.T).float()


def intruder_count(base: torch.Tensor, tuned: torch.Tensor, top_k: int = DEFAULT_TOP_K, epsilon: float = DEFAULT_EPSILON) -> int:
    """How many of the `top_k` left singular vectors of `tuned` have |cosine| < `epsilon` with every left
    singular vector of `base` (arXiv:2410.21228). Singular vectors are unit length, so cosine = dot product."""
    import torch

    u_base = torch.linalg.svd(base.double(), full_matrices=False).U
    u_tuned = torch.linalg.svd(tuned.double(), full_matrices=False).U[:, :top_k]
    best = (u_base.T @ u_tuned).abs().max(dim=0).values
    return int((best < epsilon).sum())


def _module_report(path: str, delta_sv: torch.Tensor, delta_norm: float, shape: tuple[int, int], base: torch.Tensor | None,
                   tuned: torch.Tensor | None, energy: float, top_k: int, epsilon: float) -> ModuleReport:
    match = _LAYER_MODULE.search(path)
    layer, module = (int(match.group(1)), match.group(2)) if match else (None, path.rsplit(".", 1)[-1])
    base_norm = float(base.double().norm()) if base is not None else None
    return ModuleReport(
        path=path, layer=layer, module=module, shape=shape, delta_norm=delta_norm,
        relative_norm=(delta_norm / base_norm) if base_norm else None,
        rank=numerical_rank(delta_sv), effective_rank=effective_rank(delta_sv, energy),
        singular_values=[float(s) for s in torch_sorted(delta_sv)[:16]],
        intruders=intruder_count(base, tuned, top_k, epsilon) if base is not None and tuned is not None else None,
    )


def torch_sorted(values: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.sort(values, descending=True).values


# --------------------------------------------------------------------------- reading weights


class SafetensorsDir:
    """Lazy access to the tensors of a model directory's `*.safetensors` files (pickle files refused)."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        check_weight_files(self.directory)
        self._handles = {}
        self._where: dict[str, Any] = {}
        for file in sorted(self.directory.glob("*.safetensors")):
            handle = safe_open(str(file), framework="pt")
            self._handles[file] = handle
            for key in handle.keys():
                self._where[key] = handle
        if not self._where:
            raise NotFound(f"{str(self.directory)!r} holds no *.safetensors weights")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key).float()


@dataclass
class _LoraModule:
    path: str
    a: Any
    b: Any


def _lora_modules(tensors: dict[str, Any]) -> Iterator[_LoraModule]:
    for key in sorted(tensors):
        if key.endswith(".lora_A.weight"):
            stem = key[: -len(".lora_A.weight")]
            b_key = f"{stem}.lora_B.weight"
            if b_key not in tensors:
                raise InvalidArtifact(f"{key} has no matching {b_key}: the adapter file is incomplete")
            yield _LoraModule(stem.removeprefix("base_model.model."), tensors[key].float(), tensors[b_key].float())


def _pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module path ending in `.key` (or equal to it)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def lora_scale(config: dict[str, Any], path: str) -> float:
    """The scale peft multiplies B·A by for the module at `path`: alpha/r (alpha/√r with use_rslora)."""
    r = _pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
    return float(alpha) / (float(r) ** 0.5 if config.get("use_rslora") else float(r))


def inspect_lora(adapter_dir: str | Path, base_dir: str | Path | None, *, target: str, energy: float = DEFAULT_ENERGY,
                 top_k: int = DEFAULT_TOP_K, epsilon: float = DEFAULT_EPSILON, manifest: Manifest | None = None) -> InspectReport:
    """Report of a peft LoRA adapter directory (published as `manifest`, if it was); intruders and relative norms
    need `base_dir`."""
    directory = Path(adapter_dir)
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise InvalidArtifact(f"{target}: {str(directory)!r} has no {ADAPTER_CONFIG}: not a peft adapter directory") from None
    if artifact_traits(manifest, config).serving != "multiplexed":  # peft multiplexes the LoRA family: A·B factors
        peft_type = str(config.get("peft_type", "")).upper()
        raise InvalidArtifact(
            f"{target} is a {peft_type or 'unknown'} adapter: inspect reads LoRA-family adapters (lora, qlora, dora, rslora) "
            "and full models; merge it into a model (`rayft train --merge`) and inspect that against its base"
        )
    tensors = load_safetensors(directory / ADAPTER_WEIGHTS)
    base = SafetensorsDir(base_dir) if base_dir is not None else None
    modules = []
    for lora in _lora_modules(tensors):
        scale = lora_scale(config, lora.path)
        sv = lora_singular_values(lora.a, lora.b, scale)
        delta_norm = float(sv.double().pow(2).sum().sqrt())
        shape = (int(lora.b.shape[0]), int(lora.a.shape[1]))
        weight, tuned = None, None
        if base is not None:
            key = f"{lora.path}.weight"
            if key not in base:
                raise InvalidArtifact(f"{target} adapts {lora.path!r}, which base {str(base_dir)!r} does not have: wrong base?")
            weight = base.get(key)
            if tuple(weight.shape) != shape:
                raise InvalidArtifact(f"{target}: {lora.path} is {shape[0]}x{shape[1]} in the adapter but "
                                      f"{weight.shape[0]}x{weight.shape[1]} in base {str(base_dir)!r}: wrong base?")
            tuned = weight + scale * (lora.b @ lora.a)
        modules.append(_module_report(lora.path, sv, delta_norm, shape, weight, tuned, energy, top_k, epsilon))
    if not modules:
        raise InvalidArtifact(f"{target}: {ADAPTER_WEIGHTS} holds no lora_A/lora_B pairs")
    return InspectReport(target=target, kind="lora", base=None if base_dir is None else str(base_dir), energy=energy,
                         top_k=top_k, epsilon=epsilon, modules=_ordered(modules))


def inspect_full(model_dir: str | Path, base_dir: str | Path, *, target: str, energy: float = DEFAULT_ENERGY,
                 top_k: int = DEFAULT_TOP_K, epsilon: float = DEFAULT_EPSILON) -> InspectReport:
    """Report of a fully fine-tuned model directory against its base: every 2-D weight inside the transformer
    blocks that changed (embeddings, head and norms are left out)."""
    import torch

    tuned_dir, base = SafetensorsDir(model_dir), SafetensorsDir(base_dir)
    modules = []
    for key in sorted(tuned_dir.keys()):
        if not key.endswith(".weight") or not _LAYER_MODULE.search(key[: -len(".weight")]):
            continue
        tuned = tuned_dir.get(key)
        if tuned.ndim != 2:
            continue
        if key not in base:
            raise InvalidArtifact(f"{target} has weight {key!r}, which base {str(base_dir)!r} does not have: wrong base?")
        weight = base.get(key)
        if weight.shape != tuned.shape:
            raise InvalidArtifact(f"{target}: {key} has shape {tuple(tuned.shape)} but {tuple(weight.shape)} in the base: wrong base?")
        delta = tuned.double() - weight.double()
        if not bool(delta.any()):
            continue
        sv = torch.linalg.svdvals(delta).float()
        modules.append(_module_report(key[: -len(".weight")], sv, float(delta.norm()), tuple(tuned.shape), weight, tuned,
                                      energy, top_k, epsilon))
    return InspectReport(target=target, kind="full", base=str(base_dir), energy=energy, top_k=top_k, epsilon=epsilon,
                         modules=_ordered(modules))


def _ordered(modules: list[ModuleReport]) -> list[ModuleReport]:
    return sorted(modules, key=lambda m: (m.layer is None, m.layer or 0, m.path))


# --------------------------------------------------------------------------- refs


def inspect_target(target: str, *, base: str | None = None, storage_uri: str | None = None, energy: float = DEFAULT_ENERGY,
                   top_k: int = DEFAULT_TOP_K, epsilon: float = DEFAULT_EPSILON) -> InspectReport:
    """Inspect a registry ref (`NAME[@V]`) or a local adapter / model directory.

    The base is `base` if given, else the manifest's base model (registry refs), else the
    `base_model_name_or_path` of an adapter's config. An adapter without a reachable base still
    gets norms and spectra; a full model needs its base.
    """
    if not 0 < energy <= 1:
        raise InvalidArtifact(f"--energy must be in (0, 1], got {energy}")
    if top_k < 1 or not 0 < epsilon < 1:
        raise InvalidArtifact(f"--top-k must be ≥ 1 and --epsilon in (0, 1), got {top_k} and {epsilon}")
    local = Path(target).expanduser()
    if local.is_dir():
        directory, label = local, str(local)
        recorded_base, manifest = None, None
    else:
        registry = open_registry(storage_uri)
        manifest = registry.resolve(target)
        directory, label, recorded_base = registry.download(manifest.ref), manifest.ref, manifest.base_model
    is_adapter = (directory / ADAPTER_CONFIG).exists()
    if is_adapter and recorded_base is None:
        recorded_base = json.loads((directory / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    source = base or recorded_base
    if not is_adapter and (source is None or source == label.split("@")[0]):
        raise InvalidArtifact(f"{label} is a full model: pass --base (registry:NAME[@V] or a model directory) to compare it with")
    base_dir, notes = None, []
    if source:
        try:
            base_dir = resolve_model_dir(source, storage_uri)
            if not Path(base_dir).is_dir():  # a hub id: its weights are not here
                raise NotFound(f"{source!r} is not a local, s3:// or registry model")
        except RayftError as err:
            if base or not is_adapter:
                raise InvalidArtifact(f"base {source!r}: {err}") from None
            notes.append(f"base {source!r} not found ({err}): norms and spectra only; pass --base for intruder dimensions")
    else:
        notes.append("no base model known: norms and spectra only; pass --base for intruder dimensions")
    if is_adapter:
        report = inspect_lora(directory, base_dir, target=label, energy=energy, top_k=top_k, epsilon=epsilon, manifest=manifest)
    else:
        report = inspect_full(directory, base_dir, target=label, energy=energy, top_k=top_k, epsilon=epsilon)
    return report.model_copy(update={"notes": notes, "base": source if base_dir is not None else None})
