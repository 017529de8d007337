"""Samples -> the actor's micro-batches: prompt + response token rows, next-token labels, a loss
mask over the response, and the per-sample / per-token tensors the loss reads.

Rows are right-padded to a fixed `seq_length` (pipeline schedules need one shape; causal
attention makes right padding harmless). Shape legend: B = rows, S = seq_length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_rl.actor.step import MicroBatch
from megatron_rl.rollout.types import Sample


def sample_rows(samples: Sequence[Sample], seq_length: int, pad_id: int = 0
                ) -> dict[str, torch.Tensor]:
    """tokens/labels [B, S] (int64), loss_mask and rollout_logprobs [B, S] (fp32).

    Position t predicts token t+1; the mask is 1 where that token is a response token. A sample
    longer than `seq_length + 1` tokens is cut (its tail does not train).
    """
    b = len(samples)
    tokens = torch.full((b, seq_length), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_length), pad_id, dtype=torch.long)
    mask = torch.zeros(b, seq_length)
    rollout = torch.zeros(b, seq_length)
    for i, s in enumerate(samples):
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
            rollout[i, first : first + resp] = torch.tensor(s.rollout_logprobs[:resp])
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "rollout_logprobs": rollout}


def micro_batches(rows: dict[str, torch.Tensor], advantages: torch.Tensor,
                  micro_batch_size: int) -> list[MicroBatch]:
    """Split rows into micro-batches of `micro_batch_size` (the last may be smaller only when
    the rows do not divide; pipeline layouts need them to divide)."""
    out = []
    for lo in range(0, rows["tokens"].shape[0], micro_batch_size):
        hi = lo + micro_batch_size
        out.append(MicroBatch(
            tokens=rows["tokens"][lo:hi], labels=rows["labels"][lo:hi],
            loss_mask=rows["loss_mask"][lo:hi],
            extras={"advantages": advantages[lo:hi],
                    "rollout_logprobs": rows["rollout_logprobs"][lo:hi]}))
    return out
