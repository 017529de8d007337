"""Math accuracy reward: extract the final answer and verify it against the gold with math-verify.

Two or more different final answers: `multiple="last"` (default, as DAPO's verifier) scores the
last one; `multiple="wrong"` scores the response as incorrect.
"""

from collections.abc import Sequence
from typing import Any, Literal

from megatron_rl.rewards.extract import EXTRACTORS, extract_answers
from megatron_rl.rewards.registry import register


def _latex(text: str) -> str:
    """Wrap a bare answer in `$...$` so math-verify parses LaTeX (`2^{10}`, `\\sqrt{2}/2`)."""
    return text if "$" in text or "\\boxed" in text else f"${text}$"


def is_equivalent(gold: str, answer: str) -> bool:
    """math-verify's `verify(parse(gold), parse(answer))` (fractions, radicals, LaTeX, sets)."""
    from math_verify import parse, verify  # lazy: pulls in sympy

    gold_parsed = parse(_latex(gold))
    if not gold_parsed:
        raise ValueError(f"math-verify cannot parse the gold answer {gold!r}")
    return bool(verify(gold_parsed, parse(_latex(answer))))


@register("math")
def math_reward(prompt: str, response: str, label: Any, metadata: dict, *,
                correct_reward: float = 1.0, incorrect_reward: float = 0.0,
                order: Sequence[str] = EXTRACTORS,
                multiple: Literal["last", "wrong"] = "last") -> float:
    """`correct_reward` if the final answer (outside `<think>`) equals `label`, else incorrect.

    `order` lists the extractors to try (`boxed`, `answer_tag`, `answer_line`, `last_number`);
    the first that finds something wins. `label` is the gold answer (str or number).
    """
    if multiple not in ("last", "wrong"):
        raise ValueError(f"math: multiple must be 'last' or 'wrong', got {multiple!r}")
    found = extract_answers(response, order)
    if not found:
        return incorrect_reward
    if multiple == "wrong" and len({"".join(a.split()) for a in found}) > 1:
        return incorrect_reward
    return correct_reward if is_equivalent(str(label), found[-1]) else incorrect_reward
