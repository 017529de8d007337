"""KL estimators of KL(pi_theta || pi_ref) per token (Schulman, "Approximating KL divergence"),
bounded so that no token can give an inf or NaN loss or gradient.

Shape legend: B = samples, T = tokens. Inputs are log-probs of the sampled tokens [B, T].

With the gap d = ref - logp (log pi_ref / pi_theta of the sampled token):
    k1 = -d                 unbiased, high variance, can be negative
    k2 = d^2 / 2            biased, low variance, >= 0
    k3 = e^d - d - 1        unbiased, >= 0 (GRPO, DeepSeekMath eq. 4)
Bound (`KL_GAP_KNOT`): each estimator is its exact formula for |d| <= KL_GAP_KNOT and continues
along its tangent at the knot beyond, f(c) + f'(c) (d - c) with c = clamp(d, -knot, knot).
"""

from collections.abc import Callable

import torch

KL_GAP_KNOT = 5.0
"""|ref - logp| up to which every KL estimator is its exact formula; beyond, it is continued
along its tangent at the knot (linear in the gap, same value and slope at the knot).

Why: k3 = e^d - d - 1 is 1e13 at d = 30 and inf past d ~ 88 in fp32, and one such token (even
a masked one: 0 * inf = NaN in backward) poisons the step. With the tangent the value is finite
for every finite gap and the gradient is bounded, |dk3/dd| <= e^5 - 1 ~ 147.4 and
|dk2/dd| <= 5 (k2 becomes the Huber loss; k1 is linear already, so unchanged), and it never
vanishes: a token far from the reference keeps being pulled back at the knot's slope. verl's
`kl_penalty` instead clamps k3 to [-10, 10], which zeroes its gradient past d ~ 2.6 and below
d ~ -11. A gap of 5 is a probability ratio of e^5 ~ 148 on a token the policy sampled, far
outside any trust region, so the exact region covers every token that behaves."""


def _tangent_beyond_knot(d: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor],
                         df: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """f(d) for |d| <= KL_GAP_KNOT, its tangent at the nearer knot beyond (df = f').

    f and df only ever see the clamped gap, so both branches are finite for any finite d, and
    each gets an exactly zero gradient where it is not selected: backward has no inf * 0.
    """
    c = d.clamp(-KL_GAP_KNOT, KL_GAP_KNOT)
    fc = f(c)
    tangent = fc.detach() + df(c).detach() * (d - c.detach())  # d/dd = f'(knot)
    return torch.where(d.abs() <= KL_GAP_KNOT, fc, tangent)


def k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref: unbiased, high variance, can be negative; linear, so needs no bound."""
    return logprobs - ref_logprobs


def k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = (logp - ref)^2 / 2: biased, low variance, >= 0 (Huber beyond `KL_GAP_KNOT`)."""
    return _tangent_beyond_knot(ref_logprobs - logprobs, lambda c: 0.5 * c * c, lambda c: c)


def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1: unbiased, >= 0 (GRPO, DeepSeekMath eq. 4);
    linear beyond `KL_GAP_KNOT` (finite value, bounded and nonzero gradient)."""
    return _tangent_beyond_knot(ref_logprobs - logprobs, lambda c: torch.exp(c) - c - 1,
                                lambda c: torch.exp(c) - 1)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": k1,
    "k2": k2,
    "k3": k3,
}
"""The one registry of KL estimators, keyed by `AlgorithmConfig.kl_estimator`."""


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate [B, T] by the estimator named in the config."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of "
                         f"{', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)
