"""The `rayft` command line.

Each subcommand lives in its own module under `cluster/commands/` and exposes
`register(subparsers)`, which adds its parser and sets `func` to a handler
`(args) -> int`. Adding a command is adding one module and one name below.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from storage.errors import RayftError

# Order here is the order `rayft --help` lists them.
COMMANDS = [
    "validate",
    "plan",
    "train",
    "tune",
    "merge",
    "serve",
    "registry",
    "inspect",
    "submit",
    "jobs",
    "ft",
    "demo",
]


class UserError(RayftError):
    """A problem with what the user asked for: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayft", description="Fine-tune and serve LLMs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"cluster.commands.{name}")
        except ModuleNotFoundError as exc:
            # A command whose module is not written yet is simply absent from the CLI.
            if exc.name == f"cluster.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RayftError as exc:
        print(f"rayft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
