"""Dynamic sampling (DAPO section 3.2, eq. 11): train only on groups whose rewards disagree.

Shape legend: B = samples. A group with reward std 0 (all correct or all wrong, 0 < #correct < G
fails) has zero advantage and only dilutes the batch, so it is dropped and more prompts are
generated, up to `max_gen_batches` generation batches per step.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from megatron_rl.algorithms._checks import check_finite, check_ndim, check_nonempty, check_shape

T = TypeVar("T")


def informative_mask(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B]: the sample's group carries a learning signal. Rewards [B]: the group's reward
    std > 0 (max != min). Rewards [B, K] (several rewards, GDPO): any column varies within the
    group, since GDPO normalises each reward on its own and a column that varies gives nonzero
    advantages even when the totals tie. Singletons are never informative."""
    rewards = torch.as_tensor(rewards)
    group_ids = torch.as_tensor(group_ids)
    check_nonempty("rewards", rewards)
    if rewards.dim() == 1:
        rewards = rewards[:, None]
    check_ndim("rewards", rewards, 2, "[B] or [B, K]")
    check_shape("group_ids", group_ids, tuple(rewards.shape[:1]), "rewards [B]")
    check_finite("rewards", rewards)
    _, index = torch.unique(group_ids, return_inverse=True)
    n, k = int(index.max()) + 1, rewards.shape[1]
    r = rewards.to(torch.float64)
    idx = index[:, None].expand(-1, k)
    hi = r.new_full((n, k), -torch.inf).scatter_reduce(0, idx, r, "amax")
    lo = r.new_full((n, k), torch.inf).scatter_reduce(0, idx, r, "amin")
    return (hi > lo).any(-1)[index]


@dataclass
class DynamicSamplingReport:
    """What the buffer saw and dropped while filling one step's batch."""

    gen_batches: int = 0
    """Generation batches added."""
    groups_seen: int = 0
    """Groups generated in all batches."""
    groups_kept: int = 0
    """Groups handed to training (<= target)."""
    dropped_zero_std: int = 0
    """Groups dropped because their rewards all agree (incl. groups of one sample)."""
    dropped_surplus: int = 0
    """Informative groups beyond the target, dropped to keep the batch size fixed."""
    filled: bool = False
    """The target was reached (False: max_gen_batches ran out first)."""


@dataclass
class DynamicSamplingBuffer(Generic[T]):
    """Accumulates informative groups across generation batches up to `target_groups`.

        buf = DynamicSamplingBuffer(target_groups=512, max_gen_batches=4)
        while buf.wants_more():
            buf.add(samples, rewards, group_ids)      # one generation batch
        groups, report = buf.take()
    """

    target_groups: int
    """Groups (prompts) wanted per training step."""
    max_gen_batches: int
    """Most generation batches per step; after that the batch is taken as it is."""
    _groups: list[list[T]] = field(default_factory=list, init=False)
    _report: DynamicSamplingReport = field(default_factory=DynamicSamplingReport, init=False)

    def __post_init__(self) -> None:
        if self.target_groups < 1 or self.max_gen_batches < 1:
            raise ValueError(f"target_groups ({self.target_groups}) and max_gen_batches "
                             f"({self.max_gen_batches}) must be >= 1")

    def wants_more(self) -> bool:
        """True while the target is not reached and generation batches remain."""
        return (len(self._groups) < self.target_groups
                and self._report.gen_batches < self.max_gen_batches)

    def add(self, samples: Sequence[T], rewards: torch.Tensor, group_ids: torch.Tensor) -> None:
        """Add one generation batch: samples [B] with rewards [B] (or [B, K], see
        `informative_mask`) and group ids [B] (ids only need to be unique within this batch).
        Groups keep their order of first appearance."""
        if len(samples) != len(rewards):
            raise ValueError(f"{len(samples)} samples but {len(rewards)} rewards")
        keep = informative_mask(rewards, group_ids)
        by_group: dict[int, list[int]] = {}
        for i, gid in enumerate(torch.as_tensor(group_ids).tolist()):
            by_group.setdefault(gid, []).append(i)
        rep = self._report
        rep.gen_batches += 1
        for members in by_group.values():
            rep.groups_seen += 1
            if not bool(keep[members[0]]):
                rep.dropped_zero_std += 1
            elif len(self._groups) < self.target_groups:
                self._groups.append([samples[i] for i in members])
            else:
                rep.dropped_surplus += 1

    def take(self) -> tuple[list[list[T]], DynamicSamplingReport]:
        """The kept groups (at most `target_groups`) and the report; empties the buffer."""
        groups, report = self._groups, self._report
        report.groups_kept = len(groups)
        report.filled = len(groups) >= self.target_groups
        self._groups, self._report = [], DynamicSamplingReport()
        return groups, report
