"""Triton kernel for the token-level clipped policy loss, forward and backward in one pass.

See `kernels.policy_loss` for the API and the math. One program per BLOCK tokens of the
flattened [B*T] batch; it writes the per-token gradients d loss / d logprob and
d loss / d entropy (already weighted by the aggregation) and one row of partial statistics
per block, so the backward is a scale by the upstream gradient. Imported lazily.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NSTATS = 16
"""Columns of the partial-statistics rows (see STAT_KEYS in kernels.policy_loss)."""


@triton.jit
def bounded_kl(d, MODE: tl.constexpr, KNOT: tl.constexpr):
    """(k2 or k3 of the gap d = ref - logp, its slope d kl / d d), as `algorithms.kl`: the exact
    formula for |d| <= KNOT, the tangent at the knot beyond (finite, bounded slope)."""
    c = tl.minimum(tl.maximum(d, -KNOT), KNOT)
    if MODE == 2:
        fc = 0.5 * c * c
        slope = c
    else:
        ec = tl.exp(c)
        fc = ec - c - 1.0
        slope = ec - 1.0
    return tl.where(tl.abs(d) <= KNOT, fc, fc + slope * (d - c)), slope


@triton.jit
def policy_loss_kernel(lp_ptr, old_ptr, adv_ptr, w_ptr, mask_ptr, ref_ptr, roll_ptr, ent_ptr,
                       dlp_ptr, dent_ptr, part_ptr, N,
                       EPS_LOW: tl.constexpr, EPS_HIGH: tl.constexpr, DUAL_C: tl.constexpr,
                       TIS_CAP: tl.constexpr, KL_COEF: tl.constexpr, KL_MODE: tl.constexpr,
                       ENT_COEF: tl.constexpr, HAS_ENT: tl.constexpr, CLAMP: tl.constexpr,
                       KL_KNOT: tl.constexpr, BLOCK: tl.constexpr):
    """KL_MODE: 0 none, 1 k1, 2 k2, 3 k3. DUAL_C / TIS_CAP <= 0: off. Inputs fp32 [N].

    CLAMP: the log-ratio clamp of the ratio and the TIS weight; KL_KNOT: the KL bound. Masked
    tokens may hold anything: every store and statistic selects live tokens with tl.where."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=inb, other=0.0)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0)
    live = (tl.load(mask_ptr + offs, mask=inb, other=0.0) != 0) & inb
    raw = lp - old
    lr = tl.minimum(tl.maximum(raw, -CLAMP), CLAMP)
    d_lr = tl.where((raw >= -CLAMP) & (raw <= CLAMP), 1.0, 0.0)
    r = tl.exp(lr)
    clipped = tl.minimum(tl.maximum(r, 1.0 - EPS_LOW), 1.0 + EPS_HIGH)
    pg1 = -adv * r
    pg2 = -adv * clipped
    pg = tl.maximum(pg1, pg2)
    dpg = tl.where(pg1 >= pg2, -adv * r, 0.0) * d_lr  # d pg / d logprob
    dual_tok = tl.zeros([BLOCK], tl.float32)
    if DUAL_C > 0:
        bound = -adv * DUAL_C
        cut = (adv < 0) & (pg > bound)
        pg = tl.where(cut, bound, pg)
        dpg = tl.where(cut, 0.0, dpg)
        dual_tok = tl.where(live & (adv < 0) & (r > DUAL_C), 1.0, 0.0)
    tis = tl.zeros([BLOCK], tl.float32)
    tis_capped = tl.zeros([BLOCK], tl.float32)
    if TIS_CAP > 0:
        roll = tl.load(roll_ptr + offs, mask=inb, other=0.0)
        tis = tl.minimum(tl.exp(tl.minimum(tl.maximum(old - roll, -CLAMP), CLAMP)), TIS_CAP)
        pg = pg * tis
        dpg = dpg * tis
        tis_capped = tl.where(live & (tis >= TIS_CAP), 1.0, 0.0)
    loss = pg
    dl = dpg
    kl = tl.zeros([BLOCK], tl.float32)
    if KL_MODE > 0:
        ref = tl.load(ref_ptr + offs, mask=inb, other=0.0)
        if KL_MODE == 1:  # linear: no bound needed
            kl = lp - ref
            dkl = tl.full([BLOCK], 1.0, tl.float32)
        elif KL_MODE == 2:
            kl, slope = bounded_kl(ref - lp, 2, KL_KNOT)
            dkl = -slope  # d kl / d logprob
        else:
            kl, slope = bounded_kl(ref - lp, 3, KL_KNOT)
            dkl = -slope
        loss = loss + KL_COEF * kl
        dl = dl + KL_COEF * dkl
    ent = tl.zeros([BLOCK], tl.float32)
    if HAS_ENT:
        ent = tl.load(ent_ptr + offs, mask=inb, other=0.0)
        if ENT_COEF > 0:
            loss = loss - ENT_COEF * ent
    wl = tl.where(live, w, 0.0)
    tl.store(dlp_ptr + offs, tl.where(live, wl * dl, 0.0), mask=inb)
    if ENT_COEF > 0:
        tl.store(dent_ptr + offs, tl.where(live, -ENT_COEF * wl, 0.0), mask=inb)
    one = tl.where(live, 1.0, 0.0)
    approx_kl, _ = bounded_kl(-lr, 3, KL_KNOT)  # k3(logp, logp_old): KL(pi_old || pi_theta)
    row = part_ptr + pid.to(tl.int64) * 16
    tl.store(row + 0, tl.sum(tl.where(live, wl * loss, 0.0), 0))
    tl.store(row + 1, tl.sum(one, 0))
    tl.store(row + 2, tl.sum(tl.where(live, pg, 0.0), 0))
    tl.store(row + 3, tl.sum(tl.where(live & (adv < 0) & (r < 1.0 - EPS_LOW), 1.0, 0.0), 0))
    tl.store(row + 4, tl.sum(tl.where(live & (adv > 0) & (r > 1.0 + EPS_HIGH), 1.0, 0.0), 0))
    tl.store(row + 5, tl.sum(tl.where(live, approx_kl, 0.0), 0))
    tl.store(row + 6, tl.sum(tl.where(live, r, 0.0), 0))
    tl.store(row + 7, tl.max(tl.where(live, r, float("-inf")), 0))
    tl.store(row + 8, tl.sum(dual_tok, 0))
    tl.store(row + 9, tl.sum(tl.where(live, tis, 0.0), 0))
    tl.store(row + 10, tl.sum(tis_capped, 0))
    tl.store(row + 11, tl.sum(tl.where(live, kl, 0.0), 0))
    tl.store(row + 12, tl.sum(tl.where(live, ent, 0.0), 0))


