"""Clipped policy-gradient loss per token, with its summable statistics (docs/design.md section 4).

Shape legend: B = samples, T = tokens. Log-probs are of the sampled tokens [B, T]; advantages
are per sample [B] (broadcast over tokens) or per token [B, T]; `loss_mask` [B, T] is 1 where a
token counts.

Per token (PPO, Schulman et al. 2017 eq. 7; DAPO eq. 10 for clip-higher):
    r   = exp(logp - logp_old)                 (GSPO: exp(mean_t (logp - logp_old)) per sequence)
    pg  = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))
    pg  = min(pg, -c A)            where A < 0  (dual clip, Ye et al. 2020)
    pg *= min(exp(logp_old - logp_rollout), cap)   (TIS: truncated importance sampling against
                                                    the engine's log-probs, detached)
    l   = pg + kl_coef * KL_k(logp, logp_ref) - entropy_coef * H
The step loss is `aggregate(loss_agg, l, mask, denominator)`. Both log-ratios are clamped to
+-LOG_RATIO_CLAMP before exp and KL_k is bounded (`kl.KL_GAP_KNOT`), so any finite input gives
a finite loss and gradient; masked tokens are read as 0 whatever they hold.

This is the one torch implementation of the loss: the actor runs it on the `torch` kernel
backend, and the fused Triton kernel (`megatron_rl.kernels.policy_loss`) is tested against it.

Statistics contract: the actor SUMS every statistic over micro-batches and data-parallel ranks,
except keys ending in `_max`, which must be reduced with max (`reduce_stats` does both). So the
loss returns sums and counts (`tokens`, `clip_low_tokens`, `ratio_sum`, ...) and
`summarize_stats` turns the reduced sums into means and fractions for logging.
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from megatron_rl.algorithms._checks import check_ndim, check_nonempty, check_shape
from megatron_rl.algorithms.aggregation import aggregate
from megatron_rl.algorithms.config import AlgorithmConfig
from megatron_rl.algorithms.kl import k3, kl_penalty

LOG_RATIO_CLAMP = 20.0
"""|log r| is clamped here before exp so a stray token cannot give inf (and 0 * inf = NaN where
A = 0); any such token is far outside every clip range anyway (verl does the same)."""


@dataclass(frozen=True)
class TokenLosses:
    """Per-token pieces of the loss, all [B, T] (at masked positions: the terms of all-zero
    inputs, not garbage; they count nowhere)."""

    loss: torch.Tensor
    """Total per-token loss l."""
    pg: torch.Tensor
    """Clipped policy-gradient term (after TIS)."""
    ratio: torch.Tensor
    """The ratio r used in the clip (sequence-level under GSPO)."""
    advantages: torch.Tensor
    """Advantages broadcast to [B, T]."""
    log_ratio: torch.Tensor
    """Per-token logp - logp_old (clamped), for the approximate KL."""
    kl: torch.Tensor | None
    """KL to the reference, if a reference was given."""
    tis_weight: torch.Tensor | None
    """Truncated importance weight, if TIS is on."""


def _masked_row_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of x over mask [B, T] -> [B, 1] (0 for rows with no token)."""
    num = torch.where(mask != 0, x * mask, torch.zeros_like(x)).sum(-1, keepdim=True)
    return num / mask.sum(-1, keepdim=True).clamp(min=1)


