"""DAPO's ablation (Yu et al. 2025, Table 1) rerun on the embedded default's task.

Each row adds one of DAPO's fixes to the previous row, as the paper's table does:

    naive GRPO -> + overlong filtering -> + clip-higher -> + soft overlong punishment
               -> + token-level loss -> + dynamic sampling (= DAPO)

Every row trains the same cached base model (the `pretrain` section) for `--steps` RL steps with
several seeds, evaluating on the held-out set every `--eval-every` steps, and the table gives the
final held-out accuracy (mean and spread over seeds) and the steps until held-out accuracy first
reaches `--target`. All rows have no KL term, so only the four fixes differ (the paper's naive
GRPO keeps the KL term; DAPO drops it). Each step is split into `--mini-batches` optimizer updates
against the same old log-probs, as DAPO's training does: with one update per step the ratio is
exactly 1 and clip-higher cannot change anything. Results and what they show:
benchmarks/README.md.

The task is the demo's chain sums (2 to 4 one-digit terms): a worked response is 20 to 41
tokens, a guess about 12, and a policy that loops or rambles runs into `--max-new-tokens`
(default 56, so the soft punishment starts at 42 tokens, just past the longest worked answer), so
overlong shaping has something to act on; two-term chains saturate (all 8 samples right) and
four-term ones often fail together, so dynamic sampling has groups to drop.

    python benchmarks/ablation.py                 # 6 rows x 3 seeds x 40 steps, 2 runs at once
    python benchmarks/ablation.py --seeds 1 2 --steps 20 --set actor.lr=3e-4

Each run is a `megatron-rl train` subprocess; its outputs stay under `--out` (one directory per
row and seed, with metrics.jsonl and learning_curve.png) and the table is also written there as
`ablation.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ROWS: list[tuple[str, dict[str, str]]] = [
    ("naive GRPO", {"algorithm.preset": "grpo", "algorithm.kl_coef": "0",
                    "algorithm.eps_high": "0.2", "algorithm.loss_agg": "seq_mean_token_mean",
                    "algorithm.overlong_filter": "false", "algorithm.overlong_penalty": "false",
                    "algorithm.dynamic_sampling": "false"}),
    ("+ overlong filtering", {"algorithm.overlong_filter": "true"}),
    ("+ clip-higher", {"algorithm.eps_high": "0.28"}),
    ("+ soft overlong punishment", {"algorithm.overlong_penalty": "true"}),
    ("+ token-level loss", {"algorithm.loss_agg": "token_mean"}),
    ("+ dynamic sampling (DAPO)", {"algorithm.dynamic_sampling": "true"}),
]
"""Cumulative: each row is the previous row's overrides plus its own."""


def cumulative_rows() -> list[tuple[str, dict[str, str]]]:
    """(row name, all overrides of that row)."""
    out, acc = [], {}
    for name, extra in ROWS:
        acc = {**acc, **extra}
        out.append((name, dict(acc)))
    return out


