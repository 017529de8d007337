"""Transformer Engine / grouped-GEMM parameter names -> the portable spec's names the maps use.

On CUDA with Transformer Engine the actor is built from Megatron-Core's TE layer specs
(`megatron/core/models/gpt/gpt_layer_specs.py`, `get_gpt_layer_with_transformer_engine_spec`)
and, for MoE, with `TEGroupedMLP` (`megatron/core/transformer/moe/experts.py`). Their parameters
hold the same tensors as the portable spec's, under other names (Megatron-Core 0.16.1):

- Dense attention: no `input_layernorm` module (IdentityOp); its weight is the fused
  `self_attention.linear_qkv.layer_norm_weight` (`TELayerNormColumnParallelLinear`).
- Dense MLP layers: no `pre_mlp_layernorm` (IdentityOp); its weight is
  `mlp.linear_fc1.layer_norm_weight`. MoE layers keep a separate `pre_mlp_layernorm` (TENorm).
- MLA: `input_layernorm` stays a module (TENorm); with `qk_layernorm` the q/kv LoRA norms are
  fused into `linear_q_up_proj` / `linear_kv_up_proj` as `layer_norm_weight` (the
  `q_layernorm` / `kv_layernorm` modules are IdentityOp). Dense-attention `q_layernorm` /
  `k_layernorm` stay modules (TENorm) with a `weight`.
- `TEGroupedMLP`: `mlp.experts.linear_fc{1,2}.weight{e}` (`e` the local expert index) is the
  `[out, in]` tensor of `mlp.experts.local_experts.{e}.linear_fc{1,2}.weight`.
- TE modules carry `_extra_state` (FP8 metadata) in their state dicts: no weight, ignored.

For RMSNorm a fused linear has `layer_norm_weight` only ([in_features], replicated, like the
separate norm's `weight`); a LayerNorm model also has `layer_norm_bias`, mapped to `.bias`.

TP layout differences (TE marks every linear weight `tensor_model_parallel` with
`partition_dim = 1 if parallel_mode == "row" else 0`, even where TE does no TP itself):
- MLA's down projections are `TELinear(parallel_mode="duplicated")`: the whole tensor on every TP
  rank (the portable spec splits them by rows); see `tp_duplicated`.
- Expert linears with explicit expert communication (EP > 1 or expert TP > 1) get
  `parallel_mode=None`, so a row-parallel `linear_fc2` weight is marked `partition_dim=0` although
  it is split by columns; the conversion takes the split dimension from the rule's kind.
"""

from __future__ import annotations

import re

import torch

_P = r"^(?P<p>(?:.*\.)?)"  # everything up to the matched module path, ending in '.' or empty
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(_P + pattern + "$"), repl) for pattern, repl in (
        (r"self_attention\.linear_qkv\.layer_norm_(?P<w>weight|bias)",
         r"\g<p>input_layernorm.\g<w>"),
        (r"self_attention\.linear_q_up_proj\.layer_norm_(?P<w>weight|bias)",
         r"\g<p>self_attention.q_layernorm.\g<w>"),
        (r"self_attention\.linear_kv_up_proj\.layer_norm_(?P<w>weight|bias)",
         r"\g<p>self_attention.kv_layernorm.\g<w>"),
        (r"mlp\.linear_fc1\.layer_norm_(?P<w>weight|bias)",
         r"\g<p>pre_mlp_layernorm.\g<w>"),
        (r"mlp\.experts\.(?P<fc>linear_fc[12])\.(?P<w>weight|bias)(?P<e>\d+)",
         r"\g<p>mlp.experts.local_experts.\g<e>.\g<fc>.\g<w>"),
    )
)
_EXTRA_STATE = re.compile(r"(?:^|\.)_extra_state\d*$")


def canonical(name: str) -> str:
    """The portable spec's name of a parameter (or state-dict entry) of either spec; names the
    portable spec already uses come back unchanged."""
    for pattern, repl in _RENAMES:
        new, n = pattern.subn(repl, name)
        if n:
            return new
    return name


def ignored(name: str) -> bool:
    """State-dict entries that hold no weight (TE's `_extra_state`, per GEMM `_extra_state{i}`)."""
    return _EXTRA_STATE.search(name) is not None


def num_local_experts(chunk: torch.nn.Module) -> int | None:
    """Experts per EP rank: `len(local_experts)` of a SequentialMLP, else the
    `num_local_experts` of TEGroupedMLP (or MoELayer); None without experts."""
    for module in chunk.modules():
        if hasattr(module, "local_experts"):
            return len(module.local_experts)
    for module in chunk.modules():
        n = getattr(module, "num_local_experts", None)
        if isinstance(n, int):
            return n
    return None


def owner(chunk: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module that holds the parameter or buffer `name` of `chunk`."""
    path = name.rpartition(".")[0]
    return chunk.get_submodule(path) if path else chunk


def tp_duplicated(module: torch.nn.Module, is_expert: bool) -> bool:
    """A TE linear built with `parallel_mode="duplicated"` (MLA's down projections): the whole
    tensor on every TP rank. Megatron's `TELinear` hands TE `parallel_mode=None` for it, as for
    expert linears with explicit communication, which *are* split; Megatron's own linears have no
    `parallel_mode` attribute."""
    return not is_expert and hasattr(module, "parallel_mode") and module.parallel_mode is None