def token_losses(
    cfg: AlgorithmConfig,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    rollout_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> TokenLosses:
    """Per-token loss terms under the clip, dual-clip, GSPO, TIS, KL and entropy knobs of cfg.

    Every input is read as 0 at masked tokens (whatever they hold there), so every term and
    gradient is finite at them; the ratio and the TIS weight clamp their log-ratio at
    `LOG_RATIO_CLAMP` and the KL is bounded (`kl.KL_GAP_KNOT`), so live tokens at any finite
    gap give finite values and gradients too.
    """
    adv = check_inputs(cfg, logprobs, old_logprobs, advantages, loss_mask,
                       rollout_logprobs=rollout_logprobs, ref_logprobs=ref_logprobs,
                       entropy=entropy)
    live = loss_mask != 0
    # Masked tokens may hold anything (NaN, +-inf, 1e30 padding): read them as 0 so that no
    # value or gradient downstream ever sees them (their gradient is exactly 0).
    logprobs, old_logprobs, rollout_logprobs, ref_logprobs, entropy = (
        None if x is None else torch.where(live, x, torch.zeros_like(x))
        for x in (logprobs, old_logprobs, rollout_logprobs, ref_logprobs, entropy))
    mask = loss_mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if cfg.sequence_level_ratio:  # GSPO eq. 7: length-normalised sequence ratio
        seq = _masked_row_mean(log_ratio, mask)
        ratio = torch.exp(seq).expand_as(log_ratio)
    else:
        ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    pg = torch.maximum(-adv * ratio, -adv * clipped)
    if cfg.dual_clip_c is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * cfg.dual_clip_c), pg)
    tis = None
    if cfg.tis_cap is not None:
        gap = (old_logprobs - rollout_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        tis = torch.exp(gap).clamp(max=cfg.tis_cap).detach()
        pg = pg * tis
    loss = pg
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator)
        loss = loss + cfg.kl_coef * kl
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * entropy
    return TokenLosses(loss=loss, pg=pg, ratio=ratio, advantages=adv, log_ratio=log_ratio,
                       kl=kl, tis_weight=tis)


