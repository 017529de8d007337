"""Hugging Face <-> Megatron-Core conversion: per-architecture maps, sharded load, bucketed export.

Entry points:
- `hf_model_config(path)`: the architecture and our `ModelConfig` of an HF checkpoint.
- `load_hf_checkpoint(actor_model, model_cfg, path)`: HF safetensors into a sharded model.
- `save_hf_checkpoint(actor_model, model_cfg, out_dir)`: back to HF layout.
- `iter_hf_buckets(...)`: `(hf_name, tensor)` in bounded buckets (weight sync).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_rl.actor.config import ModelConfig
from megatron_rl.convert.maps import Arch
from megatron_rl.convert.registry import ARCHS, arch_for, read_hf_config


def hf_model_config(path: str | Path, **overrides: Any) -> tuple[Arch, ModelConfig]:
    """Architecture and `ModelConfig` of the HF checkpoint at `path`."""
    hf = read_hf_config(path)
    arch = arch_for(hf)
    fields = arch.model_config(hf) | overrides
    model = ModelConfig(**fields)
    model.validate()
    return arch, model


def arch_of(model_cfg: ModelConfig, name: str) -> Arch:
    """An architecture by name (for exporting a model built from our own config)."""
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; supported: {sorted(ARCHS)}")
    return ARCHS[name]


__all__ = ["ARCHS", "Arch", "arch_for", "arch_of", "hf_model_config", "read_hf_config"]
