"""Samples -> the typed batch one RL step trains on, and its cut into mini- and micro-batches.

Pure: no process group, no config object. What depends on the layout (this rank's data-parallel
index, the micro-batch size) comes in as plain arguments, so the same function gives every rank
its share and tests can call it without a process group (docs/design.md section 3).

`build_batch` right-pads rows to `seq_length` (causal attention makes right padding harmless);
`split_updates` then cuts every micro-batch back to its longest row (rounded up to
`pad_multiple`: the TP size under sequence parallelism), or with pipeline parallelism every
micro-batch of a rank's update to the update's longest row (a schedule needs one shape). With
`max_tokens` micro-batches hold as many rows as fit the token budget (rows x longest row)
instead of a fixed count, and a mini-batch's rows go to the DP ranks balanced by tokens.
Position t predicts token t + 1.
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
    lengths: torch.Tensor | None = None
    """Real input positions of each row [B] (int64; the rest is padding); None = all of S."""
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
            if fields.get("lengths") is not None:
                fields["lengths"][~live] = 1  # padding rows do not widen their micro-batch
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

    def row_lengths(self) -> torch.Tensor:
        """Real input positions per row [B] (all of S when unknown)."""
        if self.lengths is not None:
            return self.lengths
        return torch.full((self.size,), self.tokens.shape[1], dtype=torch.long)


def _part(x: torch.Tensor | None, s: slice) -> torch.Tensor | None:
    return None if x is None else x[s]


def trim(mb: MicroBatch, length: int) -> MicroBatch:
    """`mb` cut to its first `length` positions (right padding only: nothing that trains)."""
    if length >= mb.tokens.shape[1]:
        return mb
    cut = slice(0, length)
    return dataclasses.replace(
        mb, tokens=mb.tokens[:, cut].contiguous(), labels=mb.labels[:, cut].contiguous(),
        loss_mask=mb.loss_mask[:, cut].contiguous(),
        rollout_logprobs=None if mb.rollout_logprobs is None
        else mb.rollout_logprobs[:, cut].contiguous(),
        advantages=mb.advantages if mb.advantages is None or mb.advantages.dim() == 1
        else mb.advantages[:, cut].contiguous(),
        routed_experts=None if mb.routed_experts is None
        else mb.routed_experts[:, cut].contiguous())


def _round_up(n: int, multiple: int) -> int:
    return -(-max(n, 1) // multiple) * multiple


def reward_matrix(samples: Sequence[Sample], names: Sequence[str]) -> torch.Tensor:
    """Per-column scores [B, K] (fp64) from each sample's `rewards` by column name."""
    missing = [n for n in names if any(n not in s.rewards for s in samples)]
    if missing:
        raise ValueError(f"samples lack reward column(s) {missing}; they have "
                         f"{sorted(samples[0].rewards) if samples else []}")
    return torch.tensor([[s.rewards[n] for n in names] for s in samples], dtype=torch.float64)


