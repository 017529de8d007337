"""Arguments shared by several subcommands: the config file and `--set KEY=VALUE` overrides."""

from __future__ import annotations

import argparse
from collections.abc import Callable

PROG = "megatron-rl"
DEFAULT_CONFIG = "configs/tiny_moe_cpu.yaml"


def positive(kind: type) -> Callable[[str], float | int]:
    """An argparse type: a number of `kind` > 0 (argparse prints the one-line error)."""
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535 (0 = any free port), got {value}")
    return value


def key_value(text: str) -> str:
    """Validate one `--set` override: `KEY=VALUE` with a non-empty dotted key; returned as is."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. actor.lr=1e-6), got {text!r}")
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
