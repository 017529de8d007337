"""Job-wide signals and helper processes (issue 15): a SIGTERM or SIGUSR1 sent to the trainer's
whole process group (Slurm preemption, `scancel`, `scontrol requeue`) ends the run with a
checkpoint and exit 0, and `--resume` continues from it; helper processes (reward workers,
Megatron's checkpoint-writer manager, multiprocessing's resource tracker) ignore stop signals
and die with a `kill -9`'d trainer; a reward worker killed between calls is replaced.

The trainer runs as `megatron-rl train` in a new session, so that `os.killpg` reaches it and
every helper it started, and nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_rl.rewards.config import RewardFunctionConfig, RewardsConfig
from megatron_rl.rewards.pool import RewardComputer, RewardInput

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_moe_cpu.yaml")
CLI = [sys.executable, "-m", "megatron_rl", "train", TINY]


def tiny(out: Path, *extra: str) -> list[str]:
    return ["rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=4",
            "rollout.max_new_tokens=12", "actor.seq_length=160", "data.train_size=200",
            "data.eval_size=20", "eval.size=0", "train.steps=50", "rewards.num_workers=1",
            "checkpoint.save_interval=0", "logging.tensorboard=false", "logging.plot=false",
            f"data.tokenizer_cache={out}/tok", f"train.output_dir={out}/run",
            f"checkpoint.dir={out}/ckpt", *extra]


def start(out: Path, *extra: str, resume: bool = False, torchrun: int = 0) -> subprocess.Popen:
    """`megatron-rl train` on the tiny run in a new session (under `torchrun` with that many
    ranks when `torchrun` > 0)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [a for kv in tiny(out, *extra) for a in ("--set", kv)] + ["--resume"] * resume
    cli = CLI if not torchrun else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    f"--nproc-per-node={torchrun}", *CLI[1:]]
    return subprocess.Popen([*cli, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for_steps(proc: subprocess.Popen, out: Path, steps: int = 1) -> None:
    """Until `steps` rows are in metrics.jsonl (the run is past its first reward call and
    save-manager start), or fail with the run's output."""
    metrics = out / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= steps):
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {steps} was logged:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"step {steps} was not logged within 300 s")
        time.sleep(0.05)


def helpers_of(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    return [p for p in procs if running(p)]


def left_after(procs: list[psutil.Process], seconds: float = 10) -> list[str]:
    """Command lines of `procs` still alive after up to `seconds`."""
    deadline = time.monotonic() + seconds
    while alive(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [" ".join(p.cmdline()) for p in alive(procs)]


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_to_the_process_group_saves_exits_0_and_resume_continues(tmp_path, sig):
    proc = start(tmp_path)
    try:
        wait_for_steps(proc, tmp_path)
        helpers = helpers_of(proc.pid)
        assert any("multiprocessing" in " ".join(p.cmdline()) for p in helpers), \
            [p.cmdline() for p in helpers]  # reward worker, writer manager, resource tracker
        os.killpg(proc.pid, sig)
    finally:
        output = finish(proc)
    assert proc.returncode == 0, output
    assert "stop signal received: saved step" in output, output
    step = int(output.split("stop signal received: saved step ")[1].split()[0])
    assert 1 <= step < 50
    assert (tmp_path / "ckpt" / f"step_{step}" / "trainer_state.pt").is_file()
    assert not left_after(helpers)  # they ended with the run

    resumed = start(tmp_path, f"train.steps={step + 1}", resume=True)
    output = finish(resumed)
    assert resumed.returncode == 0, output
    assert f"resumed from {tmp_path / 'ckpt' / f'step_{step}'} at step {step}" in output, output
    assert (tmp_path / "ckpt" / f"step_{step + 1}" / "trainer_state.pt").is_file(), output


def test_sigterm_to_torchrun_saves_on_every_rank_and_resume_continues(tmp_path):
    """torchrun passes SIGTERM to each rank's process group (rank and helpers): every rank
    finishes the step and saves within torchrun's shutdown timeout."""
    proc = start(tmp_path, "parallel.tp=2", torchrun=2)
    try:
        wait_for_steps(proc, tmp_path)
        proc.send_signal(signal.SIGTERM)  # torchrun alone
    finally:
        output = finish(proc)
    assert "stop signal received: saved step" in output, output
    step = int(output.split("stop signal received: saved step ")[1].split()[0])
    assert "Traceback" not in output.split("stop signal received")[0], output
    for f in ("trainer_state.pt", "rng_rank0.pt", "rng_rank1.pt"):
        assert (tmp_path / "ckpt" / f"step_{step}" / f).is_file(), output

    resumed = start(tmp_path, "parallel.tp=2", f"train.steps={step + 1}", resume=True,
                    torchrun=2)
    output = finish(resumed)
    assert resumed.returncode == 0, output
    assert f"resumed from {tmp_path / 'ckpt' / f'step_{step}'} at step {step}" in output, output


def test_kill_9_of_the_trainer_leaves_no_helper_behind(tmp_path):
    proc = start(tmp_path)
    helpers: list[psutil.Process] = []
    try:
        wait_for_steps(proc, tmp_path)
        helpers = helpers_of(proc.pid)
        names = [" ".join(p.cmdline()) for p in helpers]
        assert len(helpers) >= 3, names  # reward worker, writer manager, resource tracker
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        left = left_after(helpers)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in alive(helpers):  # never leave orphans (they would also hold the run's stdout)
            p.kill()
        proc.communicate()
    assert not left, left


def _computer() -> RewardComputer:
    return RewardComputer(RewardsConfig(functions=[
        RewardFunctionConfig(name="length", weight=1.0, kwargs={"max_len": 10})],
        num_workers=1, timeout_s=30))


def test_reward_worker_killed_between_calls_is_replaced():
    samples = [RewardInput("", r, None) for r in ["ok", "longer one"]]
    with _computer() as rc:
        first = rc(samples)
        worker = rc._workers[0].process
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        again = rc(samples)
        assert rc._workers[0].process.pid != worker.pid
    assert first.failures == 0 and again.failures == 0
    assert again.total == first.total


def test_reward_worker_ignores_stop_signals_and_dies_with_its_parent(tmp_path):
    samples = [RewardInput("", "ok", None)]
    with _computer() as rc:
        first = rc(samples)
        worker = rc._workers[0].process
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            os.kill(worker.pid, sig)
        time.sleep(0.5)
        assert worker.is_alive()
        assert rc(samples).total == first.total and rc._workers[0].process is worker

    # a parent killed with SIGKILL takes its worker along, even one busy in a long call
    script = ("import sys\n"
              "sys.path.insert(0, 'tests')\n"
              "from megatron_rl.rewards.config import RewardFunctionConfig, RewardsConfig\n"
              "from megatron_rl.rewards.pool import RewardComputer, RewardInput\n"
              "rc = RewardComputer(RewardsConfig(functions=[RewardFunctionConfig("
              "name='test_rewards:sleepy')], num_workers=1, timeout_s=600))\n"
              "rc._workers.append(rc._start_worker())\n"
              "print(rc._workers[0].process.pid, flush=True)\n"
              "rc([RewardInput('', 'hang', None)])\n")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    child: list[psutil.Process] = []
    try:
        child.append(psutil.Process(int(parent.stdout.readline())))
        time.sleep(3)  # the worker is in the hanging call
        assert alive(child) and parent.poll() is None
        parent.kill()
        parent.wait(timeout=10)
        left = left_after(child)
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
        parent.communicate()
        for p in alive(child):
            p.kill()
    assert not left
