"""R1-Zero format reward: a `<think>...</think>` block followed by the answer in the set form."""

import re
from typing import Any, Literal

from megatron_rl.rewards.extract import boxed_all
from megatron_rl.rewards.registry import register

_THINK = re.compile(r"\s*<think>(?P<think>.*?)</think>(?P<rest>.*)", re.DOTALL)
_ANSWER = re.compile(r"\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)


@register("format")
def format_reward(prompt: str, response: str, label: Any, metadata: dict, *,
                  answer: Literal["answer_tag", "boxed"] = "answer_tag") -> float:
    """1.0 if `response` is `<think>reasoning</think>` then an answer, else 0.0.

    answer="answer_tag": exactly one non-empty `<answer>...</answer>` and nothing else after the
    think block (R1-Zero's template). answer="boxed": a `\\boxed{...}` after the think block.
    When the prompt ends with `<think>` (the template opened the block), the response may start
    inside it. Reasoning must be non-empty and contain no further think tags.
    """
    if answer not in ("answer_tag", "boxed"):
        raise ValueError(f"format: answer must be 'answer_tag' or 'boxed', got {answer!r}")
    if prompt.rstrip().endswith("<think>") and not response.lstrip().startswith("<think>"):
        response = "<think>" + response
    m = _THINK.fullmatch(response)
    if not m or not m["think"].strip() or "<think>" in m["think"] or "think>" in m["rest"]:
        return 0.0
    rest = m["rest"]
    if answer == "boxed":
        return 1.0 if any(boxed_all(rest)) else 0.0
    tag = _ANSWER.fullmatch(rest)
    ok = tag is not None and tag["answer"].strip() and "<answer>" not in tag["answer"]
    return 1.0 if ok else 0.0
