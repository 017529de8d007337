"""Weight sync bandwidth on this machine, next to its memcpy bandwidth (a measurement only).

Builds a Megatron-Core actor of the tiny MoE config scaled up (`--hidden`, `--layers`) at one
rank, an embedded `TransformersEngine` of the same model, and times `sync_weights` for a few
bucket sizes. In the same process it measures memcpy bandwidth (`torch.empty` + `copy_` of a
large fp32 buffer; GB/s counts bytes copied once, as the sync's bytes do). A sync reads each
Megatron tensor, splits fused QKV/gate-up into HF tensors and copies them into the HF model, so
the ratio to memcpy is the overhead of export + apply.

    .venv/bin/python benchmarks/weight_sync.py [--hidden 512] [--layers 4] [--markdown]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|cuda_graph_scope).*")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_rl.launch.spawn import run_ranks  # noqa: E402


def memcpy_gb_s(nbytes: int, repeats: int = 5) -> float:
    """Median GB/s of copying an fp32 buffer of `nbytes` into a fresh one."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages first
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def worker(hidden: int, layers: int, buckets_mb: list[float], repeats: int) -> dict:
    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.config import ActorConfig, ModelConfig, ParallelConfig
    from megatron_rl.actor.parallel import init_distributed
    from megatron_rl.config import read_yaml
    from megatron_rl.rollout.transformers_engine import TransformersEngine
    from megatron_rl.rollout.weight_sync import sync_weights

    fields = read_yaml(ROOT / "configs/tiny_moe_cpu.yaml")["model"] | dict(
        hidden_size=hidden, num_layers=layers, ffn_hidden_size=4 * hidden,
        moe_ffn_hidden_size=hidden, vocab_size=8192, num_attention_heads=8, num_query_groups=4)
    model_cfg = ModelConfig(**fields)
    par = ParallelConfig(timeout_s=120, dp=None)
    init_distributed(par, seed=1)
    actor = Actor(model_cfg, par, ActorConfig(seq_length=64, micro_batch_size=1))
    engine = TransformersEngine.from_model_config(model_cfg)
    rows = []
    for mb in buckets_mb:
        reports = [sync_weights(actor, [engine], int(mb * 2**20)) for _ in range(repeats + 1)][1:]
        best = min(reports, key=lambda r: r.seconds)
        med = statistics.median(r.seconds for r in reports)
        rows.append({"bucket_mb": mb, "bytes": best.bytes, "tensors": best.tensors,
                     "buckets": best.buckets, "seconds": med, "gb_s": best.bytes / med / 1e9})
    total = rows[0]["bytes"]
    return {"rows": rows, "memcpy_small": memcpy_gb_s(max(total, 2**20)),
            "memcpy_large": memcpy_gb_s(512 * 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--buckets-mb", default="1,16,256")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    buckets = [float(x) for x in args.buckets_mb.split(",")]
    res = run_ranks(worker, 1, args.hidden, args.layers, buckets, args.repeats,
                    timeout_s=900)[0]
    mib = res["rows"][0]["bytes"] / 2**20
    print(f"model: {mib:.1f} MiB fp32 HF tensors; memcpy {res['memcpy_large']:.2f} GB/s "
          f"(512 MiB buffer), {res['memcpy_small']:.2f} GB/s (buffer of the model's size)")
    head = "| bucket MiB | buckets | tensors | MiB | seconds | GB/s | vs memcpy (512 MiB) |"
    print(head if args.markdown else head.replace("|", " "))
    if args.markdown:
        print("|--:|--:|--:|--:|--:|--:|--:|")
    for r in res["rows"]:
        print(f"| {r['bucket_mb']:g} | {r['buckets']} | {r['tensors']} | {r['bytes'] / 2**20:.1f}"
              f" | {r['seconds']:.3f} | {r['gb_s']:.2f} | {r['gb_s'] / res['memcpy_large']:.2f} |")


if __name__ == "__main__":
    main()
