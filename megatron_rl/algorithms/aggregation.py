"""Loss aggregation over tokens with a global denominator (docs/design.md section 4).

Shape legend: B = samples, T = tokens; `loss_mask` [B, T] is 1 where a token counts.

Every aggregation is `sum_{i,t} c_it l_it / denominator` (`token_weights` gives the per-token
weights c / denominator): the numerator sums over the rows it is given and the denominator is
computed once for the whole step (all micro-batches, all data-parallel ranks) by `denominator`.
So the step loss, and its gradient, is the sum of the micro-batch losses whatever the split
(sequences are never split across micro-batches). Rows with no loss token (fully masked, e.g.
filtered overlong samples) contribute nothing and are not counted as sequences.

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


def _per_token(loss_mask: torch.Tensor) -> torch.Tensor:
    return loss_mask


def _per_sequence_mean(loss_mask: torch.Tensor) -> torch.Tensor:
    return loss_mask / loss_mask.sum(dim=-1, keepdim=True).clamp(min=1)  # 1 / |o_i| per token


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
    """A loss aggregation: numerator sum_{i,t} c_it l_it over the micro-batch's rows and a
    whole-step denominator."""

    coefficient: Callable[[torch.Tensor], torch.Tensor]
    """loss_mask [B, T] (float) -> the numerator's coefficient c of each token [B, T] (read only
    where the mask is nonzero)."""
    denominator: Callable[[torch.Tensor, int | None], torch.Tensor]
    """(loss_mask [B, T], norm_len) -> scalar count over these rows (float64)."""


AGGREGATIONS: dict[str, Aggregation] = {
    "token_mean": Aggregation(_per_token, _tokens),
    "seq_mean_token_mean": Aggregation(_per_sequence_mean, _sequences),
    "seq_mean_token_sum_norm": Aggregation(_per_token, _sequences_times_len),
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


def token_weights(loss_agg: str, loss_mask: torch.Tensor, denominator: torch.Tensor | float,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weight w [B, T] of each token in the step loss, sum_{i,t} w_it l_it: the aggregation's
    coefficient over the global denominator, exactly 0 where masked (and everywhere when the
    denominator is 0: no loss token in the whole step). The fused kernel consumes these."""
    check_ndim("loss_mask", loss_mask, 2, "[B, T]")
    d = float(denominator)
    if d < 0 or d != d:
        raise ValueError(f"denominator must be >= 0, got {d}")
    coef = _lookup(loss_agg).coefficient(loss_mask.to(dtype))
    w = torch.where(loss_mask != 0, coef, torch.zeros_like(coef))
    return w / d if d > 0 else w * 0.0


def aggregate(loss_agg: str, token_loss: torch.Tensor, loss_mask: torch.Tensor,
              denominator: torch.Tensor | float) -> torch.Tensor:
    """This micro-batch's share of the step loss: sum_{i,t} w_it l_it (`token_weights`).

    Masked tokens contribute exactly 0, even where l is NaN or inf (e.g. padding); a zero
    denominator (no loss token in the whole step) gives a zero loss, not NaN.
    """
    check_ndim("token_loss", token_loss, 2, "[B, T]")
    check_shape("loss_mask", loss_mask, tuple(token_loss.shape), "token_loss")
    w = token_weights(loss_agg, loss_mask, denominator, token_loss.dtype)
    return torch.where(loss_mask != 0, w * token_loss, torch.zeros_like(token_loss)).sum()
