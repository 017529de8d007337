"""Group advantages from per-sample rewards (docs/design.md section 4).

Shape legend: B = samples, K = reward functions (GDPO). `group_ids` [B] are any integer labels;
samples with the same label answer the same prompt. Every estimator gives one scalar per sample,
shared by all tokens of its response.

Degenerate groups are explicit: a group of size 1 or whose rewards are all equal carries no
learning signal, so its advantage is exactly 0 (also after batch normalisation, from which it is
excluded) and it is counted in `GroupAdvantages`.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_rl.algorithms._checks import check_finite, check_ndim, check_nonempty, check_shape


@dataclass(frozen=True)
class GroupAdvantages:
    """Advantages [B] plus what the estimator did with degenerate groups."""

    advantages: torch.Tensor
    """One advantage per sample [B] (float32)."""
    num_groups: int
    """Number of distinct group ids."""
    singleton_groups: int
    """Groups of size 1 (advantage 0)."""
    zero_std_groups: int
    """Groups of size >= 2 whose rewards all agree (advantage 0)."""


@dataclass(frozen=True)
class _Groups:
    """Group structure of a batch: index of each sample's group and per-group reductions."""

    index: torch.Tensor  # [B] in 0..n-1
    size: torch.Tensor  # [n] float

    @property
    def n(self) -> int:
        return int(self.size.numel())

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group mean of x [B] -> [n]."""
        return x.new_zeros(self.n).index_add_(0, self.index, x) / self.size

    def std(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group unbiased (Bessel) std of x [B] -> [n], 0 for singletons (as torch.std)."""
        dev = x - self.mean(x)[self.index]
        ss = x.new_zeros(self.n).index_add_(0, self.index, dev * dev)
        return torch.sqrt(ss / (self.size - 1).clamp(min=1))

    def constant(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group flag [n]: all values of x in the group are equal (exactly)."""
        hi = x.new_full((self.n,), -torch.inf).scatter_reduce(
            0, self.index, x, "amax")
        lo = x.new_full((self.n,), torch.inf).scatter_reduce(
            0, self.index, x, "amin")
        return hi == lo


def _groups(group_ids: torch.Tensor) -> _Groups:
    _, index = torch.unique(group_ids, return_inverse=True)
    size = torch.bincount(index).to(torch.float64)
    return _Groups(index=index, size=size)


def _batch_normalize(a: torch.Tensor, live: torch.Tensor, eps: float) -> torch.Tensor:
    """(a - mean) / (std + eps) over the samples where `live` [B] is set; others stay 0."""
    n = int(live.sum())
    if n == 0:
        return torch.zeros_like(a)
    vals = a[live]
    std = vals.std() if n > 1 else a.new_zeros(())
    return torch.where(live, (a - vals.mean()) / (std + eps), torch.zeros_like(a))


def _finish(a: torch.Tensor, g: _Groups, degenerate_n: torch.Tensor) -> GroupAdvantages:
    """Zero the degenerate groups' samples and count them."""
    single = g.size == 1
    zero_std = degenerate_n & ~single
    a = torch.where((single | degenerate_n)[g.index], torch.zeros_like(a), a)
    return GroupAdvantages(advantages=a.float(), num_groups=g.n,
                           singleton_groups=int(single.sum()), zero_std_groups=int(zero_std.sum()))


def grpo(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6,
         weights: torch.Tensor | None = None) -> GroupAdvantages:
    """GRPO (DeepSeekMath eq. 3 / DeepSeek-R1): A_i = (R_i - mean(R)) / (std(R) + eps)."""
    r, g = _prepare(rewards, group_ids, weights)
    a = (r - g.mean(r)[g.index]) / (g.std(r)[g.index] + eps)
    return _finish(a, g, g.constant(r))


def dr_grpo(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6,
            weights: torch.Tensor | None = None) -> GroupAdvantages:
    """Dr.GRPO (Liu et al. 2025, eq. 3): A_i = R_i - mean(R), no std normalisation."""
    r, g = _prepare(rewards, group_ids, weights)
    return _finish(r - g.mean(r)[g.index], g, g.constant(r))


def rloo(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6,
         weights: torch.Tensor | None = None) -> GroupAdvantages:
    """RLOO (Ahmadian et al. 2024): A_i = R_i - mean_{j != i} R_j = G/(G-1) (R_i - mean(R))."""
    r, g = _prepare(rewards, group_ids, weights)
    size = g.size[g.index]
    a = size / (size - 1).clamp(min=1) * (r - g.mean(r)[g.index])
    return _finish(a, g, g.constant(r))


def reinforce_pp_baseline(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6,
                          weights: torch.Tensor | None = None) -> GroupAdvantages:
    """REINFORCE++-baseline (Hu et al. 2025): A_i = R_i - mean(R) in the group, then
    (A - mean_B(A)) / (std_B(A) + eps) over the non-degenerate samples of the batch."""
    r, g = _prepare(rewards, group_ids, weights)
    degenerate = g.constant(r) | (g.size == 1)
    a = _batch_normalize(r - g.mean(r)[g.index], ~degenerate[g.index], eps)
    return _finish(a, g, degenerate)


def gdpo(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6,
         weights: torch.Tensor | None = None) -> GroupAdvantages:
    """GDPO: each reward k normalised within its group, A_k = (r_k - mean) / (std + eps) (0 where
    reward k agrees in the group); A_sum = sum_k w_k A_k; then (A_sum - mean_B) / (std_B + eps)
    over the batch. Takes rewards [B, K] (or [B], then K = 1) and weights [K] (default ones)."""
    r_bk, g = _prepare_multi(rewards, group_ids, weights)
    w = _weights(weights, r_bk.shape[1], r_bk.device)
    a_sum = r_bk.new_zeros(r_bk.shape[0])
    constant = torch.ones(g.n, dtype=torch.bool, device=r_bk.device)
    for k in range(r_bk.shape[1]):
        r = r_bk[:, k]
        const_k = g.constant(r)
        a_k = (r - g.mean(r)[g.index]) / (g.std(r)[g.index] + eps)
        a_sum += w[k] * torch.where(const_k[g.index], torch.zeros_like(a_k), a_k)
        constant &= const_k
    degenerate = constant | (g.size == 1)
    return _finish(_batch_normalize(a_sum, ~degenerate[g.index], eps), g, degenerate)


AdvantageFn = Callable[..., GroupAdvantages]

ADVANTAGES: dict[str, AdvantageFn] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "reinforce_pp_baseline": reinforce_pp_baseline,
    "gdpo": gdpo,
}
"""The one registry of advantage estimators, keyed by `AlgorithmConfig.advantage_estimator`."""

