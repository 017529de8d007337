"""`StreamingSafetensors` (a file written a tensor at a time, header last) read back by the
safetensors library itself, by our reader and by `validate.read_header`; a full header ends the
file instead of corrupting it."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megatron_rl.convert.reader import SafetensorsReader
from megatron_rl.convert.validate import read_header
from megatron_rl.convert.writer import StreamingSafetensors


def _tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"w.bf16": torch.randn(5, 3).to(torch.bfloat16), "w.f32": torch.randn(7),
            "w.f16": torch.randn(2, 2, 2).half(), "scalar": torch.tensor(1.5),
            "empty": torch.zeros(0, 4), "ids": torch.arange(9, dtype=torch.int64),
            "mask": torch.tensor([True, False, True]),
            "view": torch.randn(6, 4)[:, 1:3]}  # not contiguous: written as its values


def test_what_is_written_is_what_the_library_reads(tmp_path):
    path = tmp_path / "model.safetensors"
    w = StreamingSafetensors(path, {"format": "pt"}, reserve=4096)
    for name, t in _tensors().items():
        assert w.fits(name, t)
        w.add(name, t)
    assert w.close() == list(_tensors())
    back = load_file(str(path))
    assert back.keys() == _tensors().keys()
    for name, t in _tensors().items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    data_start, header = read_header(path)
    assert data_start == 4096 and set(header) - {"__metadata__"} == set(_tensors())
    ours = SafetensorsReader(str(tmp_path))
    assert torch.equal(ours.read("w.bf16", rows=(1, 4)), _tensors()["w.bf16"][1:4])


def test_a_full_header_is_refused_not_written(tmp_path):
    w = StreamingSafetensors(tmp_path / "small.safetensors", reserve=128)
    t = torch.ones(2)
    w.add("a", t)
    with pytest.raises(ValueError, match="twice"):
        w.add("a", t)
    name = "x" * 100
    assert not w.fits(name, t)
    with pytest.raises(ValueError, match="header full"):
        w.add(name, t)
    w.close()
    assert list(load_file(str(tmp_path / "small.safetensors"))) == ["a"]
