"""Pure helpers that turn one step's rollouts into scalars named as in docs/design.md section 8.

Each returns a dict keyed by the full metric name (`reward/mean`, `response_length/max`, ...),
so the trainer can merge them straight into the step's metrics. Only `logprob_mismatch` needs
torch, and imports it lazily.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REFLECTION_WORDS = ("wait", "verify", "check")
"""Self-reflection words whose rising frequency is R1-Zero's "aha moment" (DeepSeek-R1, 2.2.4)."""


def _mean(values: Iterable[float]) -> float:
    """Mean of the finite values (reward columns hold NaN where a function did not apply)."""
    finite = [float(v) for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else 0.0


def reward_stats(rewards_by_fn: Mapping[str, Sequence[float]],
                 total: Sequence[float]) -> dict[str, float]:
    """`reward/mean` and `reward/std` (population std) of the totals, `reward/<fn>` the mean of
    each function's column; NaN entries (function not applicable) are skipped."""
    finite = [float(r) for r in total if math.isfinite(r)]
    mean = _mean(finite)
    var = sum((r - mean) ** 2 for r in finite) / len(finite) if finite else 0.0
    out = {"reward/mean": mean, "reward/std": math.sqrt(var)}
    for name, column in rewards_by_fn.items():
        out[f"reward/{name}"] = _mean(column)
    return out


def response_stats(lengths: Sequence[int], max_len: int) -> dict[str, float]:
    """Mean and max response length in tokens, and the share that hit `max_len` (truncated)."""
    if not lengths:
        return {"response_length/mean": 0.0, "response_length/max": 0.0,
                "response_length/clip_ratio": 0.0}
    return {
        "response_length/mean": sum(lengths) / len(lengths),
        "response_length/max": float(max(lengths)),
        "response_length/clip_ratio": sum(n >= max_len for n in lengths) / len(lengths),
    }


def reflection_frequency(texts: Sequence[str],
                         words: Sequence[str] = REFLECTION_WORDS) -> dict[str, float]:
    """`reflection/<word>`: share of responses containing `word` as a whole word, any case."""
    out = {}
    for word in words:
        pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
        hits = sum(bool(pattern.search(t)) for t in texts)
        out[f"reflection/{word}"] = hits / len(texts) if texts else 0.0
    return out


def logprob_mismatch(train_logp: torch.Tensor, rollout_logp: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, float]:
    """Mean and max of |logp_train - logp_rollout| over tokens where `mask` is set.

    All three are (B, T); the gap measures how far the engine's sampling distribution is from
    the trainer's (precision, kernels, routing), which off-policy corrections must absorb.
    """
    if train_logp.shape != rollout_logp.shape or train_logp.shape != mask.shape:
        raise ValueError(f"logprob_mismatch: shapes differ: train {tuple(train_logp.shape)}, "
                         f"rollout {tuple(rollout_logp.shape)}, mask {tuple(mask.shape)}")
    diff = (train_logp.float() - rollout_logp.float()).abs()[mask.bool()]
    if diff.numel() == 0:
        return {"mismatch/logp_abs_diff_mean": 0.0, "mismatch/logp_abs_diff_max": 0.0}
    return {"mismatch/logp_abs_diff_mean": float(diff.mean()),
            "mismatch/logp_abs_diff_max": float(diff.max())}
