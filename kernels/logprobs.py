"""Per-token log-prob of given labels and full-vocabulary entropy from vocab-parallel logits.

Shape legend: T = tokens, V = this TP rank's vocabulary slice, R = TP ranks.

Each rank reduces its slice of z = logits / temperature (fp32) to 4 statistics per token,
relative to the slice max m:  (m, s = sum e^(z - m), w = sum e^(z - m) (z - m), z_label or 0).
One all-gather of these [T, 4] statistics over the TP group combines them into
    logZ = M + log S,   E[z] = sum_j p_j z_j,   log p(y) = z_y - logZ,   H = logZ - E[z].
Backward needs no collective: dz_j = g (1[j=y] - p_j) - h p_j (z_j - E[z]) for upstream grads
g (log-prob) and h (entropy), divided by the temperature.

Vocabulary ids >= `vocab_size` (padding of the last slice) are -inf: no probability, no
gradient, and 0 * log 0 never appears. Labels owned by no rank (e.g. -100 on masked tokens)
give log p = -logZ and no one-hot gradient; mask such tokens in the loss.

Two paths with the same signature: the Triton kernels (`kernels.triton_logprobs`) and a chunked
torch path that never materialises more than `chunk_tokens` rows of fp32 temporaries. The
`backend` argument picks one (`kernels.dispatch`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rl.kernels import dispatch

CHUNK_ELEMENTS = 1 << 24
"""Torch reference: rows per chunk = max(1, CHUNK_ELEMENTS // V) (64 MiB fp32 per temporary)."""


def _n_valid(v_local: int, vocab_start: int, vocab_size: int) -> int:
    return max(0, min(v_local, vocab_size - vocab_start))


def _chunk_rows(v_local: int, chunk_tokens: int | None) -> int:
    return chunk_tokens or max(1, CHUNK_ELEMENTS // max(v_local, 1))


def reference_row_stats(logits_tv: torch.Tensor, labels_t: torch.Tensor, vocab_start: int,
                        n_valid: int, temperature: float,
                        chunk_tokens: int | None = None) -> torch.Tensor:
    """Torch reference of the forward kernel: statistics [T, 4] fp32 (m, s, w, z_label)."""
    t, v = logits_tv.shape
    stats = torch.empty(t, 4, dtype=torch.float32, device=logits_tv.device)
    step = _chunk_rows(v, chunk_tokens)
    local = labels_t.long() - vocab_start
    own = (local >= 0) & (local < n_valid)
    for a in range(0, t, step):
        z = logits_tv[a:a + step].float() / temperature  # a new fp32 tensor, safe to edit
        if n_valid < v:
            z[:, n_valid:] = float("-inf")
        m = z.amax(-1)
        safe_m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
        zc = z.sub_(safe_m[:, None])  # z - m in place
        e = zc.exp()
        stats[a:a + step, 0] = m
        stats[a:a + step, 1] = e.sum(-1)
        stats[a:a + step, 2] = (e * zc.nan_to_num_(neginf=0.0)).sum(-1)
        idx = torch.where(own[a:a + step], local[a:a + step], 0)
        zy = logits_tv[a:a + step].gather(1, idx[:, None])[:, 0].float() / temperature
        stats[a:a + step, 3] = torch.where(own[a:a + step], zy, torch.zeros_like(zy))
    return stats


def reference_grad_logits(logits_tv: torch.Tensor, labels_t: torch.Tensor,
                          rowstats_t2: torch.Tensor, grad_lp_t: torch.Tensor,
                          grad_ent_t: torch.Tensor, vocab_start: int, n_valid: int,
                          temperature: float, chunk_tokens: int | None = None) -> torch.Tensor:
    """Torch reference of the backward kernel: d loss / d logits [T, V] in the logits' dtype."""
    t, v = logits_tv.shape
    out = torch.empty_like(logits_tv)
    step = _chunk_rows(v, chunk_tokens)
    local = labels_t.long() - vocab_start
    own = (local >= 0) & (local < n_valid)
    g_all, h_all = grad_lp_t.float(), grad_ent_t.float()
    for a in range(0, t, step):
        z = logits_tv[a:a + step].float() / temperature
        if n_valid < v:
            z[:, n_valid:] = float("-inf")
        lz, ez = rowstats_t2[a:a + step, 0:1], rowstats_t2[a:a + step, 1:2]
        g, h = g_all[a:a + step, None], h_all[a:a + step, None]
        p = (z - lz).exp_()
        zc = z.sub_(ez).nan_to_num_(neginf=0.0)
        dz = zc.mul_(h).add_(g).mul_(p).neg_()  # -(g + h (z - E z)) p
        rows = torch.arange(dz.shape[0], device=dz.device)
        ok = own[a:a + step]
        dz[rows[ok], local[a:a + step][ok]] += g[ok, 0]
        out[a:a + step] = dz.div_(temperature)
    return out


def combine_stats(stats_rt4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-rank statistics [R, T, 4] -> (logZ [T], E[z] [T], z_label [T]), all fp32."""
    m, s, w, zy = stats_rt4.unbind(-1)
    big = m.amax(0)
    safe = torch.where(torch.isneginf(big), torch.zeros_like(big), big)
    dead = torch.isneginf(m)
    c = torch.where(dead, torch.zeros_like(m), (m - safe).exp())
    shift = torch.where(dead, torch.zeros_like(m), m - safe)
    total = (c * s).sum(0)
    wz = (c * (s * shift + w)).sum(0)
    return safe + total.log(), safe + wz / total, zy.sum(0)


def _gather_stats(stats_t4: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather [T, 4] over the TP group -> [R, T, 4] (R = 1 without a group)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return stats_t4[None]
    parts = [torch.empty_like(stats_t4) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, stats_t4.contiguous(), group=group)
    return torch.stack(parts)


class _LogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_tv, labels_t, vocab_start, vocab_size, temperature, group,
                triton_path, chunk_tokens):
        n_valid = _n_valid(logits_tv.shape[1], vocab_start, vocab_size)
        if triton_path:
            from megatron_rl.kernels import triton_logprobs

            stats = triton_logprobs.row_stats(logits_tv, labels_t, vocab_start, n_valid,
                                              temperature)
        else:
            stats = reference_row_stats(logits_tv, labels_t, vocab_start, n_valid, temperature,
                                        chunk_tokens)
        lz, ez, zy = combine_stats(_gather_stats(stats, group))
        ctx.save_for_backward(logits_tv, labels_t, torch.stack([lz, ez], -1))
        ctx.args = (vocab_start, n_valid, temperature, triton_path, chunk_tokens)
        return zy - lz, lz - ez

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        logits_tv, labels_t, rowstats = ctx.saved_tensors
        vocab_start, n_valid, temperature, triton_path, chunk_tokens = ctx.args
        zeros = torch.zeros(logits_tv.shape[0], dtype=torch.float32, device=logits_tv.device)
        g = zeros if grad_lp is None else grad_lp
        h = zeros if grad_ent is None else grad_ent
        if triton_path:
            from megatron_rl.kernels import triton_logprobs

            grad = triton_logprobs.grad_logits(logits_tv, labels_t, rowstats, g, h, vocab_start,
                                               n_valid, temperature)
        else:
            grad = reference_grad_logits(logits_tv, labels_t, rowstats, g, h, vocab_start,
                                         n_valid, temperature, chunk_tokens)
        return grad, None, None, None, None, None, None, None


def logprobs_and_entropy(
    logits_tv: torch.Tensor,
    labels_t: torch.Tensor,
    *,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    group: dist.ProcessGroup | None = None,
    backend: dispatch.KernelBackend | str = "auto",
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(label) [T], entropy [T]), fp32 and differentiable w.r.t. logits [T, V].

    logits_tv: this rank's vocabulary slice [T, V] (any float dtype), global ids
    [vocab_start, vocab_start + V); labels_t: global token ids [T]; vocab_size: real vocabulary
    (ids >= it are padding, -inf; default: no padding); group: the TP group whose ranks hold the
    other slices (None = the whole vocabulary is here). Temperature divides the logits in fp32
    before the softmax. backend: auto | triton | torch (`ActorConfig.kernels`, see
    `kernels.dispatch`).
    """
    if logits_tv.dim() != 2 or labels_t.shape != logits_tv.shape[:1]:
        raise ValueError(f"logits must be [T, V] and labels [T], got {tuple(logits_tv.shape)} "
                         f"and {tuple(labels_t.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits_tv.stride(-1) != 1:
        logits_tv = logits_tv.contiguous()
    vs = vocab_start + logits_tv.shape[1] if vocab_size is None else vocab_size
    triton_path = dispatch.use_triton(logits_tv, backend)
    return _LogprobsEntropy.apply(logits_tv, labels_t.contiguous(), int(vocab_start), int(vs),
                                  float(temperature), group, triton_path, chunk_tokens)


def naive_logprobs_and_entropy(logits_tv: torch.Tensor, labels_t: torch.Tensor,
                               vocab_size: int | None = None, temperature: float = 1.0
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsharded `log_softmax(...).gather` and -sum p log p, for tests and benchmarks [T]."""
    z = logits_tv.float() / temperature
    if vocab_size is not None and vocab_size < z.shape[-1]:
        z = z.masked_fill(torch.arange(z.shape[-1], device=z.device) >= vocab_size,
                          float("-inf"))
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    ent = -(p * logp.masked_fill(torch.isneginf(logp), 0.0)).sum(-1)  # 0 * log 0 = 0
    return logp.gather(-1, labels_t.long()[:, None])[:, 0], ent
