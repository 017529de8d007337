"""`megatron-rl serve (--model-path DIR | --config FILE) [--host H] [--port P]`: an embedded
engine behind SGLang-compatible HTTP routes (the server is `megatron_rl.rollout.server`)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_rl.rollout.engine import RolloutEngine

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model (an HF directory or our config) and where to listen."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model-path", help="HF model directory (config.json + weights)")
    src.add_argument("--config", help="YAML run config: serve a random-init model of its "
                     "model section (e.g. configs/tiny_moe_cpu.yaml)")
    parser.add_argument("--tokenizer-path", help="tokenizer directory (default: --model-path)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=30000,
                        help="port (default: 30000; 0 = any free port, printed when ready)")


def run(args: argparse.Namespace) -> int:
    """Run `megatron-rl serve` until SIGTERM/SIGINT; 2 without exactly one model source."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if bool(args.model_path) == bool(args.config):
        print("megatron-rl serve: give exactly one of --model-path and --config", file=sys.stderr)
        return 2
    from megatron_rl.rollout.server import serve  # torch: keeps `megatron-rl --help` light

    serve(_engine(args), args.host, args.port, model_path=args.model_path or args.config,
          tokenizer_path=args.tokenizer_path)
    return 0


def _engine(args: argparse.Namespace) -> RolloutEngine:
    """The embedded `TransformersEngine` from an HF directory or from our config."""
    # torch and transformers, as in run()
    from megatron_rl.rollout.transformers_engine import TransformersEngine

    if args.model_path:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(args.model_path)
        tok_path = args.tokenizer_path or args.model_path
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(tok_path)
        except (OSError, ValueError) as e:
            logger.warning("no tokenizer at %s (%s): serving input_ids only", tok_path, e)
            tokenizer = None
        return TransformersEngine(model, tokenizer)
    from megatron_rl.config import load_config

    cfg = load_config(args.config, getattr(args, "overrides", []))
    return TransformersEngine.from_model_config(cfg.model)  # the arch of model.hf_architecture
