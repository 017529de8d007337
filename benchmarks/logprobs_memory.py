"""Peak memory of per-token log-probs: the chunked kernel path vs naive log_softmax + gather.

Each variant runs in a fresh process on bf16 logits [tokens, vocab] (temperature 0.7): the
extra memory is the process's peak RSS (ru_maxrss) minus its RSS once the inputs exist, so it
counts every temporary the variant allocates (fp32 copies, the log-softmax output, gradients).
`fwd+bwd` includes the logits' gradient (tokens x vocab in bf16), which both paths must write.
Prints one markdown table. Measurements, not assertions.

    .venv/bin/python benchmarks/logprobs_memory.py --tokens 4096 --vocab 152064
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(variant: str, tokens: int, vocab: int) -> dict:
    import torch

    from megatron_rl.kernels.logprobs import logprobs_and_entropy

    torch.manual_seed(0)
    x = torch.randn(tokens, vocab, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (tokens,))
    backward = variant.endswith("fwd+bwd")
    if backward:
        x.requires_grad_()
    base = _rss_mb()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    with torch.set_grad_enabled(backward):
        if variant.startswith("naive"):
            lp = torch.log_softmax(x.float() / 0.7, -1).gather(-1, labels[:, None])[:, 0]
        else:
            lp, _ = logprobs_and_entropy(x, labels, temperature=0.7, backend="torch")
        if backward:
            lp.sum().backward()
    sec = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "extra_mb": peak - max(base, peak0) if peak > peak0 else 0.0,
            "inputs_mb": base, "seconds": sec}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.tokens, a.vocab)))
        return
    rows = []
    for variant in ("naive fwd", "chunked fwd", "naive fwd+bwd", "chunked fwd+bwd"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--tokens",
                              str(a.tokens), "--vocab", str(a.vocab)], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    logits_mb = a.tokens * a.vocab * 2 / 2**20
    print(f"tokens x vocab = {a.tokens} x {a.vocab}, bf16 logits {logits_mb:,.0f} MiB, "
          f"{os.cpu_count()} CPU cores, torch kernel path\n")
    print("| variant | extra peak RSS MiB | x logits size | seconds | ratio naive / chunked |")
    print("|---|--:|--:|--:|--:|")
    by = {r["variant"]: r for r in rows}
    for r in rows:
        kind = r["variant"].split()[1]
        ratio = by[f"naive {kind}"]["extra_mb"] / max(by[f"chunked {kind}"]["extra_mb"], 1e-9)
        print(f"| {r['variant']} | {r['extra_mb']:,.0f} | {r['extra_mb'] / logits_mb:.2f} | "
              f"{r['seconds']:.2f} | {ratio:.1f} |" if r["variant"].startswith("naive") else
              f"| {r['variant']} | {r['extra_mb']:,.0f} | {r['extra_mb'] / logits_mb:.2f} | "
              f"{r['seconds']:.2f} | |")


if __name__ == "__main__":
    main()
