"""What `megatron-rl profile` measures: time, bytes moved, FLOP/s and peak memory of the fused
kernels, and (`--compile-only`) an ahead-of-time sm_90a build of every Triton kernel with its
resources.

Shapes: T tokens, V vocabulary, TP ranks (each rank's slice is ceil(V / TP) columns). On a GPU
the Triton path is timed and compared with the device's bf16 peak and HBM bandwidth; on CPU it
says so and times the chunked torch references. Bytes and FLOPs are nominal counts of the
algorithm (logits read once forward; read once and gradient written once backward; ~6 FLOP
per logit forward, ~8 backward), not hardware counters.
"""

from __future__ import annotations

import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

GPU_PEAKS = {  # name fragment: (dense bf16 FLOP/s, HBM bytes/s)
    "H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}
REGS_PER_SM, SHARED_PER_SM, MAX_WARPS_PER_SM, MAX_CTAS_PER_SM = 65536, 228 * 1024, 64, 32


# ---------------------------------------------------------------- ahead-of-time compilation
def aot_specs() -> list[dict[str, Any]]:
    """Every Triton kernel at its production constexprs: name, fn, signature, constexprs,
    num_warps, and the CTAs per SM it needs resident (its occupancy floor)."""
    from megatron_rl.algorithms.kl import KL_GAP_KNOT
    from megatron_rl.algorithms.policy_loss import LOG_RATIO_CLAMP
    from megatron_rl.kernels import triton_logprobs as tlp
    from megatron_rl.kernels import triton_policy_loss as tpl

    specs = []
    for dt in ("bf16", "fp32"):
        for v_local in (129280, 152064, 16160, 19008):  # TP=1 and TP=8 slices
            bv = tlp.block_v(v_local)
            common = {"TEMP": 0.7, "BLOCK_V": bv}
            specs.append(dict(
                name=f"logprobs_fwd {dt} V/rank={v_local}", fn=tlp.logprobs_fwd_kernel,
                signature={"logits_ptr": f"*{dt}", "labels_ptr": "*i64", "stats_ptr": "*fp32",
                           "V": "i32", "stride_t": "i32", "vocab_start": "i32",
                           "n_valid": "i32"},
                constexprs=common, num_warps=tlp.num_warps(bv), min_ctas=2))
            specs.append(dict(
                name=f"logprobs_bwd {dt} V/rank={v_local}", fn=tlp.logprobs_bwd_kernel,
                signature={"logits_ptr": f"*{dt}", "labels_ptr": "*i64", "rowstats_ptr": "*fp32",
                           "grad_lp_ptr": "*fp32", "grad_ent_ptr": "*fp32",
                           "grad_logits_ptr": f"*{dt}", "V": "i32", "stride_t": "i32",
                           "stride_gt": "i32", "vocab_start": "i32", "n_valid": "i32"},
                constexprs=common, num_warps=tlp.num_warps(bv), min_ctas=2))
    sig = {k: "*fp32" for k in ("lp_ptr", "old_ptr", "adv_ptr", "w_ptr", "mask_ptr", "ref_ptr",
                                "roll_ptr", "ent_ptr", "dlp_ptr", "dent_ptr", "part_ptr")}
    sig["N"] = "i32"
    for label, kl_mode, dual, tis, ent in (("dapo", 0, 0.0, 0.0, 0.0),
                                           ("grpo_k3", 3, 0.0, 0.0, 0.0),
                                           ("all_on", 3, 3.0, 2.0, 0.01)):
        specs.append(dict(
            name=f"policy_loss {label}", fn=tpl.policy_loss_kernel, signature=sig,
            constexprs={"EPS_LOW": 0.2, "EPS_HIGH": 0.28, "DUAL_C": dual, "TIS_CAP": tis,
                        "KL_COEF": 0.001 if kl_mode else 0.0, "KL_MODE": kl_mode,
                        "ENT_COEF": ent, "HAS_ENT": ent > 0, "CLAMP": LOG_RATIO_CLAMP,
                        "KL_KNOT": KL_GAP_KNOT, "BLOCK": tpl.BLOCK},
            num_warps=4, min_ctas=4))
    return specs


def cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / SHARED / LOCAL / STACK of a cubin, by Triton's bundled cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], check=True,
                             capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", out))
    return {k.lower(): int(found[k]) for k in ("REG", "SHARED", "LOCAL", "STACK")}


def ctas_per_sm(regs: int, shared: int, num_warps: int) -> int:
    """Resident CTAs per H100 SM allowed by registers, shared memory and warps."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * num_warps)
    by_shared = SHARED_PER_SM // shared if shared else MAX_CTAS_PER_SM
    return min(by_regs, by_shared, MAX_WARPS_PER_SM // num_warps, MAX_CTAS_PER_SM)


def compile_all() -> list[dict[str, Any]]:
    """AOT-compile every spec for sm_90a; one row per kernel with its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for spec in aot_specs():
        t0 = time.perf_counter()
        src = ASTSource(fn=spec["fn"], signature=spec["signature"],
                        constexprs=spec["constexprs"])
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": spec["num_warps"]})
        use = resource_usage(kernel.asm["cubin"])
        ctas = ctas_per_sm(use["reg"], use["shared"], spec["num_warps"])
        rows.append({"kernel": spec["name"], "num_warps": spec["num_warps"], **use,
                     "ctas_per_sm": ctas, "min_ctas": spec["min_ctas"],
                     "ok": use["local"] == 0 and use["stack"] == 0 and ctas >= spec["min_ctas"],
                     "ptx_bytes": len(kernel.asm["ptx"]), "compile_s": time.perf_counter() - t0})
    return rows


# ---------------------------------------------------------------------------- timing
def device_info() -> tuple[str, bool, tuple[float, float] | None]:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_PEAKS.items() if k in name), None)
        return name, True, peak
    return f"CPU ({os.cpu_count()} cores, torch {torch.__version__}, no GPU)", False, None