def run_one(config: str, overrides: dict[str, str], out: Path, threads: int) -> dict:
    """One `megatron-rl train` run on `threads` CPU threads; returns its eval curve, train
    accuracy curve and lengths."""
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    sets += ["--set", f"train.output_dir={out}", "--set", f"logging.log_dir={out / 'tb'}",
             "--set", f"checkpoint.dir={out / 'ck'}", "--set", "checkpoint.keep_last=1"]
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "megatron_rl", "train", config, *sets],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    (out / "train.log").parent.mkdir(parents=True, exist_ok=True)
    (out / "train.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({out / 'train.log'}): {proc.stderr.strip()[-800:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    evals[0] = json.loads((out / "eval" / "before.json").read_text())["eval/accuracy"]
    return {"eval": dict(sorted(evals.items())),
            "train_accuracy": [r.get("accuracy", float("nan")) for r in rows],
            "response_length": statistics.fmean(r.get("response_length/mean", 0.0)
                                                for r in rows),
            "clip_ratio": statistics.fmean(r.get("response_length/clip_ratio", 0.0)
                                           for r in rows),
            "seconds": time.perf_counter() - start}


def steps_to(evals: dict[int, float], target: float) -> int | None:
    """First evaluated step whose held-out accuracy reaches `target`, or None."""
    return next((s for s, a in evals.items() if a >= target), None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo_cpu.yaml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-size", type=int, default=128,
                   help="eval candidates (those also in train are dropped)")
    p.add_argument("--max-new-tokens", type=int, default=56)
    p.add_argument("--mini-batches", type=int, default=4,
                   help="optimizer steps per RL step (algorithm.mini_batches): with 1 every "
                        "update is on-policy, the ratio is 1 and clip-higher cannot act")
    p.add_argument("--target", type=float, default=0.45, help="held-out accuracy to reach")
    p.add_argument("--jobs", type=int, default=2,
                   help="runs at once, each on cpu_count / jobs threads (one thread each is "
                        "about as fast per run as two on this 2-core box)")
    p.add_argument("--out", default="outputs/ablation")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--table-only", action="store_true",
                   help="print the table of <out>/ablation.json again (e.g. with another "
                        "--target) without running anything")
    args = p.parse_args()
    if args.table_only:
        saved = json.loads((Path(args.out) / "ablation.json").read_text())
        print_table(saved["rows"], {**saved["args"], "target": args.target})
        return 0

    common = {"train.steps": str(args.steps), "train.eval_interval": str(args.eval_every),
              "eval.size": str(args.eval_size), "eval.n_samples": "4", "eval.k": "[1, 4]",
              "rollout.max_new_tokens": str(args.max_new_tokens),
              "algorithm.mini_batches": str(args.mini_batches)}
    common.update(kv.split("=", 1) for kv in args.extra)
    runs = [(name, ov, seed) for name, ov in cumulative_rows() for seed in args.seeds]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    done = 0

    def one(run: tuple[str, dict[str, str], int]) -> dict:
        nonlocal done
        name, ov, seed = run
        out = Path(args.out) / f"row{[n for n, _ in ROWS].index(name)}-seed{seed}"
        res = run_one(args.config, {**common, **ov, "train.seed": str(seed)}, out, threads)
        done += 1
        final = res["eval"][max(res["eval"])]
        print(f"[{done}/{len(runs)}] {name:<28} seed {seed}: held-out accuracy "
              f"{res['eval'][0]:.3f} -> {final:.3f} ({res['seconds']:.0f} s)", flush=True)
        return res

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        finished = list(pool.map(one, runs))
    results: dict[str, list[dict]] = {}
    for (name, _, _), res in zip(runs, finished, strict=True):
        results.setdefault(name, []).append(res)

    rows = [{"row": name, "eval_curves": [r["eval"] for r in res],
             "response_length": statistics.fmean(r["response_length"] for r in res),
             "clip_ratio": statistics.fmean(r["clip_ratio"] for r in res)}
            for name, res in results.items()]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ablation.json").write_text(json.dumps(
        {"args": vars(args), "rows": rows}, indent=1))
    print_table(rows, vars(args))
    return 0


def print_table(rows: list[dict], args: dict) -> None:
    """The ablation table: final held-out accuracy, its mean over the evaluations after step 0
    (less noisy than one point), and the steps until it first reaches the target."""
    target = args["target"]
    print(f"\nDAPO ablation on {args['config']} (chain_sum, {args['steps']} steps of "
          f"{args.get('mini_batches', 1)} updates, seeds {args['seeds']}, max_new_tokens "
          f"{args['max_new_tokens']}, target {target:.0%})")
    reach_head = f"steps to {target:.0%}"
    head = (f"| {'row':<28} | final acc (mean ± sd) | mean acc, steps > 0 | {reach_head:<14} "
            "| mean len | clipped |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for row in rows:
        curves = [{int(k): v for k, v in c.items()} for c in row["eval_curves"]]
        finals = [c[max(c)] for c in curves]
        means = [statistics.fmean(v for k, v in c.items() if k > 0) for c in curves]
        reach = [steps_to(dict(sorted(c.items())), target) for c in curves]
        reached = [x for x in reach if x is not None]
        reach_txt = (f"{statistics.median(reached):.0f} ({len(reached)}/{len(curves)} seeds)"
                     if reached else f"never (0/{len(curves)})")
        sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
        msd = statistics.stdev(means) if len(means) > 1 else 0.0
        print(f"| {row['row']:<28} | {statistics.fmean(finals):.3f} ± {sd:.3f}        | "
              f"{statistics.fmean(means):.3f} ± {msd:.3f}       | {reach_txt:<14} | "
              f"{row['response_length']:8.1f} | {row['clip_ratio']:7.3f} |")


if __name__ == "__main__":
    sys.exit(main())
