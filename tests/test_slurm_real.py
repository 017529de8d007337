"""`megatron-rl submit` against a real one-node Slurm (scripts/slurm_up.sh; docs/design.md
section 7).

A tiny CPU run is submitted; once it has saved a checkpoint it is requeued with `scontrol
requeue` (SIGTERM to the job: the trainer ranks save, Slurm puts the job back in the queue); it
restarts, resumes from its checkpoint, then gets SIGUSR1 the way `--signal=B:USR1@N` sends it
(`scancel --batch --signal=USR1`: to the batch shell, which passes it to the trainer ranks),
saves, exits 0 and requeues itself; it resumes again and finishes. The daemons this test
started are stopped by PID afterwards.
Skipped where Slurm cannot be brought up (not root, or no Slurm and no apt-get).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("SLURM_STATE_DIR", "/run/megatron-rl-slurm"))
STEPS = 30
"""Enough that each signal, sent a step after a checkpoint, lands well before the run ends (a
tiny step takes about half a second)."""


def _can_bring_up() -> str | None:
    """Why Slurm cannot be brought up here, or None."""
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root to install and start Slurm (scripts/slurm_up.sh)"
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        return "Slurm is not installed and apt-get is not available"
    return None


pytestmark = pytest.mark.skipif(_can_bring_up() is not None, reason=str(_can_bring_up()))


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A running one-node cluster; stopped by PID afterwards if this fixture started it."""
    ours = not (STATE / "pids").exists()
    up = subprocess.run(["bash", str(ROOT / "scripts/slurm_up.sh")], capture_output=True,
                        text=True, timeout=300)
    try:
        if up.returncode != 0 and "apt-get" in up.stderr:
            pytest.skip(f"Slurm cannot be installed here: {up.stderr.strip()}")
        assert up.returncode == 0, f"slurm_up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield
    finally:
        if ours:
            down = subprocess.run(["bash", str(ROOT / "scripts/slurm_down.sh")],
                                  capture_output=True, text=True, timeout=60)
            assert down.returncode == 0, down.stderr


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout


def wait_for(what: str, cond: Callable[[], bool], timeout_s: float, log: Path) -> None:
    """Poll `cond` every second; fail naming `what` and the job's log on timeout."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log.is_file() else "(no log)"
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; log:\n{tail}")
        time.sleep(1)


def _state(job: str) -> str:
    """The job's state in the queue ('' once it has left it)."""
    return _sh("squeue", "-h", "-j", job, "-o", "%T").strip()


def _has_step(ckpt: Path, n: int) -> bool:
    return (ckpt / f"step_{n}" / "trainer_state.pt").is_file()


def test_submit_requeue_resume_finish(cluster: None, tmp_path: Path) -> None:
    name = f"slurm-test-{os.getpid()}"
    sets = [
        f"slurm.job_name={name}", f"slurm.run_dir={tmp_path}", f"slurm.log_dir={tmp_path}/logs",
        f"slurm.venv={ROOT}/.venv", "slurm.env={OMP_NUM_THREADS: '1'}", "slurm.signal_lead_s=60",
        f"train.steps={STEPS}", "checkpoint.save_interval=1", "checkpoint.keep_last=0",
        "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=12", "actor.seq_length=128", "actor.micro_batch_size=4",
        "data.train_size=100", "data.eval_size=10", "eval.size=0", "rewards.num_workers=1",
        "algorithm.dynamic_sampling=false", f"data.tokenizer_cache={tmp_path}/tok",
        "logging.tensorboard=false", "logging.plot=false",
    ]
    argv = [sys.executable, "-m", "megatron_rl", "submit", "configs/tiny_moe_cpu.yaml"]
    for s in sets:
        argv += ["--set", s]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    assert re.fullmatch(r"\d+", job), out.stdout
    log = tmp_path / "logs" / f"{name}-{job}.out"
    ckpt = tmp_path / name / "checkpoints"
    try:
        # 1. Runs and checkpoints; `scontrol requeue` (SIGTERM) sends it back to the queue.
        wait_for("the first checkpoint", lambda: _has_step(ckpt, 2), 240, log)
        _sh("scontrol", "requeue", job)
        wait_for("the restart to resume", lambda: "resumed from" in log.read_text(), 150, log)
        text = log.read_text()
        first = int(re.search(r"resumed from \S+ at step (\d+)", text).group(1))
        assert first >= 2
        # SIGTERM reached every process of the step, yet the trainer saved and the restart
        # resumed from that save (its helpers, the checkpoint writer's manager and the reward
        # worker, ignore it)
        saved = re.search(r"stop signal received: saved step (\d+)", text)
        assert saved and int(saved.group(1)) == first, text
        # 2. SIGUSR1 to the batch shell, as --signal=B:USR1@N sends it: the ranks save and
        # exit 0, the script requeues the job.
        wait_for("a step after the resume", lambda: _has_step(ckpt, first + 1), 120, log)
        _sh("scancel", "--batch", "--signal=USR1", job)
        wait_for("the second resume", lambda: log.read_text().count("resumed from") >= 2, 150,
                 log)
        text = log.read_text()
        assert "[submit] stopped at step" in text and text.count("stop signal received") >= 2, text
        second = int(re.findall(r"resumed from \S+ at step (\d+)", text)[-1])
        assert second > first
        # 3. Finishes: out of the queue, COMPLETED in the job-completion log, all steps logged.
        wait_for("the job to finish", lambda: _state(job) == "", 240, log)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    text = log.read_text()
    assert f"[submit] finished {STEPS} steps" in text, text[-3000:]
    states = re.findall(rf"^{job}\s.*?\s(COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|REQUEUED)\b",
                        _sh("sacct", "-c", "-j", job, "-n", "-o", "JobID,State"), re.M)
    assert states and states[-1] == "COMPLETED", states
    rows = [json.loads(ln) for ln in (tmp_path / name / "run" / "metrics.jsonl").read_text()
            .splitlines() if ln.strip()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert (ckpt / "latest").read_text().strip() == f"step_{STEPS}"
