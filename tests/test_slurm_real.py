"""`megatron-rl submit` against a real one-node Slurm (scripts/slurm_up.sh; docs/design.md
section 7).

A tiny CPU run is submitted; once it has saved a checkpoint it is requeued with `scontrol
requeue` (SIGTERM to the job: the trainer ranks save, Slurm puts the job back in the queue); it
restarts, resumes from its checkpoint, then gets SIGUSR1 the way `--signal=B:USR1@N` sends it
(`scancel --batch --signal=USR1`: to the batch shell, which passes it to the trainer ranks),
saves, exits 0 and requeues itself; it resumes again and finishes. The rehearsals of the
flagship configs (`megatron-rl submit CONFIG --rehearse`: the model shrunk, 4 CPU ranks, engine
servers started by the script) finish with the engines' log-probs equal to the actor's after
every weight sync; one is stopped by SIGUSR1 and resumes. The daemons this module started are
stopped by PID afterwards.
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
STEPS = 12
"""Enough that the requeue, sent after the step-2 checkpoint, lands well before the run ends (a
tiny step takes about half a second)."""
PARITY = 1e-3
"""Bound on |actor - engine| token log-prob after a sync (fp32): measured ~1e-6 here, while an
engine a step behind differs by ~0.1."""


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


def submit(config: str, sets: list[str], *flags: str) -> tuple[str, str]:
    """`megatron-rl submit CONFIG [flags] --set ...` -> (job id, its stderr)."""
    argv = [sys.executable, "-m", "megatron_rl", "submit", config, *flags]
    for s in sets:
        argv += ["--set", s]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    assert re.fullmatch(r"\d+", job), out.stdout
    return job, out.stderr


def _job_sets(name: str, tmp_path: Path) -> list[str]:
    """Overrides that key a job's files under `tmp_path`."""
    return [f"slurm.job_name={name}", f"slurm.run_dir={tmp_path}",
            f"slurm.log_dir={tmp_path}/logs", f"slurm.venv={ROOT}/.venv",
            f"data.tokenizer_cache={tmp_path}/tok"]


def stop_with_usr1(job: str, ckpt: Path, after_step: int, log: Path, timeout_s: float) -> int:
    """Once `step_<after_step>` is saved, SIGUSR1 to the batch shell (as --signal=B:USR1@N
    sends it): the ranks save and exit 0, the script requeues the job; return the step the
    restart resumed from."""
    wait_for(f"checkpoint step_{after_step}", lambda: _has_step(ckpt, after_step), timeout_s,
             log)
    before = log.read_text().count("resumed from")
    _sh("scancel", "--batch", "--signal=USR1", job)
    wait_for("the resume after SIGUSR1",
             lambda: log.read_text().count("resumed from") > before, timeout_s, log)
    text = log.read_text()
    assert "[submit] stopped at step" in text and "stop signal received" in text, text[-3000:]
    return int(re.findall(r"resumed from \S+ at step (\d+)", text)[-1])


def finished(job: str, log: Path, steps: int, timeout_s: float) -> None:
    """Wait until the job leaves the queue; it finished `steps` and ended COMPLETED."""
    wait_for("the job to finish", lambda: _state(job) == "", timeout_s, log)
    text = log.read_text()
    assert f"[submit] finished {steps} steps" in text, text[-3000:]
    states = re.findall(rf"^{job}\s.*?\s(COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|REQUEUED)\b",
                        _sh("sacct", "-c", "-j", job, "-n", "-o", "JobID,State"), re.M)
    assert states and states[-1] == "COMPLETED", states


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
            if ln.strip()]


def test_submit_requeue_resume_finish(cluster: None, tmp_path: Path) -> None:
    name = f"slurm-test-{os.getpid()}"
    sets = [
        *_job_sets(name, tmp_path), "slurm.env={OMP_NUM_THREADS: '1'}", "slurm.signal_lead_s=60",
        f"train.steps={STEPS}", "checkpoint.save_interval=1", "checkpoint.keep_last=0",
        "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=12", "actor.seq_length=128", "actor.micro_batch_size=4",
        "data.train_size=100", "data.eval_size=10", "eval.size=0", "rewards.num_workers=1",
        "algorithm.dynamic_sampling=false", "logging.tensorboard=false", "logging.plot=false",
    ]
    job, _ = submit("configs/tiny_moe_cpu.yaml", sets)
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
        # (SIGUSR1 to the batch shell, as --signal=B:USR1@N sends it, is the Qwen3 rehearsal's.)
        # 2. Finishes: out of the queue, COMPLETED in the job-completion log, all steps logged.
        finished(job, log, STEPS, 240)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    rows = metric_rows(tmp_path / name / "run")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert (ckpt / "latest").read_text().strip() == f"step_{STEPS}"


REHEARSALS = {  # config: (steps, SIGUSR1 after this checkpoint or None)
    "configs/deepseek_v3_h100.yaml": (4, None),
    # the quicker one (pp 1): stopped by SIGUSR1 after its first checkpoint, it saves the next
    # step, requeues and resumes to the end
    "configs/qwen3_30b_a3b_h100.yaml": (6, 2),
}


@pytest.mark.timeout(420)
@pytest.mark.parametrize("config", list(REHEARSALS))
def test_rehearsal(cluster: None, tmp_path: Path, config: str) -> None:
    """`submit CONFIG --rehearse`: torchrun of 4 ranks beside the engine servers the script
    starts; weight sync after every step, routing replay, checkpoints; the engines' log-probs
    equal the actor's after every sync; (one of them) SIGUSR1, requeue, resume."""
    steps, stop_after = REHEARSALS[config]
    name = f"rehearsal-{Path(config).stem}-{os.getpid()}"
    job, err = submit(config, [*_job_sets(name, tmp_path), f"train.steps={steps}"],
                      "--rehearse")
    assert "megatron-rl submit --rehearse: model:" in err, err
    log = tmp_path / "logs" / f"{name}-{job}.out"
    try:
        wait_for("the engines", lambda: log.is_file() and "[submit] engines healthy" in
                 log.read_text(), 150, log)
        if stop_after:
            resumed = stop_with_usr1(job, tmp_path / name / "checkpoints", stop_after, log, 150)
            assert stop_after < resumed < steps
        finished(job, log, steps, 240)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)
    text = log.read_text()
    assert text.count("megatron-rl serve: ready at") == 2 * (1 + bool(stop_after)), text[-3000:]
    rows = metric_rows(tmp_path / name / "run")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    diffs = [r.get("mismatch/logp_abs_diff_max") for r in rows]
    assert all(d is not None and d < PARITY for d in diffs), diffs
    assert all(r["routing/agreement"] >= 0 for r in rows)  # replayed, and measured
    assert (tmp_path / name / "checkpoints" / "latest").read_text().strip() == f"step_{steps}"
