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

from megatron_rl.actor.shared_prompts import SharedPrompts, pack_rows, response_window
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
    prompt_lengths: torch.Tensor | None = None
    """Prompt tokens of each row [B] (int64), the first of its real positions; None = unknown
    (prompts cannot be shared)."""
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
    real positions and prompt tokens per row, lengths and prompt_lengths [B].

    The mask is 1 where the position's label is a response token. A sample longer than
    `seq_length + 1` tokens is cut (its tail does not train).
    """
    b = len(samples)
    lengths = torch.zeros(b, dtype=torch.long)
    prompt_lengths = torch.zeros(b, dtype=torch.long)
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
        prompt_lengths[i] = min(len(s.prompt_ids), n)
        tokens[i, :n] = torch.tensor(seq[:-1])
        labels[i, :n] = torch.tensor(seq[1:])
        first = len(s.prompt_ids) - 1  # position predicting the first response token
        resp = min(len(s.response_ids), n - first)
        if resp > 0:
            mask[i, first : first + resp] = 1.0
            rollout[i, first : first + resp] = torch.tensor(s.rollout_logprobs[:resp],
                                                            dtype=torch.float32)
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "rollout_logprobs": rollout,
            "lengths": lengths, "prompt_lengths": prompt_lengths}


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
                  same_shape: bool = False, pad_to_seq_length: bool = False,
                  share_prompts: bool = False) -> list[list[MicroBatch]]:
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
    `share_prompts`: each micro-batch's model input feeds a group's prompt once
    (`actor.shared_prompts`); under a token budget the unit dealt and counted is then a whole
    group as one packed row (prompt + its responses), so a group is not split.
    """
    n = batch.size
    k = max(1, min(updates, n))  # a dynamic-sampling step may come up short
    lengths = batch.row_lengths()
    sharing = share_prompts and batch.prompt_lengths is not None
    parts = []
    for start, end in itertools.pairwise([round(i * n / k) for i in range(k + 1)]):
        if max_tokens is None:
            per_rank = -(-(end - start) // (dp_size * micro_batch_size)) * micro_batch_size
            order = start + torch.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank)
            live = order < end
            index = torch.where(live, order, torch.zeros_like(order))
            rows = batch.rows(index, live)
            metas = [rows.rows(torch.arange(lo, min(lo + micro_batch_size, rows.size)))
                     for lo in range(0, rows.size, micro_batch_size)]
        else:
            metas = _budget_rows(batch, lengths, start, end, dp_size, dp_rank, max_tokens,
                                 pad_multiple, by_group=sharing)
        mbs = [m.micro_batches(m.size)[0] for m in metas]
        longest = [int(m.row_lengths().max()) for m in metas]
        if not pad_to_seq_length:
            if same_shape:
                longest = [max(longest)] * len(longest)
            mbs = [trim(mb, _round_up(m, pad_multiple)) for mb, m in zip(mbs, longest,
                                                                         strict=True)]
        if sharing:
            mbs = _shared(mbs, metas, pad_multiple, same_shape)
        parts.append(mbs)
    return parts


def _shared(mbs: list[MicroBatch], metas: list[RLBatch], pad_multiple: int,
            same_shape: bool) -> list[MicroBatch]:
    """`mbs` with their packed model input (one shape for all with `same_shape`), their loss
    tensors cut to each row's response window (`shared_prompts.response_window`)."""
    def pack(mb: MicroBatch, meta: RLBatch, rows: int | None = None,
             length: int | None = None) -> SharedPrompts:
        return pack_rows(mb.tokens, meta.row_lengths(), meta.prompt_lengths, meta.group_ids,
                         pad_multiple=pad_multiple, rows=rows, length=length)

    packed = [pack(mb, meta) for mb, meta in zip(mbs, metas, strict=True)]
    if same_shape:
        rows = max(p.tokens.shape[0] for p in packed)
        length = max(p.tokens.shape[1] for p in packed)
        packed = [pack(mb, meta, rows, length) for mb, meta in zip(mbs, metas, strict=True)]
    return [_windowed(mb, meta, p) for mb, meta, p in zip(mbs, metas, packed, strict=True)]


