"""`megatron-rl convert`: HF <-> Megatron-Core checkpoints, single process or under torchrun.

    megatron-rl convert hf-to-mcore HF_DIR MCORE_DIR [--set parallel.tp=2 ...]
    megatron-rl convert mcore-to-hf MCORE_DIR HF_DIR [--set parallel.tp=2 ...]

The conversion itself is `megatron_rl.convert.checkpoints`.
"""

from __future__ import annotations

import argparse

from megatron_rl.cli.args import add_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Direction, source, destination and layout overrides."""
    parser.add_argument("direction", choices=["hf-to-mcore", "mcore-to-hf"],
                        help="hf-to-mcore: HF safetensors -> Megatron dist checkpoint; "
                        "mcore-to-hf: back")
    parser.add_argument("src", help="source checkpoint directory")
    parser.add_argument("dst", help="destination directory (written atomically)")
    add_overrides(parser, "layout and other overrides, e.g. --set parallel.tp=2 (the model comes "
                  "from the source checkpoint)")


def run(args: argparse.Namespace) -> int:
    """Run `megatron-rl convert`; user errors print one line and exit 1."""
    # Megatron-Core: imported on run so that `megatron-rl --help` stays light
    from megatron_rl.actor.parallel import destroy_distributed
    from megatron_rl.convert.checkpoints import hf_to_mcore, log_rank0, mcore_to_hf

    convert = hf_to_mcore if args.direction == "hf-to-mcore" else mcore_to_hf
    try:  # an error a user can cause: one line, exit 1 (megatron_rl.cli.errors)
        out = convert(args.src, args.dst, args.overrides)
    finally:
        destroy_distributed()
    log_rank0(f"wrote {out}")
    return 0
