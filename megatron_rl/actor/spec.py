"""Layer specs: Transformer Engine's where the config says `transformer_impl="transformer_engine"`
(CUDA and a real TE import, decided with the fusions by `compat.fusion_settings`), otherwise our
portable spec built from Megatron-Core's local modules plus `layers.RMSNorm` and
`layers.SDPACoreAttention`. Grouped GEMM follows `config.moe_grouped_gemm` in both.
"""

from __future__ import annotations

import dataclasses

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.multi_latent_attention import (
    MLASelfAttention,
    MLASelfAttentionSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_rl.actor.layers import RMSNorm, SDPACoreAttention


class PortableSpecProvider(LocalSpecProvider):
    """Megatron's local modules with an SP-capable RMSNorm and SDPA core attention."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return RMSNorm

    def core_attention(self) -> type:
        return SDPACoreAttention


def _attention_spec(config: TransformerConfig, backend: PortableSpecProvider) -> ModuleSpec:
    norm = backend.layer_norm(rms_norm=True, for_qk=True)
    qk_norm = norm if config.qk_layernorm else IdentityOp
    if config.multi_latent_attention:
        return ModuleSpec(
            module=MLASelfAttention,
            params={"attn_mask_type": AttnMaskType.causal},
            submodules=MLASelfAttentionSubmodules(
                linear_q_proj=backend.column_parallel_linear(),
                linear_q_down_proj=backend.column_parallel_linear(),
                linear_q_up_proj=backend.column_parallel_linear(),
                linear_kv_down_proj=backend.column_parallel_linear(),
                linear_kv_up_proj=backend.column_parallel_linear(),
                core_attention=backend.core_attention(),
                linear_proj=backend.row_parallel_linear(),
                q_layernorm=qk_norm,
                kv_layernorm=qk_norm,
            ),
        )
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=backend.column_parallel_linear(),
            core_attention=backend.core_attention(),
            linear_proj=backend.row_parallel_linear(),
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def portable_layer_spec(config: TransformerConfig, moe: bool) -> ModuleSpec:
    """One transformer layer (dense MLP or MoE) from portable modules."""
    backend = PortableSpecProvider()
    if moe:
        mlp = get_moe_module_spec_for_backend(
            backend=backend,
            num_experts=config.num_moe_experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
        )
    else:
        mlp = ModuleSpec(
            module=MLP,
            submodules=MLPSubmodules(
                linear_fc1=backend.column_parallel_linear(),
                linear_fc2=backend.row_parallel_linear(),
            ),
        )
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=_attention_spec(config, backend),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def moe_layer_pattern(config: TransformerConfig) -> list[int]:
    """Megatron's `moe_layer_freq` as one 0 (dense) / 1 (MoE) per layer."""
    if not config.num_moe_experts:
        return [0] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    return list(freq)


def decoder_block_spec(
    config: TransformerConfig, use_te: bool | None = None, vp_stage: int | None = None,
    masked_attention: bool = False,
) -> TransformerBlockSubmodules:
    """The layers this pipeline stage (and virtual stage) builds: TE's or the portable ones, as
    `config.transformer_impl` says unless `use_te` overrides it. `masked_attention`
    (`actor.share_prompts`): the core attention takes an arbitrary mask, so under TE it is our
    SDPA core attention (torch's memory-efficient kernel on CUDA) inside TE's layers."""
    if use_te is None:
        use_te = config.transformer_impl == "transformer_engine"
    if use_te:
        # the TE layer specs: imported only when Transformer Engine builds the layers
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        block = get_gpt_decoder_block_spec(
            config, use_transformer_engine=True, normalization="RMSNorm", vp_stage=vp_stage
        )
        return with_core_attention(block, SDPACoreAttention) if masked_attention else block
    pattern = moe_layer_pattern(config)
    specs = {m: portable_layer_spec(config, moe=bool(m)) for m in set(pattern)}
    layers = [specs[m] for m in pattern]
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=layers[offset : offset + count], layer_norm=RMSNorm
    )


def with_core_attention(block: TransformerBlockSubmodules, cls: type) -> TransformerBlockSubmodules:
    """`block` with every layer's self-attention core replaced by `cls` (copies, the given
    specs untouched)."""
    layers = []
    for layer in block.layer_specs:
        attn = layer.submodules.self_attention
        attn = dataclasses.replace(attn, submodules=dataclasses.replace(
            attn.submodules, core_attention=cls))
        layers.append(dataclasses.replace(layer, submodules=dataclasses.replace(
            layer.submodules, self_attention=attn)))
    return dataclasses.replace(block, layer_specs=layers)
