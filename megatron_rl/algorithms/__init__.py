"""Pure-torch RL math: advantages, policy losses, KL, aggregation, sample shaping.

Imports nothing of ours but `algorithms.config` and no process group: where a global value is
needed (the loss denominator) it is an argument, so the actor can pass the all-reduced value.

Names are imported on first use (PEP 562), so importing `megatron_rl.algorithms.config` (which
runs this file first) does not import torch: the run config loads, and a bad value is rejected,
before torch is imported.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from megatron_rl.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["ADVANTAGES", "GroupAdvantages", "compute_advantages", "dr_grpo", "gdpo",
                     "grpo", "reinforce_pp_baseline", "rloo"], "advantages"),
    **dict.fromkeys(["AGGREGATIONS", "Aggregation", "aggregate", "denominator",
                     "token_weights"], "aggregation"),
    "AlgorithmConfig": "config",
    **dict.fromkeys(["DynamicSamplingBuffer", "DynamicSamplingReport", "informative_mask"],
                    "dynamic_sampling"),
    **dict.fromkeys(["KL_ESTIMATORS", "KL_GAP_KNOT", "k1", "k2", "k3", "kl_penalty"], "kl"),
    **dict.fromkeys(["overlong_filter", "overlong_penalty"], "overlong"),
    **dict.fromkeys(["avg_at_k", "cons_at_k", "pass_at_k"], "pass_at_k"),
    **dict.fromkeys(["LOG_RATIO_CLAMP", "PolicyLoss", "TokenLosses", "make_loss_fn",
                     "policy_loss", "reduce_stats", "summarize_stats", "token_losses"],
                    "policy_loss"),
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """Keeps `pass_at_k` and `policy_loss` the functions: importing a submodule binds it on its
    package under its own name, and these two share their function's name (as when this file
    imported them eagerly, the function wins)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
