"""Backend choice for the fused kernels: Triton or the chunked torch reference.

`auto` (the default) picks Triton for CUDA tensors, or for any tensor when `TRITON_INTERPRET=1`
is set (the Triton interpreter, used by the tests on CPU), and the torch reference otherwise.
Force a backend with the environment variable `MEGATRON_RL_KERNELS=reference|triton|auto` or
with `set_backend` (what a config switch calls); the setter wins over the environment.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

Backend = Literal["auto", "triton", "reference"]
ENV = "MEGATRON_RL_KERNELS"
_override: Backend | None = None


def set_backend(backend: Backend | None) -> None:
    """Force a backend for every later call in this process (None = back to env / auto)."""
    global _override
    if backend is not None and backend not in ("auto", "triton", "reference"):
        raise ValueError(f"unknown kernel backend {backend!r}; use auto, triton or reference")
    _override = backend


def backend() -> Backend:
    """The requested backend: `set_backend`, else `$MEGATRON_RL_KERNELS`, else auto."""
    if _override is not None:
        return _override
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "triton", "reference"):
        raise ValueError(f"{ENV}={value!r}: use auto, triton or reference")
    return value  # type: ignore[return-value]


def interpreting() -> bool:
    """True when the Triton interpreter is on (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(x: torch.Tensor, choice: Backend | None = None) -> bool:
    """Whether the kernel for tensor `x` runs in Triton (`choice` overrides `backend()`)."""
    b = choice or backend()
    if b == "reference":
        return False
    can = triton_available() and (x.is_cuda or interpreting())
    if b == "triton" and not can:
        raise RuntimeError("kernel backend 'triton' needs a CUDA tensor or TRITON_INTERPRET=1 "
                           f"(got a {x.device} tensor, triton installed: {triton_available()})")
    return can
