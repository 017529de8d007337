"""`megatron-rl train CONFIG [--set K=V] [--resume]`: the demo's base model when the config asks
for one, held-out eval of the starting policy, RL, held-out eval again, and a before / after
summary."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_rl.cli.args import add_config_args
from megatron_rl.metrics.logger import format_duration, record_eval

if TYPE_CHECKING:
    from megatron_rl.config import RunConfig
    from megatron_rl.trainer import Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Config arguments plus `--resume`."""
    add_config_args(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the newest "
                        "complete checkpoint in checkpoint.dir (same as --set "
                        "checkpoint.resume=true)")


def run(args: argparse.Namespace) -> int:
    """Run `megatron-rl train`. The config is loaded and checked before torch and Megatron-Core
    are imported, so a bad value is refused in about a second; an error a user can cause, then
    or during training, is one line and exit 1 (`megatron_rl.cli.errors`). Exit 0 also when a
    stop signal ended the run (it saved a checkpoint)."""
    from megatron_rl.config import load_config  # no torch

    start = time.monotonic()
    overrides = list(args.overrides) + (["checkpoint.resume=true"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    # torch and Megatron-Core: imported once the config holds, so that `megatron-rl --help` and
    # a bad config stay light
    from megatron_rl.actor.parallel import destroy_distributed
    from megatron_rl.trainer import Trainer

    try:
        cfg = with_base_model(cfg)
        trainer = Trainer(cfg)
        before = eval_before(trainer) if cfg.eval.size != 0 else None
        trainer.run()
        if trainer.stopped_by_signal:
            return 0
        after = trainer.evaluate() if before is not None else None
        if trainer.rank == 0 and before is not None and after is not None:
            record_eval(cfg.logging, cfg.train.output_dir, trainer.step, after)
            print(summary(cfg, before, after), flush=True)
        if trainer.rank == 0:
            print(f"megatron-rl train: done in {format_duration(time.monotonic() - start)}",
                  flush=True)
    finally:
        destroy_distributed()
    return 0


def with_base_model(cfg: RunConfig) -> RunConfig:
    """`cfg` starting from the demo's pre-trained base (built and cached on first use) when
    `pretrain.steps > 0` and no `checkpoint.load` is given."""
    if cfg.pretrain.steps == 0 or cfg.checkpoint.load:
        return cfg
    from megatron_rl.pretrain import ensure_base_model  # torch: see run()

    rank0 = int(os.environ.get("RANK", "0")) == 0
    base = ensure_base_model(cfg, log=lambda line: print(line, flush=True) if rank0 else None)
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint,
                                                                   load=str(base)))


def eval_before(trainer: Trainer) -> dict[str, float]:
    """The starting policy's eval metrics, kept in `<output_dir>/eval/before.json` so that a
    resumed run still reports them."""
    file = Path(trainer.cfg.train.output_dir) / "eval" / "before.json"
    if trainer.resumed_from is not None and file.is_file():
        return json.loads(file.read_text())
    if trainer.resumed_from is not None:
        return {}
    metrics = trainer.evaluate()
    if trainer.rank == 0:
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(metrics, indent=1) + "\n")
        record_eval(trainer.cfg.logging, trainer.cfg.train.output_dir, trainer.step, metrics)
        print(f"held-out accuracy before RL: {metrics['eval/accuracy']:.1%} "
              f"(pass@1 over {trainer.cfg.eval.n_samples} samples per problem)", flush=True)
    return metrics


def summary(cfg: RunConfig, before: dict[str, float], after: dict[str, float]) -> str:
    """Before/after table of the eval metrics, accuracy first."""
    keys = ["eval/accuracy"] + [k for k in after if k != "eval/accuracy"]
    lines = [f"held-out evaluation ({cfg.data.task}): before RL -> after {cfg.train.steps} steps",
             f"  {'metric':<22}{'before':>9}{'after':>9}{'change':>9}"]
    for k in keys:
        b, a = before.get(k, math.nan), after[k]
        lines.append(f"  {k:<22}{b:>9.3f}{a:>9.3f}{a - b:>+9.3f}")
    acc_b, acc_a = before.get("eval/accuracy", math.nan), after["eval/accuracy"]
    lines.append(f"accuracy {acc_b:.1%} -> {acc_a:.1%} ({(acc_a - acc_b) * 100:+.1f} points); "
                 f"curves: {cfg.train.output_dir}/learning_curve.png, tensorboard --logdir "
                 f"{cfg.logging.log_dir}")
    return "\n".join(lines)
