"""The `RolloutEngine` protocol: SGLang's engine API, so the trainer does not care which engine
serves it (the embedded `TransformersEngine`, SGLang in-process, or SGLang over HTTP).

Method names and arguments mirror `sglang.Engine` (and the HTTP routes of the same names).
Every blocking call takes the engine's configured timeout; a failure raises `EngineError` naming
the engine's address.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from megatron_rl.rollout.types import GenerateOutput, SamplingParams


class EngineError(RuntimeError):
    """An engine failed or did not answer in time; the message names its address."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a generation engine."""

    address: str
    """Where the engine is ('embedded', 'http://host:port', ...), for error messages."""

    def generate(
        self,
        input_ids: Sequence[Sequence[int]] | None = None,
        sampling_params: SamplingParams | None = None,
        prompt: Sequence[str] | None = None,
        return_routed_experts: bool = False,
    ) -> list[list[GenerateOutput]]:
        """For each prompt (ids or text), `sampling_params.n` outputs."""
        ...

    def update_weights_from_tensor(
        self,
        named_tensors: Sequence[tuple[str, torch.Tensor]],
        load_format: str | None = None,
        flush_cache: bool = True,
    ) -> None:
        """Replace the named (HF-named) weights with these tensors."""
        ...

    def init_weights_update_group(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int,
        group_name: str = "weight_update_group", backend: str = "nccl",
    ) -> None:
        """Join a process group through which the trainer broadcasts weights."""
        ...

    def update_weights_from_distributed(
        self, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]],
        group_name: str = "weight_update_group", flush_cache: bool = True,
    ) -> None:
        """Receive the named weights by broadcast from rank 0 of the update group."""
        ...

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None) -> None:
        """Reload all weights from an HF checkpoint directory."""
        ...

    def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Free weights and/or KV cache memory (colocated training runs meanwhile)."""
        ...

    def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Take the released memory back."""
        ...

    def flush_cache(self) -> None:
        """Drop cached prefixes (stale after a weight update)."""
        ...

    def health(self) -> bool:
        """True when the engine answers."""
        ...
