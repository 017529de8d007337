"""Overlong reward shaping (DAPO section 3.4).

Shape legend: B = samples, T = tokens.
"""

import torch

from megatron_rl.algorithms._checks import check_ndim, check_nonempty, check_shape


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """Soft overlong punishment R_length (DAPO eq. 13), float32 [B], added to the reward:

        0                                  if |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
        -1                                 if |y| > L_max
    """
    if not 0 < cache_len < max_len:
        raise ValueError(f"need 0 < cache_len < max_len, got cache_len={cache_len}, "
                         f"max_len={max_len}")
    lengths = torch.as_tensor(lengths)
    check_nonempty("lengths", lengths)
    check_ndim("lengths", lengths, 1, "[B]")
    y = lengths.to(torch.float64)
    free = max_len - cache_len
    ramp = (free - y) / cache_len
    out = torch.where(y <= free, torch.zeros_like(y), torch.where(y <= max_len, ramp, -1.0))
    return out.float()


def overlong_filter(loss_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """Overlong filtering (DAPO section 3.4): loss_mask [B, T] with the rows of truncated
    samples (truncated [B], bool) zeroed, so they give no gradient."""
    check_ndim("loss_mask", loss_mask, 2, "[B, T]")
    truncated = torch.as_tensor(truncated, dtype=torch.bool)
    check_shape("truncated", truncated, tuple(loss_mask.shape[:1]), "loss_mask [B]")
    return loss_mask * (~truncated).to(loss_mask.dtype)[:, None]
