"""Samples -> the typed batch one RL step trains on, and its cut into mini- and micro-batches.

Pure: no process group, no config object. What depends on the layout (this rank's data-parallel
index, the micro-batch size) comes in as plain arguments, so the same function gives every rank
its share and tests can call it without a process group (docs/design.md section 3).

Rows are right-padded to a fixed `seq_length` (pipeline schedules need one shape; causal
attention makes right padding harmless). Position t predicts token t + 1.
Shape legend: B = rows (samples), S = seq_length, K = reward columns, L = MoE layers of the
whole model, E = experts per token (the router's top-k).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_rl.actor.step import MicroBatch
from megatron_rl.algorithms import overlong_filter
from megatron_rl.rollout.types import Sample


@dataclass(frozen=True, kw_only=True)
class RLBatch:
    """One step's training rows and everything the loss and the metrics read about them."""

    tokens: torch.Tensor
    """Input ids [B, S] (int64)."""
    labels: torch.Tensor
    """Next-token ids [B, S] (int64)."""
    loss_mask: torch.Tensor
    """1.0 where the position predicts a response token that trains [B, S] (fp32); the rows of
    truncated samples are zero under overlong filtering."""
    rollout_logprobs: torch.Tensor
    """The engine's log-prob of each response token at its predicting position [B, S] (fp32)."""
    rewards: torch.Tensor
    """Score per reward column [B, K] (fp64): the reward functions, then shaping columns."""
    reward_names: tuple[str, ...]
    """Names of the K columns."""
    weights: torch.Tensor
    """Weight of each column in the total reward [K] (fp64)."""
    group_ids: torch.Tensor
    """Prompt group of each row [B] (int64)."""
    advantages: torch.Tensor
    """One advantage per row [B] (fp32)."""
    routed_experts: torch.Tensor | None = None
    """Experts the engine chose for each input position [B, S, L, E] (int16: expert ids fit,
    and at scale this is the batch's largest tensor), or None. (Old and
    reference log-probs are per micro-batch: the actor's passes fill them in.)"""

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def total_reward(self) -> torch.Tensor:
        """The reward the policy is paid [B]: rewards @ weights."""
        return self.rewards @ self.weights

    def rows(self, index: torch.Tensor, live: torch.Tensor | None = None) -> RLBatch:
        """The rows at `index` [n]; rows where `live` [n] is False keep their data but have no
        loss (padding that gives every rank the same number of micro-batches)."""
        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[index].clone()

        fields = {f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)
                  if isinstance(getattr(self, f.name), torch.Tensor) and f.name != "weights"}
        if live is not None:
            fields["loss_mask"][~live] = 0.0
        return dataclasses.replace(self, **fields)

    def micro_batches(self, micro_batch_size: int) -> list[MicroBatch]:
        """Consecutive micro-batches of `micro_batch_size` rows (the last may be smaller only
        when the rows do not divide; pipeline layouts need them to divide)."""
        out = []
        for lo in range(0, self.size, micro_batch_size):
            s = slice(lo, lo + micro_batch_size)
            out.append(MicroBatch(
                tokens=self.tokens[s], labels=self.labels[s], loss_mask=self.loss_mask[s],
                advantages=self.advantages[s], rollout_logprobs=self.rollout_logprobs[s],
                routed_experts=_part(self.routed_experts, s)))
        return out


def _part(x: torch.Tensor | None, s: slice) -> torch.Tensor | None:
    return None if x is None else x[s]


def reward_matrix(samples: Sequence[Sample], names: Sequence[str]) -> torch.Tensor:
    """Per-column scores [B, K] (fp64) from each sample's `rewards` by column name."""
    missing = [n for n in names if any(n not in s.rewards for s in samples)]
    if missing:
        raise ValueError(f"samples lack reward column(s) {missing}; they have "
                         f"{sorted(samples[0].rewards) if samples else []}")
    return torch.tensor([[s.rewards[n] for n in names] for s in samples], dtype=torch.float64)


