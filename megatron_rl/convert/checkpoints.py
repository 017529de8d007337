"""Whole-checkpoint conversion, HF <-> Megatron-Core, single process or under torchrun (the
library behind `megatron-rl convert`).

hf_to_mcore reads each rank's slices of the safetensors straight into a bare sharded model
(`bare.BareModel`: weights only, no random init) and writes a Megatron dist checkpoint (loadable
under any layout, recording the model config, architecture, dtype and the source's config.json);
mcore_to_hf loads a dist checkpoint written by us and writes config.json + sharded safetensors
(+ the HF source's tokenizer files). The model always comes from the source checkpoint; the
overrides pick the layout. Destinations: see `validate.check_destination`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from megatron_rl.actor.config import ModelConfig
from megatron_rl.actor.parallel import init_distributed
from megatron_rl.config import load_config
from megatron_rl.configurable import from_dict
from megatron_rl.convert import hf_model_config
from megatron_rl.convert.bare import BareModel
from megatron_rl.convert.registry import ARCHS, arch_for, fp8_block, read_hf_config
from megatron_rl.convert.validate import check_destination, check_mcore_source


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def log_rank0(msg: str) -> None:
    """`[convert] msg` on stderr, from rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[convert] {msg}", file=sys.stderr, flush=True)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""What `--dtype` and an HF config's `torch_dtype` may name."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
"""Files of an HF checkpoint beside its weights that a model directory needs to be used: the
tokenizer's and the generation defaults. mcore-to-hf copies those the HF source has."""


def source_dtype(hf: dict) -> str:
    """The weights' dtype an HF config.json states (`torch_dtype`, or transformers 5's
    `dtype`); float32 when it states none."""
    name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    if name not in DTYPES:
        raise ValueError(f"config.json: torch_dtype {name!r} is not one of {sorted(DTYPES)}")
    return name


def _model(model: ModelConfig, overrides: list[str], dtype: str) -> BareModel:
    # Sequence lengths do not matter for conversion; keep them within the model's positions.
    # bf16 weights stay bf16; fp16 ones are held in fp32 (exact both ways; Megatron's fp16
    # training needs a loss scaler, not a converter's concern).
    seq = min(256, model.max_position_embeddings)
    params = "bfloat16" if dtype == "bfloat16" else "float32"
    lengths = [f"actor.seq_length={seq}", f"rollout.max_new_tokens={max(1, seq // 2)}",
               f"actor.params_dtype={params}"]
    cfg = load_config(None, lengths + list(overrides), world_size=_world(), model=model)
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    return BareModel(cfg.model, cfg.parallel, cfg.actor)


def _describe(arch_name: str, model: ModelConfig, dtype: str) -> str:
    experts = (f"{model.num_experts} experts (top-{model.moe_router_topk})"
               if model.num_experts else "dense")
    return f"{arch_name}, {model.num_layers} layers, {experts}, {dtype}"


_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _check_same_model(origin: Path, base: dict, arch, ours: dict) -> None:
    """The HF source whose config and tokenizer an export takes must be the checkpoint's model:
    the same architecture and sizes (else its tokenizer and keys would be mixed into another
    model's files)."""
    try:
        theirs = arch_for(base).name
    except ValueError:
        theirs = base.get("model_type")
    differ = [f"{k}={base[k]!r} there, {ours[k]!r} here" for k in _SIZES
              if k in base and k in ours and base[k] != ours[k]]
    if theirs != arch.name or differ:
        what = (f"a {theirs} model, the checkpoint holds {arch.name}" if theirs != arch.name
                else ", ".join(differ))
        raise ValueError(f"--hf-source {origin}: not the model this checkpoint was trained from "
                         f"({what}); pass the HF checkpoint it came from, or none")


def hf_to_mcore(src: str, dst: str, overrides: list[str], *, overwrite: bool = False,
                dtype: str | None = None) -> str:
    """HF checkpoint -> Megatron dist checkpoint at `dst` (collective); returns its path.

    The weights keep the source's dtype (or `dtype`), which is recorded with the source's
    whole config.json and its path in the checkpoint's megatron_rl.json, so mcore_to_hf can
    give back the same files."""
    check_destination(dst, overwrite)
    hf = read_hf_config(src)
    arch, model = hf_model_config(src)
    dtype = dtype or source_dtype(hf)
    block = fp8_block(hf)
    log_rank0(f"{src}: {_describe(arch.name, model, dtype)}" + (
        f" (FP8 weights in {block[0]}x{block[1]} blocks, dequantized to {dtype})" if block
        else ""))
    bare = _model(model, overrides, dtype)
    stats = bare.load_hf(src, arch)
    log_rank0(f"rank 0 read {stats['bytes_read'] / 2**20:.1f} MiB in {stats['seconds']:.1f}s")
    info = {"dtype": dtype, "hf_config": hf, "hf_source": str(Path(src).resolve())}
    return bare.save(dst, arch, info)


def mcore_to_hf(src: str, dst: str, overrides: list[str], *, overwrite: bool = False,
                dtype: str | None = None, hf_source: str | None = None) -> str:
    """Megatron dist checkpoint written by megatron-rl -> HF checkpoint at `dst` (collective);
    returns its path.

    config.json is the HF source's with the model's own keys restated (so every key the source
    had comes back), the weights in the recorded source dtype (or `dtype`), and the source's
    tokenizer and generation config are copied. The HF source is `hf_source`, else the one
    recorded at hf-to-mcore when it still exists."""
    check_destination(dst, overwrite)
    info = check_mcore_source(src)
    model = from_dict(ModelConfig, info["model"])
    arch = ARCHS[info["arch"]]
    origin = Path(hf_source) if hf_source else (
        Path(info["hf_source"]) if info.get("hf_source") else None)
    if hf_source and not (origin / "config.json").is_file():
        raise ValueError(f"--hf-source {hf_source}: no config.json there")
    if origin is not None and not (origin / "config.json").is_file():
        origin = None  # the recorded source moved away: the recorded config still serves
    base = read_hf_config(origin) if origin is not None else info.get("hf_config") or {}
    dtype = dtype or info.get("dtype") or source_dtype(base)
    ours = {k: v for k, v in arch.hf_config(model).items() if k not in ("torch_dtype", "dtype")}
    if origin is not None:  # its tokenizer and keys must be this model's
        _check_same_model(origin, base, arch, ours)
    # the weights go out dequantized (an FP8 source is read as bf16): no quantization_config
    config = {k: v for k, v in {**base, **ours}.items() if k != "quantization_config"}
    # the dtype under the key(s) the source used (transformers 5 writes `dtype`, 4.x
    # `torch_dtype`, which both read)
    for key in [k for k in ("torch_dtype", "dtype") if k in base] or ["torch_dtype"]:
        config[key] = dtype
    extra = [origin / f for f in TOKENIZER_FILES if origin is not None
             and (origin / f).is_file()]
    log_rank0(f"{src}: {_describe(arch.name, model, dtype)}; "
              + (f"tokenizer and config from {origin}" if origin is not None else
                 "no HF source (pass --hf-source DIR): config.json from the model alone, no "
                 "tokenizer files"))
    bare = _model(model, overrides, info.get("dtype") or "float32")
    bare.load(src)
    return bare.save_hf(dst, arch, dtype=DTYPES[dtype], config=config, extra_files=extra,
                        overwrite=overwrite)
