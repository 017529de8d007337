"""Arguments shared by several subcommands: the config file and `--set KEY=VALUE` overrides."""

from __future__ import annotations

import argparse

PROG = "megatron-rl"
DEFAULT_CONFIG = "configs/tiny_moe_cpu.yaml"


def key_value(text: str) -> str:
    """Validate one `--set` override: `KEY=VALUE` with a non-empty dotted key; returned as is."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. rl.lr=1e-6), got {text!r}")
    return text


def add_overrides(parser: argparse.ArgumentParser, help: str) -> None:
    """Repeatable `--set KEY=VALUE` into `args.overrides`."""
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append",
                        type=key_value, default=[], help=help)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """`config` (optional positional, the tiny CPU default) and repeatable `--set KEY=VALUE`."""
    parser.add_argument(
        "config",
        nargs="?",
        default=DEFAULT_CONFIG,
        help=f"YAML config file (default: {DEFAULT_CONFIG})",
    )
    add_overrides(parser, "override one config field by its dotted name, e.g. --set "
                  "parallel.tp=2 (repeatable; applied in order after the YAML)")
