"""`megatron-rl eval CONFIG [--set K=V ...] (--checkpoint DIR | --hf DIR) [--out FILE]`:
pass@k, cons@k and avg@k of a checkpoint or HF model on the config's held-out set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_rl.cli.args import add_config_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Config arguments, the model to evaluate (`--checkpoint DIR | --hf DIR`) and `--out`."""
    add_config_args(parser)
    src = parser.add_mutually_exclusive_group()  # one is needed: run() says so
    src.add_argument("--checkpoint", metavar="DIR", help="Megatron dist checkpoint written by "
                     "megatron-rl (or the root holding its `latest` file)")
    src.add_argument("--hf", metavar="DIR", help="Hugging Face model directory (config.json + "
                     "safetensors); its tokenizer if it has one, else the config's")
    parser.add_argument("--out", metavar="FILE", help="per-problem results as JSON lines "
                        "(default: <train.output_dir>/eval_results.jsonl); eval_metrics.json "
                        "is written beside it")


def run(args: argparse.Namespace) -> int:
    """Run `megatron-rl eval`: engine and evaluation on rank 0; user errors print one line and
    exit 1 (`megatron_rl.cli.errors`; 2 without a model to evaluate)."""
    if not (args.checkpoint or args.hf):
        print("megatron-rl eval: give the model to evaluate: --checkpoint DIR or --hf DIR",
              file=sys.stderr)
        return 2
    if args.hf:  # no torch yet: a bad config value is refused in about a second
        from megatron_rl.config import load_config

        load_config(args.config, args.overrides)  # (a checkpoint's model comes from it)
    # torch and transformers: imported on run so that `megatron-rl --help` stays light
    from megatron_rl.evaluate import METRICS_FILE, RESULTS_FILE, run_eval
    from megatron_rl.evaluate.engines import checkpoint_engine, hf_engine, teardown

    try:
        if args.hf:
            cfg, engine = hf_engine(args.hf, args.config, args.overrides)
        else:
            cfg, engine = checkpoint_engine(args.checkpoint, args.config, args.overrides)
        if engine is None:  # not rank 0: it only took part in the weight sync, if any
            return 0
        result = run_eval(cfg, engine)
    finally:  # an error a user can cause: one line, exit 1 (megatron_rl.cli.errors)
        if args.checkpoint:
            teardown()
    out = result.write(args.out or Path(cfg.train.output_dir) / RESULTS_FILE)
    (out.parent / METRICS_FILE).write_text(json.dumps(result.metrics, indent=1) + "\n")
    print(format_table(result.metrics))
    print(f"[eval] wrote {out} and {out.parent / METRICS_FILE}", file=sys.stderr)
    return 0


def format_table(metrics: dict[str, float]) -> str:
    """Metrics as a two-column text table."""
    width = max(len("metric"), *(len(k) for k in metrics))
    lines = [f"{'metric':<{width}}  value"]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in metrics.items()]
    return "\n".join(lines)
