"""The actor's policy loss on the configured kernel backend (`ActorConfig.kernels`): the fused
Triton kernel where the backend picks it, else the algorithms library's `policy_loss` itself
(also for GSPO's sequence-level ratio, which has no kernel). Same contract either way
(docs/design.md section 4, `step.LossFn`): the micro-batch's loss over the step's global
denominator, plus summable statistics.
"""

from __future__ import annotations

import functools

import torch

from megatron_rl.actor.step import LossFn
from megatron_rl.algorithms import make_loss_fn
from megatron_rl.algorithms.config import AlgorithmConfig
from megatron_rl.kernels.dispatch import KernelBackend
from megatron_rl.kernels.policy_loss import fused_policy_loss


def policy_loss_fn(alg: AlgorithmConfig, denominator: torch.Tensor | float,
                   backend: KernelBackend | str = "auto", *, on_policy: bool = False) -> LossFn:
    """`LossFn` for `alg` on kernel `backend` (pass `actor_cfg.kernels`), reading the
    micro-batch as `algorithms.make_loss_fn` does: `advantages`, `old_logprobs` (missing is an
    error unless `on_policy`), and where set `rollout_logprobs`, `ref_logprobs`, `entropy`
    (computed by the actor when `needs_entropy`)."""
    return make_loss_fn(alg, denominator, on_policy=on_policy,
                        loss=functools.partial(fused_policy_loss, backend=backend))
