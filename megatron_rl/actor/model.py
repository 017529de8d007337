"""Build the Megatron-Core GPT/MoE model from our config.

`transformer_config` is the one place where our `ModelConfig`/`ParallelConfig`/`ActorConfig`
become Megatron-Core's `TransformerConfig`. `build_model` returns one `GPTModel` per virtual
pipeline stage on this rank, each wrapped in Megatron's `DistributedDataParallel`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_rl.actor import compat
from megatron_rl.actor.config import ActorConfig, ModelConfig, ParallelConfig, padded_vocab_size
from megatron_rl.actor.shared_prompts import enable_row_positions
from megatron_rl.actor.spec import decoder_block_spec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _yarn_kwargs(model: ModelConfig) -> dict:
    if model.rope_scaling == "none":
        return dict(rope_type="rope")
    return dict(
        rope_type="yarn",
        rotary_scaling_factor=model.rope_scaling_factor,
        original_max_position_embeddings=model.rope_original_max_position_embeddings,
        beta_fast=model.yarn_beta_fast,
        beta_slow=model.yarn_beta_slow,
        mscale=model.yarn_mscale,
        mscale_all_dim=model.yarn_mscale_all_dim,
    )


def _gloo() -> bool:
    return dist.is_initialized() and dist.get_backend() == "gloo"


def _recompute_kwargs(actor: ActorConfig) -> dict:
    if actor.recompute == "full":
        return dict(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    if actor.recompute == "selective":
        return dict(recompute_granularity="selective")
    return {}


def _moe_kwargs(model: ModelConfig) -> dict:
    if model.num_experts == 0:
        return {}
    return dict(
        num_moe_experts=model.num_experts,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size or model.ffn_hidden_size,
        moe_router_topk=model.moe_router_topk,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_router_score_function=model.moe_router_score_function,
        moe_router_load_balancing_type=model.moe_router_load_balancing_type,
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_router_enable_expert_bias=model.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=model.moe_router_bias_update_rate,
        moe_router_num_groups=model.moe_router_num_groups,
        moe_router_group_topk=model.moe_router_group_topk,
        moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
        moe_router_pre_softmax=model.moe_router_pre_softmax,
        moe_layer_freq=model.moe_layer_freq,
        moe_token_dispatcher_type=model.moe_token_dispatcher_type,
        moe_router_dtype="fp32",
    )


def transformer_config(
    model: ModelConfig, parallel: ParallelConfig, actor: ActorConfig,
    device: compat.Device | None = None,
) -> TransformerConfig:
    """Our configs -> Megatron-Core `TransformerConfig` (the only place this happens). The layer
    implementation, grouped GEMM and fusions follow `device` (default: this process, probed) as
    `compat.fusion_settings` decides."""
    device = device if device is not None else compat.probe_device()
    dtype = _DTYPES[actor.params_dtype]
    cls, mla = TransformerConfig, {}
    if model.multi_latent_attention:
        cls, mla = MLATransformerConfig, dict(
            q_lora_rank=model.q_lora_rank,
            kv_lora_rank=model.kv_lora_rank,
            qk_head_dim=model.qk_head_dim,
            qk_pos_emb_head_dim=model.qk_pos_emb_head_dim,
            v_head_dim=model.v_head_dim,
            rotary_base=model.rotary_base,
            **_yarn_kwargs(model),
        )
    return cls(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_pp,
        num_layers_in_last_pipeline_stage=parallel.pp_last_stage_layers,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp if parallel.etp is not None else parallel.tp,
        sequence_parallel=bool(parallel.sequence_parallel),
        # Apex's persistent LayerNorm (our norms are RMSNorm) and the fused cross entropy of
        # GPTModel's own loss (we compute log-probs with `kernels/`) are never used.
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        # Batched p2p issues send_prev before send_next; gloo matches messages between two ranks
        # by order, so with pp=2 (prev == next) and interleaved stages an activation and a
        # gradient in flight together get swapped. Unbatched p2p orders them by rank parity.
        batch_p2p_comm=not _gloo(),
        # Megatron-Core's own default scope "full" is deprecated (a warning on every build); the
        # empty list is the same scope, the whole layer. No CUDA graphs are captured here.
        cuda_graph_scope=[],
        **_recompute_kwargs(actor),
        **_moe_kwargs(model),
        **compat.fusion_settings(actor, model, device),
        **mla,
    )


def build_gpt(
    config: TransformerConfig, model: ModelConfig, vp_stage: int | None = None,
    share_prompts: bool = False,
) -> GPTModel:
    """One (virtual) pipeline stage of the GPT model, unwrapped (`share_prompts`: attention
    that takes a mask, see `spec.decoder_block_spec`)."""
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, vp_stage=vp_stage,
                                                  masked_attention=share_prompts),
        vocab_size=padded_vocab_size(model.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base) if float(model.rotary_base).is_integer()
        else model.rotary_base,
        vp_stage=vp_stage,
    )
    enable_row_positions(gpt)  # inert unless a micro-batch shares prompts
    return gpt


def build_model(
    model: ModelConfig, parallel: ParallelConfig, actor: ActorConfig
) -> tuple[list[DistributedDataParallel], TransformerConfig]:
    """All model chunks of this rank wrapped in Megatron DDP, and their `TransformerConfig`."""
    compat.report_backend(actor.kernels)  # once per process: what runs the model
    config = transformer_config(model, parallel, actor)
    stages = parallel.virtual_pp or 1
    chunks = []
    for vp in range(stages):
        gpt = build_gpt(config, model, vp_stage=vp if parallel.virtual_pp else None,
                        share_prompts=actor.share_prompts)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=actor.use_distributed_optimizer,
            check_for_nan_in_grad=False,
        )
        chunks.append(
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=gpt,
                disable_bucketing=vp > 0,
            )
        )
    return chunks, config
