"""Qwen3-MoE: Qwen3 attention, softmax top-k router, routed experts (no shared expert).

Routing: HF takes softmax over all experts, then top-k, then renormalises when
`norm_topk_prob`; that equals Megatron's top-k on logits then softmax over the k
(`moe_router_pre_softmax=False`). Without renormalisation it is Megatron's pre-softmax routing.
Dense layers: `mlp_only_layers` and `decoder_sparse_step` become `moe_layer_freq`.
"""

from __future__ import annotations

from typing import Any

from megatron_rl.convert.llama import dense_hf_config, dense_model_config
from megatron_rl.convert.maps import (
    Arch,
    Rule,
    dense_attention_rules,
    glu_mlp_rules,
    output_rules,
    require_hf,
)


def _layer_pattern(hf: dict[str, Any]) -> list[int]:
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or [])
    return [0 if (i in dense or (i + 1) % step) else 1 for i in range(hf["num_hidden_layers"])]


def _model_config(hf: dict[str, Any]) -> dict[str, Any]:
    require_hf(hf, "attention_bias", (False,), "qwen3_moe")
    require_hf(hf, "use_sliding_window", (False,), "qwen3_moe")
    return dense_model_config(hf, "qwen3_moe") | dict(
        qk_layernorm=True,
        # transformers 5 writes num_local_experts; released Qwen3-MoE configs say num_experts.
        num_experts=hf.get("num_experts") or hf["num_local_experts"],
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        moe_router_topk=hf["num_experts_per_tok"],
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not hf.get("norm_topk_prob", False),
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)),
        moe_layer_freq=_layer_pattern(hf),
    )


def _hf_config(m: Any) -> dict[str, Any]:
    pattern = m.moe_layer_freq if isinstance(m.moe_layer_freq, list) else [
        1 if i % m.moe_layer_freq == 0 else 0 for i in range(m.num_layers)]
    return dense_hf_config(m, "qwen3_moe", "Qwen3MoeForCausalLM") | {
        "attention_bias": False,
        "use_sliding_window": False,
        "num_experts": m.num_experts,
        "num_local_experts": m.num_experts,
        "moe_intermediate_size": m.moe_ffn_hidden_size or m.ffn_hidden_size,
        "num_experts_per_tok": m.moe_router_topk,
        "norm_topk_prob": not m.moe_router_pre_softmax,
        "router_aux_loss_coef": m.moe_aux_loss_coeff,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, v in enumerate(pattern) if v == 0],
    }


def _rules(m: Any) -> dict[str, Rule]:
    rules = dense_attention_rules(qkv_bias=False, qk_norm=True)
    # Dense layers (mlp_only_layers) keep the plain MLP names; MoE layers have router + experts.
    rules.update(glu_mlp_rules("decoder.layers.{L}.mlp.", "model.layers.{L}.mlp."))
    rules["decoder.layers.{L}.mlp.router.weight"] = Rule(
        "replicated", ("model.layers.{L}.mlp.gate.weight",))
    rules.update(glu_mlp_rules("decoder.layers.{L}.mlp.experts.local_experts.{E}.",
                               "model.layers.{L}.mlp.experts.{E}."))
    rules.update(output_rules(m.tie_embeddings))
    return rules


ARCH = Arch(
    name="qwen3_moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    model_config=_model_config,
    hf_config=_hf_config,
    rules=_rules,
    ignored_hf=(r".*rotary_emb\.inv_freq$",),
)
