"""CPU threads beside other work: the demo's pre-training timed alone and beside one busy
process, with OpenMP's idle threads spinning (OMP_WAIT_POLICY=ACTIVE, GNU OpenMP's habit) and
sleeping (PASSIVE, what `megatron_rl` sets unless the user chose). Each cell is a fresh process
running `pretrain` for `--steps` steps of `configs/demo_cpu.yaml` with torch's default thread
count; the busy neighbour is one Python loop. Prints a markdown table with the load average;
asserts nothing.

    .venv/bin/python benchmarks/threads.py [--steps 30]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CELL = r"""
import json, sys, time
from megatron_rl.config import load_config
from megatron_rl.data import build_dataset, build_tokenizer
from megatron_rl.pretrain import pretrain
import dataclasses, torch
cfg = load_config("configs/demo_cpu.yaml", [], world_size=1)
train = build_dataset(cfg.data, "train")
tok = build_tokenizer(cfg.data, cfg.model.vocab_size, train)
pre = dataclasses.replace(cfg.pretrain, steps=int(sys.argv[1]), mixed_steps=0)
pretrain(cfg.model, dataclasses.replace(pre, steps=3), train.records, tok,
         cfg.data.chat_template, log=lambda *_: None)  # warm-up
t = time.perf_counter()
pretrain(cfg.model, pre, train.records, tok, cfg.data.chat_template, log=lambda *_: None)
print(json.dumps({"s_per_step": (time.perf_counter() - t) / pre.steps,
                  "threads": torch.get_num_threads()}))
"""


def cell(policy: str, busy: bool, steps: int) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    env.pop("OMP_NUM_THREADS", None)  # torch's default: one thread per core
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        time.sleep(0.5 if busy else 0.0)
        r = subprocess.run([sys.executable, "-c", CELL, str(steps)], cwd=ROOT, env=env,
                           capture_output=True, text=True, check=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    print(f"{os.cpu_count()} cores, load average before {os.getloadavg()[0]:.2f}")
    print("| OMP_WAIT_POLICY | neighbour | threads | s/step | slowdown |\n|---|---|--:|--:|--:|")
    for policy in ("ACTIVE", "PASSIVE"):
        alone = cell(policy, False, args.steps)
        beside = cell(policy, True, args.steps)
        for name, r in (("none", alone), ("one busy process", beside)):
            print(f"| {policy} | {name} | {r['threads']} | {r['s_per_step']:.3f} | "
                  f"{r['s_per_step'] / alone['s_per_step']:.2f}x |", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
