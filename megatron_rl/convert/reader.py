"""Read Hugging Face safetensors checkpoints by slices, so a rank reads only what it owns.

Handles a single `model.safetensors` and sharded checkpoints with `model.safetensors.index.json`.
Every read goes through `safetensors.safe_open(...).get_slice`, which maps only the requested
rows/columns from disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match the model."""


class SafetensorsReader:
    """Lazy, sliced access to the tensors of an HF checkpoint directory."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such checkpoint directory")
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
        elif (self.path / SINGLE).is_file():
            with safe_open(self.path / SINGLE, "pt") as f:
                weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise CheckpointError(f"{self.path}: neither {INDEX} nor {SINGLE} found")
        self.weight_map: dict[str, str] = weight_map
        self._files: dict[str, object] = {}
        self.used: set[str] = set()
        self.bytes_read = 0

    def names(self) -> set[str]:
        """All tensor names of the checkpoint."""
        return set(self.weight_map)

    def _slice(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        file = self.weight_map[name]
        if file not in self._files:
            self._files[file] = safe_open(self.path / file, "pt")
        self.used.add(name)
        return self._files[file].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor without reading it."""
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor, or only rows [a, b) (dim 0) and/or columns [c, d) (dim 1) of it."""
        sl = self._slice(name)
        index = (slice(*rows) if rows else slice(None),)
        if cols is not None:
            index = index + (slice(*cols),)
        out = sl[index] if (rows or cols) else sl[:]
        self.bytes_read += out.numel() * out.element_size()
        return out