PER_REWARD_ESTIMATORS = frozenset({"gdpo"})
"""Estimators that normalise each reward column on its own: dynamic sampling keeps a group
when any reward function's column varies in it (`dynamic_sampling.informative_mask` with
rewards [B, K]; shaping columns are not part of that signal, see `Trainer.filter_signal`)."""


def compute_advantages(estimator: str, rewards: torch.Tensor, group_ids: torch.Tensor,
                       eps: float = 1e-6, weights: torch.Tensor | None = None) -> GroupAdvantages:
    """Advantages [B] by the estimator named in the config (see `ADVANTAGES`).

    rewards: [B] scalar rewards, or [B, K] per-function rewards with `weights` [K] (every
    estimator but `gdpo` first reduces them to the weighted sum).
    """
    if estimator not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {estimator!r}; "
                         f"choose one of {', '.join(ADVANTAGES)}")
    return ADVANTAGES[estimator](rewards, group_ids, eps=eps, weights=weights)


# ---- input handling --------------------------------------------------------------------------


def _weights(weights: torch.Tensor | None, k: int, device: torch.device) -> torch.Tensor:
    if weights is None:
        return torch.ones(k, dtype=torch.float64, device=device)
    weights = torch.as_tensor(weights, dtype=torch.float64, device=device)
    check_shape("weights", weights, (k,), "the reward columns [K]")
    check_finite("weights", weights)
    return weights


def _prepare_multi(rewards: torch.Tensor, group_ids: torch.Tensor,
                   weights: torch.Tensor | None) -> tuple[torch.Tensor, _Groups]:
    """Validate and return rewards [B, K] in float64 and the group structure."""
    rewards = torch.as_tensor(rewards)
    group_ids = torch.as_tensor(group_ids)
    check_nonempty("rewards", rewards)
    if rewards.dim() == 1:
        rewards = rewards[:, None]
    check_ndim("rewards", rewards, 2, "[B] or [B, K]")
    check_ndim("group_ids", group_ids, 1, "[B]")
    check_shape("group_ids", group_ids, (rewards.shape[0],), "rewards [B]")
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must be integers, got {group_ids.dtype}")
    check_finite("rewards", rewards)
    return rewards.to(torch.float64), _groups(group_ids)


def _prepare(rewards: torch.Tensor, group_ids: torch.Tensor,
             weights: torch.Tensor | None) -> tuple[torch.Tensor, _Groups]:
    """Validate and return the scalar reward per sample [B] (weighted sum over K) in float64."""
    r_bk, g = _prepare_multi(rewards, group_ids, weights)
    if r_bk.shape[1] == 1 and weights is None:
        return r_bk[:, 0], g
    return r_bk @ _weights(weights, r_bk.shape[1], r_bk.device), g
