"""Weight sync into served engines vs a raw gloo broadcast of the same bytes (a measurement only).

One run, side by side, for N = 1 and 2 engines and a few bucket sizes:

(a) `distributed`: a 1-rank Megatron-Core actor of the tiny MoE config scaled up (`--hidden`,
    `--layers`) and N `megatron-rl serve --config configs/tiny_moe_cpu.yaml --set model.*=...`
    processes of the same model; `WeightSync(actor, "distributed", bucket).sync(engines)` timed
    after one warm-up sync (export from Megatron, one HTTP request + gloo broadcasts per bucket,
    apply in the server, flush).
(b) raw gloo: the same HF tensors (`actor.hf_buckets(arch, ...)`, cloned) broadcast tensor by
    tensor from this process to N plain receiver processes over a group made with
    `open_update_group` (receivers allocate the shapes fresh each round, no HTTP, no apply), and
    one flat fp32 buffer of the same total bytes. A round ends with a 1-element all-reduce, so
    the time covers delivery to every receiver. Raw rounds run before, between and after the (a)
    measurements (the machine is shared); their median is the reference.

Bytes/s everywhere = model bytes (the HF tensors, what each engine receives) / seconds, i.e. the
bytes delivered per engine; with N engines the sender pushes N times that. ratio = (a) / (b,
tensor by tensor). A breakdown (Megatron export alone, apply alone into an embedded
`TransformersEngine`, an HTTP round trip to a server) shows where (a) loses time.

    .venv/bin/python benchmarks/weight_sync.py [--hidden 256] [--layers 4] [--engines 1,2]
        [--buckets-mb 16,64] [--repeats 3] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|cuda_graph_scope).*")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_rl.launch.spawn import ServeProcess  # noqa: E402

CONFIG = "configs/tiny_moe_cpu.yaml"
TIMEOUT_S = 300.0


def model_fields(hidden: int, layers: int) -> dict[str, int]:
    """The scaled model: overrides of CONFIG's model section (actor and servers alike)."""
    return dict(hidden_size=hidden, num_layers=layers, ffn_hidden_size=4 * hidden,
                moe_ffn_hidden_size=hidden, vocab_size=8192, num_attention_heads=8,
                num_query_groups=4)


def config_sets(fields: dict[str, int], tmp: Path) -> list[str]:
    return [f"model.{k}={v}" for k, v in fields.items()] + [
        f"data.tokenizer_cache={tmp}/tok", "data.train_size=100", "data.eval_size=10"]


