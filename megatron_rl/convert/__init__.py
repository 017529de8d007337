"""Hugging Face <-> Megatron-Core conversion: per-architecture maps, sharded load, bucketed export.

Entry points:
- `hf_model_config(path)`: the architecture and our `ModelConfig` of an HF checkpoint.
- `load_hf_checkpoint(actor_model, model_cfg, path)`: HF safetensors into a sharded model.
- `save_hf_checkpoint(actor_model, model_cfg, out_dir)`: back to HF layout.
- `iter_hf_buckets(...)`: `(hf_name, tensor)` in bounded buckets (weight sync).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from megatron_rl.actor.config import ModelConfig
from megatron_rl.convert.maps import Arch
from megatron_rl.convert.registry import ARCHS, arch_for, fp8_block, read_hf_config


def hf_model_config(path: str | Path, **overrides: Any) -> tuple[Arch, ModelConfig]:
    """Architecture and `ModelConfig` of the HF checkpoint at `path`."""
    hf = read_hf_config(path)
    arch = arch_for(hf)
    fp8_block(hf, str(Path(path) / "config.json"))  # unsupported quantization: refused first
    fields = arch.model_config(hf) | {"hf_architecture": arch.name} | overrides
    model = ModelConfig(**fields)
    model.validate()
    return arch, model


# Fields that shape training, not the weights or the forward pass an HF model must reproduce.
_TRAINING_ONLY = frozenset({
    "hf_architecture", "init_method_std", "moe_aux_loss_coeff", "moe_router_load_balancing_type",
    "moe_router_bias_update_rate", "moe_token_dispatcher_type",
})


_GQA_ONLY = frozenset({"kv_channels", "num_query_groups"})  # MLA has neither


def _effective(m: ModelConfig, key: str) -> Any:
    """A field's value with its None/shorthand defaults spelled out, as HF configs state them."""
    value = getattr(m, key)
    if key == "kv_channels" and value is None:
        return m.hidden_size // m.num_attention_heads
    if key == "num_query_groups" and value is None:
        return m.num_attention_heads
    if key == "moe_ffn_hidden_size" and value is None:
        return m.ffn_hidden_size
    if key == "moe_layer_freq" and isinstance(value, int):
        return [1 if i % value == 0 else 0 for i in range(m.num_layers)]
    return value


def arch_of(model_cfg: ModelConfig) -> Arch:
    """The architecture named by `model.hf_architecture`, checked to express this model: the
    model must survive ModelConfig -> HF config -> ModelConfig unchanged."""
    name = model_cfg.hf_architecture
    if name not in ARCHS:
        raise ValueError(f"model.hf_architecture: {name!r} is not one of {sorted(ARCHS)}")
    arch = ARCHS[name]
    back = arch.model_config(arch.hf_config(model_cfg))
    # A field the architecture does not map must be at its default (the feature unused).
    default = ModelConfig()
    expected = {f.name: back.get(f.name, _effective(default, f.name))
                for f in dataclasses.fields(ModelConfig) if f.name not in _TRAINING_ONLY
                and (model_cfg.num_experts or not f.name.startswith("moe_"))
                and not (model_cfg.multi_latent_attention and f.name in _GQA_ONLY)}
    lost = sorted(k for k, v in expected.items() if _effective(model_cfg, k) != v)
    if lost:
        diffs = ", ".join(f"{k}={getattr(model_cfg, k)!r} (HF gives {expected[k]!r})" for k in lost)
        raise ValueError(f"model.hf_architecture: {name} cannot express this model: {diffs}")
    return arch


def _same(ours: Any, theirs: Any) -> bool:
    """Equal, floats within float32 rounding (a config written from float32, e.g. a GGUF's
    rms_norm_eps 1e-5 stored as 9.999999747378752e-06, states the same value)."""
    if isinstance(ours, float) or isinstance(theirs, float):
        return (isinstance(ours, int | float) and isinstance(theirs, int | float)
                and math.isclose(ours, theirs, rel_tol=1e-6))
    return ours == theirs


def check_hf_matches(model_cfg: ModelConfig, path: str | Path) -> Arch:
    """The architecture of the HF checkpoint at `path`, after checking that every field its
    config.json states equals the run's `model` section (shapes alone can agree while, e.g.,
    rope_theta or the norm epsilon differ and the loaded model silently computes another
    function)."""
    arch, theirs = hf_model_config(path)
    stated = arch.model_config(read_hf_config(path))
    differ = sorted(k for k in stated if k not in _TRAINING_ONLY
                    and not _same(_effective(model_cfg, k), _effective(theirs, k)))
    if differ:
        diffs = ", ".join(f"model.{k}={_effective(model_cfg, k)!r} but {_effective(theirs, k)!r}"
                          " there" for k in differ)
        raise ValueError(f"checkpoint.load={str(path)!r}: its config.json does not match the "
                         f"run's model section: {diffs}; make the model section agree with it")
    return arch


__all__ = ["ARCHS", "Arch", "arch_for", "arch_of", "check_hf_matches", "hf_model_config",
           "read_hf_config"]
