"""Backend choice for the fused kernels: Triton or torch.

The backend is an argument of every kernel entry point, set from `ActorConfig.kernels`:
- `auto`: Triton for CUDA tensors, or for any tensor when `TRITON_INTERPRET=1` is set (the
  Triton interpreter, used by the tests on CPU); torch otherwise.
- `triton`: Triton, and an error where it cannot run (no triton, or a CPU tensor without the
  interpreter).
- `torch`: the torch implementation (for the policy loss, the algorithms library's).
"""

from __future__ import annotations

import importlib.util
import os
import typing
from typing import Literal

import torch

KernelBackend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[str, ...] = typing.get_args(KernelBackend)
"""The values of `ActorConfig.kernels`."""


def interpreting() -> bool:
    """True when the Triton interpreter is on (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """Whether triton is installed."""
    return importlib.util.find_spec("triton") is not None


def triton_can_run(on_cuda: bool) -> bool:
    """Triton is installed and has somewhere to run: CUDA tensors, or the interpreter on CPU."""
    return triton_available() and (on_cuda or interpreting())


def use_triton(x: torch.Tensor, backend: KernelBackend | str) -> bool:
    """Whether the kernel for tensor `x` runs in Triton under `backend` (see the module)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    can = triton_can_run(x.is_cuda)
    if backend == "triton" and not can:
        raise RuntimeError("kernel backend 'triton' needs a CUDA tensor or TRITON_INTERPRET=1 "
                           f"(got a {x.device} tensor, triton installed: {triton_available()}); "
                           "use actor.kernels=auto or torch")
    return can