def memcpy_gb_s(nbytes: int, repeats: int = 5) -> float:
    """Median GB/s of copying an fp32 buffer of `nbytes` into another one."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages first
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "LOCAL_RANK")}
    return env | {"OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- (b) raw gloo broadcast: both sides run the same schedule ----------------------------------

def _raw_round(pg, tensors: list[torch.Tensor] | None, spec: dict, flat: bool) -> float:
    """One round: every tensor (or the flat buffer) from rank 0, all broadcasts started before
    any is waited for (the fastest raw schedule), then a 1-element all-reduce."""
    from megatron_rl.rollout.weight_sync import broadcast_tensors

    t0 = time.perf_counter()
    if tensors is None:  # receiver: fresh buffers, as an engine allocates per bucket
        dtypes = [getattr(torch, d) for d in spec["dtypes"]]
        tensors = ([torch.empty(spec["flat_numel"])] if flat else
                   [torch.empty(tuple(s), dtype=d) for s, d in zip(spec["shapes"], dtypes,
                                                                    strict=True)])
    broadcast_tensors(pg, [(f"tensor {i}", t) for i, t in enumerate(tensors)], TIMEOUT_S)
    pg.allreduce([torch.zeros(1)]).wait()
    return time.perf_counter() - t0


def _raw_phase(pg, tensors, flat_buf, spec: dict) -> dict[str, list[float]]:
    """1 warm-up + `repeats` rounds tensor by tensor, then the same with the flat buffer."""
    out = {}
    for kind, src in (("tensors", tensors), ("flat", flat_buf)):
        times = [_raw_round(pg, src, spec, kind == "flat") for _ in range(spec["repeats"] + 1)]
        out[kind] = times[1:]
    return out


def receiver(spec_path: str, rank: int) -> None:
    """A receiver process: join the group, run every raw phase, exit."""
    from megatron_rl.rollout.weight_sync import open_update_group

    spec = json.loads(Path(spec_path).read_text())
    pg, _store = open_update_group("127.0.0.1", spec["port"], rank, spec["world"],
                                   spec["name"], TIMEOUT_S)
    for _ in range(spec["phases"]):
        _raw_phase(pg, None, None, spec)


class RawSender:
    """Rank 0 of a raw group with N receiver processes."""

    def __init__(self, tensors: list[torch.Tensor], n: int, phases: int, repeats: int,
                 tmp: Path) -> None:
        from megatron_rl.rollout.weight_sync import open_update_group

        self.tensors = tensors
        numel = sum(t.numel() * t.element_size() for t in tensors) // 4
        self.flat = [torch.ones(numel)]
        self.spec = {"port": _free_port(), "world": n + 1, "phases": phases, "repeats": repeats,
                     "shapes": [list(t.shape) for t in tensors], "flat_numel": numel,
                     "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
                     "name": f"raw_bench_{n}"}
        path = tmp / f"raw_spec_{n}.json"
        path.write_text(json.dumps(self.spec))
        self.procs = [subprocess.Popen([sys.executable, __file__, "--receive", str(path),
                                        str(r)], cwd=ROOT, env=_env())
                      for r in range(1, n + 1)]
        self.pg, self.store = open_update_group("127.0.0.1", self.spec["port"], 0, n + 1,
                                                self.spec["name"], TIMEOUT_S)
        self.times: dict[str, list[float]] = {"tensors": [], "flat": []}

    def phase(self) -> None:
        for k, v in _raw_phase(self.pg, self.tensors, self.flat, self.spec).items():
            self.times[k] += v

    def close(self) -> None:
        for p in self.procs:
            p.wait(timeout=60)
        self.pg = self.store = None


# -- the actor's process --------------------------------------------------------------------------

def worker(fields: dict, urls: list[str], ns: list[int], buckets_mb: list[float], repeats: int,
           tmp: str) -> dict:
    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.config import ActorConfig, ModelConfig, ParallelConfig
    from megatron_rl.actor.parallel import init_distributed
    from megatron_rl.config import read_yaml
    from megatron_rl.rollout.sglang_engine import SGLangEngine
    from megatron_rl.rollout.transformers_engine import TransformersEngine
    from megatron_rl.rollout.weight_sync import WeightSync, sync_weights

    model_cfg = ModelConfig(**(read_yaml(ROOT / CONFIG)["model"] | fields))
    par = ParallelConfig(timeout_s=120, dp=None)
    init_distributed(par, seed=1)
    actor = Actor(model_cfg, par, ActorConfig(seq_length=64, micro_batch_size=1))
    tensors = [t.detach().contiguous().clone()
               for b in actor.hf_buckets(actor.arch, 2**40) for _, t in b]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    res: dict = {"bytes": nbytes, "tensors": len(tensors), "dist": {}, "raw": {},
                 "memcpy": memcpy_gb_s(max(nbytes, 2**20))}

    for n in ns:
        engines = [SGLangEngine(u, timeout_s=120, max_retries=0) for u in urls[:n]]
        raw = RawSender(tensors, n, len(buckets_mb) + 1, repeats, Path(tmp))
        for mb in buckets_mb:
            raw.phase()
            ws = WeightSync(actor, "distributed", int(mb * 2**20), in_process=False,
                            timeout_s=120)
            reports = [ws.sync(engines) for _ in range(repeats + 1)][1:]
            ws.close()
            res["dist"][(n, mb)] = {"seconds": [r.seconds for r in reports],
                                    "bytes": reports[0].bytes, "buckets": reports[0].buckets}
        raw.phase()
        raw.close()
        res["raw"][n] = raw.times

    # breakdown: export alone, apply alone, export + apply in-process, one HTTP round trip
    engine = TransformersEngine.from_model_config(model_cfg)
    named = [(n, t) for b in actor.hf_buckets(actor.arch, 2**40) for n, t in b]
    prof: dict = {"apply": [], "rtt": []}
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        engine.update_weights_from_tensor(named)
        prof["apply"].append(time.perf_counter() - t0)
    client = SGLangEngine(urls[0], timeout_s=30, max_retries=0)
    for _ in range(20):
        t0 = time.perf_counter()
        client.request("/get_server_info", method="GET")
        prof["rtt"].append(time.perf_counter() - t0)
    for mb in buckets_mb:
        export, inproc = [], []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            for b in actor.hf_buckets(actor.arch, int(mb * 2**20)):
                [t.contiguous() for _, t in b]
            export.append(time.perf_counter() - t0)
            inproc.append(sync_weights(actor, [engine], int(mb * 2**20)).seconds)
        prof[mb] = {"export": export[1:], "inproc": inproc[1:]}
    prof["apply"], prof["rtt"] = prof["apply"][1:], prof["rtt"][1:]
    res["prof"] = prof
    return res


# -- servers and report ---------------------------------------------------------------------------

def _server(sets: list[str]) -> ServeProcess:
    """A `megatron-rl serve --config` process of the scaled model (random weights)."""
    return ServeProcess(["--config", CONFIG, "--port", "0",
                         *[a for s in sets for a in ("--set", s)]], ROOT, _env())


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def report(res: dict, ns: list[int], buckets_mb: list[float], md: bool) -> None:
    def table(head: str, rows: list[list]) -> None:
        print(head if md else head.replace("|", " "))
        if md:
            print("|" + "|".join("--:" for _ in range(head.count("|") - 1)) + "|")
        for r in rows:
            print("| " + " | ".join(str(x) for x in r) + " |")
        print()

    nbytes = res["bytes"]
    mb = nbytes / 2**20
    print(f"model: {mib(nbytes)} MiB fp32 in {res['tensors']} HF tensors; memcpy "
          f"{res['memcpy']:.2f} GB/s (buffer of the model's size); GB/s = {mb:.1f} MiB "
          "(bytes each engine receives) / median seconds\n")
    rows = []
    for n in ns:
        raw_t, raw_f = _med(res["raw"][n]["tensors"]), _med(res["raw"][n]["flat"])
        for b in buckets_mb:
            d = res["dist"][(n, b)]
            sec = _med(d["seconds"])
            rows.append([n, f"{b:g}", d["buckets"], f"{sec:.3f}", f"{d['bytes'] / sec / 1e9:.2f}",
                         f"{raw_t:.3f}", f"{nbytes / raw_t / 1e9:.2f}",
                         f"{nbytes / raw_f / 1e9:.2f}", f"{raw_t / sec:.2f}"])
    table("| engines | bucket MiB | buckets | (a) distributed s | (a) GB/s | (b) raw s | "
          "(b) raw GB/s | (b) flat GB/s | ratio (a)/(b) |", rows)
    p = res["prof"]
    rtt = _med(p["rtt"])
    rows = []
    for b in buckets_mb:
        nb = res["dist"][(ns[0], b)]["buckets"]
        rows.append([f"{b:g}", nb, f"{_med(p[b]['export']):.3f}", f"{_med(p['apply']):.3f}",
                     f"{_med(p[b]['inproc']):.3f}", f"{rtt * 1e3:.1f}",
                     f"{_med(res['raw'][ns[0]]['tensors']):.3f}",
                     f"{_med(res['dist'][(ns[0], b)]['seconds']):.3f}"])
    table(f"| bucket MiB | buckets | export s | apply s | export+apply in-process s | "
          f"HTTP RTT ms | raw bcast s (N={ns[0]}) | (a) s (N={ns[0]}) |", rows)


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--receive":
        receiver(sys.argv[2], int(sys.argv[3]))
        return
    from megatron_rl.launch.spawn import run_ranks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--engines", default="1,2", help="engine counts N")
    ap.add_argument("--buckets-mb", default="16,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    ns = [int(x) for x in args.engines.split(",")]
    buckets = [float(x) for x in args.buckets_mb.split(",")]
    load0 = os.getloadavg()[0]
    start = time.time()
    fields = model_fields(args.hidden, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        sets = config_sets(fields, Path(tmp))
        from megatron_rl.config import load_config
        from megatron_rl.data import tokenizer_dir

        cfg = load_config(CONFIG, sets)  # train the demo tokenizer once, before the servers
        tokenizer_dir(cfg.data, cfg.model.vocab_size)
        servers = [_server(sets) for _ in range(max(ns))]
        try:
            urls = [s.url() for s in servers]
            res = run_ranks(worker, 1, fields, urls, ns, buckets, args.repeats, tmp,
                            timeout_s=900)[0]
        finally:
            for s in servers:
                s.stop()
    print(f"hidden {args.hidden}, {args.layers} layers, vocab 8192, 8 experts; load average "
          f"{load0:.2f} at start, {os.getloadavg()[0]:.2f} at end; {time.time() - start:.0f} s; "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    report(res, ns, buckets, args.markdown)


if __name__ == "__main__":
    main()
