"""Read Hugging Face safetensors checkpoints by slices, so a rank reads only what it owns.

Handles a single `model.safetensors` and sharded checkpoints with `model.safetensors.index.json`.
Each file's header is parsed (and checked against the file's size) by `validate.read_header`;
a read is one positioned `readinto` of the requested rows, straight into the parameter where
its dtype and layout allow (`read_into`), else into a buffer that becomes the tensor. A column
slice (TP's row-parallel weights) at least a page wide per row is read row by row, only its
columns; a narrower one reads whole rows and keeps its columns. No file is memory-mapped: mapped
pages a rank touched would stay in its resident memory for the whole load (a rank converting
its share of a 671B model would hold its share twice), while a read buffer lives as long as the
one tensor being copied.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from megatron_rl.convert.registry import fp8_block, read_hf_config
from megatron_rl.convert.validate import read_header

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
"""safetensors dtype names -> torch."""
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
PAGE = 4096
"""A column slice at least this wide per row is read row by row (`_read_columns`)."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match the model."""


class SafetensorsReader:
    """Sliced access to the tensors of an HF checkpoint directory (positioned reads)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._headers: dict[str, tuple[int, dict]] = {}
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such checkpoint directory")
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
        elif (self.path / SINGLE).is_file():
            weight_map = {k: SINGLE for k in self._header(SINGLE)[1] if k != "__metadata__"}
        else:
            raise CheckpointError(f"{self.path}: neither {INDEX} nor {SINGLE} found")
        self.weight_map: dict[str, str] = weight_map
        config = self.path / "config.json"
        self.fp8_block = (fp8_block(read_hf_config(self.path), str(config)) if config.is_file()
                          else None)
        """Block (rows, columns) of a block-wise FP8 checkpoint, whose weights `read` returns
        dequantized (float32); None when it is not quantized."""
        self.used: set[str] = set()
        self.bytes_read = 0
        """Bytes read from disk (a column slice narrower than a page reads its whole rows)."""

    def _header(self, file: str) -> tuple[int, dict]:
        """(offset of the file's data, its header), parsed once."""
        if file not in self._headers:
            try:
                self._headers[file] = read_header(self.path / file)
            except (OSError, ValueError) as err:
                raise CheckpointError(str(err)) from None
        return self._headers[file]

    def names(self) -> set[str]:
        """All tensor names of the checkpoint."""
        return set(self.weight_map)

    def _entry(self, name: str) -> tuple[str, int, dict]:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        file = self.weight_map[name]
        start, header = self._header(file)
        if name not in header:
            raise CheckpointError(f"{self.path / file}: does not hold {name!r}, which the index "
                                  "maps to it")
        self.used.add(name)
        return file, start, header[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor without reading it."""
        return tuple(self._entry(name)[2]["shape"])

    def read_into(self, name: str, rows: tuple[int, int] | None, out: torch.Tensor) -> bool:
        """Read rows [a, b) of `name` (all with None) straight into `out`, a contiguous tensor of
        their dtype and shape: no buffer in between. False (nothing read) when `out` does not
        fit them, so the caller can take `read`'s path (and its shape errors)."""
        file, start, entry = self._entry(name)
        shape = list(entry["shape"])
        a, b = rows if rows else (0, shape[0] if shape else 1)
        if (not shape or out.dtype != DTYPES[entry["dtype"]] or not out.is_contiguous()
                or list(out.shape) != [b - a, *shape[1:]] or out.device.type != "cpu"):
            return False
        row = math.prod(shape[1:]) * out.element_size()
        view = memoryview(out.view(torch.uint8).numpy()).cast("B") if out.numel() else b""
        self._read_exact(file, start + entry["data_offsets"][0] + a * row, view, name)
        return True

    def _read_exact(self, file: str, offset: int, view, name: str) -> None:
        """Fill `view` from `file` at `offset`; one read(2) returns at most ~2 GiB, so loop."""
        want, got = len(view), 0
        with open(self.path / file, "rb", buffering=0) as f:
            f.seek(offset)
            while got < want:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        if got != want:
            raise CheckpointError(f"{self.path / file}: truncated while reading {name!r}")
        self.bytes_read += got

    def _dequantize(self, name: str, raw: torch.Tensor, row0: int) -> torch.Tensor:
        """Rows [row0, row0 + len(raw)) of an FP8 weight times their blocks' scales, float32:
        w[i, j] = fp8[i, j] * scale_inv[i // B0, j // B1], DeepSeek-V3's `weight_dequant`."""
        scale = f"{name}_scale_inv"
        if self.fp8_block is None or scale not in self.weight_map or raw.dim() != 2:
            raise CheckpointError(
                f"{self.path}: {name!r} is FP8 but "
                + ("config.json has no block-wise fp8 quantization_config"
                   if self.fp8_block is None else f"there is no 2-D weight with {scale!r}"))
        b0, b1 = self.fp8_block
        rows, cols = raw.shape
        want = (-(-self.shape(name)[0] // b0), -(-cols // b1))
        if tuple(self.shape(scale)) != want:
            raise CheckpointError(f"{self.path}: {scale!r} has shape {self.shape(scale)}, "
                                  f"expected {want} for blocks of {b0}x{b1}")
        if rows == 0:
            return raw.float()
        first = row0 // b0
        s = self.read(scale, rows=(first, (row0 + rows - 1) // b0 + 1)).float()
        s = s.repeat_interleave(b0, 0)[row0 - first * b0 : row0 - first * b0 + rows]
        return raw.float() * s.repeat_interleave(b1, 1)[:, :cols]

    def _read_columns(self, file: str, data: int, entry: dict, name: str,
                      rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
        """Columns [c, d) of rows [a, b) of a 2-D tensor, one positioned read per row straight
        into the result: a TP rank reads its share of a row-parallel weight, not whole rows.
        Used where a row's slice is at least a page (below that the kernel reads the same
        pages as whole rows would)."""
        dtype, width = DTYPES[entry["dtype"]], entry["shape"][1]
        (a, b), (c, d) = rows, cols
        out = torch.empty(b - a, d - c, dtype=dtype)
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        span, row = (d - c) * dtype.itemsize, width * dtype.itemsize
        first = data + entry["data_offsets"][0] + a * row + c * dtype.itemsize
        fd = os.open(self.path / file, os.O_RDONLY)
        try:
            for i in range(b - a):
                got, want = 0, view[i * span : (i + 1) * span]
                while got < span:
                    n = os.preadv(fd, [want[got:]], first + i * row + got)
                    if not n:
                        raise CheckpointError(
                            f"{self.path / file}: truncated while reading {name!r}")
                    got += n
        finally:
            os.close(fd)
        self.bytes_read += (b - a) * span
        return out

    def read(self, name: str, rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only rows [a, b) (dim 0) and/or columns [c, d) (dim 1) of it; an FP8
        weight of a block-quantized checkpoint comes dequantized, in float32."""
        file, start, entry = self._entry(name)
        dtype, shape = DTYPES[entry["dtype"]], list(entry["shape"])
        lo = entry["data_offsets"][0]
        row = math.prod(shape[1:]) * dtype.itemsize if shape else dtype.itemsize
        a, b = rows if rows else (0, shape[0] if shape else 1)
        if cols is not None and dtype not in FP8 and len(shape) == 2:
            span = (cols[1] - cols[0]) * dtype.itemsize
            if span >= PAGE and span < row:
                return self._read_columns(file, start, entry, name, (a, b), cols)
        out_shape = [b - a, *shape[1:]] if shape else []
        buf = bytearray((b - a) * row)
        self._read_exact(file, start + lo + a * row, memoryview(buf), name)
        out = (torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype))
        out = out.reshape(out_shape)
        if dtype in FP8:
            out = self._dequantize(name, out, a)
        if cols is not None:
            out = out[:, cols[0]:cols[1]].contiguous()
        return out
