"""Whole-checkpoint conversion, HF <-> Megatron-Core, single process or under torchrun (the
library behind `megatron-rl convert`).

hf_to_mcore reads each rank's slices of the safetensors straight into the sharded model and
writes a Megatron dist checkpoint (loadable under any layout); mcore_to_hf loads a dist
checkpoint written by us (it records the model config and architecture) and writes config.json +
sharded safetensors. The model always comes from the source checkpoint; the overrides pick the
layout.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from megatron_rl.actor import checkpoint
from megatron_rl.actor.actor import Actor
from megatron_rl.actor.config import ModelConfig
from megatron_rl.actor.parallel import init_distributed
from megatron_rl.config import load_config
from megatron_rl.configurable import from_dict
from megatron_rl.convert import hf_model_config
from megatron_rl.convert.registry import ARCHS


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def log_rank0(msg: str) -> None:
    """`[convert] msg` on stderr, from rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[convert] {msg}", file=sys.stderr, flush=True)


def _actor(model: ModelConfig, overrides: list[str]) -> Actor:
    # Sequence lengths do not matter for conversion; keep them within the model's positions.
    seq = min(256, model.max_position_embeddings)
    lengths = [f"actor.seq_length={seq}", f"rollout.max_new_tokens={max(1, seq // 2)}"]
    cfg = load_config(None, lengths + list(overrides), world_size=_world(), model=model)
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    return Actor(cfg.model, cfg.parallel, cfg.actor)


def _check_destination(dst: str) -> None:
    """A destination that holds anything is refused before any work: conversion never replaces
    or deletes a user's files."""
    out = Path(dst)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{dst}: the destination exists and is not empty; choose a new "
                              "directory (nothing was written)")


def hf_to_mcore(src: str, dst: str, overrides: list[str]) -> str:
    """HF checkpoint -> Megatron dist checkpoint at `dst` (collective); returns its path."""
    _check_destination(dst)
    arch, model = hf_model_config(src)
    log_rank0(f"{src}: {arch.name}, {model.num_layers} layers, {model.num_experts} experts")
    actor = _actor(model, overrides)
    stats = actor.load_hf(src, arch)
    log_rank0(f"rank 0 read {stats['bytes_read'] / 2**20:.1f} MiB in {stats['seconds']:.1f}s")
    out = Path(dst)
    return actor.save(out.parent, out.name, with_optimizer=False)


def mcore_to_hf(src: str, dst: str, overrides: list[str]) -> str:
    """Megatron dist checkpoint written by megatron-rl -> HF checkpoint at `dst` (collective);
    returns its path."""
    _check_destination(dst)
    info = checkpoint.read_info(src)
    if not info.get("model") or not info.get("arch"):
        raise ValueError(f"{src}: no model config/architecture recorded (megatron_rl.json); "
                         "only checkpoints converted from HF by megatron-rl can go back")
    model = from_dict(ModelConfig, info["model"])
    actor = _actor(model, overrides)
    actor.load(src, with_optimizer=False)
    return actor.save_hf(dst, ARCHS[info["arch"]])