def token_rows(samples: Sequence[Sample], seq_length: int, pad_id: int = 0
               ) -> dict[str, torch.Tensor]:
    """tokens / labels [B, S] (int64), loss_mask and rollout_logprobs [B, S] (fp32).

    The mask is 1 where the position's label is a response token. A sample longer than
    `seq_length + 1` tokens is cut (its tail does not train).
    """
    b = len(samples)
    tokens = torch.full((b, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_length), pad_id, dtype=torch.long)
    mask = torch.zeros(b, seq_length)
    rollout = torch.zeros(b, seq_length)
    for i, s in enumerate(samples):
        if not s.prompt_ids:
            raise ValueError(f"sample {i} has no prompt tokens (group {s.group}); every "
                             "response is predicted from at least one prompt token")
        seq = (list(s.prompt_ids) + list(s.response_ids))[: seq_length + 1]
        n = len(seq) - 1
        if n <= 0:
            continue
        tokens[i, :n] = torch.tensor(seq[:-1])
        labels[i, :n] = torch.tensor(seq[1:])
        first = len(s.prompt_ids) - 1  # position predicting the first response token
        resp = min(len(s.response_ids), n - first)
        if resp > 0:
            mask[i, first : first + resp] = 1.0
            rollout[i, first : first + resp] = torch.tensor(s.rollout_logprobs[:resp],
                                                            dtype=torch.float32)
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "rollout_logprobs": rollout}


def expert_rows(samples: Sequence[Sample], seq_length: int) -> torch.Tensor | None:
    """The engine's experts per input position [B, S, L, E] (int16), or None when a sample
    has none. Positions past a sample's recorded tokens (the last generated token, which the
    engine never fed back, and right padding; none of them trains the router's choice for a
    response token that counts) repeat its last recorded position."""
    if not samples or any(s.routed_experts is None for s in samples):
        return None
    shapes = {tuple(s.routed_experts.shape[1:]) for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"routed experts of different layouts (MoE layers, top-k): {shapes}")
    rows = []
    for s in samples:
        ex = torch.as_tensor(s.routed_experts).to(torch.int16)[:seq_length]
        if ex.shape[0] == 0:
            raise ValueError("a sample has routed_experts for no token")
        pad = ex[-1:].expand(seq_length - ex.shape[0], -1, -1)
        rows.append(torch.cat([ex, pad]))
    return torch.stack(rows)


def build_batch(samples: Sequence[Sample], *, reward_names: Sequence[str],
                weights: torch.Tensor, advantages: torch.Tensor, seq_length: int,
                mask_truncated: bool) -> RLBatch:
    """The step's `RLBatch` from its samples, reward columns and advantages [B].

    `mask_truncated`: DAPO's overlong filtering, the one place it applies (the loss mask of
    every sample the length limit stopped is zeroed).
    """
    rows = token_rows(samples, seq_length)
    if mask_truncated:
        truncated = torch.tensor([s.truncated for s in samples], dtype=torch.bool)
        rows["loss_mask"] = overlong_filter(rows["loss_mask"], truncated)
    return RLBatch(**rows, rewards=reward_matrix(samples, reward_names),
                   reward_names=tuple(reward_names),
                   weights=torch.as_tensor(weights, dtype=torch.float64),
                   group_ids=torch.tensor([s.group for s in samples], dtype=torch.long),
                   advantages=advantages.float(),
                   routed_experts=expert_rows(samples, seq_length))


def split_updates(batch: RLBatch, *, updates: int, dp_size: int, dp_rank: int,
                  micro_batch_size: int) -> list[list[MicroBatch]]:
    """The step's rows in `updates` contiguous mini-batches (one optimizer step each), and of
    each mini-batch this data-parallel rank's share as micro-batches.

    Each mini-batch is split over the ranks (not the step, then each rank's part into
    mini-batches), so every update sees the same samples under any DP size. Every rank gets
    the same number of micro-batches: short shares are padded with masked rows.
    """
    n = batch.size
    k = max(1, min(updates, n))  # a dynamic-sampling step may come up short
    parts = []
    for start, end in itertools.pairwise([round(i * n / k) for i in range(k + 1)]):
        per_rank = -(-(end - start) // (dp_size * micro_batch_size)) * micro_batch_size
        order = start + torch.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        live = order < end
        index = torch.where(live, order, torch.zeros_like(order))
        parts.append(batch.rows(index, live).micro_batches(micro_batch_size))
    return parts
