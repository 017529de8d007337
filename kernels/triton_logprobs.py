"""Triton kernels for vocab-parallel log-probs + entropy (see `kernels.logprobs` for the API).

One program per token row, looping over this rank's vocabulary slice in BLOCK_V chunks with an
online max; every accumulation in fp32. Imported lazily (only when the Triton path runs), so
`TRITON_INTERPRET` is read when this module is first imported.

Per row the forward writes 4 fp32 statistics (relative to the running max m):
    m = max_j z_j,  s = sum_j e^(z_j - m),  w = sum_j e^(z_j - m) (z_j - m),  zy = z_label or 0
with z = logits / TEMP and padded columns (local id >= n_valid) at -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def row_offset(row, stride):
    """Element offset of a row, in int64: T*V passes 2^31 at T=16.6k, V=129280."""
    return row.to(tl.int64) * stride


@triton.jit
def offset_probe_kernel(rows_ptr, out_ptr, stride):
    """Test helper: out[i] = row_offset(rows[i], stride) for an int32 row index."""
    i = tl.program_id(0)
    row = tl.load(rows_ptr + i)
    tl.store(out_ptr + i, row_offset(row, stride))


@triton.jit
def logprobs_fwd_kernel(logits_ptr, labels_ptr, stats_ptr, V, stride_t, vocab_start, n_valid,
                        TEMP: tl.constexpr, BLOCK_V: tl.constexpr):
    """stats[row] = (m, s, w, zy) of one row of logits [T, V] (any float dtype)."""
    row = tl.program_id(0)
    base = logits_ptr + row_offset(row, stride_t)
    m = tl.full([], NEG_INF, tl.float32)
    s = tl.zeros([], tl.float32)
    w = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < n_valid
        z = tl.load(base + cols, mask=valid, other=NEG_INF).to(tl.float32) / TEMP
        new_m = tl.maximum(m, tl.max(z, 0))
        safe_m = tl.where(new_m == NEG_INF, 0.0, new_m)
        shift = tl.where(m == NEG_INF, 0.0, m - safe_m)
        alpha = tl.exp(m - safe_m)
        e = tl.exp(z - safe_m)
        zc = tl.where(z == NEG_INF, 0.0, z - safe_m)
        w = alpha * (w + s * shift) + tl.sum(e * zc, 0)
        s = alpha * s + tl.sum(e, 0)
        m = new_m
    label = tl.load(labels_ptr + row).to(tl.int64)
    local = label - vocab_start
    own = (local >= 0) & (local < n_valid)
    zy = tl.load(base + tl.where(own, local, 0), mask=own, other=0.0).to(tl.float32) / TEMP
    zy = tl.where(own, zy, 0.0)
    out = stats_ptr + row.to(tl.int64) * 4
    tl.store(out, m)
    tl.store(out + 1, s)
    tl.store(out + 2, w)
    tl.store(out + 3, zy)


@triton.jit
def logprobs_bwd_kernel(logits_ptr, labels_ptr, rowstats_ptr, grad_lp_ptr, grad_ent_ptr,
                        grad_logits_ptr, V, stride_t, stride_gt, vocab_start, n_valid,
                        TEMP: tl.constexpr, BLOCK_V: tl.constexpr):
    """grad_logits[row] = (g (1[j=y] - p_j) - h p_j (z_j - E[z])) / TEMP.

    rowstats [T, 2] = (logZ, E[z]) after the TP combine; g, h = upstream grads [T] of log-prob
    and entropy. Padded columns get exactly 0.
    """
    row = tl.program_id(0)
    base = logits_ptr + row_offset(row, stride_t)
    gbase = grad_logits_ptr + row_offset(row, stride_gt)
    lz = tl.load(rowstats_ptr + row.to(tl.int64) * 2)
    ez = tl.load(rowstats_ptr + row.to(tl.int64) * 2 + 1)
    g = tl.load(grad_lp_ptr + row)
    h = tl.load(grad_ent_ptr + row)
    local = tl.load(labels_ptr + row).to(tl.int64) - vocab_start
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < n_valid
        z = tl.load(base + cols, mask=valid, other=NEG_INF).to(tl.float32) / TEMP
        p = tl.exp(z - lz)
        zc = tl.where(valid, z - ez, 0.0)
        dz = -(g + h * zc) * p + tl.where(cols == local, g, 0.0)
        dz = tl.where(valid, dz, 0.0) / TEMP
        tl.store(gbase + cols, dz.to(grad_logits_ptr.dtype.element_ty), mask=cols < V)


def block_v(v_local: int) -> int:
    """Vocabulary block: 4096 fp32 lanes for production slices, smaller for tiny tests."""
    return max(16, min(4096, triton.next_power_of_2(v_local)))


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def row_stats(logits_tv: torch.Tensor, labels_t: torch.Tensor, vocab_start: int, n_valid: int,
              temperature: float) -> torch.Tensor:
    """Per-row statistics [T, 4] fp32 of logits [T, V_local] (unit column stride)."""
    t, v = logits_tv.shape
    stats = torch.empty(t, 4, dtype=torch.float32, device=logits_tv.device)
    if t == 0:
        return stats
    bv = block_v(v)
    logprobs_fwd_kernel[(t,)](logits_tv, labels_t, stats, v, logits_tv.stride(0), vocab_start,
                              n_valid, TEMP=float(temperature), BLOCK_V=bv,
                              num_warps=num_warps(bv))
    return stats


def grad_logits(logits_tv: torch.Tensor, labels_t: torch.Tensor, rowstats_t2: torch.Tensor,
                grad_lp_t: torch.Tensor, grad_ent_t: torch.Tensor, vocab_start: int,
                n_valid: int, temperature: float) -> torch.Tensor:
    """d loss / d logits [T, V_local] in the logits' dtype."""
    t, v = logits_tv.shape
    out = torch.empty_like(logits_tv)
    if t == 0:
        return out
    bv = block_v(v)
    logprobs_bwd_kernel[(t,)](logits_tv, labels_t, rowstats_t2.contiguous(),
                              grad_lp_t.float().contiguous(), grad_ent_t.float().contiguous(),
                              out, v, logits_tv.stride(0), out.stride(0), vocab_start, n_valid,
                              TEMP=float(temperature), BLOCK_V=bv, num_warps=num_warps(bv))
    return out