def token_rows(samples: Sequence[Sample], seq_length: int, pad_id: int = 0
               ) -> dict[str, torch.Tensor]:
    """tokens / labels [B, S] (int64), loss_mask and rollout_logprobs [B, S] (fp32), and the
    real positions per row, lengths [B].

    The mask is 1 where the position's label is a response token. A sample longer than
    `seq_length + 1` tokens is cut (its tail does not train).
    """
    b = len(samples)
    lengths = torch.zeros(b, dtype=torch.long)
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
        lengths[i] = n
        tokens[i, :n] = torch.tensor(seq[:-1])
        labels[i, :n] = torch.tensor(seq[1:])
        first = len(s.prompt_ids) - 1  # position predicting the first response token
        resp = min(len(s.response_ids), n - first)
        if resp > 0:
            mask[i, first : first + resp] = 1.0
            rollout[i, first : first + resp] = torch.tensor(s.rollout_logprobs[:resp],
                                                            dtype=torch.float32)
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "rollout_logprobs": rollout,
            "lengths": lengths}


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
                  micro_batch_size: int, max_tokens: int | None = None, pad_multiple: int = 1,
                  same_shape: bool = False, pad_to_seq_length: bool = False
                  ) -> list[list[MicroBatch]]:
    """The step's rows in `updates` contiguous mini-batches (one optimizer step each), and of
    each mini-batch this data-parallel rank's share as micro-batches.

    Each mini-batch is split over the ranks (not the step, then each rank's part into
    mini-batches), so every update sees the same samples under any DP size. Every rank gets
    the same number of micro-batches (collectives inside the forward, such as expert
    parallelism's all-to-all, run once per micro-batch): short shares are padded with masked
    rows.

    Shapes: each micro-batch is cut to its longest row rounded up to `pad_multiple`; with
    `same_shape` (pipeline parallelism) all of a rank's micro-batches of an update share the
    longest; `pad_to_seq_length` keeps every row at S (the fixed shape, for comparison).
    `max_tokens`: micro-batches by token budget (rows x longest row <= max_tokens; a longer
    row gets one of its own) instead of `micro_batch_size` rows, the mini-batch's rows dealt
    to the ranks longest first, each to the rank with the fewest tokens so far.
    """
    n = batch.size
    k = max(1, min(updates, n))  # a dynamic-sampling step may come up short
    lengths = batch.row_lengths()
    parts = []
    for start, end in itertools.pairwise([round(i * n / k) for i in range(k + 1)]):
        if max_tokens is None:
            per_rank = -(-(end - start) // (dp_size * micro_batch_size)) * micro_batch_size
            order = start + torch.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank)
            live = order < end
            index = torch.where(live, order, torch.zeros_like(order))
            rows = batch.rows(index, live)
            mbs = rows.micro_batches(micro_batch_size)
            sizes = [min(micro_batch_size, rows.size - lo)
                     for lo in range(0, rows.size, micro_batch_size)]
            longest = _longest(rows.row_lengths(), sizes)
        else:
            mbs, longest = _budget_micro_batches(batch, lengths, start, end, dp_size, dp_rank,
                                                 max_tokens, pad_multiple)
        if not pad_to_seq_length:
            if same_shape:
                longest = [max(longest)] * len(longest)
            mbs = [trim(mb, _round_up(m, pad_multiple)) for mb, m in zip(mbs, longest,
                                                                         strict=True)]
        parts.append(mbs)
    return parts


def _longest(lengths: torch.Tensor, sizes: list[int]) -> list[int]:
    """The longest row of each consecutive group of `sizes` rows."""
    out, lo = [], 0
    for size in sizes:
        out.append(int(lengths[lo: lo + size].max()))
        lo += size
    return out


def _budget_micro_batches(batch: RLBatch, lengths: torch.Tensor, start: int, end: int,
                          dp_size: int, dp_rank: int, max_tokens: int, pad_multiple: int
                          ) -> tuple[list[MicroBatch], list[int]]:
    """This rank's micro-batches of rows [start, end) under a token budget, and the longest
    row of each. Every rank computes every rank's plan (pure, same inputs), so all agree on
    the micro-batch count."""
    order = sorted(range(start, end), key=lambda i: (-int(lengths[i]), i))
    shares: list[list[int]] = [[] for _ in range(dp_size)]
    tokens = [0] * dp_size
    for i in order:  # longest first, to the rank with the fewest tokens so far
        r = min(range(dp_size), key=lambda r: (tokens[r], r))
        shares[r].append(i)
        tokens[r] += int(lengths[i])

    def pack(rows: list[int]) -> list[list[int]]:
        groups: list[list[int]] = []
        for i in rows:  # rows come longest first: a group's first row is its longest
            cost = (len(groups[-1]) + 1) * _round_up(int(lengths[groups[-1][0]]), pad_multiple) \
                if groups else 0
            if groups and cost <= max_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    plans = [pack(share) for share in shares]
    count = max(len(p) for p in plans)
    mine = plans[dp_rank]
    mbs, longest = [], []
    for g in range(count):
        if g < len(mine):
            index, live = torch.tensor(mine[g]), torch.ones(len(mine[g]), dtype=torch.bool)
        else:  # fewer micro-batches than another rank: one masked row keeps the count
            index, live = torch.tensor([start]), torch.zeros(1, dtype=torch.bool)
        rows = batch.rows(index, live)
        mbs.extend(rows.micro_batches(rows.size))
        longest.append(int(rows.row_lengths().max()) if bool(live.any()) else 1)
    return mbs, longest
