"""The model a converter needs: this rank's Megatron-Core parameters and nothing else.

A training `Actor` adds DDP gradient buffers (fp32, one per parameter), an optimizer (Adam's two
moments, plus fp32 master weights under bf16) and a random initialisation that loading then
overwrites: several times the memory of the weights, which at 671B decides whether conversion
fits on the nodes a user has. `BareModel` builds the same `GPTModel` chunks (same parameter
names, so its checkpoints are the trainer's, loadable under any layout) with
`perform_initialization=False`, and reads or writes only their weights.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from megatron_rl.actor import checkpoint
from megatron_rl.actor.config import ActorConfig, ModelConfig, ParallelConfig, padded_vocab_size
from megatron_rl.actor.model import build_gpt, transformer_config
from megatron_rl.convert.export import save_hf
from megatron_rl.convert.load import load_hf
from megatron_rl.convert.maps import Arch


class BareModel:
    """This rank's model chunks (one per virtual pipeline stage), weights only; collective."""

    def __init__(self, model: ModelConfig, parallel: ParallelConfig, actor: ActorConfig) -> None:
        if parallel.cp > 1:
            raise ValueError(f"parallel.cp={parallel.cp}: conversion does not split sequences; "
                             "set parallel.cp=1 (a checkpoint loads under any cp later)")
        self.model_cfg, self.parallel_cfg = model, parallel
        config = dataclasses.replace(transformer_config(model, parallel, actor),
                                     perform_initialization=False)
        stages = parallel.virtual_pp or 1
        with torch.no_grad():
            self.chunks = [build_gpt(config, model, vp_stage=vp if parallel.virtual_pp else None)
                           for vp in range(stages)]
        for chunk in self.chunks:
            chunk.requires_grad_(False)

    def local_bytes(self) -> int:
        """Bytes of this rank's parameters."""
        return sum(p.numel() * p.element_size() for c in self.chunks for p in c.parameters())

    def load_hf(self, path: str | os.PathLike, arch: Arch, progress: bool = True) -> dict:
        """Read this rank's slices of an HF checkpoint into the chunks."""
        padded = padded_vocab_size(self.model_cfg.vocab_size, self.parallel_cfg.tp)
        return load_hf(self.chunks, arch, self.model_cfg, str(path), padded, progress=progress)

    def _info(self, arch: Arch, extra: dict | None) -> dict:
        p = self.parallel_cfg  # the fields `Actor` records, so the trainer reads it the same
        return {"tp": p.tp, "pp": p.pp, "ep": p.ep, "cp": p.cp, "dp": p.dp,
                "virtual_pp": p.virtual_pp, "with_optimizer": False,
                "distributed_optimizer": False, "model": dataclasses.asdict(self.model_cfg),
                "arch": arch.name} | (extra or {})

    def save(self, dst: str | os.PathLike, arch: Arch, info: dict | None = None) -> str:
        """A Megatron dist checkpoint at `dst` (written beside it, renamed at the end; no
        `latest` file next to it), weights only, as `Actor.save(with_optimizer=False)`."""
        out = Path(dst)
        state: dict[str, Any] = {f"model{i}": c.sharded_state_dict()
                                 for i, c in enumerate(self.chunks)}
        return str(checkpoint.save_sharded(state, out.parent, out.name, self._info(arch, info),
                                           latest=False))

    def load(self, path: str | os.PathLike) -> None:
        """The weights of a checkpoint saved under any layout (by a run or a conversion)."""
        state = {f"model{i}": c.sharded_state_dict() for i, c in enumerate(self.chunks)}
        loaded = checkpoint.load_sharded(state, path)
        for i, chunk in enumerate(self.chunks):
            chunk.load_state_dict(loaded[f"model{i}"], strict=True)

    def save_hf(self, out_dir: str | os.PathLike, arch: Arch, **kwargs: Any) -> str:
        """An HF checkpoint at `out_dir` (`export.save_hf`'s options)."""
        return str(save_hf(self.chunks, arch, self.model_cfg, out_dir, **kwargs))
