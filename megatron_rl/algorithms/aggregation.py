"""Loss aggregation over tokens with a global denominator (DESIGN.md section 4).

Shape legend: B = samples, T = tokens; `loss_mask` [B, T] is 1 where a token counts.

Every aggregation is `numerator(token_loss, loss_mask) / denominator`, where the numerator is a
sum over the rows it is given and the denominator is computed once for the whole step (all
micro-batches, all data-parallel ranks) by `denominator`. So the step loss, and its gradient, is
the sum of the micro-batch losses whatever the split (sequences are never split across
micro-batches). Rows with no loss token (fully masked, e.g. filtered overlong samples) contribute
nothing and are not counted as sequences.

- token_mean (DAPO eq. 12): sum_{i,t} l_it / sum_i |o_i|.
- seq_mean_token_mean (GRPO, DeepSeekMath eq. 3): sum_i (sum_t l_it / |o_i|) / N_seq; the
  per-sequence count |o_i| is local to the row, the global denominator is N_seq.
- seq_mean_token_sum_norm (Dr.GRPO): sum_{i,t} l_it / (N_seq * L) with L a constant length
  (the generation budget, `norm_len`).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_rl.algorithms._checks import check_ndim, check_shape


def _masked(token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """l * m with masked positions exactly 0 (even where l is NaN or inf, e.g. padding)."""
    return torch.where(loss_mask != 0, token_loss * loss_mask, torch.zeros_like(token_loss))


def _token_sum(token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return _masked(token_loss, loss_mask).sum()


def _seq_token_mean_sum(token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    counts = loss_mask.sum(dim=-1)  # [B]
    per_seq = _masked(token_loss, loss_mask).sum(dim=-1) / counts.clamp(min=1)
    return per_seq.sum()  # rows with no token give 0 / 1 = 0


def _tokens(loss_mask: torch.Tensor, norm_len: int | None) -> torch.Tensor:
    return loss_mask.to(torch.float64).sum()


def _sequences(loss_mask: torch.Tensor, norm_len: int | None) -> torch.Tensor:
    return (loss_mask.sum(dim=-1) > 0).to(torch.float64).sum()


def _sequences_times_len(loss_mask: torch.Tensor, norm_len: int | None) -> torch.Tensor:
    if norm_len is None or norm_len <= 0:
        raise ValueError("seq_mean_token_sum_norm needs norm_len > 0 (the constant length L, "
                         f"e.g. rollout.max_new_tokens), got {norm_len}")
    return _sequences(loss_mask, None) * norm_len


@dataclass(frozen=True)
class Aggregation:
    """A loss aggregation: a per-micro-batch numerator and a whole-step denominator."""

    numerator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """(token_loss [B, T], loss_mask [B, T]) -> scalar sum over these rows."""
    denominator: Callable[[torch.Tensor, int | None], torch.Tensor]
    """(loss_mask [B, T], norm_len) -> scalar count over these rows (float64)."""


AGGREGATIONS: dict[str, Aggregation] = {
    "token_mean": Aggregation(_token_sum, _tokens),
    "seq_mean_token_mean": Aggregation(_seq_token_mean_sum, _sequences),
    "seq_mean_token_sum_norm": Aggregation(_token_sum, _sequences_times_len),
}
"""The one registry of aggregations, keyed by `AlgorithmConfig.loss_agg`."""


def _lookup(loss_agg: str) -> Aggregation:
    if loss_agg not in AGGREGATIONS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; choose one of {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[loss_agg]


def denominator(loss_agg: str, loss_masks: torch.Tensor | Sequence[torch.Tensor],
                norm_len: int | None = None) -> torch.Tensor:
    """Denominator of `loss_agg` over the masks given: one [B, T] tensor or the list of all
    micro-batches' masks. Returns a float64 scalar; on several DP ranks, all-reduce (SUM) it."""
    agg = _lookup(loss_agg)
    masks = [loss_masks] if isinstance(loss_masks, torch.Tensor) else list(loss_masks)
    if not masks:
        raise ValueError("denominator needs at least one loss mask")
    total = torch.zeros((), dtype=torch.float64)
    for mask in masks:
        check_ndim("loss_mask", mask, 2, "[B, T]")
        total = total + agg.denominator(mask, norm_len).cpu()
    return total


def aggregate(loss_agg: str, token_loss: torch.Tensor, loss_mask: torch.Tensor,
              denominator: torch.Tensor | float) -> torch.Tensor:
    """This micro-batch's share of the step loss: numerator(rows) / global denominator.

    A zero denominator (no loss token in the whole step) gives a zero loss, not NaN.
    """
    check_ndim("token_loss", token_loss, 2, "[B, T]")
    check_shape("loss_mask", loss_mask, tuple(token_loss.shape), "token_loss")
    d = float(denominator)
    if d < 0 or d != d:
        raise ValueError(f"denominator must be >= 0, got {d}")
    num = _lookup(loss_agg).numerator(token_loss, loss_mask.to(token_loss.dtype))
    return num / d if d > 0 else num * 0.0
