"""`megatron-rl submit CONFIG [--set K=V] [--dry-run] [--convert SRC DST | --rehearse]`: render an
sbatch script from a run config and submit it to Slurm (the job is `megatron_rl.launch.slurm`;
a rehearsal's config is `megatron_rl.launch.rehearse`)."""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from pathlib import Path

from megatron_rl.cli.args import add_config_args
from megatron_rl.cli.errors import debug


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Config arguments, `--dry-run` and `--convert SRC DST`."""
    add_config_args(parser)
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
    parser.add_argument(
        "--rehearse", action="store_true",
        help="rehearse the config on one node of 4 CPU ranks: the model shrunk (every "
        "architectural feature kept), the layout scaled to 4 ranks, `megatron-rl serve` "
        "engines, synthetic data, a few steps; --set overrides apply to the rehearsal",
    )


def run(args: argparse.Namespace) -> int:
    """Run `megatron-rl submit`: print the script (--dry-run) or submit it and print the job id;
    user errors print one line and exit 1."""
    from megatron_rl.launch import slurm  # the run config imports torch: keeps --help light

    # a bad config or file (ValueError, OSError): one line, exit 1 (megatron_rl.cli.errors)
    if args.rehearse and args.convert:
        print("megatron-rl submit: give one of --rehearse and --convert", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        config, source = args.config, None
        if args.rehearse:
            from megatron_rl.launch import rehearse

            config, notes = stack.enter_context(rehearse.rehearsal_file(args.config))
            source = " ".join([args.config, "--rehearse", *(f"--set {o}" for o in args.overrides)])
        workdir = slurm.job_workdir(config, args.overrides, Path.cwd())
        convert = tuple(args.convert) if args.convert else None
        job = slurm.build(config, args.overrides, workdir, convert=convert, source=source)
        if args.rehearse:
            cfg = slurm.load_job_config(config, args.overrides, workdir)
            for line in [*notes, *rehearse.warnings(args.config, cfg, workdir)]:
                print(f"megatron-rl submit --rehearse: {line}", file=sys.stderr)
    if args.dry_run:
        print(job.script, end="")
        print(f"megatron-rl submit: dry run; to submit it by hand: mkdir -p "
              f"{job.script_path.parent} (Slurm opens the log there) and sbatch the script",
              file=sys.stderr)
        return 0
    try:
        job_id = slurm.sbatch(job.script, job.script_path)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        if debug(args):
            raise
        print(f"megatron-rl submit: {err}", file=sys.stderr)
        return 1
    print(job_id)
    print(f"megatron-rl submit: job {job_id} ({job.name}); script {job.script_path}; log "
          f"{job.script_path.parent}/{job.name}-{job_id}.out", file=sys.stderr)
    return 0
