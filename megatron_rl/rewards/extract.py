"""Find the final answer in a model response: outside `<think>`, by configurable markers."""

import re
from collections.abc import Sequence

EXTRACTORS = ("boxed", "answer_tag", "answer_line", "last_number")
"""Extraction methods, tried in the configured order (this is the default order)."""

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_LINE = re.compile(r"^\s*\**answer\**\s*[:：]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def strip_think(response: str) -> str | None:
    """The part of `response` after its reasoning block; None if the block is never closed.

    R1-style prompts end with `<think>`, so a response may hold only the closing tag: everything
    up to the last `</think>` is reasoning. A `<think>` that is never closed means the model did
    not finish thinking: there is no final answer.
    """
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1]
    if "<think>" in response:
        return None
    return response


def boxed_all(text: str) -> list[str]:
    r"""Contents of every `\boxed{...}` (and `\fbox{...}`) in order, nested braces balanced."""
    found = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append(text[m.end(): i - 1].strip())
    return found


def candidates(text: str, method: str) -> list[str]:
    """All answers `method` finds in `text`, in order of appearance."""
    if method == "boxed":
        return boxed_all(text)
    if method == "answer_tag":
        return [a.strip() for a in _ANSWER_TAG.findall(text) if a.strip()]
    if method == "answer_line":
        return _ANSWER_LINE.findall(text)
    if method == "last_number":
        return [n.replace(",", "") for n in _NUMBER.findall(text)]
    raise ValueError(f"unknown answer extractor {method!r}; choose from {', '.join(EXTRACTORS)}")


def extract_answers(response: str, order: Sequence[str] = EXTRACTORS) -> list[str]:
    """All final-answer candidates of the first method in `order` that finds any (outside think).

    A `\\boxed{}` answer inside `<answer>` tags is unwrapped, so `<answer>\\boxed{3}</answer>`
    gives `3`.
    """
    text = strip_think(response)
    if text is None:
        return []
    for method in order:
        found = candidates(text, method)
        if found:
            return [(boxed_all(a) or [a])[-1] for a in found]
    return []


def extract_answer(response: str, order: Sequence[str] = EXTRACTORS) -> str | None:
    """The last answer found by `extract_answers` (DAPO takes the last boxed), or None."""
    found = extract_answers(response, order)
    return found[-1] if found else None
