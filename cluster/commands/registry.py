"""`rayft registry list|show|push|pull|delete`: browse and manage published models and adapters."""

from __future__ import annotations

import argparse
import json

from storage.artifacts import push_directory

__all__ = ["register", "run", "push_directory", "format_table"]

STORAGE_HELP = "storage URI (default: $RAYFT_STORAGE or ~/.rayft/storage)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("registry", help="list, show, push, pull or delete registry entries")
    p.add_argument("--storage", default=None, help=STORAGE_HELP)
    # --storage is accepted after the action as well (`rayft registry list --storage URI`): SUPPRESS keeps
    # an action's parser from overwriting a value given before the action with its own default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage", default=argparse.SUPPRESS, help=STORAGE_HELP)
    rsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = rsub.add_parser("list", parents=[common], help="latest version of every name (--all: every version)")
    ls.add_argument("--all", action="store_true", help="every version, not only the latest")
    ls.add_argument("--json", action="store_true", help="print manifests as JSON")
    show = rsub.add_parser("show", parents=[common], help="one manifest: NAME (latest) or NAME@VERSION")
    show.add_argument("ref")
    push = rsub.add_parser(
        "push", parents=[common], help="publish a local peft adapter or transformers model directory as a new version",
        description="Publish a directory made anywhere (plain peft / transformers save_pretrained): safetensors only. "
        "An adapter records its base model's config digest, so it serves and merges only on that base.",
    )
    push.add_argument("directory")
    push.add_argument("--name", required=True, help="registry name (published as its next version)")
    push.add_argument("--kind", choices=["model", "adapter"], default="model", help="adapter: a peft adapter dir; model: a transformers dir")
    push.add_argument("--base-model", default=None, metavar="SOURCE",
                      help="base of an adapter: registry:NAME[@VERSION], a local model directory, s3:// or a hub id "
                      "(default: base_model_name_or_path of adapter_config.json)")
    pull = rsub.add_parser("pull", parents=[common], help="write a published version to DIR as a plain peft / transformers directory")
    pull.add_argument("ref", help="NAME (latest) or NAME@VERSION")
    pull.add_argument("directory", help="a new (or empty) directory")
    rm = rsub.add_parser("delete", parents=[common], help="delete one version: NAME@VERSION")
    rm.add_argument("ref")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from storage.artifacts import pull_directory
    from storage.registry import open_registry

    registry = open_registry(args.storage)
    if args.action == "list":
        manifests = registry.list(all_versions=args.all)
        if args.json:
            print(json.dumps([m.model_dump(mode="json") for m in manifests], indent=1))
            return 0
        print(format_table(manifests))
    elif args.action == "show":
        print(json.dumps(registry.show(args.ref), indent=1, default=str))
    elif args.action == "push":
        m = push_directory(registry, args.directory, args.name, args.kind, args.base_model)
        base = f", base {m.base_model}" if m.kind == "adapter" else ""
        print(f"published {m.name}@{m.version} ({m.kind}{base}, {len(m.files)} files, {m.total_size:,} bytes)")
    elif args.action == "pull":
        m, directory = pull_directory(registry, args.ref, args.directory)
        what = "peft adapter" if m.kind == "adapter" else "transformers model"
        print(f"pulled {m.ref} to {directory} ({what} directory, {len(m.files)} files verified against the manifest, "
              f"base {m.base_model})")
    elif args.action == "delete":
        m = registry.delete(args.ref)
        print(f"deleted {m.name}@{m.version}")
    return 0


def format_table(manifests) -> str:
    if not manifests:
        return "(registry is empty)"
    rows = [("NAME", "VER", "KIND", "METHOD", "BASE", "SIZE", "EVAL LOSS", "CREATED")]
    for m in manifests:
        loss = m.metrics.get("eval_loss") if m.metrics else None
        method = m.method or str(m.params.get("peft_type", "-")).lower()
        rows.append((
            m.name, str(m.version), m.kind, method, m.base_model[:28], f"{m.total_size / 1024:,.0f} KiB",
            f"{loss:.4f}" if isinstance(loss, (int, float)) else "-", str(m.created_at)[:19],
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
