"""Token-level clipped policy loss, fused forward + backward (DESIGN.md sections 4 and 5).

Shape legend: B = samples, T = tokens. Log-probs / entropy / masks are [B, T]; advantages [B]
(broadcast over tokens) or [B, T]. The math is the algorithms library's (`policy_loss.py`,
`aggregation.py`), restated here because kernels import nothing of ours:
    r  = exp(clamp(logp - logp_old, -20, 20))
    pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));  pg = min(pg, -c A) where A < 0
    pg *= min(exp(clamp(logp_old - logp_rollout)), tis_cap)   (detached; TIS, optional)
    l  = pg + kl_coef * KL(logp, logp_ref) - entropy_coef * H   (KL k1 | k2 | k3)
    loss = sum_{b,t} weight_bt l_bt, with weight = mask / denominator (token_mean,
           seq_mean_token_sum_norm) or mask / (row tokens * denominator) (seq_mean_token_mean)
The denominator is the step's global one (`aggregation.denominator`, all-reduced over DP);
0 gives a zero loss. Statistics follow the algorithms' contract: sums and counts over the
masked tokens, `ratio_max` reduced by max. Gradients flow to `logprobs` and `entropy` only.

The Triton kernel computes the loss, its gradient and the statistics in one pass; the torch
reference (same signature) builds the same graph from torch ops. `kernels.dispatch` picks.
"""

from __future__ import annotations

import torch

from megatron_rl.kernels import dispatch

LOG_RATIO_CLAMP = 20.0
KL_MODES = {"k1": 1, "k2": 2, "k3": 3}
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
STAT_KEYS = ("loss", "tokens", "pg_loss_sum", "clip_low_tokens", "clip_high_tokens",
             "approx_kl_sum", "ratio_sum", "ratio_max", "dual_clip_tokens", "tis_weight_sum",
             "tis_capped_tokens", "kl_sum", "entropy_sum")
"""Column order of the kernel's partial statistics."""


def token_weights(loss_mask: torch.Tensor, loss_agg: str,
                  denominator: torch.Tensor | float) -> torch.Tensor:
    """Aggregation weight per token [B, T] fp32: loss = sum(weight * l) (0 where masked)."""
    if loss_agg not in AGGREGATIONS:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; choose one of {AGGREGATIONS}")
    d = float(denominator)
    if d < 0 or d != d:
        raise ValueError(f"denominator must be >= 0, got {d}")
    m = loss_mask.float()
    live = loss_mask != 0
    if loss_agg == "seq_mean_token_mean":
        m = m / m.sum(-1, keepdim=True).clamp(min=1)
    w = torch.where(live, m, torch.zeros_like(m))
    return w / d if d > 0 else w * 0.0


def _check(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
           loss_mask: torch.Tensor, kl_coef: float, ref_logprobs: torch.Tensor | None,
           entropy_coef: float, entropy: torch.Tensor | None, tis_cap: float | None,
           rollout_logprobs: torch.Tensor | None, kl_estimator: str) -> torch.Tensor:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got {tuple(logprobs.shape)}")
    for name, x in (("old_logprobs", old_logprobs), ("loss_mask", loss_mask),
                    ("ref_logprobs", ref_logprobs), ("entropy", entropy),
                    ("rollout_logprobs", rollout_logprobs)):
        if x is not None and x.shape != logprobs.shape:
            raise ValueError(f"{name} {tuple(x.shape)} != logprobs {tuple(logprobs.shape)}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 but ref_logprobs were not given")
    if entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 but the token entropy was not given")
    if tis_cap is not None and rollout_logprobs is None:
        raise ValueError("tis_cap is set but rollout_logprobs were not given")
    if kl_estimator not in KL_MODES:
        raise ValueError(f"unknown KL estimator {kl_estimator!r}")
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    return advantages.float().expand(logprobs.shape)