def _windowed(mb: MicroBatch, meta: RLBatch, shared: SharedPrompts) -> MicroBatch:
    """`mb` (rows) as its response windows [b, w], fed through `shared`."""
    cols, inside = response_window(meta.prompt_lengths, meta.row_lengths(), mb.tokens.shape[1])
    r = torch.arange(cols.shape[0])[:, None]

    def cut(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None or x.dim() < 2 else x[r, cols].contiguous()

    shared = dataclasses.replace(
        shared, target=shared.target[r, cols].contiguous(),
        loss_mask=shared.packed_from_rows(mb.loss_mask) * shared.live,
        experts=None if mb.routed_experts is None
        else shared.packed_from_rows(mb.routed_experts))
    advantages = mb.advantages if mb.advantages is None or mb.advantages.dim() == 1 \
        else cut(mb.advantages)
    return dataclasses.replace(
        mb, tokens=cut(mb.tokens), labels=cut(mb.labels), loss_mask=cut(mb.loss_mask) * inside,
        rollout_logprobs=cut(mb.rollout_logprobs), advantages=advantages,
        routed_experts=None, shared=shared)


def _budget_rows(batch: RLBatch, lengths: torch.Tensor, start: int, end: int,
                 dp_size: int, dp_rank: int, max_tokens: int, pad_multiple: int,
                 by_group: bool = False) -> list[RLBatch]:
    """This rank's micro-batches (as rows) of rows [start, end) under a token budget. Every
    rank computes every rank's plan (pure, same inputs), so all agree on the micro-batch count.
    The unit dealt to ranks and packed into micro-batches is a row, or with `by_group` a
    prompt group, whose tokens are its prompt once plus its responses (one packed row)."""
    units: list[list[int]] = []
    sizes: list[int] = []
    if by_group:
        members: dict[int, list[int]] = {}
        for i in range(start, end):
            members.setdefault(int(batch.group_ids[i]), []).append(i)
        for rows in members.values():
            prompt = int(batch.prompt_lengths[rows[0]])
            units.append(rows)
            sizes.append(prompt + sum(max(0, int(lengths[i]) - prompt) for i in rows))
    else:
        units = [[i] for i in range(start, end)]
        sizes = [int(lengths[i]) for i in range(start, end)]
    order = sorted(range(len(units)), key=lambda u: (-sizes[u], units[u][0]))
    shares: list[list[int]] = [[] for _ in range(dp_size)]
    tokens = [0] * dp_size
    for u in order:  # longest first, to the rank with the fewest tokens so far
        r = min(range(dp_size), key=lambda r: (tokens[r], r))
        shares[r].append(u)
        tokens[r] += sizes[u]

    def pack(share: list[int]) -> list[list[int]]:
        groups: list[list[int]] = []
        for u in share:  # units come longest first: a group's first unit is its longest
            cost = (len(groups[-1]) + 1) * _round_up(sizes[groups[-1][0]], pad_multiple) \
                if groups else 0
            if groups and cost <= max_tokens:
                groups[-1].append(u)
            else:
                groups.append([u])
        return groups

    plans = [pack(share) for share in shares]
    count = max(len(p) for p in plans)
    mine = plans[dp_rank]
    out = []
    for g in range(count):
        if g < len(mine):
            rows = [i for u in mine[g] for i in units[u]]
            index, live = torch.tensor(rows), torch.ones(len(rows), dtype=torch.bool)
        else:  # fewer micro-batches than another rank: one masked row keeps the count
            index, live = torch.tensor([start]), torch.zeros(1, dtype=torch.bool)
        out.append(batch.rows(index, live))
    return out
