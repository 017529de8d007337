"""The actor's policy loss: the fused kernel (through its dispatcher: Triton on GPUs, the chunked
torch reference on CPU) wherever it applies, the algorithms library otherwise (GSPO's
sequence-level ratio). Both follow the same contract (DESIGN.md section 4, `step.LossFn`): the
micro-batch's loss over the step's global denominator, plus summable statistics.
"""

from __future__ import annotations

import torch

from megatron_rl.actor.step import LossFn, MicroBatch
from megatron_rl.algorithms import make_loss_fn
from megatron_rl.algorithms.config import AlgorithmConfig
from megatron_rl.kernels.policy_loss import fused_policy_loss


def policy_loss_fn(alg: AlgorithmConfig, denominator: torch.Tensor | float) -> LossFn:
    """`LossFn` for `alg` reading `mb.extras` (`advantages`, `old_logprobs`, and where used
    `rollout_logprobs`, `ref_logprobs`; entropy is computed by the actor when the bonus is on)."""
    if alg.sequence_level_ratio:  # not fused: GSPO needs per-sequence means first
        fn = make_loss_fn(alg, denominator)
    else:
        def fn(logprobs: torch.Tensor, mb: MicroBatch):
            ex = mb.extras
            if "advantages" not in ex:
                raise ValueError("micro-batch extras lack 'advantages' ([b] or [b, s])")
            return fused_policy_loss(
                logprobs, ex.get("old_logprobs", logprobs.detach()), ex["advantages"],
                mb.loss_mask, denominator, eps_low=alg.eps_low, eps_high=alg.eps_high,
                dual_clip_c=alg.dual_clip_c, loss_agg=alg.loss_agg,
                ref_logprobs=ex.get("ref_logprobs") if alg.kl_coef > 0 else None,
                kl_coef=alg.kl_coef, kl_estimator=alg.kl_estimator, entropy=ex.get("entropy"),
                entropy_coef=alg.entropy_coef, rollout_logprobs=ex.get("rollout_logprobs"),
                tis_cap=alg.tis_cap)
    fn.needs_entropy = alg.entropy_coef > 0
    return fn
