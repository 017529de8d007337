"""`megatron-rl plan CONFIG [--gpus N] [hardware flags]`: per-GPU memory and step time of a
config, on paper, and whether the trainer would start it (the planner is
`megatron_rl.launch.plan`, the settings check `megatron_rl.launch.support`)."""

from __future__ import annotations

import argparse

from megatron_rl.cli.args import add_config_args, positive
from megatron_rl.configurable import apply_overrides, from_dict
from megatron_rl.launch.plan import Hardware, make_plan, render


def _fraction(text: str) -> float:
    value = positive(float)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text} (e.g. 0.3 for 30%)")
    return value


_FLAGS = {  # flag -> (Hardware field, parser)
    "--gpu-mem-gib": ("gpu_mem_gib", positive(float)),
    "--reserve-gib": ("reserve_gib", positive(float)),
    "--peak-tflops": ("peak_tflops", positive(float)),
    "--mfu": ("mfu", _fraction),
    "--rollout-mfu": ("rollout_mfu", _fraction),
    "--nvlink-gbs": ("nvlink_gbs", positive(float)),
    "--ib-gbs": ("ib_gbs", positive(float)),
    "--gpus-per-node": ("gpus_per_node", positive(int)),
}

_FIELD_HELP = {
    "gpu_mem_gib": "memory of one GPU, GiB", "reserve_gib": "per-GPU memory kept back for the "
    "CUDA context, NCCL and fragmentation, GiB", "peak_tflops": "dense bf16 peak of one GPU, "
    "TFLOP/s", "mfu": "model FLOP utilisation of training and log-prob forwards, (0, 1]",
    "rollout_mfu": "model FLOP utilisation of generation, (0, 1]", "nvlink_gbs": "per-GPU "
    "NVLink bandwidth, GB/s", "ib_gbs": "per-GPU inter-node bandwidth, GB/s",
    "gpus_per_node": "GPUs per node when slurm.gpus_per_node is 0 (a CPU job)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Config arguments plus the world size and the hardware assumptions (H100 SXM defaults)."""
    add_config_args(parser)
    parser.add_argument("--gpus", type=positive(int), help="actor GPUs (default: (slurm.nodes - "
                        "slurm.engine_nodes) x slurm.gpus_per_node, or tp*pp*cp*dp on a CPU job)")
    parser.add_argument("--engine-mem-fraction", dest="engine_mem_fraction", type=_fraction,
                        help="memory fraction of an engine (default: --mem-fraction-static of "
                        "slurm.engine_args, else 0.7)")
    parser.add_argument("--mtp-layers", type=int, default=0, choices=range(0, 9), metavar="N",
                        help="multi-token-prediction layers to count (default 0)")
    defaults = Hardware()
    for flag, (name, parse) in _FLAGS.items():
        # gpus_per_node: None = the slurm section's, else the H100 node's (decided in `run`)
        parser.add_argument(flag, dest=name, type=parse,
                            default=None if name == "gpus_per_node" else getattr(defaults, name),
                            help=f"{_FIELD_HELP[name]} (default: {getattr(defaults, name)})")


def run(args: argparse.Namespace) -> int:
    """Run `megatron-rl plan`: print the table; exit 0 whatever the verdict (FITS, DOES NOT
    FIT, or CANNOT START naming each setting the trainer would refuse: the table is the
    answer); a config that does not load is one line and exit 1, as for every subcommand
    (`megatron_rl.cli.errors`)."""
    from megatron_rl.config import load_config

    world, per_node = _world_size(args.config, args.overrides, args.gpus)
    cfg = load_config(args.config, args.overrides, world_size=world)
    flags = {name: getattr(args, name) for name, _ in _FLAGS.values()}
    if flags["gpus_per_node"] is None:  # not given: the job's nodes, else an H100 node's
        flags["gpus_per_node"] = per_node or Hardware().gpus_per_node
    hw = Hardware(mtp_layers=args.mtp_layers, engine_mem_fraction=args.engine_mem_fraction,
                  **flags)
    print(render(make_plan(cfg, hw), cfg, args.config))
    return 0


def _world_size(path: str, overrides: list[str], gpus: int | None) -> tuple[int, int | None]:
    """Actor GPUs (--gpus, else the slurm section's trainer GPUs, else tp*pp*cp*dp with dp as
    set or 1 on a CPU job) and the slurm section's GPUs per node (None on a CPU job)."""
    from megatron_rl.config import RunConfig, read_yaml  # torch, as in run()

    raw = from_dict(RunConfig, apply_overrides(RunConfig, read_yaml(path), overrides))
    slurm = raw.slurm
    per_node = slurm.gpus_per_node or None
    if gpus is not None:
        return gpus, per_node
    if per_node:
        return max(1, slurm.trainer_nodes) * slurm.ranks_per_node, per_node
    par = raw.parallel
    return par.tp * par.pp * par.cp * (par.dp or 1), per_node
