"""`megatron-rl train` end to end on a shrunken embedded default: base model, eval before,
RL, eval after, the summary, the logs, `--resume`, and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    sets = {
        "pretrain.steps": 40, "pretrain.batch_size": 8, "pretrain.warmup_steps": 5,
        "pretrain.cache_dir": tmp_path / "base", "data.tokenizer_cache": tmp_path / "tok",
        "data.train_size": 300, "eval.size": 4, "eval.n_samples": 2, "eval.k": "[1, 2]",
        "rollout.prompts_per_step": 2, "rollout.n_samples_per_prompt": 4,
        "rollout.max_new_tokens": 24, "algorithm.dynamic_sampling": "false",
        "train.steps": 2, "train.output_dir": tmp_path / "run",
        "logging.log_dir": tmp_path / "tb", "checkpoint.dir": tmp_path / "ck",
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE",
                                                             "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "megatron_rl", "train", "configs/demo_cpu.yaml",
                           *args, *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_train_command_runs_the_demo_flow_and_resumes(tmp_path: Path) -> None:
    proc = _train(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "base model: pre-training 40 steps" in out
    assert "held-out accuracy before RL:" in out
    assert "accuracy " in out and " points); curves:" in out  # the before/after summary
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # Steps 1 and 2, and the held-out evals before (step 0) and after (step 2) as rows of their
    # own, so the learning curve's accuracy panel shows them.
    assert [r["step"] for r in rows] == [0, 1, 2, 2]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2]
    assert (run / "learning_curve.png").stat().st_size > 0
    assert any((tmp_path / "tb").rglob("events.out.tfevents.*"))
    before = json.loads((run / "eval" / "before.json").read_text())
    assert set(before) >= {"eval/accuracy", "eval/pass@1", "eval/pass@2", "eval/cons@2"}
    assert (run / "eval" / "step_0.jsonl").is_file() and (run / "eval" / "step_2.jsonl").is_file()
    assert (tmp_path / "ck" / "step_2").is_dir()

    # A second run finds the base model cached and, with --resume and two more steps, continues
    # from step 2 and still reports the first run's "before" accuracy.
    again = _train(tmp_path, "--resume", "--set", "train.steps=4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "base model: cached at" in again.stdout
    assert f"resumed from {tmp_path / 'ck' / 'step_2'} at step 2" in again.stdout
    assert "held-out accuracy before RL" not in again.stdout
    assert f"{before['eval/accuracy']:9.3f}" in again.stdout
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 2, 3, 4, 4]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2, 4]


def test_config_errors_are_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "megatron_rl", "train", "--set",
                           "pretrain.step_accuracy=2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("megatron-rl train:") and "step_accuracy" in lines[-1]
    missing = subprocess.run([sys.executable, "-m", "megatron_rl", "train",
                              str(tmp_path / "nope.yaml")], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 1 and "nope.yaml" in missing.stderr.strip().splitlines()[-1]
