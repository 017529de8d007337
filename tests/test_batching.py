"""The typed batch (`batching.py`), a pure function of samples and plain layout numbers: rows,
masks and reward columns from the samples, overlong filtering, the engine's experts per
position, and the cut into updates that gives every update the same samples under any DP size."""

from __future__ import annotations

import pytest
import torch

from megatron_rl.batching import build_batch, expert_rows, reward_matrix, split_updates
from megatron_rl.rollout.types import Sample


def _sample(i: int, prompt: int = 3, response: int = 4, finish: str = "stop",
            layers: int = 2, k: int = 2) -> Sample:
    experts = torch.arange((prompt + response - 1) * layers * k).reshape(-1, layers, k) + 100 * i
    return Sample(group=i // 2, prompt="p", prompt_ids=list(range(1, prompt + 1)),
                  response_ids=[10 + i] * response, rollout_logprobs=[-0.5 - i] * response,
                  finish_reason=finish, rewards={"acc": float(i % 2), "len": 0.1 * i},
                  routed_experts=experts)


def test_rows_masks_and_rewards_follow_the_samples():
    samples = [_sample(0), _sample(1, finish="length"), _sample(2, response=2)]
    adv = torch.tensor([1.0, -1.0, 0.5])
    batch = build_batch(samples, reward_names=["acc", "len"], weights=torch.tensor([1.0, 0.5]),
                        advantages=adv, seq_length=8, mask_truncated=False)
    # Sample 0: prompt [1, 2, 3], response [10] * 4 -> positions 2..5 predict the response.
    assert batch.tokens[0].tolist() == [1, 2, 3, 10, 10, 10, 0, 0]
    assert batch.labels[0].tolist() == [2, 3, 10, 10, 10, 10, 0, 0]
    assert batch.loss_mask[0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0]
    assert batch.rollout_logprobs[0, 2:6].tolist() == [-0.5] * 4
    assert batch.loss_mask[2].sum() == 2
    assert batch.rewards.tolist() == [[0.0, 0.0], [1.0, 0.1], [0.0, 0.2]]
    assert batch.total_reward.tolist() == pytest.approx([0.0, 1.05, 0.1])
    assert batch.group_ids.tolist() == [0, 0, 1] and batch.advantages.tolist() == adv.tolist()
    filtered = build_batch(samples, reward_names=["acc", "len"], weights=torch.ones(2),
                           advantages=adv, seq_length=8, mask_truncated=True)
    assert filtered.loss_mask.sum(-1).tolist() == [4, 0, 2]  # the truncated one trains nothing


def test_expert_rows_cover_every_position():
    s = _sample(0)  # 6 routed positions (prompt 3 + response 4 - 1), L=2, K=2
    rows = expert_rows([s], seq_length=8)
    assert rows.shape == (1, 8, 2, 2) and rows.dtype == torch.int16
    assert torch.equal(rows[0, :6], s.routed_experts.to(torch.int16))
    assert torch.equal(rows[0, 6], rows[0, 5]) and torch.equal(rows[0, 7], rows[0, 5])
    without = _sample(1)
    without.routed_experts = None
    assert expert_rows([s, without], 8) is None  # nothing to replay unless every sample has them
    with pytest.raises(ValueError, match="layouts"):
        expert_rows([s, _sample(1, layers=3)], 8)


def test_missing_reward_column_is_named():
    with pytest.raises(ValueError, match="'fmt'"):
        reward_matrix([_sample(0)], ["acc", "fmt"])


@pytest.mark.parametrize("updates", [1, 2, 3])
def test_every_update_sees_the_same_samples_under_any_dp_size(updates):
    samples = [_sample(i) for i in range(10)]
    batch = build_batch(samples, reward_names=["acc"], weights=torch.ones(1),
                        advantages=torch.arange(10.0), seq_length=8, mask_truncated=False)

    def trained(dp: int) -> list[list[float]]:
        """Per update, the advantages of the live rows over all ranks (sorted)."""
        per_rank = [split_updates(batch, updates=updates, dp_size=dp, dp_rank=r,
                                  micro_batch_size=2) for r in range(dp)]
        assert len({len(p) for p in per_rank}) == 1  # same number of updates on every rank
        out = []
        for u in range(updates):
            assert len({len(p[u]) for p in per_rank}) == 1  # same micro-batch count
            out.append(sorted(float(mb.advantages[i]) for p in per_rank for mb in p[u]
                              for i in range(mb.tokens.shape[0]) if mb.loss_mask[i].sum() > 0))
        return out

    one = trained(1)
    assert sorted(a for u in one for a in u) == list(map(float, range(10)))  # each row once
    assert trained(2) == one and trained(4) == one
