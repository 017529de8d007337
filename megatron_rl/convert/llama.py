"""Llama (and SmolLM2): GQA attention with RoPE, SwiGLU MLP, RMSNorm, optional tied head."""

from __future__ import annotations

from typing import Any

from megatron_rl.convert.maps import (
    Arch,
    Rule,
    dense_attention_rules,
    glu_mlp_rules,
    output_rules,
    require_hf,
    rope_theta,
)


def dense_model_config(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """Fields shared by Llama, Qwen2 and Qwen3 (and the attention part of Qwen3-MoE)."""
    require_hf(hf, "hidden_act", ("silu",), arch)
    require_hf(hf, "mlp_bias", (False,), arch)
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        ffn_hidden_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        rotary_base=rope_theta(hf),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def dense_hf_config(m: Any, model_type: str, architecture: str) -> dict[str, Any]:
    """The config.json fields shared by the dense families."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": m.kv_channels or m.hidden_size // m.num_attention_heads,
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon,
        "rope_parameters": {"rope_theta": m.rotary_base, "rope_type": "default"},
        "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def dense_rules(m: Any) -> dict[str, Rule]:
    """Attention, dense SwiGLU MLP per layer, output head."""
    rules = dense_attention_rules(qkv_bias=m.add_qkv_bias, qk_norm=m.qk_layernorm)
    rules.update(glu_mlp_rules("decoder.layers.{L}.mlp.", "model.layers.{L}.mlp."))
    rules.update(output_rules(m.tie_embeddings))
    return rules


def _model_config(hf: dict[str, Any]) -> dict[str, Any]:
    require_hf(hf, "attention_bias", (False,), "llama")
    return dense_model_config(hf, "llama")


ARCH = Arch(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    model_config=_model_config,
    hf_config=lambda m: dense_hf_config(m, "llama", "LlamaForCausalLM")
    | {"attention_bias": False, "mlp_bias": False},
    rules=dense_rules,
    ignored_hf=(r".*rotary_emb\.inv_freq$",),
)
