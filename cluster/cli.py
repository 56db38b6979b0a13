"""The `rayft` command line.

Each subcommand lives in its own module under `cluster/commands/` and exposes
`register(subparsers)`, which adds its parser and sets `func` to a handler
`(args) -> int`. Adding a command is adding one module and one name below.

Exit status: 0 success; 2 bad input or usage (one line, or one short list of problems, naming the
fix: every `RayftError` but `RunFailed`); 1 a failure while running (`RunFailed`, or an unexpected
error, shown as its one-line message). Python tracebacks, and everything Ray prints, only with
`--verbose` (accepted before or after the command).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from cluster.client import console
from storage.errors import RayftError, first_line

# Order here is the order `rayft --help` lists them.
COMMANDS = [
    "validate",
    "plan",
    "train",
    "tune",
    "merge",
    "serve",
    "console",
    "registry",
    "eval",
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
    add_verbose_option(parser)
    return parser


VERBOSE_HELP = "print Python tracebacks and everything Ray prints (its internals, its workers' full output)"


def add_verbose_option(parser: argparse.ArgumentParser) -> None:
    """--verbose on the top-level parser and on every (nested) subcommand, so it works where a person types it."""
    parser.add_argument("--verbose", "-v", action="store_true", help=VERBOSE_HELP)

    def walk(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    if not any("--verbose" in a.option_strings for a in child._actions):
                        # SUPPRESS: a subcommand without the flag leaves the top-level value alone.
                        child.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
                    walk(child)

    walk(parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console.configure(args.verbose)
    try:
        return int(args.func(args) or 0)
    except RayftError as exc:
        if args.verbose and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        print(f"rayft {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an environment problem: its message, the traceback on request
        if args.verbose:
            traceback.print_exc()
        hint = "" if args.verbose else " (--verbose shows the traceback)"
        print(f"rayft {args.command}: error: {type(exc).__name__}: {first_line(exc)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
