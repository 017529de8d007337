"""Per-token log-probs of given labels from vocab-parallel logits, padded vocabulary masked.

Shape legend: b = micro-batch, s = sequence, v = this TP rank's vocabulary slice.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


def mask_padded_vocab(logits_bsv: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the logits of padded vocabulary ids (>= vocab_size) on this TP rank to -inf."""
    v_local = logits_bsv.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * v_local
    if start + v_local <= vocab_size:
        return logits_bsv
    ids = torch.arange(start, start + v_local, device=logits_bsv.device)
    return logits_bsv.masked_fill(ids >= vocab_size, float("-inf"))


def token_logprobs(
    logits_bsv: torch.Tensor, labels_bs: torch.Tensor, vocab_size: int, temperature: float = 1.0
) -> torch.Tensor:
    """log p(label) per token [b, s] in fp32, differentiable, across the TP vocabulary split.

    Temperature divides the logits before the softmax, exactly as the rollout engine samples.
    """
    logits = logits_bsv.float()
    if temperature != 1.0:
        logits = logits / temperature
    logits = mask_padded_vocab(logits, vocab_size)
    # Megatron's vocab-parallel cross entropy does the max/sum-exp all-reduces over TP.
    return -vocab_parallel_cross_entropy(logits, labels_bs)
