"""The model to evaluate as an embedded rollout engine: a Hugging Face model directory, or a
megatron-rl dist checkpoint loaded into the actor and synced into an engine on rank 0."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers

from megatron_rl.actor.config import ModelConfig
from megatron_rl.actor.parallel import destroy_distributed, init_distributed
from megatron_rl.config import RunConfig, load_config
from megatron_rl.configurable import from_dict, require
from megatron_rl.convert.maps import Arch
from megatron_rl.convert.registry import ARCHS
from megatron_rl.data import build_tokenizer, load_tokenizer
from megatron_rl.evaluate import eval_data
from megatron_rl.rollout.transformers_engine import TransformersEngine
from megatron_rl.rollout.weight_sync import sync_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
"""Any of these in an HF model directory means it brings its own tokenizer."""


def rank() -> int:
    """This process's global rank (RANK, 0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def hf_engine(path: str, config: str | None,
              overrides: Sequence[str]) -> tuple[RunConfig, TransformersEngine | None]:
    """The run config and a `TransformersEngine` on the HF model at `path` (rank 0; None on other
    ranks). Raises FileNotFoundError / ValueError naming `path`."""
    hf_dir = Path(path)
    if not (hf_dir / "config.json").is_file():
        what = "no config.json" if hf_dir.is_dir() else "directory not found"
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory ({what})")
    cfg = load_config(config, overrides)
    if rank() != 0:
        return cfg, None
    try:  # fp32, as the embedded engine runs the actor's weights
        model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot load a Hugging Face causal LM ({first})") from e
    own = any((hf_dir / f).is_file() for f in TOKENIZER_FILES)
    tokenizer = load_tokenizer(hf_dir) if own else _tokenizer(cfg, model.config.vocab_size)
    return cfg, TransformersEngine(model, tokenizer, timeout_s=cfg.rollout.call_timeout_s)


def checkpoint_engine(path: str, config: str | None,
                      overrides: Sequence[str]) -> tuple[RunConfig, TransformersEngine | None]:
    """Load a megatron-rl dist checkpoint into the actor (collective) and push its weights
    into a `TransformersEngine` on rank 0 (None on other ranks). The model comes from the
    checkpoint's recorded config; the layout from the run config. Call `teardown()` after."""
    if not Path(path).is_dir():  # before importing Megatron-Core
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    # Megatron-Core: only this route needs it, the HF route runs without it
    from megatron_rl.actor import checkpoint

    info = checkpoint.read_info(path)  # FileNotFoundError naming the path
    if not info.get("model") or info.get("arch") not in ARCHS:
        raise ValueError(f"{path}: no model config/architecture recorded in "
                         f"{checkpoint.INFO}; evaluate checkpoints written by megatron-rl")
    cfg = load_config(config, overrides, model=from_dict(ModelConfig, info["model"]))
    require(cfg.parallel.pp == 1, "parallel.pp", "eval pushes weights into an engine on rank 0, "
            "which sees only its pipeline stage", "use parallel.pp=1")
    arch = ARCHS[info["arch"]]
    engine = None
    if rank() == 0:  # before the collectives: other ranks wait at most parallel.timeout_s
        tokenizer = _tokenizer(cfg, cfg.model.vocab_size)
        engine = TransformersEngine.from_model_config(cfg.model, arch, tokenizer=tokenizer,
                                                      timeout_s=cfg.rollout.call_timeout_s)
    _load_into(engine, path, cfg, arch)
    return cfg, engine


def teardown() -> None:
    """Leave the process groups of the checkpoint route, if it made any."""
    if dist.is_initialized():
        destroy_distributed()


def _tokenizer(cfg: RunConfig, vocab_size: int) -> Any:
    """The config's tokenizer (data.tokenizer, or the demo tokenizer trained on the prompts)."""
    return build_tokenizer(eval_data(cfg), vocab_size)


def _load_into(engine: TransformersEngine | None, path: str, cfg: RunConfig, arch: Arch) -> None:
    """Build the actor, load the checkpoint's weights and sync them into `engine` (collective);
    the actor is dropped afterwards."""
    from megatron_rl.actor.actor import Actor  # Megatron-Core, as in checkpoint_engine

    init_distributed(cfg.parallel, seed=cfg.train.seed)
    actor = Actor(cfg.model, cfg.parallel, cfg.actor)
    actor.load(path, with_optimizer=False)
    bucket = cfg.rollout.weight_sync_bucket_mb * 2**20
    sync_weights(actor, [engine] if engine is not None else [], bucket, arch=arch)
