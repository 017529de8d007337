"""`megatron-rl profile [--tokens T ..] [--vocab V ..] [--tp N ..] [--compile-only]`: kernel
throughput, or an ahead-of-time sm_90a build of every Triton kernel with its resources (the
measurements are `megatron_rl.kernels.profile`, which imports torch and Triton only when run)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from megatron_rl.cli.args import positive
from megatron_rl.kernels import profile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Shapes, kernels and backend to profile."""
    parser.add_argument("--tokens", type=positive(int), nargs="+", default=[4096],
                        help="tokens per call (rows of the logits)")
    parser.add_argument("--vocab", type=positive(int), nargs="+", default=[129280, 152064],
                        help="full vocabulary sizes")
    parser.add_argument("--tp", type=positive(int), nargs="+", default=[1],
                        help="tensor-parallel sizes (each rank holds ceil(V/TP) columns)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="logits dtype")
    parser.add_argument("--kernels", nargs="+", choices=["logprobs", "policy_loss"],
                        default=["logprobs", "policy_loss"])
    parser.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto",
                        help="kernel backend, as actor.kernels (auto: Triton on CUDA, torch on "
                        "CPU)")
    parser.add_argument("--iters", type=positive(int), default=5, help="timed calls per shape")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile every Triton kernel for sm_90a (no GPU needed) and print "
                        "registers / shared / local / stack per kernel; no timing")
    parser.add_argument("--json", action="store_true", help="print JSON rows, not a table")


def run(args: argparse.Namespace) -> int:
    """Run `megatron-rl profile`; returns the exit code (1 if an AOT kernel fails its check)."""
    if args.compile_only:
        rows = profile.compile_all()
        print("AOT compile for sm_90a (H100), Triton cuobjdump --dump-resource-usage")
        print(json.dumps(rows, indent=1) if args.json else _table(
            rows, ["kernel", "num_warps", "reg", "shared", "local", "stack", "ctas_per_sm",
                   "min_ctas", "ok"]))
        return 0 if all(r["ok"] for r in rows) else 1
    name, cuda, peak = profile.device_info()
    print(f"device: {name}" + ("" if cuda else " -- CPU: timing the chunked torch paths"))
    rows = profile.profile_shapes(args.tokens, args.vocab, args.tp, dtype=args.dtype,
                                  kernels=args.kernels, backend=args.backend, iters=args.iters,
                                  warmup=args.warmup)
    if peak is not None:
        for r in rows:
            r["pct_bf16_peak"] = 100 * r["gflop_s"] * 1e9 / peak[0]
            r["pct_hbm"] = 100 * r["gbytes_s"] * 1e9 / peak[1]
    cols = ["kernel", "path", "tokens", "vocab", "tp", "dtype", "ms", "gbytes_s", "gflop_s",
            "peak_mb"] + (["pct_bf16_peak", "pct_hbm"] if peak is not None else [])
    print(json.dumps(rows, indent=1) if args.json else _table(rows, cols))
    if not cuda:
        print("peak_mb on CPU is the process's peak RSS so far (ru_maxrss), not per shape.")
    return 0


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(x: Any) -> str:
        return f"{x:,.2f}" if isinstance(x, float) else str(x)

    cells = [cols] + [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
                     for row in cells)
