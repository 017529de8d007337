"""The `megatron-rl` command line: parses arguments and dispatches, nothing more.

One module per subcommand (`megatron_rl.cli.train`, `.eval`, `.convert`, `.plan`, `.submit`,
`.profile`, `.serve`) holds its arguments (`add_arguments(parser)`) and its handler
(`run(args) -> int`); library modules hold no command-line code. This package imports every
subcommand module to build the parser, so those modules import nothing heavy at the top: their
handlers import torch-backed library modules when they run, and `megatron-rl --help` (or any
subcommand's `--help`) stays instant.

Every subcommand is one row of `SUBCOMMANDS`: its one-line help, its handler and the issue that
tracks it. A handler is `None` (not built yet: the command says so on stderr and exits 2), a
callable `handler(args: argparse.Namespace) -> int`, or a lazy import path `"module:function"`
naming such a callable. The exit status is the handler's return value; 2 means a usage error or
a command not built yet. An error a user can cause, raised anywhere in the command (training
included), prints one line and exits 1; `--debug` shows its traceback (`megatron_rl.cli.errors`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from megatron_rl import __version__
from megatron_rl.cli import convert, plan, profile, serve, submit, train
from megatron_rl.cli import eval as eval_
from megatron_rl.cli.args import DEFAULT_CONFIG, PROG
from megatron_rl.cli.errors import add_debug, debug, is_user_error, report

__all__ = ["DEFAULT_CONFIG", "PROG", "SUBCOMMANDS", "Subcommand", "build_parser", "main"]

EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def _add_nothing(parser: argparse.ArgumentParser) -> None:
    """Subcommands whose arguments are defined when they are built."""


class Subcommand(NamedTuple):
    """One row of the dispatch table."""

    help: str
    handler: Handler | str | None
    issue: int
    add_arguments: Callable[[argparse.ArgumentParser], None] = _add_nothing


SUBCOMMANDS: dict[str, Subcommand] = {
    "train": Subcommand("Run RL training (GRPO/DAPO/GDPO) from a YAML config",
                        train.run, 7, train.add_arguments),
    "eval": Subcommand("Evaluate a checkpoint: pass@k, cons@k, avg@k",
                       eval_.run, 7, eval_.add_arguments),
    "convert": Subcommand("Convert checkpoints between Hugging Face and Megatron",
                          convert.run, 5, convert.add_arguments),
    "plan": Subcommand("Estimate per-GPU memory and step time for a config",
                       plan.run, 9, plan.add_arguments),
    "submit": Subcommand("Render an sbatch script for a config and submit it to Slurm",
                         submit.run, 9, submit.add_arguments),
    "profile": Subcommand("Profile kernel throughput (time, bytes/s, FLOP/s)",
                          profile.run, 8, profile.add_arguments),
    "serve": Subcommand("Serve a model over SGLang-compatible HTTP routes",
                        serve.run, 6, serve.add_arguments),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per row of `SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="RL post-training for Mixture-of-Experts LMs on Megatron-Core.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    add_debug(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, sub in SUBCOMMANDS.items():
        child = subparsers.add_parser(name, help=sub.help, description=sub.help)
        sub.add_arguments(child)
        add_debug(child)
    return parser


def _resolve(handler: Handler | str) -> Handler:
    """Import a `"module:function"` handler lazily; return callables unchanged."""
    if callable(handler):
        return handler
    module_name, _, attr = handler.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: `sys.argv[1:]`), dispatch, and return the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    sub = SUBCOMMANDS[args.command]
    if sub.handler is None:
        print(
            f"{PROG} {args.command}: not built yet (tracked in issue {sub.issue})", file=sys.stderr
        )
        return EXIT_USAGE
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    handler = _resolve(sub.handler)
    try:
        return int(handler(args) or 0)
    except Exception as err:
        if debug(args) or not is_user_error(err):
            raise
        return report(args.command, err)

