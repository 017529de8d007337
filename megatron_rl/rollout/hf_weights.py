"""Apply Hugging Face checkpoint-named tensors to an in-memory `transformers` model.

Checkpoints (and the actor's weight export) name MoE experts one by one,
`model.layers.{L}.mlp.experts.{E}.{gate,up,down}_proj.weight`, but transformers 5 keeps them
fused in memory: `mlp.experts.gate_up_proj` [E, 2I, H] (= [gate_E; up_E] along dim 1) and
`mlp.experts.down_proj` [E, H, I]. Verified against `save_pretrained` of a Qwen3-MoE model in
transformers 5.23 (tests/test_weight_sync.py re-checks it). Everything else maps 1:1 to a
parameter or buffer of the same name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

_EXPERT = re.compile(r"^(?P<base>.+\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name (tied weights appear under every name)."""
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update(model.named_buffers(remove_duplicate=False))
    return out


class HFWeightApplier:
    """Copies HF-named tensors into a model's parameters in place (no reallocation)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.state = _state(model)

    def _target(self, name: str) -> torch.Tensor:
        """The view of a model tensor that `name` (a checkpoint name) fills."""
        if name in self.state:
            return self.state[name]
        m = _EXPERT.match(name)
        if m is None:
            raise KeyError(f"weight {name!r} has no counterpart in {type(self.model).__name__}")
        base, e, proj = m["base"], int(m["e"]), m["proj"]
        if proj == "down":
            fused = self.state.get(f"{base}.down_proj")
            return self._expert_view(name, fused, e, None)
        fused = self.state.get(f"{base}.gate_up_proj")
        half = 0 if proj == "gate" else 1
        return self._expert_view(name, fused, e, half)

    @staticmethod
    def _expert_view(name: str, fused: torch.Tensor | None, e: int,
                     half: int | None) -> torch.Tensor:
        if fused is None or e >= fused.shape[0]:
            raise KeyError(f"weight {name!r}: no fused expert tensor holds expert {e}")
        view = fused[e]
        if half is not None:
            inter = view.shape[0] // 2
            view = view[half * inter : (half + 1) * inter]
        return view

    @torch.no_grad()
    def apply(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy every tensor into place; returns the number of bytes applied."""
        nbytes = 0
        for name, tensor in named_tensors:
            target = self._target(name)
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} does not match "
                                 f"the model's {tuple(target.shape)}")
            target.copy_(tensor)
            nbytes += tensor.numel() * tensor.element_size()
        return nbytes


def iter_checkpoint(path: str | Path) -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor of an HF safetensors checkpoint directory, one at a time."""
    from safetensors import safe_open  # only reloading from a checkpoint directory needs it

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files (not an HF checkpoint dir)")
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
