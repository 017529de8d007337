"""Host offload of the actor while colocated engines generate (docs/design.md section 6).

Megatron-Core keeps gradients (and, with the distributed optimizer, parameters) in contiguous
per-chunk buffers whose tensors are views; releasing a buffer's storage (`resize_(0)`) frees
the device memory while every view stays a valid object, and resizing it back revives them all
(Megatron-Core's own RL offload, `_ParamAndGradBuffer.offload_to_cpu`). Parameters outside a
buffer move one by one. Gradients are not kept (they are zeroed before the next backward);
parameters are copied to host first; optimizer state moves with Megatron-Core's
`offload_to_cpu` / `restore_from_cpu` (nothing to move when `actor.optimizer_cpu_offload` keeps it
on the host already).

On CPU the device is the host, so nothing is saved, but the same storage is released and
restored: anything that reads the actor while it is offloaded fails loudly instead of reading
stale memory, on CPU as on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def _buffers(chunks: list[Any]) -> list[Any]:
    return [b for c in chunks for b in (*c.buffers, *c.expert_parallel_buffers)]


@dataclass
class HostCopy:
    """What an offload moved: per buffer its host copy and sizes, per loose parameter its data."""

    grads: list[tuple[Any, int]] = field(default_factory=list)
    params: list[tuple[Any, torch.Tensor, int]] = field(default_factory=list)
    loose: list[tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)
    optimizer: bool = False


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t.detach().clone()  # the storage is about to be released
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def offload_grads(chunks: list[Any], moved: HostCopy) -> None:
    """Release every gradient buffer's storage (its contents are not needed again)."""
    for buf in _buffers(chunks):
        storage = buf.grad_data.untyped_storage()
        if storage.size() > 0:
            moved.grads.append((buf, storage.size()))
            storage.resize_(0)


def offload_params(chunks: list[Any], moved: HostCopy) -> None:
    """Copy parameters to host and release their device memory."""
    in_buffers = set()
    for buf in _buffers(chunks):
        if buf.param_data is None:
            continue
        in_buffers.update(id(p) for p in buf.params)
        storage = buf.param_data.untyped_storage()
        if storage.size() > 0:
            moved.params.append((buf, _to_host(buf.param_data), storage.size()))
            storage.resize_(0)
    for chunk in chunks:
        for p in chunk.parameters():
            if id(p) not in in_buffers and p.numel() > 0:
                moved.loose.append((p, _to_host(p.data)))
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)


def offload_optimizer(optimizer: Any, moved: HostCopy, device: torch.device) -> None:
    """Megatron-Core's optimizer offload (moves CUDA state only)."""
    if device.type == "cuda":
        optimizer.offload_to_cpu()
        moved.optimizer = True


def onload(moved: HostCopy, optimizer: Any, device: torch.device) -> None:
    """Undo every offload recorded in `moved` (gradients come back zeroed)."""
    for buf, host, size in moved.params:
        buf.param_data.untyped_storage().resize_(size)
        buf.param_data.copy_(host, non_blocking=True)
    for p, host in moved.loose:
        p.data = host.to(device, non_blocking=True)
    for buf, size in moved.grads:
        buf.grad_data.untyped_storage().resize_(size)
        buf.grad_data.zero_()
    if moved.optimizer:
        optimizer.restore_from_cpu()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
