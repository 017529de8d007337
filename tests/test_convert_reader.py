"""`SafetensorsReader` against the safetensors library itself: row/column slices and in-place
reads give the library's bytes, a dtype or shape that does not fit is refused without reading,
and reads the kernel returns short (one read(2) stops at ~2 GiB) are completed, not called
truncation."""

from __future__ import annotations

import io
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_rl.convert import reader as reader_mod
from megatron_rl.convert.reader import SafetensorsReader


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    tensors = {"a": torch.randn(7, 5).to(torch.bfloat16), "b": torch.randn(11, 3),
               "c": torch.randn(4), "s": torch.tensor(2.5),
               "wide": torch.randn(6, 3000)}  # 12 KB rows: column slices read row by row
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_slices_match_the_library(ckpt):
    r = SafetensorsReader(str(ckpt))
    with safe_open(str(ckpt / "model.safetensors"), "pt") as lib:
        for name in ("a", "b", "c", "s"):
            assert torch.equal(r.read(name), lib.get_tensor(name)), name
        assert torch.equal(r.read("a", rows=(2, 6)), lib.get_slice("a")[2:6])
        assert torch.equal(r.read("b", rows=(3, 9), cols=(1, 3)), lib.get_slice("b")[3:9, 1:3])
        before = r.bytes_read
        got = r.read("wide", rows=(1, 5), cols=(1000, 2500))  # 6 KB of each row
        assert torch.equal(got, lib.get_slice("wide")[1:5, 1000:2500])
        assert r.bytes_read - before == 4 * 1500 * 4  # only the columns
        assert torch.equal(r.read("wide", cols=(0, 800)), lib.get_slice("wide")[:, 0:800])
        out = torch.empty(4, 5, dtype=torch.bfloat16)
        assert r.read_into("a", (1, 5), out)
        assert torch.equal(out, lib.get_slice("a")[1:5])
        whole = torch.empty(11, 3)
        assert r.read_into("b", None, whole) and torch.equal(whole, lib.get_tensor("b"))


def test_in_place_read_refuses_what_does_not_fit(ckpt):
    r = SafetensorsReader(str(ckpt))
    before = r.bytes_read
    assert not r.read_into("a", (0, 4), torch.zeros(4, 5))  # float32, not the file's bf16
    assert not r.read_into("b", (0, 4), torch.zeros(5, 3))  # wrong row count
    assert not r.read_into("b", None, torch.zeros(3, 11).t())  # not contiguous
    assert not r.read_into("s", None, torch.zeros(()))  # a scalar takes `read`
    assert r.bytes_read == before


class _Trickle(io.FileIO):
    """A file whose every read returns at most 3 bytes, as a read past 2 GiB returns short."""

    def readinto(self, b):
        return super().readinto(memoryview(b)[:3])


def test_short_reads_are_completed_and_real_truncation_named(ckpt, monkeypatch):
    expected = SafetensorsReader(str(ckpt)).read("b")
    monkeypatch.setattr(reader_mod, "open", lambda p, mode, buffering=-1: _Trickle(p, mode),
                        raising=False)
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: preadv(fd, [bufs[0][:3]], off))
    r = SafetensorsReader(str(ckpt))
    assert torch.equal(r.read("b"), expected)
    out = torch.empty(11, 3)
    assert r.read_into("b", None, out) and torch.equal(out, expected)
    wide = SafetensorsReader(str(ckpt)).read("wide")
    assert torch.equal(r.read("wide", cols=(100, 1200)), wide[:, 100:1200])
    monkeypatch.undo()

    r = SafetensorsReader(str(ckpt))
    last = max(("a", "b", "c", "s", "wide"), key=lambda n: r._entry(n)[2]["data_offsets"][1])
    path = ckpt / "model.safetensors"  # cut after its header was checked (a copy in progress)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(Exception, match=f"truncated.*{last}"):
        r.read(last)
