"""The `megatron-rl` command line: parses arguments and dispatches, nothing more.

Every subcommand is one row of `SUBCOMMANDS`: its one-line help, its handler and the issue that
tracks it. A handler is `None` (not built yet: the command says so on stderr and exits 2), a
callable `handler(args: argparse.Namespace) -> int`, or a lazy import path `"module:function"`
naming such a callable (so that `megatron-rl --help` imports nothing heavy). Plugging in a
subcommand is a one-line change of its row, e.g.::

    "train": Subcommand("Run RL training ...", "megatron_rl.trainer:cli_main", 7, _add_config_args),

The exit status is the handler's return value; 2 means a usage error or a command not built yet.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from megatron_rl import __version__

PROG = "megatron-rl"
DEFAULT_CONFIG = "configs/tiny_moe_cpu.yaml"
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


def _key_value(text: str) -> str:
    """Validate one `--set` override: `KEY=VALUE` with a non-empty dotted key; returned as is."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. rl.lr=1e-6), got {text!r}")
    return text


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    """`config` (optional positional, the tiny CPU default) and repeatable `--set KEY=VALUE`."""
    parser.add_argument(
        "config",
        nargs="?",
        default=DEFAULT_CONFIG,
        help=f"YAML config file (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        type=_key_value,
        default=[],
        help="override one config field by its dotted name, e.g. --set parallel.tp=2 "
        "(repeatable; applied in order after the YAML)",
    )


def _add_submit_args(parser: argparse.ArgumentParser) -> None:
    """Config arguments, `--dry-run` and `--convert SRC DST`."""
    _add_config_args(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the rendered sbatch script instead of submitting it",
    )
    parser.add_argument(
        "--convert", nargs=2, metavar=("SRC", "DST"),
        help="submit a multi-node HF -> Megatron conversion (megatron-rl convert hf-to-mcore "
        "SRC DST) on the config's nodes and parallel layout instead of training",
    )


def _add_convert_args(parser: argparse.ArgumentParser) -> None:
    """Direction, source, destination and layout overrides."""
    parser.add_argument("direction", choices=["hf-to-mcore", "mcore-to-hf"],
                        help="hf-to-mcore: HF safetensors -> Megatron dist checkpoint; "
                        "mcore-to-hf: back")
    parser.add_argument("src", help="source checkpoint directory")
    parser.add_argument("dst", help="destination directory (written atomically)")
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="append", type=_key_value,
        default=[], help="layout and other overrides, e.g. --set parallel.tp=2 (the model comes "
        "from the source checkpoint)")


def _add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The model (an HF directory or our config) and where to listen."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model-path", help="HF model directory (config.json + weights)")
    src.add_argument("--config", help="YAML run config: serve a random-init model of its "
                     "model section (e.g. configs/tiny_moe_cpu.yaml)")
    parser.add_argument("--tokenizer-path", help="tokenizer directory (default: --model-path)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=30000,
                        help="port (default: 30000; 0 = any free port, printed when ready)")


def _add_profile_args(parser: argparse.ArgumentParser) -> None:
    """Shapes, kernels and backend to profile (defined beside the kernels; argparse only)."""
    from megatron_rl.kernels.profile import add_arguments

    add_arguments(parser)


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    """Config arguments plus `--resume`."""
    _add_config_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the newest "
                        "complete checkpoint in checkpoint.dir (same as --set "
                        "checkpoint.resume=true)")


def _add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Config arguments, the model to evaluate (`--checkpoint DIR | --hf DIR`) and `--out`."""
    _add_config_args(parser)
    src = parser.add_mutually_exclusive_group()  # one is needed: the handler says so
    src.add_argument("--checkpoint", metavar="DIR", help="Megatron dist checkpoint written by "
                     "megatron-rl (or the root holding its `latest` file)")
    src.add_argument("--hf", metavar="DIR", help="Hugging Face model directory (config.json + "
                     "safetensors); its tokenizer if it has one, else the config's")
    parser.add_argument("--out", metavar="FILE", help="per-problem results as JSON lines "
                        "(default: <train.output_dir>/eval_results.jsonl); eval_metrics.json "
                        "is written beside it")


def _add_plan_args(parser: argparse.ArgumentParser) -> None:
    """Config arguments plus the world size and hardware assumptions (defined beside the
    planner; argparse only)."""
    from megatron_rl.launch.plan import add_arguments

    _add_config_args(parser)
    add_arguments(parser)


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
                        "megatron_rl.trainer:cli_main", 7, _add_train_args),
    "eval": Subcommand("Evaluate a checkpoint: pass@k, cons@k, avg@k",
                       "megatron_rl.evaluate:cli_main", 7, _add_eval_args),
    "convert": Subcommand(
        "Convert checkpoints between Hugging Face and Megatron", "megatron_rl.convert.cli:main", 5,
        _add_convert_args,
    ),
    "plan": Subcommand("Estimate per-GPU memory and step time for a config",
                       "megatron_rl.launch.plan:cli_main", 9, _add_plan_args),
    "submit": Subcommand(
        "Render an sbatch script for a config and submit it to Slurm",
        "megatron_rl.launch.slurm:cli_main", 9, _add_submit_args
    ),
    "profile": Subcommand("Profile kernel throughput (time, bytes/s, FLOP/s)",
                          "megatron_rl.kernels.profile:cli_main", 8, _add_profile_args),
    "serve": Subcommand("Serve a model over SGLang-compatible HTTP routes",
                        "megatron_rl.rollout.server:cli_main", 6, _add_serve_args),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per row of `SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="RL post-training for Mixture-of-Experts LMs on Megatron-Core.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, sub in SUBCOMMANDS.items():
        child = subparsers.add_parser(name, help=sub.help, description=sub.help)
        sub.add_arguments(child)
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
    return int(_resolve(sub.handler)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
