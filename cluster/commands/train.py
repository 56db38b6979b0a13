"""`rayft train JOB.yaml`: fine-tune on Ray Train and publish the result to the registry."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a model as a job spec describes, and publish it")
    p.add_argument("job", help="job YAML file")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--merge", action="store_true", help="also publish the merged full model (<name>-merged)")
    p.add_argument("--storage", default=None, help="override storage.uri (s3://bucket/prefix or a local path)")
    p.add_argument("--force", action="store_true", help="start even when the pre-flight plan says it will not fit")
    p.add_argument("--run-id", default=None, help="name of the run (its checkpoints are under runs/RUN_ID); default: <output.name>-<time>-<random>")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cluster.client.ray_connect import prepare
    from evaluation.pipeline import train_and_publish
    from trainers.inputs import resolve_inputs
    from trainers.spec import load_job_spec

    if args.run_id is not None:
        from storage.safety import validate_name

        validate_name(args.run_id)  # it becomes a storage prefix
    overrides = {}
    if args.merge:
        overrides["output.merge"] = True
    if args.storage:
        overrides["storage.uri"] = args.storage
    spec = load_job_spec(args.job, overrides)  # flags validated with the file, once
    spec = resolve_inputs(spec).spec  # model, data, storage and output name, before Ray starts
    prepare(args.address)  # the cluster's token checked and set up (Ray not started); Ray's output kept quiet
    # The top floor runs the job: training (planned first, inside run_training: a job that cannot fit is refused
    # before anything starts unless --force), then (with an eval: section) evaluation and the output.require gates.
    result = train_and_publish(spec, address=args.address, run_id=args.run_id, force=args.force)
    print_summary(result)
    return 0


def print_summary(result) -> None:
    m = result.metrics
    trainable, total = m.get("trainable_params", 0), m.get("total_params", 0)
    print("")
    print(f"[rayft] run {result.run_id} finished in {result.wall_s:.1f}s")
    if total:
        print(f"  trainable params : {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)")
    if m.get("eval_loss") is not None:
        print(f"  final eval loss  : {m['eval_loss']:.4f}")
    print(f"  final train loss : {m.get('train_loss', float('nan')):.4f}")
    if m.get("eval_preference_accuracy") is not None:
        margin = m.get("eval_reward_margin")
        print(f"  eval preference  : accuracy {m['eval_preference_accuracy']:.4f}"
              + (f", reward margin {margin:.4f}" if margin is not None else ""))
    print(f"  checkpoint       : {result.checkpoint_path}")
    for manifest in result.manifests:
        print(f"  published        : {manifest.name}@{manifest.version} ({manifest.kind})")
