"""Input checks shared by the algorithms: clear `ValueError`s instead of silent broadcasting."""

import torch


def check_nonempty(name: str, x: torch.Tensor) -> None:
    """Raise if `x` has no elements."""
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one sample")


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise if `x` holds NaN or +-inf."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf; fix the producer (e.g. the reward function)")


def check_shape(name: str, x: torch.Tensor, shape: tuple[int, ...], ref: str) -> None:
    """Raise if `x.shape != shape` (the shape of `ref`)."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref} has {tuple(shape)}; "
                         "they must match")


def check_ndim(name: str, x: torch.Tensor, ndim: int, legend: str) -> None:
    """Raise if `x` does not have `ndim` dimensions (`legend` names them, e.g. '[B, T]')."""
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {legend}, got shape {tuple(x.shape)}")
