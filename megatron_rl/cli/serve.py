"""`megatron-rl serve (--model-path DIR | --config FILE [--set K=V]) [--host H] [--port P]`: an
embedded engine behind SGLang-compatible HTTP routes (the server is `megatron_rl.rollout.server`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_rl.cli.args import add_overrides, port

if TYPE_CHECKING:
    from megatron_rl.config import RunConfig
    from megatron_rl.rollout.engine import RolloutEngine

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The model (an HF directory or our config) and where to listen."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model-path", help="HF model directory (config.json + weights)")
    src.add_argument("--config", help="YAML run config: serve a random-init model of its "
                     "model section with the tokenizer its training uses (e.g. "
                     "configs/tiny_moe_cpu.yaml); the trainer sends the weights")
    add_overrides(parser, "override one field of --config by its dotted name (repeatable)")
    parser.add_argument("--tokenizer-path", help="tokenizer directory (default: --model-path, or "
                        "the tokenizer of --config's data section)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=port, default=30000,
                        help="port (default: 30000; 0 = any free port, printed when ready)")


def run(args: argparse.Namespace) -> int:
    """Run `megatron-rl serve` until SIGTERM/SIGINT; 2 without exactly one model source. A bad
    config, a missing model directory or a port in use is one line and exit 1
    (`megatron_rl.cli.errors`), found before the model is loaded."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if bool(args.model_path) == bool(args.config):
        print("megatron-rl serve: give exactly one of --model-path and --config", file=sys.stderr)
        return 2
    if args.overrides and not args.config:
        print("megatron-rl serve: --set overrides fields of --config", file=sys.stderr)
        return 2
    cfg = None
    if args.config:
        from megatron_rl.config import load_config  # no torch: a bad config is refused first

        cfg = load_config(args.config, args.overrides)
    else:
        check_model_dir(args.model_path)
    from megatron_rl.rollout.server import listen, serve  # torch: keeps `megatron-rl --help` light

    server = listen(args.host, args.port)
    try:
        engine, tokenizer_path = _engine(args, cfg)
    except BaseException:
        server.server_close()
        raise
    serve(engine, model_path=args.model_path or args.config, tokenizer_path=tokenizer_path,
          server=server)
    return 0


def check_model_dir(path: str) -> None:
    """`--model-path` is a local HF model directory (config.json beside the weights)."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model-path {path}: no such directory")
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"--model-path {path}: no config.json there (not a Hugging "
                                "Face model directory)")


def _engine(args: argparse.Namespace, cfg: RunConfig | None
            ) -> tuple[RolloutEngine, str | None]:
    """The embedded `TransformersEngine` from an HF directory, or from our config with the
    tokenizer the trainer builds for it; and the tokenizer's directory."""
    # torch and transformers, as in run()
    from megatron_rl.rollout.transformers_engine import TransformersEngine

    if cfg is None:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(args.model_path)
        tok_path = args.tokenizer_path or args.model_path
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(tok_path)
        except (OSError, ValueError) as e:
            logger.warning("no tokenizer at %s (%s): serving input_ids only", tok_path, e)
            return TransformersEngine(model, None), None
        return TransformersEngine(model, tokenizer), tok_path
    from megatron_rl.data import load_tokenizer, tokenizer_dir

    # the trainer's tokenizer (Trainer: build_tokenizer(cfg.data, cfg.model.vocab_size, train)),
    # from the same cache: without one the engine answers no text and never stops at EOS
    tok_path = str(args.tokenizer_path or tokenizer_dir(cfg.data, cfg.model.vocab_size))
    engine = TransformersEngine.from_model_config(  # the arch of model.hf_architecture
        cfg.model, tokenizer=load_tokenizer(tok_path))
    return engine, tok_path