def policy_loss(
    cfg: AlgorithmConfig,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    denominator: torch.Tensor | float,
    *,
    rollout_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(this micro-batch's loss over the step's global `denominator`, summable statistics).

    `denominator` comes from `aggregation.denominator(cfg.loss_agg, all masks of the step)`,
    all-reduced over data-parallel ranks.
    """
    t = token_losses(cfg, logprobs, old_logprobs, advantages, loss_mask,
                     rollout_logprobs=rollout_logprobs, ref_logprobs=ref_logprobs,
                     entropy=entropy)
    loss = aggregate(cfg.loss_agg, t.loss, loss_mask, denominator)
    return loss, _stats(cfg, t, loss_mask, entropy)


def _stats(cfg: AlgorithmConfig, t: TokenLosses, loss_mask: torch.Tensor,
           entropy: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Sums and counts over the masked tokens (detached, float32 scalars)."""
    with torch.no_grad():
        live = loss_mask != 0
        adv, r = t.advantages, t.ratio

        def total(x: torch.Tensor) -> torch.Tensor:
            return torch.where(live, x.float(), torch.zeros_like(x, dtype=torch.float32)).sum()

        def count(cond: torch.Tensor) -> torch.Tensor:
            return (cond & live).sum().float()

        # Clip fractions count tokens where the clip is active (its gradient is zero).
        stats = {
            "tokens": count(torch.ones_like(live)),
            "sequences": live.any(-1).sum().float(),
            "pg_loss_sum": total(t.pg),
            "clip_low_tokens": count((adv < 0) & (r < 1 - cfg.eps_low)),
            "clip_high_tokens": count((adv > 0) & (r > 1 + cfg.eps_high)),
            # approx KL(pi_old || pi_theta) by k3 with pi_old as the sampling policy.
            "approx_kl_sum": total(k3(t.log_ratio, torch.zeros_like(t.log_ratio))),
            "ratio_sum": total(r),
            "ratio_max": (r.float().masked_fill(~live, -torch.inf).max() if bool(live.any())
                          else torch.zeros((), dtype=torch.float32)),
        }
        if cfg.dual_clip_c is not None:
            stats["dual_clip_tokens"] = count((adv < 0) & (r > cfg.dual_clip_c))
        if t.tis_weight is not None:
            stats["tis_weight_sum"] = total(t.tis_weight)
            stats["tis_capped_tokens"] = count(t.tis_weight >= cfg.tis_cap)
        if t.kl is not None:
            stats["kl_sum"] = total(t.kl)
        if entropy is not None:
            stats["entropy_sum"] = total(entropy)
    return stats


def reduce_stats(per_part: Iterable[Mapping[str, torch.Tensor | float]]) -> dict[str, float]:
    """Combine the statistics of several micro-batches (or ranks): sum, max for `*_max` keys."""
    out: dict[str, float] = {}
    for part in per_part:
        for key, value in part.items():
            v = float(value)
            if key not in out:
                out[key] = v
            else:
                out[key] = max(out[key], v) if key.endswith("_max") else out[key] + v
    return out


_MEANS = {  # logged name: (summed key, key of its count)
    "pg_loss": ("pg_loss_sum", "tokens"),
    "clip_frac_low": ("clip_low_tokens", "tokens"),
    "clip_frac_high": ("clip_high_tokens", "tokens"),
    "dual_clip_frac": ("dual_clip_tokens", "tokens"),
    "approx_kl": ("approx_kl_sum", "tokens"),
    "ratio_mean": ("ratio_sum", "tokens"),
    "tis_weight_mean": ("tis_weight_sum", "tokens"),
    "tis_capped_frac": ("tis_capped_tokens", "tokens"),
    "kl": ("kl_sum", "tokens"),
    "entropy": ("entropy_sum", "tokens"),
}


def summarize_stats(summed: Mapping[str, float]) -> dict[str, float]:
    """Means and fractions per loss token from reduced statistics (absent keys are skipped)."""
    out = {k: float(summed[k]) for k in ("tokens", "sequences", "ratio_max", "loss")
           if k in summed}
    for name, (num, den) in _MEANS.items():
        if num in summed:
            out[name] = float(summed[num]) / max(float(summed[den]), 1.0)
    return out


PolicyLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""A function with `policy_loss`'s signature (the fused kernel's dispatcher is one)."""


def make_loss_fn(cfg: AlgorithmConfig, denominator: torch.Tensor | float, *,
                 on_policy: bool = False, loss: PolicyLoss = policy_loss
                 ) -> Callable[[torch.Tensor, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The actor's `LossFn`: reads the micro-batch's typed fields (`loss_mask`, `advantages`,
    `old_logprobs`, and `rollout_logprobs`, `ref_logprobs`, `entropy` where set) and returns
    `loss(cfg, ...)` (`policy_loss` unless a backend passes its own).

    Missing `old_logprobs` is an error: the ratio would silently be 1. Only with
    `on_policy=True` does their absence mean logp_old = logp detached (ratio 1, same gradient);
    old log-probs that are present are always used. `needs_entropy` is set when the entropy
    bonus is on, so the actor computes the entropy.
    """

    def fn(logprobs: torch.Tensor, mb: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if mb.advantages is None:
            raise ValueError("micro-batch has no advantages ([b] or [b, s])")
        if mb.old_logprobs is not None:
            old = mb.old_logprobs
        elif on_policy:
            old = logprobs.detach()
        else:
            raise ValueError("micro-batch has no old_logprobs ([b, s], the log-probs of the "
                             "policy that the samples are scored against); pass "
                             "on_policy=True to use the current log-probs, detached")
        return loss(cfg, logprobs, old, mb.advantages, mb.loss_mask, denominator,
                    rollout_logprobs=mb.rollout_logprobs, ref_logprobs=mb.ref_logprobs,
                    entropy=mb.entropy)

    fn.needs_entropy = cfg.entropy_coef > 0
    return fn


def check_inputs(cfg: AlgorithmConfig, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                 advantages: torch.Tensor, loss_mask: torch.Tensor, *,
                 rollout_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
                 entropy: torch.Tensor | None) -> torch.Tensor:
    """Shape and presence checks of the loss inputs (every implementation of the loss runs
    them); returns the advantages broadcast to [B, T] in the log-probs' dtype."""
    check_ndim("logprobs", logprobs, 2, "[B, T]")
    check_nonempty("logprobs", logprobs)
    shape = tuple(logprobs.shape)
    check_shape("old_logprobs", old_logprobs, shape, "logprobs")
    check_shape("loss_mask", loss_mask, shape, "logprobs")
    for name, x in (("rollout_logprobs", rollout_logprobs), ("ref_logprobs", ref_logprobs),
                    ("entropy", entropy)):
        if x is not None:
            check_shape(name, x, shape, "logprobs")
    if cfg.tis_cap is not None and rollout_logprobs is None:
        raise ValueError("tis_cap is set but rollout_logprobs were not given")
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 but ref_logprobs were not given")
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 but the token entropy was not given")
    if advantages.dim() == 1:
        check_shape("advantages", advantages, shape[:1], "logprobs [B]")
        advantages = advantages[:, None]
    else:
        check_shape("advantages", advantages, shape, "logprobs [B, T]")
    if not bool(torch.isfinite(advantages).all()):
        raise ValueError("advantages contain NaN or inf")
    return advantages.to(logprobs.dtype).expand(shape)
