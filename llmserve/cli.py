"""The `llmserve` command. Each subsystem contributes its subcommands through `add_commands`.

Subsystem modules import their heavy dependencies (torch, kopf, kserve) inside the command
functions, so `llmserve --help` and the test bed stay fast and small.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define `add_commands(subparsers)`; each command sets `func(args) -> int`.
COMMAND_MODULES = (
    "llmserve.testbed.cli",
    "llmserve.operator.cli",
    "llmserve.operator.rollout_cli",
    "llmserve.operator.autoscaling_cli",
    "llmserve.artifacts.cli",
    "llmserve.compress.cli",
    "llmserve.predictors.cli",
    "llmserve.quickstart",
)


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1, never a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except CommandError as exc:
        print(f"llmserve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
