"""Per-token log-probs (and entropy) of given labels from vocab-parallel logits.

Shape legend: b = micro-batch, s = sequence, v = this TP rank's vocabulary slice (any leading
dims work: the logits' leading dims must equal the labels' shape).

Both go through the fused kernel (`megatron_rl.kernels.logprobs`) on the backend passed in
(`ActorConfig.kernels`: auto = Triton on CUDA, the chunked torch path on CPU). Padded
vocabulary ids (>= vocab_size) are -inf on every TP rank; one all-gather of per-token
statistics over the TP group replaces Megatron's max/sum-exp all-reduces.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_rl.kernels.dispatch import KernelBackend
from megatron_rl.kernels.logprobs import logprobs_and_entropy


def mask_padded_vocab(logits_bsv: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the logits of padded vocabulary ids (>= vocab_size) on this TP rank to -inf."""
    v_local = logits_bsv.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * v_local
    if start + v_local <= vocab_size:
        return logits_bsv
    ids = torch.arange(start, start + v_local, device=logits_bsv.device)
    return logits_bsv.masked_fill(ids >= vocab_size, float("-inf"))


def token_logprobs_and_entropy(
    logits_bsv: torch.Tensor, labels_bs: torch.Tensor, vocab_size: int, temperature: float = 1.0,
    backend: KernelBackend | str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label), full-vocabulary entropy), each [b, s] fp32, differentiable, across TP.

    Temperature divides the logits before the softmax, exactly as the rollout engine samples.
    backend: `ActorConfig.kernels` (auto | triton | torch).
    """
    v_local = logits_bsv.shape[-1]
    if tuple(logits_bsv.shape[:-1]) != tuple(labels_bs.shape):
        raise ValueError(f"logits {tuple(logits_bsv.shape)} do not match labels "
                         f"{tuple(labels_bs.shape)}")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    start = parallel_state.get_tensor_model_parallel_rank() * v_local
    logp, ent = logprobs_and_entropy(
        logits_bsv.reshape(-1, v_local), labels_bs.reshape(-1), vocab_start=start,
        vocab_size=vocab_size, temperature=temperature, group=group, backend=backend)
    return logp.view(labels_bs.shape), ent.view(labels_bs.shape)


def token_logprobs(
    logits_bsv: torch.Tensor, labels_bs: torch.Tensor, vocab_size: int, temperature: float = 1.0,
    backend: KernelBackend | str = "auto",
) -> torch.Tensor:
    """log p(label) per token [b, s] in fp32, differentiable, across the TP vocabulary split.

    Temperature divides the logits before the softmax, exactly as the rollout engine samples.
    backend: `ActorConfig.kernels` (auto | triton | torch).
    """
    return token_logprobs_and_entropy(logits_bsv, labels_bs, vocab_size, temperature,
                                      backend)[0]
