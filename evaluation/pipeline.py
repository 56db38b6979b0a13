"""`rayft train` with an `eval:` section: train, evaluate the unpublished result, apply the gates, publish.

Training (trainers/) and generation (serve/'s engine) never import each other; this top-floor
pipeline calls both. Without `eval:` and `output.require` it is plain `run_training`.

With them the run trains without publishing; its final adapter (or model) and, when
`eval.compare_base`, the base model are scored on the held-out rows; the results go to the run's
folder (`runs/<run_id>/eval/`) whatever happens next. If every gate of `output.require` holds,
the artifact is published with the results in its manifest (`metrics.eval`); otherwise nothing is
published and the run fails with each failed figure and its threshold, the checkpoint kept under runs/.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from evaluation.generate import adapter_files
from evaluation.runner import EvalReport, Target, evaluate
from storage.errors import RayftError
from storage.models import resolve_model_dir
from storage.runs import eval_prefix
from storage.store import default_storage_uri, open_store
from trainers.eval_spec import check_gates
from trainers.methods import traits
from trainers.publish import checkpoint_for_publishing, stage_artifact
from trainers.run import publish_result, run_training, with_absolute_paths
from trainers.spec import JobSpec


class GateFailed(RayftError):
    """The trained result missed a gate of output.require: nothing was published."""

    http_status = 422


def needs_pipeline(spec: JobSpec) -> bool:
    return spec.eval is not None or bool(spec.output.require)


def train_and_publish(spec: JobSpec, *, address: str | None = None, run_id: str | None = None, force: bool = False):
    """Train the job (planned first: `force` starts one the plan says will not fit); with `eval:`, evaluate and
    gate before publishing. Returns trainers.run.TrainResult.

    `run_id` names the run (its checkpoints go under runs/<run_id>); default: a fresh one."""
    if not needs_pipeline(spec):
        return run_training(spec, address=address, run_id=run_id, force=force)
    spec = with_absolute_paths(spec)
    result = run_training(spec, address=address, run_id=run_id, publish=False, force=force)
    return gate_and_publish(spec, result)


def gate_and_publish(spec: JobSpec, result):
    """Evaluate a run trained with publish=False, store the results in its folder, publish if the gates hold.

    The checkpoint is fetched and staged once: the staged directory is what is evaluated and what is published.
    GateFailed (nothing published) names each failed figure and threshold and where the checkpoint stays."""
    assert spec.eval is not None  # the spec refuses output.require without eval:
    storage_uri = spec.storage.uri or default_storage_uri()
    label = f"{spec.output.name} (run)"
    model_dir = result.model_dir or resolve_model_dir(spec.model.source, storage_uri)  # the run resolved it already
    is_adapter = traits(spec.method.name).is_adapter
    with checkpoint_for_publishing(result.checkpoint) as ckpt, tempfile.TemporaryDirectory(prefix="rayft-eval-run-") as work:
        # The directory publishing uploads (a full model gets the base's tokenizer files): evaluated, then published.
        staged = stage_artifact(Path(ckpt), model_dir, is_adapter, Path(work) / "artifact")
        report = evaluate_run(spec, staged, model_dir, storage_uri, label)
        print("")
        print(report.table(), flush=True)
        where = store_results(report, storage_uri, result.run_id)
        print(f"[rayft] eval results of run {result.run_id}: {where}", flush=True)
        failed = check_gates(spec.output.require, report.values(label))
        if failed:
            raise GateFailed(
                f"run {result.run_id} not published: output.require failed: {'; '.join(failed)} "
                f"(on {len(report.rows)} rows of {report.data}); the checkpoint stays at {result.checkpoint_path}"
            )
        if spec.output.require:
            print(f"[rayft] gates hold: {', '.join(f'{k} {v}' for k, v in spec.output.require.items())}", flush=True)
        result.manifests = publish_result(spec, result, storage_uri, {"eval": report.to_json(label)},
                                          checkpoint_dir=Path(ckpt), artifact=staged)
    return result


def evaluate_run(spec: JobSpec, staged: Path, model_dir: str, storage_uri: str, label: str) -> EvalReport:
    """Score the run's staged artifact (and the base first, as the baseline, when eval.compare_base)."""
    assert spec.eval is not None
    method = traits(spec.method.name)
    if method.is_adapter:
        trained = Target(label, model_dir, adapter_files(staged), mode="peft", traits=method.for_manifest())
    else:
        trained = Target(label, str(staged))
    targets = ([Target(f"base ({Path(spec.model.source).name})", model_dir)] if spec.eval.compare_base else []) + [trained]
    return evaluate([], spec.eval, storage_uri=storage_uri, data=spec.eval.data or spec.data.eval, targets=targets)


def store_results(report: EvalReport, storage_uri: str, run_id: str) -> str:
    """results.json, answers.jsonl and eval.png into `runs/<run_id>/eval/`; returns that folder's URI."""
    store = open_store(storage_uri)
    prefix = eval_prefix(run_id)
    store.put_bytes(json.dumps(report.to_json(), indent=1).encode(), f"{prefix}/results.json")
    store.put_bytes(report.answers_jsonl().encode(), f"{prefix}/answers.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        store.put_bytes(report.plot(Path(tmp) / "eval.png").read_bytes(), f"{prefix}/eval.png")
    return store.uri_for(prefix)
