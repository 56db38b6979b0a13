"""`rayft registry list|show|push|delete`: browse and manage published models and adapters."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("registry", help="list, show, push or delete registry entries")
    p.add_argument("--storage", default=None, help="storage URI (default: $RAYFT_STORAGE or ~/.rayft/storage)")
    rsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = rsub.add_parser("list", help="latest version of every name (--all: every version)")
    ls.add_argument("--all", action="store_true", help="every version, not only the latest")
    ls.add_argument("--json", action="store_true", help="print manifests as JSON")
    show = rsub.add_parser("show", help="one manifest: NAME (latest) or NAME@VERSION")
    show.add_argument("ref")
    push = rsub.add_parser("push", help="publish a local model/adapter directory as a new version")
    push.add_argument("directory")
    push.add_argument("--name", required=True)
    push.add_argument("--kind", choices=["model", "adapter"], default="model")
    push.add_argument("--base-model", default=None, help="base model of an adapter (default: the directory)")
    rm = rsub.add_parser("delete", help="delete one version: NAME@VERSION")
    rm.add_argument("ref")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
        print(f"published {m.name}@{m.version} ({m.kind}, {len(m.files)} files, {m.total_size:,} bytes)")
    elif args.action == "delete":
        m = registry.delete(args.ref)
        print(f"deleted {m.name}@{m.version}")
    return 0


def push_directory(registry, directory: str, name: str, kind: str, base_model: str | None):
    from pathlib import Path

    from storage.registry import base_config_digest

    config_path = Path(directory) / "config.json"
    if kind == "model" and config_path.exists():
        digest = base_config_digest(json.loads(config_path.read_text()))
    else:
        digest = ""
    return registry.publish(
        name, directory, kind=kind, base_model=base_model or name, base_config_digest=digest,
        method=None, params={}, metrics={}, lineage={"pushed_from": str(Path(directory).resolve())},
    )


def format_table(manifests) -> str:
    if not manifests:
        return "(registry is empty)"
    rows = [("NAME", "VER", "KIND", "METHOD", "BASE", "SIZE", "EVAL LOSS", "CREATED")]
    for m in manifests:
        loss = m.metrics.get("eval_loss") if m.metrics else None
        rows.append((
            m.name, str(m.version), m.kind, m.method or "-", m.base_model[:28], f"{m.total_size / 1024:,.0f} KiB",
            f"{loss:.4f}" if isinstance(loss, (int, float)) else "-", str(m.created_at)[:19],
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
