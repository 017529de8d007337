"""Generated tokens/s of the embedded `TransformersEngine` vs plain `transformers.generate` on the
same model and batch (a measurement only; no test asserts it).

Both sample (temperature 1, no top-k/top-p) B left-padded prompts of mixed lengths to exactly
`--new` tokens (the model has no EOS, so no row stops early) with a KV cache. The engine also
computes per-token log-probs; `generate` is asked for nothing but ids. A second engine row
captures routed experts too (`return_routed_experts=True`).

    .venv/bin/python benchmarks/rollout.py [--batch 64] [--new 48] [--markdown]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from megatron_rl.actor.config import ModelConfig  # noqa: E402
from megatron_rl.config import read_yaml  # noqa: E402
from megatron_rl.rollout.transformers_engine import TransformersEngine  # noqa: E402
from megatron_rl.rollout.types import SamplingParams  # noqa: E402

SIZES = {"tiny (configs/tiny_moe_cpu.yaml)": {},
         "hidden 256, 4 layers": dict(hidden_size=256, num_layers=4, ffn_hidden_size=1024,
                                      moe_ffn_hidden_size=256, num_attention_heads=8,
                                      num_query_groups=4)}


def _prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (8 + i % 17,), generator=g).tolist() for i in range(batch)]


def _hf_generate(model, prompts: list[list[int]], new: int) -> int:
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p):] = torch.tensor(p)
        mask[r, longest - len(p):] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                             pad_token_id=0)
    return (out.shape[1] - longest) * len(prompts)


def _time(fn, repeats: int) -> tuple[float, int]:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    base = read_yaml(ROOT / "configs/tiny_moe_cpu.yaml")["model"]
    print("| model | engine | batch | new tokens | seconds | tokens/s |")
    print("|---|---|--:|--:|--:|--:|")
    for label, extra in SIZES.items():
        engine = TransformersEngine.from_model_config(ModelConfig(**(base | extra)))
        engine.model.generation_config.eos_token_id = None
        _measure(label, engine, _prompts(args.batch, engine.model.config.vocab_size), args)


def _measure(label: str, engine: TransformersEngine, prompts: list[list[int]], args) -> None:
    sp = SamplingParams(max_new_tokens=args.new, seed=0)

    def ours(capture: bool = False) -> int:
        outs = engine.generate(input_ids=prompts, sampling_params=sp,
                               return_routed_experts=capture)
        return sum(len(o.output_ids) for g in outs for o in g)

    rows = [("transformers.generate", lambda: _hf_generate(engine.model, prompts, args.new)),
            ("TransformersEngine", ours),
            ("TransformersEngine + routed experts", lambda: ours(True))]
    for name, fn in rows:
        seconds, tokens = _time(fn, args.repeats)
        print(f"| {label} | {name} | {len(prompts)} | {tokens} | {seconds:.2f} | "
              f"{tokens / seconds:.0f} |")

if __name__ == "__main__":
    main()
