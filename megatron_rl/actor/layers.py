"""Portable layers for our Megatron-Core spec: an RMSNorm that supports sequence parallel, and
a torch-SDPA core attention that takes separate q/k and v head sizes (MLA) and packed sequences.

Shape legend: s = sequence, b = batch, n = heads in this TP partition, g = query groups in this
partition, h = head dim (hk for q/k, hv for v), t = packed tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(MegatronModule):
    """RMSNorm computed in fp32 as Hugging Face Llama/Qwen do.

    Unlike Megatron's `WrappedTorchNorm` it works under sequence parallel: the weight carries
    `sequence_parallel=True`, so Megatron all-reduces its gradient over the TP group (each rank
    only saw its slice of the sequence).
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-6,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ) -> None:
        super().__init__(config=config)
        if zero_centered_gamma:
            raise ValueError("RMSNorm: zero_centered_gamma is not supported by the portable spec")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _packed_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Boolean [total, total] mask, True where attention is allowed (causal within a sequence)."""
    seq_id = torch.zeros(total, dtype=torch.long, device=cu_seqlens.device)
    seq_id[cu_seqlens[1:-1].long()] = 1
    seq_id = seq_id.cumsum(0)
    same = seq_id[:, None] == seq_id[None, :]
    return same & torch.ones(total, total, dtype=torch.bool, device=cu_seqlens.device).tril()


class SDPACoreAttention(MegatronModule):
    """Core attention with torch's scaled_dot_product_attention, same interface as Megatron's
    `DotProductAttention` plus `k_channels`/`v_channels` (MLA's q/k and v head sizes differ).

    Masks follow Megatron: `attention_mask` is boolean with True meaning *masked out*.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        k_channels: int | None = None,
        v_channels: int | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "parallel.cp > 1 needs Transformer Engine attention; the portable spec has cp=1"
            )
        self.attn_mask_type = attn_mask_type
        hk = k_channels if k_channels is not None else config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(hk)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.dropout_p = dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not take an attention bias")
        packed_thd = packed_seq_params is not None and query.dim() == 3
        if packed_thd:  # [t, n, h] -> [t, 1, n, h]
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        # [s, b, n, h] -> [b, n, s, h]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        n, g = q.shape[1], k.shape[1]
        if n != g:
            k = k.repeat_interleave(n // g, dim=1)
            v = v.repeat_interleave(n // g, dim=1)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        allowed = None
        if packed_seq_params is not None:
            allowed = _packed_causal_mask(packed_seq_params.cu_seqlens_q, q.shape[2])
        elif attention_mask is not None:
            allowed = ~attention_mask
            if mask_type == AttnMaskType.causal:
                sq, sk = q.shape[2], k.shape[2]
                allowed = allowed & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        is_causal = allowed is None and mask_type == AttnMaskType.causal
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=allowed,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
        )
        # [b, n, s, hv] -> [s, b, n*hv]
        out = out.permute(2, 0, 1, 3).contiguous()
        out = out.reshape(out.shape[0], out.shape[1], -1)
        if packed_thd:
            out = out.squeeze(1)
        return out
