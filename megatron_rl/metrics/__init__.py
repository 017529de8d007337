"""Tensorboard and console metrics; pass@k, cons@k, avg@k live in `megatron_rl.algorithms`.

`MetricsLogger` is the trainer's per-step sink on rank 0; the helpers in `stats` turn rollouts
into the scalars of docs/design.md section 8. Importing this package does not import torch.
"""

from megatron_rl.metrics.config import LoggingConfig
from megatron_rl.metrics.logger import MetricsLogger, format_duration, format_value
from megatron_rl.metrics.stats import (
    REFLECTION_WORDS,
    logprob_mismatch,
    reflection_frequency,
    response_stats,
    reward_stats,
)

__all__ = [
    "REFLECTION_WORDS", "LoggingConfig", "MetricsLogger", "format_duration", "format_value",
    "logprob_mismatch", "reflection_frequency", "response_stats", "reward_stats",
]
