"""The ``dynaprompt`` command. Each subcommand lives in its own module of this package
and registers itself through ``add_parser(subparsers)``; ``main`` dispatches."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# Subcommand modules, each with add_parser(subparsers) that sets ``func`` (an async callable of args).
_COMMANDS = ("dynaprompt.cli.chat", "dynaprompt.cli.serve", "dynaprompt.cli.inspect", "dynaprompt.cli.schedule")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynaprompt", description="Durable chatbot dialogs.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in _COMMANDS:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    import anyio

    from dynaprompt.errors import DynapromptError

    args = build_parser().parse_args(argv)
    try:
        result = anyio.run(args.func, args)
    except KeyboardInterrupt:
        return 130
    except DynapromptError as exc:
        print(f"dynaprompt: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
