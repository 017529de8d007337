"""Token-level clipped policy loss, fused forward + backward in one Triton pass (docs/design.md
sections 4 and 5).

Shape legend: B = samples, T = tokens. Same signature and contract as the algorithms library's
`policy_loss` (`megatron_rl.algorithms.policy_loss`, where the math and its docstring live),
plus the kernel backend. That torch function is the one reference: it runs whenever the
backend does not pick Triton, and under GSPO's sequence-level ratio (no kernel: it needs
per-sequence means first). The kernel reads the bounds (`LOG_RATIO_CLAMP`, `KL_GAP_KNOT`) and
the aggregation weights (`token_weights`) from the library, and is tested against it: loss,
gradients and every statistic. Gradients flow to `logprobs` and `entropy` only.
"""

from __future__ import annotations

import torch

from megatron_rl.algorithms.aggregation import token_weights
from megatron_rl.algorithms.config import AlgorithmConfig
from megatron_rl.algorithms.kl import KL_GAP_KNOT
from megatron_rl.algorithms.policy_loss import LOG_RATIO_CLAMP, check_inputs, policy_loss
from megatron_rl.kernels import dispatch

KL_MODES = {"k1": 1, "k2": 2, "k3": 3}
"""The kernel's KL_MODE per `AlgorithmConfig.kl_estimator` (0: no reference given)."""
STAT_KEYS = ("loss", "tokens", "pg_loss_sum", "clip_low_tokens", "clip_high_tokens",
             "approx_kl_sum", "ratio_sum", "ratio_max", "dual_clip_tokens", "tis_weight_sum",
             "tis_capped_tokens", "kl_sum", "entropy_sum")
"""Column order of the kernel's partial statistics."""


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


def _triton_policy_loss(
    cfg: AlgorithmConfig, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
    advantages: torch.Tensor, loss_mask: torch.Tensor, denominator: torch.Tensor | float, *,
    rollout_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None,
    entropy: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The Triton path of `fused_policy_loss` (fp32 loss, fp32 statistics)."""
    adv = check_inputs(cfg, logprobs, old_logprobs, advantages, loss_mask,
                       rollout_logprobs=rollout_logprobs, ref_logprobs=ref_logprobs,
                       entropy=entropy).float()
    w = token_weights(cfg.loss_agg, loss_mask, denominator)
    params = dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_c=cfg.dual_clip_c or 0.0,
                  tis_cap=cfg.tis_cap or 0.0, kl_coef=cfg.kl_coef,
                  kl_mode=KL_MODES[cfg.kl_estimator] if ref_logprobs is not None else 0,
                  ent_coef=cfg.entropy_coef, clamp=LOG_RATIO_CLAMP, kl_knot=KL_GAP_KNOT)
    ent_arg = entropy if cfg.entropy_coef > 0 else None
    loss, part = _FusedPolicyLoss.apply(
        logprobs, ent_arg, old_logprobs.detach(), adv, w, loss_mask,
        None if ref_logprobs is None else ref_logprobs.detach(),
        None if rollout_logprobs is None else rollout_logprobs.detach(),
        None if entropy is None else entropy.detach(), params)
    sums = part.double().sum(0)
    live = loss_mask != 0
    stats = {k: sums[i].float() for i, k in enumerate(STAT_KEYS) if k != "loss"}
    stats["ratio_max"] = (part[:, STAT_KEYS.index("ratio_max")].max() if bool(live.any())
                          else torch.zeros((), dtype=torch.float32, device=part.device))
    stats["sequences"] = live.any(-1).sum().float()
    for key, on in (("dual_clip_tokens", cfg.dual_clip_c is not None),
                    ("tis_weight_sum", cfg.tis_cap is not None),
                    ("tis_capped_tokens", cfg.tis_cap is not None),
                    ("kl_sum", ref_logprobs is not None), ("entropy_sum", entropy is not None)):
        if not on:
            stats.pop(key)
    return loss, stats


def fused_policy_loss(
    cfg: AlgorithmConfig, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
    advantages: torch.Tensor, loss_mask: torch.Tensor, denominator: torch.Tensor | float, *,
    rollout_logprobs: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None, backend: dispatch.KernelBackend | str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`algorithms.policy_loss` on the kernel `backend` (`ActorConfig.kernels`): the Triton
    kernel where the backend picks it (not for GSPO), else that torch function itself.

    (this micro-batch's loss over the global `denominator`, summable statistics with the
    library's keys; `ratio_max` by max). Differentiable w.r.t. logprobs and entropy.
    """
    args = (cfg, logprobs, old_logprobs, advantages, loss_mask, denominator)
    kw = dict(rollout_logprobs=rollout_logprobs, ref_logprobs=ref_logprobs, entropy=entropy)
    if dispatch.use_triton(logprobs, backend) and not cfg.sequence_level_ratio:
        return _triton_policy_loss(*args, **kw)
    return policy_loss(*args, **kw)
