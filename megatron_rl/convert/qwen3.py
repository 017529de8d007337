"""Qwen3 dense: Llama layout plus RMSNorm on queries and keys per head (QK-norm)."""

from __future__ import annotations

from typing import Any

from megatron_rl.convert.llama import dense_hf_config, dense_model_config, dense_rules
from megatron_rl.convert.maps import Arch, require_hf


def _model_config(hf: dict[str, Any]) -> dict[str, Any]:
    require_hf(hf, "attention_bias", (False,), "qwen3")
    require_hf(hf, "use_sliding_window", (False,), "qwen3")
    return dense_model_config(hf, "qwen3") | {"qk_layernorm": True}


ARCH = Arch(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    model_config=_model_config,
    hf_config=lambda m: dense_hf_config(m, "qwen3", "Qwen3ForCausalLM")
    | {"attention_bias": False, "use_sliding_window": False},
    rules=dense_rules,
    ignored_hf=(r".*rotary_emb\.inv_freq$",),
)