def reference_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
    loss_mask: torch.Tensor, denominator: torch.Tensor | float, *, eps_low: float = 0.2,
    eps_high: float = 0.2, dual_clip_c: float | None = None, loss_agg: str = "token_mean",
    ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
    rollout_logprobs: torch.Tensor | None = None, tis_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Torch reference of `fused_policy_loss` (same signature, torch autograd)."""
    adv = _check(logprobs, old_logprobs, advantages, loss_mask, kl_coef, ref_logprobs,
                 entropy_coef, entropy, tis_cap, rollout_logprobs, kl_estimator)
    lp = logprobs.float()
    live = loss_mask != 0
    lr = (lp - old_logprobs.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    r = lr.exp()
    pg = torch.maximum(-adv * r, -adv * r.clamp(1 - eps_low, 1 + eps_high))
    if dual_clip_c is not None:
        pg = torch.where(adv < 0, torch.minimum(pg, -adv * dual_clip_c), pg)
    tis = None
    if tis_cap is not None:
        gap = (old_logprobs.float() - rollout_logprobs.float()).clamp(-LOG_RATIO_CLAMP,
                                                                      LOG_RATIO_CLAMP)
        tis = gap.exp().clamp(max=tis_cap).detach()
        pg = pg * tis
    loss_t = pg
    kl = None
    if ref_logprobs is not None:
        d = ref_logprobs.float() - lp
        kl = {"k1": -d, "k2": 0.5 * d * d, "k3": d.exp() - d - 1}[kl_estimator]
        loss_t = loss_t + kl_coef * kl
    if entropy_coef > 0:
        loss_t = loss_t - entropy_coef * entropy.float()
    w = token_weights(loss_mask, loss_agg, denominator)
    loss = torch.where(live, w * loss_t, torch.zeros_like(loss_t)).sum()
    with torch.no_grad():
        def total(x: torch.Tensor) -> torch.Tensor:
            return torch.where(live, x.float(), torch.zeros_like(x, dtype=torch.float32)).sum()

        def count(c: torch.Tensor) -> torch.Tensor:
            return (c & live).sum().float()

        stats = {
            "tokens": count(torch.ones_like(live)), "sequences": live.any(-1).sum().float(),
            "pg_loss_sum": total(pg), "clip_low_tokens": count((adv < 0) & (r < 1 - eps_low)),
            "clip_high_tokens": count((adv > 0) & (r > 1 + eps_high)),
            "approx_kl_sum": total((-lr).exp() + lr - 1), "ratio_sum": total(r),
            "ratio_max": (r.masked_fill(~live, -torch.inf).max() if bool(live.any())
                          else torch.zeros((), dtype=torch.float32)),
        }
        if dual_clip_c is not None:
            stats["dual_clip_tokens"] = count((adv < 0) & (r > dual_clip_c))
        if tis is not None:
            stats["tis_weight_sum"] = total(tis)
            stats["tis_capped_tokens"] = count(tis >= tis_cap)
        if kl is not None:
            stats["kl_sum"] = total(kl)
        if entropy is not None:
            stats["entropy_sum"] = total(entropy)
    return loss, stats


class _FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, entropy, old, adv, w, mask, ref, roll, ent_in, params):
        from megatron_rl.kernels import triton_policy_loss

        shape = logprobs.shape
        flat = [None if x is None else x.float().contiguous().view(-1)
                for x in (logprobs, old, adv, w, mask, ref, roll, ent_in)]
        dlp, dent, part = triton_policy_loss.run(*flat, **params)
        ctx.save_for_backward(dlp.view(shape), dent.view(shape) if dent.numel() else dent)
        ctx.has_ent_grad = entropy is not None and dent.numel() > 0
        ctx.dtypes = (logprobs.dtype, None if entropy is None else entropy.dtype)
        ctx.mark_non_differentiable(part)
        return part[:, 0].double().sum().float(), part

    @staticmethod
    def backward(ctx, grad_loss, _grad_part):
        dlp, dent = ctx.saved_tensors
        g_lp = (grad_loss * dlp).to(ctx.dtypes[0])
        g_ent = (grad_loss * dent).to(ctx.dtypes[1]) if ctx.has_ent_grad else None
        return g_lp, g_ent, None, None, None, None, None, None, None, None


def fused_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
    loss_mask: torch.Tensor, denominator: torch.Tensor | float, *, eps_low: float = 0.2,
    eps_high: float = 0.2, dual_clip_c: float | None = None, loss_agg: str = "token_mean",
    ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0, kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
    rollout_logprobs: torch.Tensor | None = None, tis_cap: float | None = None,
    backend: dispatch.Backend | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(this micro-batch's loss over the global `denominator` (fp32 scalar), statistics).

    logprobs, old_logprobs, loss_mask, ref/rollout logprobs, entropy: [B, T]; advantages [B] or
    [B, T]. Differentiable w.r.t. logprobs and entropy. Statistics: detached fp32 sums/counts
    with the algorithms library's keys (`ratio_max` by max). backend: see `kernels.dispatch`.
    """
    kw = dict(eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c, loss_agg=loss_agg,
              ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_estimator=kl_estimator,
              entropy=entropy, entropy_coef=entropy_coef, rollout_logprobs=rollout_logprobs,
              tis_cap=tis_cap)
    if not dispatch.use_triton(logprobs, backend):
        return reference_policy_loss(logprobs, old_logprobs, advantages, loss_mask,
                                     denominator, **kw)
    adv = _check(logprobs, old_logprobs, advantages, loss_mask, kl_coef, ref_logprobs,
                 entropy_coef, entropy, tis_cap, rollout_logprobs, kl_estimator)
    w = token_weights(loss_mask, loss_agg, denominator)
    params = dict(eps_low=eps_low, eps_high=eps_high, dual_c=dual_clip_c or 0.0,
                  tis_cap=tis_cap or 0.0, kl_coef=kl_coef,
                  kl_mode=KL_MODES[kl_estimator] if ref_logprobs is not None else 0,
                  ent_coef=entropy_coef, clamp=LOG_RATIO_CLAMP)
    ent_arg = entropy if entropy_coef > 0 else None
    loss, part = _FusedPolicyLoss.apply(logprobs, ent_arg, old_logprobs.detach(), adv, w,
                                        loss_mask, ref_logprobs, rollout_logprobs,
                                        None if entropy is None else entropy.detach(), params)
    sums = part.double().sum(0)
    live = loss_mask != 0
    stats = {k: sums[i].float() for i, k in enumerate(STAT_KEYS) if k != "loss"}
    stats["ratio_max"] = (part[:, 7].max() if bool(live.any())
                          else torch.zeros((), dtype=torch.float32, device=part.device))
    stats["sequences"] = live.any(-1).sum().float()
    for key, on in (("dual_clip_tokens", dual_clip_c is not None),
                    ("tis_weight_sum", tis_cap is not None),
                    ("tis_capped_tokens", tis_cap is not None),
                    ("kl_sum", ref_logprobs is not None), ("entropy_sum", entropy is not None)):
        if not on:
            stats.pop(key)
    return loss, stats
