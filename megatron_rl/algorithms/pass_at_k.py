"""Evaluation estimators per problem from n samples (Chen et al. 2021; DeepSeek-R1 section 3).

Average the per-problem values over problems for the benchmark score.
"""

from collections import Counter
from collections.abc import Hashable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) for c correct of n samples (Codex eq. 1),
    computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) to avoid huge binomials."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(correct: Sequence[bool | float], k: int | None = None) -> float:
    """avg@k: mean correctness of the first k samples (an estimate of pass@1)."""
    items = _first_k(correct, k)
    return sum(float(x) for x in items) / len(items)


def cons_at_k(answers: Sequence[Hashable | None], correct: Sequence[bool],
              k: int | None = None) -> float:
    """cons@k: 1.0 if the majority answer among the first k samples is correct, else 0.0.

    `answers` are the extracted (normalised) answers, None where none was extracted (not voted);
    `correct[i]` says whether sample i is right. Ties go to the answer seen first.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    answers = _first_k(answers, k)
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    winner = votes.most_common(1)[0][0]  # stable: ties keep first-appearance order
    return float(bool(correct[list(answers).index(winner)]))


def _first_k(items: Sequence, k: int | None) -> Sequence:
    if len(items) == 0:
        raise ValueError("need at least one sample")
    if k is None:
        return items
    if not 1 <= k <= len(items):
        raise ValueError(f"need 1 <= k <= {len(items)} (the number of samples), got {k}")
    return items[:k]
