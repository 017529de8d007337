"""`megatron-rl convert`: HF <-> Megatron-Core checkpoints, single process or under torchrun.

    megatron-rl convert hf-to-mcore HF_DIR MCORE_DIR [--set parallel.tp=2 ...]
    megatron-rl convert mcore-to-hf MCORE_DIR HF_DIR [--set parallel.tp=2 ...]

hf-to-mcore reads each rank's slices of the safetensors straight into the sharded model and
writes a Megatron dist checkpoint (loadable under any layout); mcore-to-hf loads a dist
checkpoint written by us (it records the model config and architecture) and writes config.json +
sharded safetensors. The model always comes from the source checkpoint; `--set` picks the layout.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megatron_rl.actor import checkpoint
from megatron_rl.actor.config import ModelConfig
from megatron_rl.configurable import from_dict


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _rank0(msg: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[convert] {msg}", file=sys.stderr, flush=True)


def _actor(model: ModelConfig, overrides: list[str]):
    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.parallel import init_distributed
    from megatron_rl.config import load_config

    # Sequence lengths do not matter for conversion; keep them within the model's positions.
    seq = min(256, model.max_position_embeddings)
    lengths = [f"actor.seq_length={seq}", f"rollout.max_new_tokens={max(1, seq // 2)}"]
    cfg = load_config(None, lengths + list(overrides), world_size=_world(), model=model)
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    return Actor(cfg.model, cfg.parallel, cfg.actor)


def hf_to_mcore(src: str, dst: str, overrides: list[str]) -> str:
    """HF checkpoint -> Megatron dist checkpoint at `dst`."""
    from megatron_rl.convert import hf_model_config

    arch, model = hf_model_config(src)
    _rank0(f"{src}: {arch.name}, {model.num_layers} layers, {model.num_experts} experts")
    actor = _actor(model, overrides)
    stats = actor.load_hf(src, arch)
    _rank0(f"rank 0 read {stats['bytes_read'] / 2**20:.1f} MiB in {stats['seconds']:.1f}s")
    out = Path(dst)
    return actor.save(out.parent, out.name, with_optimizer=False)


def mcore_to_hf(src: str, dst: str, overrides: list[str]) -> str:
    """Megatron dist checkpoint written by megatron-rl -> HF checkpoint at `dst`."""
    from megatron_rl.convert.registry import ARCHS

    info = checkpoint.read_info(src)
    if not info.get("model") or not info.get("arch"):
        raise ValueError(f"{src}: no model config/architecture recorded (megatron_rl.json); "
                         "only checkpoints converted from HF by megatron-rl can go back")
    model = from_dict(ModelConfig, info["model"])
    actor = _actor(model, overrides)
    actor.load(src, with_optimizer=False)
    return actor.save_hf(dst, ARCHS[info["arch"]])


def main(args: argparse.Namespace) -> int:
    """CLI handler; user errors print one line and exit 1."""
    run = hf_to_mcore if args.direction == "hf-to-mcore" else mcore_to_hf
    try:
        out = run(args.src, args.dst, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"megatron-rl convert: {err}", file=sys.stderr)
        return 1
    finally:
        from megatron_rl.actor.parallel import destroy_distributed

        destroy_distributed()
    _rank0(f"wrote {out}")
    return 0
