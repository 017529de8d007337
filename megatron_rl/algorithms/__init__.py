"""Pure-torch RL math: advantages, policy losses, KL, aggregation, sample shaping.

Imports nothing of ours but `algorithms.config` and no process group: where a global value is
needed (the loss denominator) it is an argument, so the actor can pass the all-reduced value.
"""

from megatron_rl.algorithms.advantages import (
    ADVANTAGES,
    GroupAdvantages,
    compute_advantages,
    dr_grpo,
    gdpo,
    grpo,
    reinforce_pp_baseline,
    rloo,
)
from megatron_rl.algorithms.aggregation import (
    AGGREGATIONS,
    Aggregation,
    aggregate,
    denominator,
    token_weights,
)
from megatron_rl.algorithms.config import AlgorithmConfig
from megatron_rl.algorithms.dynamic_sampling import (
    DynamicSamplingBuffer,
    DynamicSamplingReport,
    informative_mask,
)
from megatron_rl.algorithms.kl import KL_ESTIMATORS, KL_GAP_KNOT, k1, k2, k3, kl_penalty
from megatron_rl.algorithms.overlong import overlong_filter, overlong_penalty
from megatron_rl.algorithms.pass_at_k import avg_at_k, cons_at_k, pass_at_k
from megatron_rl.algorithms.policy_loss import (
    LOG_RATIO_CLAMP,
    PolicyLoss,
    TokenLosses,
    make_loss_fn,
    policy_loss,
    reduce_stats,
    summarize_stats,
    token_losses,
)

__all__ = [
    "ADVANTAGES", "AGGREGATIONS", "KL_ESTIMATORS", "KL_GAP_KNOT", "LOG_RATIO_CLAMP",
    "Aggregation", "AlgorithmConfig", "DynamicSamplingBuffer", "DynamicSamplingReport",
    "GroupAdvantages", "PolicyLoss", "TokenLosses",
    "aggregate", "avg_at_k", "compute_advantages", "cons_at_k", "denominator", "dr_grpo", "gdpo",
    "grpo", "informative_mask", "k1", "k2", "k3", "kl_penalty", "make_loss_fn", "overlong_filter",
    "overlong_penalty", "pass_at_k", "policy_loss", "reduce_stats", "reinforce_pp_baseline",
    "rloo", "summarize_stats", "token_losses", "token_weights",
]
