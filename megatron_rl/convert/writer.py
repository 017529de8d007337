"""A safetensors file written one tensor at a time, so an export holds one tensor, not a shard.

`safetensors.torch.save_file` needs every tensor of a file in memory at once: with HF's
multi-GB shards that is GBs per rank on top of the model. The format puts a JSON header (names,
dtypes, shapes, byte offsets) before the data, so the header cannot be written first; instead
the data goes after a reserved region and the header is written into it at the end, padded with
spaces, which the format allows (docs/design.md, "Checkpoint conversion"). A file ends when its
header would outgrow the reservation (thousands of tensors) or the caller's size limit.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from megatron_rl.convert.reader import DTYPES

_NAMES = {dtype: name for name, dtype in DTYPES.items()}
"""torch dtype -> safetensors dtype name (the reader's table, inverted)."""


class StreamingSafetensors:
    """Append tensors to one safetensors file; `close()` writes the header. Data starts at
    `reserve` bytes (a multiple of 8, so every tensor keeps the alignment the library gives)."""

    def __init__(self, path: str | Path, metadata: dict[str, str] | None = None,
                 reserve: int = 2**20) -> None:
        if reserve % 8 or reserve < 64:
            raise ValueError(f"reserve={reserve}: a multiple of 8, at least 64")
        self.path, self.reserve = Path(path), reserve
        self._entries: dict[str, dict] = {"__metadata__": dict(metadata)} if metadata else {}
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self._file.seek(reserve)
        self.nbytes = 0

    def _header(self, extra: dict[str, dict] | None = None) -> bytes:
        return json.dumps({**self._entries, **(extra or {})}, separators=(",", ":")).encode()

    def _entry(self, tensor: torch.Tensor) -> dict:
        if tensor.dtype not in _NAMES:
            raise TypeError(f"{tensor.dtype} has no safetensors dtype")
        size = tensor.numel() * tensor.element_size()
        return {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape),
                "data_offsets": [self.nbytes, self.nbytes + size]}

    def fits(self, name: str, tensor: torch.Tensor) -> bool:
        """Whether the header, with `name` added, still fits the reservation."""
        return 8 + len(self._header({name: self._entry(tensor)})) <= self.reserve

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write `tensor`'s bytes now (a CPU copy if it lives elsewhere)."""
        if name in self._entries:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        if not self.fits(name, tensor):
            raise ValueError(f"{self.path}: header full (start a new file; see fits())")
        entry = self._entry(tensor)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._entries[name] = entry
        self.nbytes = entry["data_offsets"][1]

    def close(self) -> list[str]:
        """Write the header (space-padded to the reservation) and close; the tensor names."""
        header = self._header()
        header += b" " * (self.reserve - 8 - len(header))
        self._file.seek(0)
        self._file.write(struct.pack("<Q", len(header)) + header)
        self._file.close()
        return [n for n in self._entries if n != "__metadata__"]
