"""reasoning-gym reward: the task's own `score_answer` on the extracted final answer."""

import functools
from collections.abc import Callable, Sequence
from typing import Any

from megatron_rl.rewards.extract import EXTRACTORS, extract_answer
from megatron_rl.rewards.registry import register


@functools.cache
def _scorer(task: str) -> Callable[[str, dict], float]:
    import reasoning_gym  # lazy: heavy import, only needed for this reward

    return reasoning_gym.get_score_answer_fn(task)


@register("reasoning_gym")
def reasoning_gym_reward(prompt: str, response: str, label: Any, metadata: dict, *,
                         correct_reward: float = 1.0, incorrect_reward: float = 0.0,
                         order: Sequence[str] = EXTRACTORS, partial_credit: bool = False) -> float:
    """Score in [0, 1] from reasoning-gym, mapped linearly onto [incorrect, correct].

    Some tasks give partial credit for near misses by string similarity (chain_sum scores "-90"
    against "-9" at 0.67). By default only a full score counts, as in DeepSeek-R1's and DAPO's
    rule-based rewards, so a policy cannot climb the reward by guessing digits;
    `partial_credit=True` keeps the task's own graded score.

    Needs `metadata["task"]` (dataset name) and `metadata["entry"]` (the generated entry dict
    with question, answer and metadata), which the reasoning-gym data source puts there. The
    answer is taken by the same extractor as the math reward (outside `<think>`).
    """
    missing = [k for k in ("task", "entry") if k not in metadata]
    if missing:
        raise ValueError(f"reasoning_gym: metadata lacks {missing}; use the reasoning_gym data "
                         "source or give metadata['task'] and metadata['entry']")
    answer = extract_answer(response, order)
    if answer is None:
        return incorrect_reward
    score = float(_scorer(metadata["task"])(answer, metadata["entry"]))
    if not partial_credit:
        score = float(score >= 1.0)
    return incorrect_reward + score * (correct_reward - incorrect_reward)
