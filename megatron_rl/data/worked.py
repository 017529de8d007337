"""Worked solutions for the embedded default's pre-training corpus, right only some of the time.

RL amplifies what a base model already samples. The demo's base model is pre-trained on
R1-Zero-formatted solutions of chain sums ("4 - 1 + 7 =") whose steps each slip with some
probability, so the base samples correct answers part of the time (more often for short chains)
and RL has something to amplify. Response format, one step per operator:

    <think> 4 - 1 = 3, 3 + 7 = 10 </think> <answer> 10 </answer>

A slipped step is off by 1 to 3 and the error carries into the following steps and the answer,
as a person's would.
"""

import random
import re

from megatron_rl.data.records import DataError, PromptRecord

_TERM = re.compile(r"^-?\d+$")
SLIPS = (-3, -2, -1, 1, 2, 3)
"""How far a slipped step lands from the true result."""


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
