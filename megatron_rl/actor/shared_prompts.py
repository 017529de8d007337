"""Shared prompts: the rows of a GRPO group fed to the model once as one packed row.

The G samples of a prompt share its tokens, and under causal attention the prompt's hidden
states do not depend on what follows, so the prompt needs computing once per group, not G
times. A packed row holds the prompt at positions 0..P-1 and then each response after it, with
an attention mask that lets a response see the prompt and itself only, and with each response's
RoPE positions continuing from P, as in its own row. The logits a sample's loss reads are
gathered back into the usual [b, s] row layout (`SharedPrompts.target`), so the log-prob
kernels, the losses and everything downstream are unchanged, and the gradient reaching a
shared prompt position is the sum over the group, as it is when the prompt is fed G times.
With demo-sized prompts (~100 tokens) and responses (~30) this feeds 3x fewer tokens.
docs/design.md section "Shared prompts".

Shape legend: b = rows (samples), s = their length, g = packed rows, t = packed row length,
L = MoE layers, E = experts per token.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class SharedPrompts:
    """A micro-batch's model input with each group's prompt once (see the module docstring)."""

    tokens: torch.Tensor
    """Packed input ids [g, t] (int64)."""
    positions: torch.Tensor
    """RoPE position of each packed token [g, t] (int64): a response continues from P."""
    attention_mask: torch.Tensor
    """[g, 1, t, t] bool, True = masked out (Megatron's convention); the causal mask is added
    by the attention."""
    source: torch.Tensor
    """For each packed position, the flat index into the rows' [b * s] positions it stands
    for [g, t] (int64): per-position row data (the engine's experts) moves to the packed layout
    through it."""
    target: torch.Tensor
    """For each position of the micro-batch's [b, s] layout, the flat index into [g * t] of the
    packed position that feeds it (int64): the logits that predict its label."""
    live: torch.Tensor
    """[g, t] bool: False at padding positions."""
    loss_mask: torch.Tensor | None = None
    """The rows' loss mask in the packed layout [g, t] (a shared position once; 0 at padding):
    which routing decisions count in `routing/agreement`."""
    experts: torch.Tensor | None = None
    """The engine's experts in the packed layout [g, t, L, E], or None."""

    def rows_from_packed(self, x_gt: torch.Tensor) -> torch.Tensor:
        """[g, t, ...] in the packed layout -> [b, s, ...] in the micro-batch's layout
        (differentiable: a shared position's gradient is the sum over its rows)."""
        b, s = self.target.shape
        flat = x_gt.reshape(-1, *x_gt.shape[2:])
        return flat.index_select(0, self.target.reshape(-1)).view(b, s, *x_gt.shape[2:])

    def packed_from_rows(self, x_bs: torch.Tensor) -> torch.Tensor:
        """[b, s, ...] in the rows' layout (as `pack_rows` saw them) -> [g, t, ...] packed."""
        g, t = self.source.shape
        flat = x_bs.reshape(-1, *x_bs.shape[2:])
        return flat.index_select(0, self.source.reshape(-1)).view(g, t, *x_bs.shape[2:])


def _round_up(n: int, multiple: int) -> int:
    return -(-max(n, 1) // multiple) * multiple


def pack_rows(tokens: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor,
              group_ids: torch.Tensor, *, pad_multiple: int = 1, rows: int | None = None,
              length: int | None = None) -> SharedPrompts:
    """The packed input of rows `tokens` [b, s] (real positions `lengths` [b], of which the
    first `prompt_lengths` [b] are the prompt; `group_ids` [b] the prompt group).

    Rows pack together when they have the same group and the same prompt tokens (checked, not
    assumed). A packed row is cut to its length rounded up to `pad_multiple` (the TP size under
    sequence parallelism); `rows`/`length` pad to a fixed [rows, length] (pipeline stages need
    one shape). A padding position attends to itself only, so no softmax row is empty."""
    b, s = tokens.shape
    packs: dict[tuple, list[int]] = {}
    for i in range(b):
        p = max(1, min(int(prompt_lengths[i]), int(lengths[i]), s))
        key = (int(group_ids[i]), tuple(tokens[i, :p].tolist()))
        packs.setdefault(key, []).append(i)
    plan = []  # per packed row: (prompt length, [(row, response start, response length)])
    for (_, prompt), members in packs.items():
        p = len(prompt)
        plan.append((p, [(i, p, max(0, int(lengths[i]) - p)) for i in members]))
    need = max(p + sum(n for _, _, n in m) for p, m in plan)
    t = _round_up(max(need, length or 1), pad_multiple)
    g = max(len(plan), rows or 0)
    packed = torch.zeros(g, t, dtype=torch.long)
    positions = torch.zeros(g, t, dtype=torch.long)
    source = torch.zeros(g, t, dtype=torch.long)
    block = torch.full((g, t), -1, dtype=torch.long)  # -1: prompt; k: response k; -2: padding
    target = torch.zeros(b, s, dtype=torch.long)
    for j, (p, members) in enumerate(plan):
        first = members[0][0]
        packed[j, :p] = tokens[first, :p]
        positions[j, :p] = torch.arange(p)
        source[j, :p] = first * s + torch.arange(p)
        cursor = p
        for k, (i, start, n) in enumerate(members):
            target[i, :p] = j * t + torch.arange(p)
            if n:
                span = slice(cursor, cursor + n)
                packed[j, span] = tokens[i, start:start + n]
                positions[j, span] = torch.arange(start, start + n)
                source[j, span] = i * s + torch.arange(start, start + n)
                block[j, span] = k
                target[i, start:start + n] = j * t + torch.arange(cursor, cursor + n)
            cursor += n
        block[j, cursor:] = -2
        positions[j, cursor:] = torch.arange(t - cursor) + p
        source[j, cursor:] = source[j, cursor - 1]
    block[len(plan):] = -2
    for j in range(len(plan), g):  # padding rows: a copy of the first position, masked out
        source[j] = source[0, 0]
    q, k = block[:, :, None], block[:, None, :]
    allowed = (k == -1) & (q != -2) | (q == k) & (q >= 0)
    allowed |= torch.eye(t, dtype=torch.bool)  # every position sees itself
    return SharedPrompts(tokens=packed, positions=positions, attention_mask=~allowed[:, None],
                         source=source, target=target, live=block != -2)


def _rotary_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "_row_positions")]


def enable_row_positions(gpt: torch.nn.Module) -> None:
    """Let `row_positions` give `gpt`'s RoPE a position per token instead of 0..s-1 (Megatron's
    rope ignores position ids). Without it the module runs exactly as before."""
    rope = getattr(gpt, "rotary_pos_emb", None)
    if rope is None or hasattr(rope, "_row_positions"):
        return
    inner = rope.forward
    rope._row_positions = None

    def forward(self, max_seq_len: int, *args, **kwargs):  # noqa: ANN001, ANN202
        pos = self._row_positions
        if pos is None:
            return inner(max_seq_len, *args, **kwargs)
        emb = inner(int(pos.max()) + 1, *args, **kwargs)  # [S, 1, 1, d]
        return emb[:, 0, 0][pos.t()].unsqueeze(2)  # [s, b, 1, d]: broadcasts over heads

    rope.forward = types.MethodType(forward, rope)


@contextlib.contextmanager
def row_positions(model: torch.nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Within the block, every RoPE of `model` (made ready by `enable_row_positions`) uses
    `positions` [b, s]."""
    mods = _rotary_modules(model)
    if not mods:
        raise RuntimeError("shared prompts: the model's RoPE takes no per-token positions "
                           "(enable_row_positions was not called at model build)")
    for m in mods:
        m._row_positions = positions
    try:
        yield
    finally:
        for m in mods:
            m._row_positions = None


def response_window(prompt_lengths: torch.Tensor, lengths: torch.Tensor, s: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns [b, w] of each row from its last prompt position (which predicts the first
    response token) to its end, and which of them lie inside the row's s positions [b, w]:
    with shared prompts a micro-batch's loss tensors hold only these, since no other position
    trains (the log-prob pass then covers ~R instead of P + R positions per row)."""
    start = (prompt_lengths.clamp(min=1) - 1).clamp(max=s - 1)
    width = int((lengths - start).clamp(min=1).max())
    cols = start[:, None] + torch.arange(width)
    return cols.clamp(max=s - 1), cols < s
