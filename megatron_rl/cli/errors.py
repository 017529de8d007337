"""One line for every error a user can cause, during the whole command (training included).

A user error is one whose message says what to fix: a `ValueError` (ours: `ConfigError`,
`DataError`, `CheckpointError`, and the trainer's refusals), an `OSError` (a missing file, a port
in use) or an exception class of ours (`EngineError`, `NonFiniteError`, `RankTimeoutError`,
`RankFailure`). `main` prints it as `megatron-rl <command>: <message>` on rank 0 only (under
torchrun every rank raises the same error: the other ranks exit quietly with the same status)
and exits 1. Anything else is a bug and keeps its traceback, as does every error under
`--debug`. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_rl.cli.args import PROG

EXIT_ERROR = 1


def add_debug(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """`--debug`: show the traceback of user errors too. On a subcommand it only sets the flag
    when given, so `megatron-rl --debug train` and `megatron-rl train --debug` both work."""
    parser.add_argument("--debug", action="store_true",
                        default=False if top_level else argparse.SUPPRESS,
                        help="show the traceback of every error (by default an error a user "
                        "can cause prints one line)")


def debug(args: argparse.Namespace) -> bool:
    """Whether `--debug` was given (before or after the subcommand)."""
    return bool(getattr(args, "debug", False))


def is_user_error(err: BaseException) -> bool:
    """`err` says what to fix (see the module docstring); other exceptions are bugs."""
    if isinstance(err, (ValueError, OSError)):
        return True
    return isinstance(err, Exception) and any(
        cls.__module__.split(".")[0] == "megatron_rl" for cls in type(err).__mro__)


def is_rank0() -> bool:
    """Rank 0 of a torchrun job, or a single process."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def report(command: str, err: BaseException) -> int:
    """Print `err` as one `megatron-rl <command>: <message>` line (rank 0 only); return 1."""
    if is_rank0():
        message = str(err).strip() or type(err).__name__
        print(f"{PROG} {command}: {message}", file=sys.stderr, flush=True)
    return EXIT_ERROR
