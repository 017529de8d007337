"""`megatron-rl convert`: HF <-> Megatron-Core checkpoints, single process or under torchrun.

    megatron-rl convert hf-to-mcore HF_DIR MCORE_DIR [--tp 2 --pp 2 --ep 2] [--dtype bfloat16]
    megatron-rl convert mcore-to-hf MCORE_DIR HF_DIR [--hf-source HF_DIR] [--overwrite]

The source is checked first (config.json keys, every safetensors header, the architecture; or
the Megatron checkpoint's record), and the destination (an existing non-empty one is refused
unless `--overwrite`), in well under a second and before Megatron-Core is imported. The
conversion itself is `megatron_rl.convert.checkpoints`.
"""

from __future__ import annotations

import argparse

from megatron_rl.cli.args import add_overrides

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Direction, source, destination, layout and output options."""
    parser.add_argument("direction", choices=["hf-to-mcore", "mcore-to-hf"],
                        help="hf-to-mcore: HF safetensors -> Megatron dist checkpoint; "
                        "mcore-to-hf: back")
    parser.add_argument("src", help="source checkpoint directory")
    parser.add_argument("dst", help="destination directory: must not exist or be empty (unless "
                        "--overwrite); written beside it and renamed into place at the end")
    parser.add_argument("--tp", type=int, help="tensor-parallel size (= --set parallel.tp=N)")
    parser.add_argument("--pp", type=int, help="pipeline-parallel size (= --set parallel.pp=N)")
    parser.add_argument("--ep", type=int, help="expert-parallel size (= --set parallel.ep=N)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES,
                        help="dtype of the written weights (default: the source's, recorded "
                        "both ways)")
    parser.add_argument("--hf-source", metavar="HF_DIR",
                        help="mcore-to-hf: the HF checkpoint the model came from, whose "
                        "config.json keys, tokenizer files and generation_config.json are "
                        "carried over (default: the one recorded at hf-to-mcore, if it exists)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing non-empty destination (only once the new "
                        "checkpoint is complete)")
    add_overrides(parser, "other overrides, e.g. --set parallel.sequence_parallel=true (the "
                  "model comes from the source checkpoint)")


def layout_overrides(args: argparse.Namespace) -> list[str]:
    """`--tp/--pp/--ep` as `--set parallel.*` overrides, before the explicit `--set`s."""
    flags = [f"parallel.{k}={getattr(args, k)}" for k in ("tp", "pp", "ep")
             if getattr(args, k) is not None]
    return flags + list(args.overrides)


def run(args: argparse.Namespace) -> int:
    """Run `megatron-rl convert`; user errors print one line and exit 1."""
    # checked before Megatron-Core is imported: a wrong path or a truncated file is named in a
    # second, not after the model is built (megatron_rl.cli.errors prints it once, on rank 0)
    from megatron_rl.convert.validate import check_destination, check_hf_source, check_mcore_source

    if args.hf_source is not None and args.direction != "mcore-to-hf":
        raise ValueError("--hf-source: only for mcore-to-hf (hf-to-mcore reads its source "
                         "directly)")
    check_destination(args.dst, args.overwrite)
    if args.direction == "hf-to-mcore":
        check_hf_source(args.src)
    else:
        check_mcore_source(args.src)

    # Megatron-Core: imported on run so that `megatron-rl --help` stays light
    from megatron_rl.actor.parallel import destroy_distributed
    from megatron_rl.convert.checkpoints import hf_to_mcore, log_rank0, mcore_to_hf

    overrides = layout_overrides(args)
    try:  # an error a user can cause: one line, exit 1 (megatron_rl.cli.errors)
        if args.direction == "hf-to-mcore":
            out = hf_to_mcore(args.src, args.dst, overrides, overwrite=args.overwrite,
                              dtype=args.dtype)
        else:
            out = mcore_to_hf(args.src, args.dst, overrides, overwrite=args.overwrite,
                              dtype=args.dtype, hf_source=args.hf_source)
    finally:
        destroy_distributed()
    log_rank0(f"wrote {out}")
    return 0
