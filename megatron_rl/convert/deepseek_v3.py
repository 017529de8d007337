"""DeepSeek-V3: multi-latent attention (q/kv LoRA, decoupled RoPE dims), sigmoid router with an
expert-score correction bias (aux-loss-free balancing), group-limited top-k, routed scaling
factor, shared experts, and the first `first_k_dense_replace` layers dense.

Routing equivalence: HF scores = sigmoid(logits); selection on scores + bias, groups ranked by the
sum of their top-2 scores; weights = selected scores / their sum * routed_scaling_factor. That is
Megatron's sigmoid router with expert bias, `moe_router_num_groups`/`group_topk` (Megatron sums
the top topk/group_topk scores per group, so topk/group_topk must be 2, as in DeepSeek-V3's 8/4)
and `moe_router_topk_scaling_factor`. HF's `rope_interleave` layout is what Megatron's MLA applies.
"""

from __future__ import annotations

from typing import Any

from megatron_rl.convert.maps import (
    Arch,
    Rule,
    glu_mlp_rules,
    output_rules,
    require_hf,
    rope_parameters,
    rope_theta,
)


def _model_config(hf: dict[str, Any]) -> dict[str, Any]:
    require_hf(hf, "hidden_act", ("silu",), "deepseek_v3")
    require_hf(hf, "scoring_func", ("sigmoid",), "deepseek_v3")
    require_hf(hf, "topk_method", ("noaux_tc",), "deepseek_v3")
    require_hf(hf, "rope_interleave", (True,), "deepseek_v3")
    require_hf(hf, "attention_bias", (False,), "deepseek_v3")
    # Megatron's sigmoid router always renormalises the top-k scores (k > 1); a model trained
    # without (norm_topk_prob false) would silently compute something else: refused by name
    require_hf(hf, "norm_topk_prob", (True,), "deepseek_v3")
    topk, groups, group_topk = hf["num_experts_per_tok"], hf.get("n_group"), hf.get("topk_group")
    if groups and groups > 1 and topk != 2 * group_topk:
        raise ValueError(f"deepseek_v3: num_experts_per_tok={topk} with topk_group={group_topk}: "
                         "Megatron ranks groups by their top topk/topk_group scores and HF by "
                         "their top 2, so they agree only when num_experts_per_tok = 2*topk_group")
    n, dense = hf["num_hidden_layers"], hf.get("first_k_dense_replace", 0)
    return _rope(hf) | dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=n,
        num_attention_heads=hf["num_attention_heads"],
        ffn_hidden_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qk_layernorm=True,  # the q/kv LoRA norms
        multi_latent_attention=True,
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_head_dim=hf["qk_nope_head_dim"],
        qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        num_experts=hf["n_routed_experts"],
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        moe_router_topk=topk,
        moe_shared_expert_intermediate_size=(hf.get("n_shared_experts") or 0)
        * hf["moe_intermediate_size"] or None,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=0.0001,
        moe_router_num_groups=groups if groups and groups > 1 else None,
        moe_router_group_topk=group_topk if groups and groups > 1 else None,
        moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        moe_router_pre_softmax=False,
        moe_layer_freq=[0] * dense + [1] * (n - dense),
    )


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE base and YaRN scaling (DeepSeek-V3's released config uses YaRN, factor 40)."""
    theta = rope_theta(hf, supported=("default", "yarn"))
    p = rope_parameters(hf)
    if p["rope_type"] == "default":
        return {"rotary_base": theta}
    return {
        "rotary_base": theta,
        "rope_scaling": "yarn",
        "rope_scaling_factor": float(p["factor"]),
        "rope_original_max_position_embeddings": int(p["original_max_position_embeddings"]),
        "yarn_beta_fast": float(p.get("beta_fast", 32.0)),
        "yarn_beta_slow": float(p.get("beta_slow", 1.0)),
        "yarn_mscale": float(p.get("mscale", 1.0)),
        "yarn_mscale_all_dim": float(p.get("mscale_all_dim", 0.0)),
    }


def _hf_rope(m: Any) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_theta": m.rotary_base, "rope_type": "default"}
    if m.rope_scaling == "yarn":
        rope |= {"rope_type": "yarn", "factor": m.rope_scaling_factor,
                 "original_max_position_embeddings": m.rope_original_max_position_embeddings,
                 "beta_fast": m.yarn_beta_fast, "beta_slow": m.yarn_beta_slow,
                 "mscale": m.yarn_mscale, "mscale_all_dim": m.yarn_mscale_all_dim}
    return rope


def _hf_config(m: Any) -> dict[str, Any]:
    pattern = m.moe_layer_freq if isinstance(m.moe_layer_freq, list) else [1] * m.num_layers
    dense = pattern.index(1) if 1 in pattern else m.num_layers
    moe_ffn = m.moe_ffn_hidden_size or m.ffn_hidden_size
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "moe_intermediate_size": moe_ffn,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_attention_heads,
        "q_lora_rank": m.q_lora_rank,
        "kv_lora_rank": m.kv_lora_rank,
        "qk_nope_head_dim": m.qk_head_dim,
        "qk_rope_head_dim": m.qk_pos_emb_head_dim,
        "v_head_dim": m.v_head_dim,
        "n_routed_experts": m.num_experts,
        "n_shared_experts": (m.moe_shared_expert_intermediate_size or 0) // moe_ffn,
        "num_experts_per_tok": m.moe_router_topk,
        "n_group": m.moe_router_num_groups or 1,
        "topk_group": m.moe_router_group_topk or 1,
        "routed_scaling_factor": m.moe_router_topk_scaling_factor or 1.0,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "first_k_dense_replace": dense,
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_epsilon,
        "rope_parameters": _hf_rope(m),
        "rope_interleave": True,
        "attention_bias": False,
        "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }


def _rules(m: Any) -> dict[str, Rule]:
    a, h = "decoder.layers.{L}.self_attention.", "model.layers.{L}.self_attn."
    rules = {
        "embedding.word_embeddings.weight": Rule("vocab", ("model.embed_tokens.weight",)),
        "decoder.final_layernorm.weight": Rule("replicated", ("model.norm.weight",)),
        "decoder.layers.{L}.input_layernorm.weight":
            Rule("replicated", ("model.layers.{L}.input_layernorm.weight",)),
        "decoder.layers.{L}.pre_mlp_layernorm.weight":
            Rule("replicated", ("model.layers.{L}.post_attention_layernorm.weight",)),
        a + "linear_kv_down_proj.weight": Rule("column", (h + "kv_a_proj_with_mqa.weight",)),
        a + "kv_layernorm.weight": Rule("replicated", (h + "kv_a_layernorm.weight",)),
        a + "linear_kv_up_proj.weight": Rule("column", (h + "kv_b_proj.weight",)),
        a + "linear_proj.weight": Rule("row", (h + "o_proj.weight",)),
        "decoder.layers.{L}.mlp.router.weight":
            Rule("replicated", ("model.layers.{L}.mlp.gate.weight",)),
        "decoder.layers.{L}.mlp.router.expert_bias":
            Rule("replicated", ("model.layers.{L}.mlp.gate.e_score_correction_bias",)),
    }
    if m.q_lora_rank is None:
        rules[a + "linear_q_proj.weight"] = Rule("column", (h + "q_proj.weight",))
    else:
        rules[a + "linear_q_down_proj.weight"] = Rule("column", (h + "q_a_proj.weight",))
        rules[a + "q_layernorm.weight"] = Rule("replicated", (h + "q_a_layernorm.weight",))
        rules[a + "linear_q_up_proj.weight"] = Rule("column", (h + "q_b_proj.weight",))
    rules.update(glu_mlp_rules("decoder.layers.{L}.mlp.", "model.layers.{L}.mlp."))
    rules.update(glu_mlp_rules("decoder.layers.{L}.mlp.experts.local_experts.{E}.",
                               "model.layers.{L}.mlp.experts.{E}."))
    rules.update(glu_mlp_rules("decoder.layers.{L}.mlp.shared_experts.",
                               "model.layers.{L}.mlp.shared_experts."))
    rules.update(output_rules(m.tie_embeddings))
    return rules


ARCH = Arch(
    name="deepseek_v3",
    hf_architectures=("DeepseekV3ForCausalLM",),
    model_config=_model_config,
    hf_config=_hf_config,
    rules=_rules,
    ignored_hf=(r".*rotary_emb\.inv_freq$",),
    # The released checkpoints hold num_nextn_predict_layers MTP layers after the last one; the
    # policy does not use them (Megatron's MTP training is not wired): skipped, and said so.
    trailing_layers_skipped="multi-token-prediction (MTP) layers",
)
