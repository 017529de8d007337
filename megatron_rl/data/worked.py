"""Solutions for the embedded default's pre-training corpus, right only some of the time.

RL amplifies what a base model already samples. The demo's base model is pre-trained on
R1-Zero-formatted answers to chain sums ("4 - 1 + 7 ="), of two kinds:

    worked:  <think> 4 - 1 = 3, 3 + 7 = 10 </think> <answer> 10 </answer>
    guessed: <think> </think> <answer> 8 </answer>

A worked solution computes running totals left to right; each step slips (off by 1 to 3, the
error carrying into the next steps and the answer) with probability 1 - `step_accuracy`. A guess
skips the reasoning and is off by up to `GUESS_SPREAD` (right one time in 2 * GUESS_SPREAD + 1).
The base model so samples correct answers part of the time; RL can amplify them by learning to
work the steps, and its responses grow longer as it does, as R1-Zero's did.
"""

import random
import re

from megatron_rl.data.records import DataError, PromptRecord

_TERM = re.compile(r"^-?\d+$")
SLIPS = (-3, -2, -1, 1, 2, 3)
"""How far a slipped step lands from the true result."""
GUESS_SPREAD = 4
"""A guessed answer is the true one plus a uniform offset in [-GUESS_SPREAD, GUESS_SPREAD]."""


def expression_terms(record: PromptRecord) -> tuple[int, list[tuple[str, int]]]:
    """(first term, [(operator, term), ...]) of a reasoning-gym +/- chain (chain_sum,
    basic_arithmetic without * and /), from `metadata["entry"]["metadata"]["expression"]`."""
    entry = record.metadata.get("entry", {}) if isinstance(record.metadata, dict) else {}
    expr = entry.get("metadata", {}).get("expression")
    if not isinstance(expr, str):
        raise DataError(f"record {record.index}: worked solutions need a reasoning-gym entry "
                        "with metadata.expression (use data.task=chain_sum)")
    tokens = expr.split()
    ops, terms = tokens[1::2], tokens[0::2]
    if (len(tokens) % 2 == 0 or any(o not in "+-" or len(o) != 1 for o in ops)
            or not all(_TERM.match(t) for t in terms)):
        raise DataError(f"record {record.index}: expression {expr!r} is not a chain of integers "
                        "joined by + and - (use data.task=chain_sum)")
    return int(terms[0]), [(o, int(t)) for o, t in zip(ops, terms[1:], strict=True)]


def solution(record: PromptRecord, rng: random.Random, work_fraction: float,
             step_accuracy: float) -> str:
    """A corpus response: worked with probability `work_fraction`, else a guess."""
    if rng.random() < work_fraction:
        return worked_solution(record, rng, step_accuracy)
    return guessed_solution(record, rng)


def guessed_solution(record: PromptRecord, rng: random.Random) -> str:
    """An answer without reasoning, near the true one."""
    total, steps = expression_terms(record)
    for op, term in steps:
        total = total + term if op == "+" else total - term
    guess = total + rng.randint(-GUESS_SPREAD, GUESS_SPREAD)
    return f" <think> </think> <answer> {guess} </answer>"


def worked_solution(record: PromptRecord, rng: random.Random, step_accuracy: float) -> str:
    """The response text: running totals left to right, each step right with probability
    `step_accuracy`, then the final total as the answer."""
    total, steps = expression_terms(record)
    lines = []
    for op, term in steps:
        result = total + term if op == "+" else total - term
        if rng.random() >= step_accuracy:
            result += rng.choice(SLIPS)
        lines.append(f"{total} {op} {term} = {result}")
        total = result
    return f" <think> {', '.join(lines)} </think> <answer> {total} </answer>"
