"""A block-wise FP8 checkpoint (DeepSeek-V3's released format: FP8 `*.weight` with a float32
`*.weight_scale_inv` per block, `quantization_config = {quant_method: fp8, weight_block_size}`)
converts through `megatron-rl convert` as its bf16 dequantization does: HF (FP8) -> Megatron at
TP=2/EP=2 -> HF gives, bit for bit, the bf16 tensors DeepSeek's `weight_dequant` formula gives
(computed here block by block), and config.json loses its quantization_config. The blocks are
24x20, so neither the weights' sizes nor TP's row and column slices fall on block edges. Any
other quantization is refused in one line naming config.json, before Megatron is imported."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from test_convert import _tensors
from test_convert_cli import _cli, _deepseek_v3

BLOCK = (24, 20)
FP8_MAX = 448.0  # float8_e4m3fn


def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block amax scaling, as DeepSeek's checkpoints are made."""
    rows, cols = w.shape
    scale = torch.empty(-(-rows // BLOCK[0]), -(-cols // BLOCK[1]))
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            r, c = slice(bi * BLOCK[0], (bi + 1) * BLOCK[0]), slice(bj * BLOCK[1],
                                                                   (bj + 1) * BLOCK[1])
            s = w[r, c].float().abs().amax().clamp(min=1e-12) / FP8_MAX
            scale[bi, bj] = s
            q[r, c] = (w[r, c].float() / s).to(torch.float8_e4m3fn)
    return q, scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference: every element times its own block's scale, stored as bf16."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            r, c = slice(bi * BLOCK[0], (bi + 1) * BLOCK[0]), slice(bj * BLOCK[1],
                                                                   (bj + 1) * BLOCK[1])
            out[r, c] = q[r, c].float() * scale[bi, bj]
    return out.to(torch.bfloat16)


def _fp8_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Rewrite the checkpoint at `path` as block-wise FP8 (the decoder's linear weights, as
    DeepSeek's: not the router, norms, embedding or head); the bf16 tensors it stands for."""
    tensors = _tensors(path)
    quantized, expected = {}, {}
    for name, w in tensors.items():
        linear = (name.startswith("model.layers.") and w.dim() == 2
                  and not name.endswith("mlp.gate.weight"))
        if linear:
            q, s = _quantize(w)
            quantized[name], quantized[f"{name}_scale_inv"] = q, s
            expected[name] = _dequantize(q, s)
        else:
            quantized[name] = w.to(torch.bfloat16)
            expected[name] = quantized[name]
    (path / "model.safetensors").unlink()
    save_file(quantized, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    config.pop("dtype", None)
    config["torch_dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(config))
    return expected


def test_fp8_checkpoint_converts_as_its_dequantization(tmp_path):
    path = _deepseek_v3(tmp_path / "ds")
    expected = _fp8_checkpoint(path)
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    run = _cli("hf-to-mcore", str(path), str(mcore), "--tp", "2", "--ep", "2",
               "--set", "parallel.etp=1", nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FP8 weights in 24x20 blocks, dequantized to bfloat16" in run.stderr
    run = _cli("mcore-to-hf", str(mcore), str(back))
    assert run.returncode == 0, run.stderr[-3000:]
    got = _tensors(back)
    assert got.keys() == expected.keys()  # no scale tensors
    bad = [k for k, v in expected.items() if got[k].dtype != torch.bfloat16
           or not torch.equal(got[k], v)]
    assert not bad, bad
    config = json.loads((back / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"


def test_other_quantizations_are_refused_by_name(tmp_path):
    path = _deepseek_v3(tmp_path / "ds")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    run = _cli("hf-to-mcore", str(path), str(tmp_path / "out"))
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.json" in lines[0] and "gptq" in lines[0], run.stderr
    assert not (tmp_path / "out").exists()
