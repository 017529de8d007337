"""Actor throughput per parallel layout on this machine (a measurement; no test asserts it).

For each layout (1 rank, TP=2 with SP, PP=2, EP=2, DP=2, TP=2+EP=2) this spawns the ranks,
builds the tiny MoE actor (configs/tiny_moe_cpu.yaml) and times, on rank 0 between barriers:
`Actor.train_step` (forward+backward+optimizer, with the optimizer step timed on its own too)
and `Actor.logprobs` (forward only). Every layout processes the same global batch of
B sequences x S tokens (each DP rank its slice), so tokens/s = B*S / median seconds compare.

Run as a file (spawned ranks re-import the workers from it):

    .venv/bin/python benchmarks/actor_step.py [--layouts 1rank,tp2_sp] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Megatron warns in every rank about missing Apex/Transformer Engine, GPU-only settings and
# deprecated torch APIs (and that SP is off in experts when etp=1); not news here.
_NOISE = ("Apex|Transformer Engine|cuda_graph_scope|CUDA_DEVICE_MAX_CONNECTIONS"
          "|tensor model parallel size is 1|all_gather_into_tensor|reduce_scatter_tensor")
warnings.filterwarnings("ignore", message=f".*({_NOISE}).*")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_rl.launch.spawn import run_ranks  # noqa: E402

TINY = str(ROOT / "configs" / "tiny_moe_cpu.yaml")


@dataclass(frozen=True)
class Layout:
    """A parallel layout: its label, rank count, config overrides and a note for the table."""

    label: str
    world: int
    overrides: tuple[str, ...]
    note: str
    dp: int = 1
    """Data-parallel size it resolves to (the batch must split into dp x micro-batches)."""


LAYOUTS: dict[str, Layout] = {
    "1rank": Layout("1 rank", 1, (), "baseline"),
    "tp2_sp": Layout("TP=2 (+SP)", 2, ("parallel.tp=2", "parallel.sequence_parallel=true"),
                     "all-gather/reduce-scatter per layer"),
    "pp2": Layout("PP=2", 2, ("parallel.pp=2",), "1F1B, 1 layer/stage"),
    "ep2": Layout("EP=2", 2, ("parallel.ep=2",), "dense part DP=2; all-to-all tokens", dp=2),
    "dp2": Layout("DP=2", 2, (), "grad all-reduce", dp=2),
    "tp2_ep2": Layout("TP=2+EP=2 (etp=1, SP)", 2,
                      ("parallel.tp=2", "parallel.ep=2", "parallel.etp=1",
                       "parallel.sequence_parallel=true"),
                      "experts split, attention TP"),
}


@dataclass(frozen=True)
class Shape:
    """What to measure: global batch, sequence length, micro-batch size, step counts."""

    batch: int
    seq: int
    micro_batch: int
    steps: int
    warmup: int


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _timed(fn: Any) -> tuple[Any, float]:
    """Run `fn()` between barriers; seconds until every rank is done."""
    _barrier()
    t0 = time.perf_counter()
    out = fn()
    _barrier()
    return out, time.perf_counter() - t0


def worker(overrides: list[str], shape: Shape, threads: int) -> dict[str, Any]:
    """One rank: build the actor, time warmup+steps of train_step and logprobs."""
    torch.set_num_threads(threads)
    from megatron.core import parallel_state as ps

    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.parallel import init_distributed
    from megatron_rl.actor.step import MicroBatch, nll_loss
    from megatron_rl.config import load_config

    base = [
        f"actor.seq_length={shape.seq}", f"actor.micro_batch_size={shape.micro_batch}",
        f"rollout.max_new_tokens={max(2, shape.seq // 2)}",
    ]
    cfg = load_config(TINY, base + overrides, world_size=int(os.environ["WORLD_SIZE"]))
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    actor = Actor(cfg.model, cfg.parallel, cfg.actor, total_steps=shape.warmup + shape.steps)

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (shape.batch, shape.seq + 1), generator=g)
    mask = torch.ones(shape.batch, shape.seq)
    mask[:, : shape.seq // 4] = 0  # a "prompt" that does not count in the loss
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_dp = shape.batch // dp
    lo = dp_rank * per_dp
    mbs = [
        MicroBatch(tokens[i : i + shape.micro_batch, :-1].contiguous(),
                   tokens[i : i + shape.micro_batch, 1:].contiguous(),
                   mask[i : i + shape.micro_batch])
        for i in range(lo, lo + per_dp, shape.micro_batch)
    ]
    loss_fn = nll_loss(float(mask.sum()))

    opt_seconds: list[float] = []
    inner_step = actor.optimizer.step

    def timed_opt_step() -> Any:
        t0 = time.perf_counter()
        out = inner_step()
        opt_seconds.append(time.perf_counter() - t0)
        return out

    actor.optimizer.step = timed_opt_step  # type: ignore[method-assign]

    train_s, fwd_s = [], []
    for i in range(shape.warmup + shape.steps):
        _, t_train = _timed(lambda: actor.train_step(mbs, loss_fn))
        _, t_fwd = _timed(lambda: actor.logprobs(mbs))
        if i >= shape.warmup:
            train_s.append(t_train)
            fwd_s.append(t_fwd)
    opt_s = opt_seconds[shape.warmup:]
    return {
        "train_s": statistics.median(train_s),
        "opt_s": statistics.median(opt_s),
        "fwd_s": statistics.median(fwd_s),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "num_mb": len(mbs),
    }


def measure(
    layout: Layout, shape: Shape, timeout_s: float, threads: int | None = None
) -> dict[str, Any]:
    """Run one layout; rank 0's medians plus derived tokens/s.

    `threads` is torch's intra-op thread count per rank; None = CPU cores // ranks.
    """
    threads = threads or max(1, (os.cpu_count() or 1) // layout.world)
    r0 = run_ranks(worker, layout.world, list(layout.overrides), shape, threads,
                   timeout_s=timeout_s)[0]
    tokens = shape.batch * shape.seq
    return {
        "layout": layout.label,
        "world": layout.world,
        "train": tokens / r0["train_s"],
        "fwdbwd": tokens / (r0["train_s"] - r0["opt_s"]),
        "opt_ms": r0["opt_s"] * 1e3,
        "fwd": tokens / r0["fwd_s"],
        "step_ms": r0["train_s"] * 1e3,
        "rss": r0["rss_mb"],
        "note": f"{layout.note}; {r0['num_mb']} mb/rank, {threads} thr/rank",
    }


HEADERS = ["layout", "world", "train tok/s", "fwd+bwd tok/s", "opt ms", "fwd-only tok/s",
           "step ms", "peak RSS MB", "note"]


def _cells(row: dict[str, Any]) -> list[str]:
    return [row["layout"], str(row["world"]), f"{row['train']:,.0f}", f"{row['fwdbwd']:,.0f}",
            f"{row['opt_ms']:.1f}", f"{row['fwd']:,.0f}", f"{row['step_ms']:.0f}",
            f"{row['rss']:.0f}", row["note"]]


def format_table(rows: list[dict[str, Any]], markdown: bool) -> str:
    """The results as an aligned text table or a markdown table."""
    body = [_cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(HEADERS) + " |",
                 "|" + "|".join("---" if i in (0, 8) else "--:" for i in range(len(HEADERS)))
                 + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(HEADERS)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in (0, 8) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(HEADERS), line(["-" * w for w in widths])] + [line(c) for c in body])


def main(argv: list[str] | None = None) -> None:
    """Parse flags, run the chosen layouts one after another, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="global sequences per step (B)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (S)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help=f"comma-separated subset of: {', '.join(LAYOUTS)}")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: CPU cores // ranks of the layout)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per layout")
    args = p.parse_args(argv)

    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        p.error(f"unknown layout(s) {unknown}; choose from {list(LAYOUTS)}")
    shape = Shape(args.batch, args.seq, args.micro_batch, args.steps, args.warmup)
    for name in names:
        dp = LAYOUTS[name].dp
        if shape.batch % (dp * shape.micro_batch):
            p.error(f"--batch {shape.batch} must split into DP={dp} x --micro-batch "
                    f"{shape.micro_batch} ({name})")
    if shape.steps < 1 or shape.warmup < 0 or shape.seq < 4 or (args.threads or 1) < 1:
        p.error("need --steps >= 1, --warmup >= 0, --seq >= 4, --threads >= 1")

    print(f"# actor step benchmark: {os.cpu_count()} CPU cores, torch {torch.__version__}, "
          f"tiny MoE config, fp32")
    print(f"# global batch {shape.batch} x {shape.seq} tokens, micro-batch {shape.micro_batch}, "
          f"median of {shape.steps} steps after {shape.warmup} warmup")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# load average before the run: {load} (other processes skew CPU timings)")
    print("# CPU/gloo: numbers show overheads of the layouts, not GPU speed", flush=True)
    rows = []
    for name in names:
        t0 = time.perf_counter()
        row = measure(LAYOUTS[name], shape, args.timeout, args.threads)
        rows.append(row)
        print(f"  done {row['layout']:<22} train {row['train']:>8,.0f} tok/s  "
              f"fwd {row['fwd']:>8,.0f} tok/s  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print()
    print(format_table(rows, args.markdown))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n# load average after the run: {load}")


if __name__ == "__main__":
    main()
