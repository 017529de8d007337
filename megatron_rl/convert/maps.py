"""Name and shape maps between Hugging Face checkpoints and Megatron-Core parameters.

An architecture is a table of `Rule`s keyed by the Megatron parameter name with `{L}` for the
global layer and `{E}` for the global expert index. A rule's `kind` says how the HF tensor(s)
become the Megatron tensor and how that tensor is split across tensor-parallel ranks:

- `replicated`: the same tensor on every rank (norms, router).
- `column`: rows split across TP (column-parallel linear).
- `row`: columns split across TP (row-parallel linear).
- `vocab`: rows split across TP after padding the vocabulary (embedding, output layer).
- `qkv`: q, k, v projections fused per query group as Megatron's `linear_qkv` (rows
  [group g: its q heads, its k head, its v head]), split across TP by whole groups.
- `glu`: gate and up projections fused as `linear_fc1` = [gate; up], each half split across TP.

Which TP group splits a tensor is read from the parameter itself (expert parameters use the
expert tensor-parallel group), never from substrings of names.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KINDS = ("replicated", "column", "row", "vocab", "qkv", "glu")


@dataclass(frozen=True)
class Rule:
    """How one Megatron parameter is made from HF tensor names (templates with {L}, {E})."""

    kind: str
    hf: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown rule kind {self.kind!r}; one of {KINDS}")

    def hf_names(self, layer: int | None, expert: int | None) -> list[str]:
        return [n.format(L=layer, E=expert) for n in self.hf]


@dataclass(frozen=True)
class Arch:
    """One supported Hugging Face architecture."""

    name: str
    hf_architectures: tuple[str, ...]
    model_config: Callable[[dict[str, Any]], dict[str, Any]]
    """HF config.json -> ModelConfig fields."""
    hf_config: Callable[[Any], dict[str, Any]]
    """ModelConfig -> HF config.json."""
    rules: Callable[[Any], dict[str, Rule]]
    """ModelConfig -> {Megatron name template: Rule}."""
    ignored_hf: tuple[str, ...] = field(default=())
    """Regexes of HF tensors that have no Megatron counterpart (e.g. rotary inv_freq)."""
    trailing_layers_skipped: str | None = None
    """What HF layers past `num_hidden_layers` are when a checkpoint has them (DeepSeek-V3's
    multi-token-prediction layers), to skip them saying so; None: they are an error."""


_LAYER = re.compile(r"(decoder\.layers\.)(\d+)(\.)")
_EXPERT = re.compile(r"(local_experts\.)(\d+)(\.)")


def template_of(name: str) -> tuple[str, int | None, int | None]:
    """'decoder.layers.3.mlp.experts.local_experts.1.w' -> (template, 3, 1): indices as found."""
    layer = expert = None
    m = _LAYER.search(name)
    if m:
        layer = int(m.group(2))
        name = _LAYER.sub(r"\g<1>{L}\g<3>", name, count=1)
    m = _EXPERT.search(name)
    if m:
        expert = int(m.group(2))
        name = _EXPERT.sub(r"\g<1>{E}\g<3>", name, count=1)
    return name, layer, expert


def dense_attention_rules(qkv_bias: bool, qk_norm: bool) -> dict[str, Rule]:
    """Llama-family attention and norms (Llama, Qwen2 adds QKV bias, Qwen3 adds QK norm)."""
    p = "model.layers.{L}."
    rules = {
        "embedding.word_embeddings.weight": Rule("vocab", ("model.embed_tokens.weight",)),
        "decoder.final_layernorm.weight": Rule("replicated", ("model.norm.weight",)),
        "decoder.layers.{L}.input_layernorm.weight":
            Rule("replicated", (p + "input_layernorm.weight",)),
        "decoder.layers.{L}.pre_mlp_layernorm.weight":
            Rule("replicated", (p + "post_attention_layernorm.weight",)),
        "decoder.layers.{L}.self_attention.linear_qkv.weight": Rule(
            "qkv", tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv")),
        "decoder.layers.{L}.self_attention.linear_proj.weight":
            Rule("row", (p + "self_attn.o_proj.weight",)),
    }
    if qkv_bias:
        rules["decoder.layers.{L}.self_attention.linear_qkv.bias"] = Rule(
            "qkv", tuple(p + f"self_attn.{x}_proj.bias" for x in "qkv"))
    if qk_norm:
        rules["decoder.layers.{L}.self_attention.q_layernorm.weight"] = Rule(
            "replicated", (p + "self_attn.q_norm.weight",))
        rules["decoder.layers.{L}.self_attention.k_layernorm.weight"] = Rule(
            "replicated", (p + "self_attn.k_norm.weight",))
    return rules


def glu_mlp_rules(mcore_prefix: str, hf_prefix: str) -> dict[str, Rule]:
    """A SwiGLU MLP: fc1 = [gate; up], fc2 = down."""
    return {
        mcore_prefix + "linear_fc1.weight": Rule(
            "glu", (hf_prefix + "gate_proj.weight", hf_prefix + "up_proj.weight")),
        mcore_prefix + "linear_fc2.weight": Rule("row", (hf_prefix + "down_proj.weight",)),
    }


TIED_OUTPUT = "output_layer.weight"


def output_rules(tied: bool) -> dict[str, Rule]:
    """The LM head. When tied to the embedding, Megatron still keeps a copy on the last
    pipeline stage (PP > 1), loaded from the embedding and never exported."""
    source = "model.embed_tokens.weight" if tied else "lm_head.weight"
    return {TIED_OUTPUT: Rule("vocab", (source,))}


def rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from either config style (transformers 5 `rope_parameters`, or the older
    `rope_theta` + `rope_scaling`), with `rope_type` normalised ('default', 'yarn', ...)."""
    params = dict(hf.get("rope_scaling") or {}) | dict(hf.get("rope_parameters") or {})
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return params


def rope_theta(hf: dict[str, Any], supported: tuple[str, ...] = ("default",)) -> float:
    """RoPE base; fails naming the scaling type when the architecture cannot map it."""
    params = rope_parameters(hf)
    if params["rope_type"] not in supported:
        raise ValueError(f"rope scaling type {params['rope_type']!r} is not supported for this "
                         f"architecture yet; supported: {list(supported)}")
    return float(params["rope_theta"])


def require_hf(hf: dict[str, Any], key: str, allowed: tuple, arch: str) -> None:
    """A config.json value this converter relies on; fails naming the key and what it supports."""
    value = hf.get(key, allowed[0])
    if value not in allowed:
        raise ValueError(f"{arch}: config.json {key}={value!r} is not supported; "
                         f"supported: {list(allowed)}")
