"""Qwen2: Llama layout plus a bias on the q/k/v projections."""

from __future__ import annotations

from typing import Any

from megatron_rl.convert.llama import dense_hf_config, dense_model_config, dense_rules
from megatron_rl.convert.maps import Arch, require_hf


def _model_config(hf: dict[str, Any]) -> dict[str, Any]:
    require_hf(hf, "use_sliding_window", (False,), "qwen2")
    return dense_model_config(hf, "qwen2") | {"add_qkv_bias": True}


ARCH = Arch(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    model_config=_model_config,
    hf_config=lambda m: dense_hf_config(m, "qwen2", "Qwen2ForCausalLM")
    | {"use_sliding_window": False},
    rules=dense_rules,
    ignored_hf=(r".*rotary_emb\.inv_freq$",),
)
