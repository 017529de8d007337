"""Golden curve (torchtitan's habit): a few RL steps of the tiny config with fixed seeds, the
per-step reward, loss and friends compared with a checked-in reference, so a change that alters
what the trainer learns (advantages, loss, clipping, shaping, sampling, weight sync) fails here.

The run: `configs/tiny_moe_cpu.yaml` (DAPO preset: clip-higher, token-mean loss, dynamic
sampling, soft overlong punishment), two reward columns (the task's accuracy and a length
reward, weight 0.5), two optimizer updates per step so the clip acts, 6 steps from the seeded
random init.

Tolerances: what depends only on the sampled tokens (rewards, lengths, accuracy) must match to
1e-6; loss, gradient norm, entropy and clip fractions to a relative 1e-3 (fp32 sums may reduce
in another order on another CPU). A deliberate change of the curve is recorded with

    .venv/bin/python tests/test_golden_curve.py --update

and the new `tests/golden/tiny_dapo.json` is committed with the change that explains it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from megatron_rl.launch.spawn import run_ranks

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "tiny_dapo.json"
STEPS = 6
EXACT = ("reward/mean", "reward/reasoning_gym", "reward/length", "accuracy",
         "response_length/mean", "dynamic_sampling/keep_ratio")
CLOSE = ("actor/loss", "actor/grad_norm", "actor/entropy", "actor/clip_frac_high",
         "actor/clip_frac_low", "actor/approx_kl")


def curve_worker(out: str) -> list[dict[str, float]]:
    from megatron_rl.config import load_config
    from megatron_rl.trainer import Trainer

    cfg = load_config(str(ROOT / "configs" / "tiny_moe_cpu.yaml"), [
        "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=16", "actor.seq_length=160", "actor.micro_batch_size=4",
        "algorithm.mini_batches=2", "algorithm.max_gen_batches=2",
        "rewards.functions=[{name: reasoning_gym, weight: 1.0}, "
        "{name: length, weight: 0.5, kwargs: {max_len: 64}}]",
        "data.train_size=200", "data.eval_size=20", "eval.size=0", "rewards.num_workers=0",
        f"data.tokenizer_cache={out}/tok", f"train.output_dir={out}/run",
        f"checkpoint.dir={out}/ckpt", "logging.tensorboard=false", "train.seed=1234",
    ], world_size=1)
    history = Trainer(cfg).run(steps=STEPS)
    return [{k: m[k] for k in EXACT + CLOSE} for m in history]


def run_curve(out: str) -> list[dict[str, float]]:
    return run_ranks(curve_worker, 1, out, timeout_s=600)[0]


def test_golden_curve(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    curve = run_curve(str(tmp_path))
    assert len(curve) == len(golden["steps"]) == STEPS
    for step, (got, want) in enumerate(zip(curve, golden["steps"], strict=True), start=1):
        for key in EXACT:
            assert got[key] == pytest.approx(want[key], abs=1e-6), (step, key, got[key])
        for key in CLOSE:
            assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-6), \
                (step, key, got[key], want[key])
    # Not a flat line: the curve moves, so the comparison can catch a change in learning.
    assert len({round(m["actor/loss"], 6) for m in curve}) > 1


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit("usage: tests/test_golden_curve.py --update   (rewrites the golden curve)")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        steps = run_curve(tmp)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({"config": "configs/tiny_moe_cpu.yaml (see curve_worker)",
                                  "steps": steps}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