BLOCK = 1024


def run(lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, w: torch.Tensor,
        mask: torch.Tensor, ref: torch.Tensor | None, roll: torch.Tensor | None,
        ent: torch.Tensor | None, *, eps_low: float, eps_high: float, dual_c: float,
        tis_cap: float, kl_coef: float, kl_mode: int, ent_coef: float, clamp: float,
        kl_knot: float, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d loss/d logprob [N], d loss/d entropy [N], partial statistics [blocks, 16]); fp32 [N]
    contiguous inputs (None for absent optional ones)."""
    n = lp.numel()
    nblk = max(1, triton.cdiv(n, block))
    dlp = torch.empty_like(lp)
    dent = torch.zeros_like(lp) if ent_coef > 0 else torch.empty(0, device=lp.device)
    part = torch.zeros(nblk, NSTATS, dtype=torch.float32, device=lp.device)
    dummy = lp
    policy_loss_kernel[(nblk,)](
        lp, old, adv, w, mask, dummy if ref is None else ref, dummy if roll is None else roll,
        dummy if ent is None else ent, dlp, dent if ent_coef > 0 else dlp, part, n,
        EPS_LOW=float(eps_low), EPS_HIGH=float(eps_high), DUAL_C=float(dual_c),
        TIS_CAP=float(tis_cap), KL_COEF=float(kl_coef), KL_MODE=int(kl_mode),
        ENT_COEF=float(ent_coef), HAS_ENT=ent is not None, CLAMP=float(clamp),
        KL_KNOT=float(kl_knot), BLOCK=block,
        num_warps=4)
    return dlp, dent, part
