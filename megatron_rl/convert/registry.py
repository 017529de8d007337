"""Supported architectures, found from a checkpoint's `config.json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megatron_rl.convert import deepseek_v3, llama, qwen2, qwen3, qwen3_moe
from megatron_rl.convert.maps import Arch

ARCHS: dict[str, Arch] = {
    a.name: a for a in (llama.ARCH, qwen2.ARCH, qwen3.ARCH, qwen3_moe.ARCH, deepseek_v3.ARCH)
}


def arch_for(hf_config: dict[str, Any]) -> Arch:
    """The architecture of an HF config (by `architectures`, then `model_type`)."""
    for name in hf_config.get("architectures") or []:
        for arch in ARCHS.values():
            if name in arch.hf_architectures:
                return arch
    model_type = hf_config.get("model_type")
    if model_type in ARCHS:
        return ARCHS[model_type]
    supported = sorted(a for arch in ARCHS.values() for a in arch.hf_architectures)
    raise ValueError(
        f"unsupported architecture {hf_config.get('architectures') or model_type!r}; "
        f"supported: {supported}"
    )


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """config.json of an HF checkpoint directory."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json (is {path} a Hugging Face checkpoint?)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from None


def fp8_block(hf_config: dict[str, Any], where: str = "config.json") -> tuple[int, int] | None:
    """The weight block of a block-wise FP8 checkpoint (DeepSeek-V3's released one:
    `quantization_config = {quant_method: fp8, weight_block_size: [128, 128]}`, each FP8
    `<name>.weight` with a float32 `<name>.weight_scale_inv` per block), which loading
    dequantizes; None for an unquantized checkpoint. Any other quantization changes what the
    weights mean and is refused by name."""
    quant = hf_config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    block = quant.get("weight_block_size")
    if method != "fp8" or not (isinstance(block, list) and len(block) == 2
                               and all(isinstance(b, int) and b > 0 for b in block)):
        raise ValueError(
            f"{where}: quantization_config (quant_method={method!r}, weight_block_size="
            f"{block!r}) is not supported: only block-wise fp8 (DeepSeek-V3's) is dequantized; "
            "convert the weights to bf16 first")
    return block[0], block[1]
