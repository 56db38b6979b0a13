"""Turn a finished run's checkpoint into registry artifacts: the adapter (or model), optionally merged."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from storage.registry import Manifest, Registry, base_config_digest
from trainers.checkpoints import ADAPTER_DIR, MODEL_DIR, STATE_FILES, STATE_NAME, local_parts
from trainers.methods import method_module, traits
from storage.models import copy_tokenizer_files, read_model_config
from trainers.spec import JobSpec
from trainers.state_io import load_state

def method_params(spec: JobSpec) -> dict:
    """The method's parameters as recorded in the manifest (rank, alpha, targets...), and the objective with its own
    (`objective: {name: dpo, beta: 0.1, ...}`)."""
    return {**spec.method.model_dump(mode="json"), "objective": spec.objective.model_dump(mode="json")}


#: Preference metrics plotted beside the loss when the history has them: (history key, label).
PREFERENCE_CURVES = (("train_preference_accuracy", "train preference accuracy"), ("eval_preference_accuracy", "eval preference accuracy"),
                     ("eval_logp_accuracy", "eval: chosen more likely"), ("train_reward_margin", "train reward margin"),
                     ("eval_reward_margin", "eval reward margin"))


def plot_loss_curve(history: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(key, label) for key, label in PREFERENCE_CURVES if any(h.get(key) is not None for h in history)]
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(11 if curves else 6, 3.5), squeeze=False)
    ax = axes[0][0]
    tr = [(h["step"], h["train_loss"]) for h in history if h.get("train_loss") is not None]
    if tr:
        ax.plot(*zip(*tr), marker="o", label="train")
    ev = [(h["step"], h["eval_loss"]) for h in history if h.get("eval_loss") is not None]
    if ev:
        ax.plot(*zip(*ev), marker="s", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if curves:  # preference objectives: accuracy and reward margin by step
        right = axes[0][1]
        for key, label in curves:
            points = [(h["step"], h[key]) for h in history if h.get(key) is not None]
            right.plot(*zip(*points), marker="s" if key.startswith("eval") else "o", label=label)
        right.set_xlabel("step")
        right.grid(alpha=0.3)
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


#: What publishing reads from a checkpoint. DeepSpeed's per-rank optimizer shards beside them (many times the
#: model's size) stay in storage.
PUBLISHED_PARTS = (ADAPTER_DIR, MODEL_DIR, *STATE_FILES)


def checkpoint_for_publishing(checkpoint) -> contextlib.AbstractContextManager[Path]:
    """A local directory with what `publish_run` reads from `checkpoint` (a `ray.train.Checkpoint`): the checkpoint
    itself on a local filesystem, else a download of `PUBLISHED_PARTS` alone."""
    return local_parts(checkpoint, PUBLISHED_PARTS)


def stage_artifact(checkpoint_dir: Path, model_dir: str, is_adapter: bool, out: Path) -> Path:
    """Copy the trained weights (and, for a full model, the tokenizer) plus the loss curve into `out`."""
    src = checkpoint_dir / (ADAPTER_DIR if is_adapter else MODEL_DIR)
    shutil.copytree(src, out)
    if not is_adapter:
        copy_tokenizer_files(model_dir, out, keep_existing=True)
    state = load_state(checkpoint_dir, STATE_NAME)
    history = state["history"]
    (out / "history.json").write_text(json.dumps(history, indent=1))
    if state.get("data"):  # the preprocessing statistics of the data the run trained on
        (out / "data_stats.json").write_text(json.dumps(state["data"], indent=1))
    plot_loss_curve(history, out / "loss_curve.png")
    return out


def merge_adapter(spec: JobSpec, base_dir: str, adapter_dir: Path, out: Path) -> Path:
    """Write base + adapter as one plain transformers model (fp32). A 4-bit base is dequantized first."""
    import peft
    from transformers import AutoModelForCausalLM

    quant = method_module(spec.method.name).quantization_config(spec.method, torch.float32)
    if quant is not None:
        print("[rayft] merging a QLoRA adapter: dequantizing the 4-bit base to float32 first", flush=True)
        base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=torch.float32, device_map={"": "cpu"})
        base = base.dequantize()
    else:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    merged.save_pretrained(out, safe_serialization=True)
    copy_tokenizer_files(base_dir, out)
    return out


def publish_run(
    spec: JobSpec,
    registry: Registry,
    checkpoint_dir: Path,
    model_dir: str,
    metrics: dict,
    run_id: str,
    workdir: Path,
    artifact: Path | None = None,
) -> list[Manifest]:
    """Publish the run's adapter/model (and the merged model when asked); returns the manifests. `artifact`: the
    checkpoint already staged by `stage_artifact` (else it is staged under `workdir`)."""
    method = traits(spec.method.name)
    is_adapter = method.is_adapter
    config = read_model_config(model_dir)
    digest = base_config_digest(config)
    lineage = {"job_spec": spec.model_dump(mode="json"), "run_id": run_id}
    if artifact is None:
        artifact = stage_artifact(checkpoint_dir, model_dir, is_adapter, workdir / "artifact")
    manifests = [
        registry.publish(
            spec.output.name, artifact, kind="adapter" if is_adapter else "model",
            base_model=spec.model.source, base_config_digest=digest, method=spec.method.name,
            params=method_params(spec), metrics=metrics, lineage=lineage, traits=method.for_manifest(),
        )
    ]
    if spec.output.merge and is_adapter:
        merged = merge_adapter(spec, model_dir, checkpoint_dir / ADAPTER_DIR, workdir / "merged")
        manifests.append(
            registry.publish(
                f"{spec.output.name}-merged", merged, kind="model",
                base_model=spec.model.source, base_config_digest=digest, method=spec.method.name,
                params=method_params(spec), metrics=metrics,
                lineage={**lineage, "merged_from": f"{spec.output.name}@{manifests[0].version}"},
            )
        )
    return manifests