def _timed(fn, iters: int, warmup: int, cuda: bool) -> float:
    import torch

    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / max(iters, 1)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _logprob_calls(x, labels, vocab: int, backend: str):
    """(forward-only call, forward+backward call) of the log-prob kernel on logits x."""
    import torch

    from megatron_rl.kernels.logprobs import logprobs_and_entropy

    def fwd():
        with torch.no_grad():
            return logprobs_and_entropy(x, labels, vocab_size=vocab, temperature=0.7,
                                        backend=backend)

    def fwd_bwd():
        lp, ent = logprobs_and_entropy(x, labels, vocab_size=vocab, temperature=0.7,
                                       backend=backend)
        (lp.sum() + 0.01 * ent.sum()).backward()
        x.grad = None

    return fwd, fwd_bwd


def _policy_call(lp, old, adv, mask, ref, backend: str):
    """Forward+backward call of the fused policy loss (DAPO clip, k3 KL)."""
    from megatron_rl.algorithms.config import AlgorithmConfig
    from megatron_rl.kernels.policy_loss import fused_policy_loss

    cfg = AlgorithmConfig(eps_high=0.28, loss_agg="token_mean", kl_coef=0.001)

    def pl():
        loss, _ = fused_policy_loss(cfg, lp, old, adv, mask, float(lp.numel()),
                                    ref_logprobs=ref, backend=backend)
        loss.backward()
        lp.grad = None

    return pl


def profile_shapes(tokens: list[int], vocab: list[int], tp_sizes: list[int],
                   dtype: str = "bf16", kernels: Sequence[str] = ("logprobs", "policy_loss"),
                   backend: str = "auto", iters: int = 5, warmup: int = 1) -> list[dict[str, Any]]:
    """Time every (tokens, vocab, tp) shape of the chosen kernels; one row per kernel call with
    ms, GB/s, GFLOP/s and peak memory (MB)."""
    import torch

    from megatron_rl.kernels import dispatch

    _, cuda, _ = device_info()
    dev = "cuda" if cuda else "cpu"
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    rows = []
    for t in tokens:
        for v in vocab:
            for tp in tp_sizes:
                if "logprobs" not in kernels:
                    break
                vl = -(-v // tp)
                x = torch.randn(t, vl, device=dev, dtype=torch_dtype).requires_grad_()
                labels = torch.randint(0, vl, (t,), device=dev)
                path = "triton" if dispatch.use_triton(x, backend) else "torch"
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if cuda else 0.0

                fwd, fwd_bwd = _logprob_calls(x, labels, v, backend)

                elems, es = t * vl, x.element_size()
                for name, fn, nbytes, flops in (
                        ("logprobs fwd", fwd, elems * es, 6 * elems),
                        ("logprobs fwd+bwd", fwd_bwd, 4 * elems * es, 14 * elems)):
                    sec = _timed(fn, iters, warmup, cuda)
                    peak = ((torch.cuda.max_memory_allocated() - base) / 2**20 if cuda
                            else _rss_mb())
                    rows.append(dict(kernel=name, path=path, tokens=t, vocab=v, tp=tp,
                                     dtype=dtype, ms=sec * 1e3, gbytes_s=nbytes / sec / 1e9,
                                     gflop_s=flops / sec / 1e9, peak_mb=peak))
                del x
    if "policy_loss" in kernels:
        for t in tokens:
            lp = (torch.randn(t // 16 or 1, 16, device=dev) - 2).requires_grad_()
            old = lp.detach() + 0.1 * torch.randn_like(lp)
            ref, adv = lp.detach() + 0.1 * torch.randn_like(lp), torch.randn(lp.shape[0],
                                                                              device=dev)
            mask = torch.ones_like(lp)
            path = "triton" if dispatch.use_triton(lp, backend) else "torch"

            pl = _policy_call(lp, old, adv, mask, ref, backend)

            sec = _timed(pl, iters, warmup, cuda)
            n = lp.numel()
            rows.append(dict(kernel="policy_loss fwd+bwd", path=path, tokens=n, vocab=0, tp=1,
                             dtype="fp32", ms=sec * 1e3, gbytes_s=7 * 4 * n / sec / 1e9,
                             gflop_s=30 * n / sec / 1e9,
                             peak_mb=(torch.cuda.max_memory_allocated() / 2**20 if cuda
                                      else _rss_mb())))
    return rows


if __name__ == "__main__":  # `python -m megatron_rl.kernels.profile ...` = `megatron-rl profile`
    from megatron_rl.cli import main

    sys.exit(main(["profile", *sys.argv[1:]]))
