"""The frozen reference policy pi_ref of GRPO's KL penalty, without a second Megatron model.

As slime does (its Megatron actor keeps the reference weights on the host and loads them into
the training model for the reference forward), each rank keeps a host copy of its own shards of
the initial weights and swaps them into the actor's parameters only while the reference
log-probs are computed. The swap is an exchange of values through `copy_`, never a rebinding
of `param.data`: with the distributed optimizer every parameter is a view into Megatron DDP's
contiguous param buffer, which the optimizer all-gathers its updated shards into, so a rebound
parameter would silently stop training. Exchanging values also means one host copy is enough:
while the reference is in, the host copy holds the training weights.

Only the model's own tensors are swapped (parameters and persistent buffers, e.g. the MoE
router's expert bias); gradients, DDP grad buffers and the optimizer's fp32 main parameters
(bf16 training) are not touched, which is right for a forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from megatron_rl.actor.step import MicroBatch

if TYPE_CHECKING:
    from megatron_rl.actor.actor import Actor


def model_tensors(actor: Actor) -> list[tuple[str, torch.Tensor]]:
    """Every tensor that decides the actor's forward, in a fixed order: each chunk's parameters
    and persistent buffers (router expert bias; not run-time counters such as the tokens per
    expert), named `<chunk>.<name>`. Parameters are their `.data`, the storage the optimizer and
    Megatron DDP's buffers share."""
    out = []
    for i, chunk in enumerate(actor.model):
        module = chunk.module
        out += [(f"{i}.{n}", p.data) for n, p in module.named_parameters()]
        persistent = set(module.state_dict(keep_vars=True))
        out += [(f"{i}.{n}", b) for n, b in module.named_buffers()
                if n in persistent and b.is_floating_point()]
    return out


class ReferencePolicy:
    """This rank's shards of the reference weights on the host; `logprobs` evaluates them in the
    actor's model. Collective like the actor: every rank calls `logprobs` together."""

    def __init__(self, names: list[str], host: list[torch.Tensor]) -> None:
        self.names, self.host = names, host

    @classmethod
    def from_actor(cls, actor: Actor) -> ReferencePolicy:
        """Snapshot the actor's current weights (call it after loading the initial checkpoint,
        before training). Host memory is pinned where CUDA is, for fast asynchronous copies."""
        for chunk in actor.model:
            if getattr(chunk.ddp_config, "overlap_param_gather", False):
                # Its forward pre-hooks all-gather the optimizer's shards into the params during
                # the forward, which would overwrite the swapped-in reference weights.
                raise ValueError("the reference policy cannot swap weights with "
                                 "overlap_param_gather on; turn it off")
        names, host = [], []
        with torch.no_grad():
            for name, t in model_tensors(actor):
                h = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
                h.copy_(t)
                names.append(name)
                host.append(h)
        return cls(names, host)

    @property
    def nbytes(self) -> int:
        """Host memory held by this rank's reference shards."""
        return sum(h.numel() * h.element_size() for h in self.host)

    def logprobs(
        self, actor: Actor, microbatches: Sequence[MicroBatch], temperature: float = 1.0
    ) -> list[torch.Tensor]:
        """Log-probs [b, s] of each micro-batch's labels under the reference weights
        (`MicroBatch.ref_logprobs` of the KL penalty); the actor's weights are back, bitwise,
        after."""
        with self.swapped_in(actor):
            return actor.logprobs(microbatches, temperature)

    @contextmanager
    def swapped_in(self, actor: Actor) -> Iterator[None]:
        """The reference weights in the actor's model for the duration of the block."""
        live = self._live(actor)
        self._exchange(live)
        try:
            yield
        finally:
            self._exchange(live)

    def _live(self, actor: Actor) -> list[torch.Tensor]:
        tensors = model_tensors(actor)
        if [n for n, _ in tensors] != self.names:
            raise ValueError("this actor's parameters are not the ones the reference was "
                             "snapshotted from (another model or parallel layout)")
        for (name, t), h in zip(tensors, self.host, strict=True):
            if t.shape != h.shape or t.dtype != h.dtype:
                raise ValueError(f"{name}: actor has {tuple(t.shape)} {t.dtype}, reference "
                                 f"{tuple(h.shape)} {h.dtype}")
        return [t for _, t in tensors]

    @torch.no_grad()
    def _exchange(self, live: list[torch.Tensor]) -> None:
        """Swap the values of the live tensors and the host copies, one tensor at a time (one
        tensor of scratch on the device). Copies between equal dtypes are exact."""
        for t, h in zip(live, self.host, strict=True):
            held = t.clone()
            t.copy_(h, non_blocking=h.is_pinned())
            h.copy_(held, non_blocking=h.is_pinned())  # same stream: after the read of h above
        if any(t.is_cuda for t in live):
            torch.cuda.synchronize()
