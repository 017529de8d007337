"""Whole-run checkpoints: a run stopped and resumed in a fresh process continues bit for bit
(1 rank, and 2 ranks with EP=2); SIGUSR1 stops a run cleanly with a checkpoint; non-finite steps
are skipped and repeated ones stop the run; `checkpoint.load` sets the initial weights.

Every run is a fresh process (spawned ranks or a subprocess), as a real resume is: global RNG
state left in a long-lived process would hide a generator the checkpoint forgot.
Run as a script (`python tests/test_resume.py OUT STEPS`) it is the subprocess the signal test
starts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rank_batches import ok, run_batch

from megatron_rl.launch.spawn import run_ranks

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny_moe_cpu.yaml")
STEPS = 4
WALL_CLOCK_KEYS = ("throughput/", "weight_sync/")
"""Metrics a resumed run may differ in: wall time, and what the weight sync moved (a resumed run
syncs its fresh engine before its first rollout even where the uninterrupted run, after a
skipped step, had nothing to sync)."""
"""Metrics that measure time; everything else must repeat bit for bit."""


def overrides(out: str, *extra: str) -> list[str]:
    """The tiny run: 4 prompts x 4 samples, 12 new tokens; dynamic sampling on (with
    over-sampling, so surplus groups are drawn and dropped) and two reward functions."""
    return [
        "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=12", "rollout.over_sampling=1.5", "actor.seq_length=128",
        "actor.micro_batch_size=2", "data.train_size=200", "data.eval_size=20",
        "algorithm.dynamic_sampling=true", "algorithm.max_gen_batches=2",
        "rewards.functions=[{name: reasoning_gym}, {name: length, weight: 0.5, "
        "kwargs: {max_len: 40, unit: chars}}]",
        "rewards.num_workers=0", f"data.tokenizer_cache={out}/tok", "parallel.timeout_s=120",
        f"train.steps={STEPS}", f"train.output_dir={out}/run", "logging.tensorboard=false",
        "logging.plot=false", f"checkpoint.dir={out}/ckpt", *extra,
    ]


def deterministic(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if not k.startswith(WALL_CLOCK_KEYS)} for m in history]


def as_json(history: list[dict]) -> list[dict]:
    """What metrics.jsonl stores: non-finite values as null."""
    return [{k: (v if math.isfinite(v) else None) for k, v in m.items()} for m in history]


def build(extra: list[str], out: str):
    from megatron_rl.config import load_config
    from megatron_rl.trainer import Trainer

    cfg = load_config(TINY, overrides(out, *extra), world_size=int(os.environ["WORLD_SIZE"]))
    return Trainer(cfg)


def run_worker(extra: list[str], out: str, signal_on_call: int = 0,
               await_signal_on_call: int = 0) -> dict:
    """Build a trainer and run it to `train.steps`. With `signal_on_call`, rank 0 alone sends
    itself SIGUSR1 while sampling that step (as torchrun may deliver it to one rank). With
    `await_signal_on_call`, that step waits for a signal from outside before sampling, so the
    signal lands in that step however fast the steps run."""
    trainer = build(extra, out)
    if (signal_on_call or await_signal_on_call) and trainer.rank == 0:
        sample, calls = trainer.sample, []

        def signalling_sample():
            calls.append(1)
            if len(calls) == signal_on_call:
                os.kill(os.getpid(), signal.SIGUSR1)
            if len(calls) == await_signal_on_call:
                deadline = time.monotonic() + 300
                while trainer.signals.received is None:
                    if time.monotonic() > deadline:
                        raise TimeoutError("no signal arrived within 300 s")
                    time.sleep(0.01)
            return sample()

        trainer.sample = signalling_sample
    history = trainer.run()
    return {"history": history, "step": trainer.step, "stopped": trainer.stopped_by_signal,
            "resumed_from": str(trainer.resumed_from) if trainer.resumed_from else None}


def copy_checkpoint(src: Path, step: int, dst: Path) -> None:
    """Only step `step` of a run's checkpoints, without `latest` (resume must find it alone)."""
    shutil.copytree(src / f"step_{step}", dst / f"step_{step}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """In turn in one 1-rank spawn: 4 steps saving every 2 (the reference every resume must
    repeat), then the runs that start from its checkpoints, each in a directory of its own:
    {name: (result, directory)}."""
    d = {name: tmp_path_factory.mktemp(name)
         for name in ("uninterrupted", "exact", "more", "initial")}
    ckpt = d["uninterrupted"] / "ckpt"
    calls = {
        "uninterrupted": (run_worker, (["checkpoint.save_interval=2", "checkpoint.keep_last=0"],
                                       str(d["uninterrupted"]))),
        "copy_2": (copy_checkpoint, (ckpt, 2, d["exact"] / "ckpt")),
        "exact": (run_worker, (["checkpoint.resume=true"], str(d["exact"]))),
        "copy_last": (copy_checkpoint, (ckpt, STEPS, d["more"] / "ckpt")),
        "more": (run_worker, (["checkpoint.resume=true", f"train.steps={STEPS + 1}"],
                              str(d["more"]))),
        "initial": (initial_weights_worker, (str(ckpt / "step_4"), str(d["initial"]))),
    }
    results = run_batch(1, list(calls.values()), timeout_s=900)
    return {name: (res, d.get(name)) for name, (res,) in zip(calls, results, strict=True)}


@pytest.fixture(scope="module")
def uninterrupted(runs) -> tuple[list[dict], Path]:
    """4 steps in one process, saving every 2 steps: the reference every resume must repeat."""
    res, out = runs["uninterrupted"]
    return ok(res)["history"], out


def test_resume_is_exact(uninterrupted, runs):
    history, out = uninterrupted
    assert len(history) == STEPS and not any(m["actor/skipped"] for m in history)
    kept = [m["dynamic_sampling/keep_ratio"] for m in history]
    assert all(0 < k <= 1 for k in kept)
    ckpt = out / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_2", "step_4"]
    assert (ckpt / "latest").read_text().strip() == "step_4"

    res, tmp_path = runs["exact"]  # resumed from a copy of step_2 alone
    res = ok(res)
    assert res["resumed_from"] == str(tmp_path / "ckpt" / "step_2") and res["step"] == STEPS
    assert deterministic(res["history"]) == deterministic(history[2:])
    # The resumed run saved its end, pointed `latest` at it and kept the newest 2 (default).
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_4"


def test_resume_with_more_steps_continues_the_run(runs):
    """Raising train.steps and resuming extends a finished run (the lr schedule follows the
    config; Megatron's scheduler would otherwise refuse the changed step count)."""
    res, tmp_path = runs["more"]  # resumed from a copy of the last checkpoint alone
    res = ok(res)
    assert res["resumed_from"] == str(tmp_path / "ckpt" / f"step_{STEPS}")
    assert res["step"] == STEPS + 1 and len(res["history"]) == 1
    assert not res["history"][0]["actor/skipped"]


def test_resume_is_exact_on_two_ranks_and_signal_stops_every_rank(tmp_path):
    """EP=2: the uninterrupted run saving at step 2; a fresh resume from that checkpoint where
    only rank 0 is signalled during step 3: every rank must stop after step 3 and save together,
    and step 3 must repeat the uninterrupted one bit for bit."""
    ep = ["parallel.ep=2", "checkpoint.save_interval=2", "checkpoint.keep_last=0"]
    full = run_ranks(run_worker, 2, ep, str(tmp_path / "full"), timeout_s=420)
    assert full[0]["history"] == full[1]["history"] and not full[0]["stopped"]
    copy_checkpoint(tmp_path / "full" / "ckpt", 2, tmp_path / "stop" / "ckpt")
    stopped = run_ranks(run_worker, 2, ep + ["checkpoint.resume=true"], str(tmp_path / "stop"),
                        1, timeout_s=420)
    assert [(r["stopped"], r["step"]) for r in stopped] == [(True, 3), (True, 3)]
    assert deterministic(stopped[0]["history"]) == deterministic(full[0]["history"][2:3])
    assert sorted(p.name for p in (tmp_path / "stop" / "ckpt").iterdir()) == \
        ["latest", "step_2", "step_3"]


def test_sigusr1_saves_and_exits_cleanly_then_resume_finishes(uninterrupted, tmp_path):
    history, _ = uninterrupted
    proc = subprocess.Popen([sys.executable, __file__, str(tmp_path), str(STEPS)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
            assert proc.poll() is None, f"the run ended before step 1 was logged:\n" \
                                        f"{proc.stdout.read()}"
            assert time.monotonic() < deadline, "step 1 was not logged within 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "stop signal received: saved step 2" in output, output
    assert (tmp_path / "ckpt" / "step_2" / "trainer_state.pt").is_file()

    res = run_ranks(run_worker, 1, ["checkpoint.resume=true"], str(tmp_path), timeout_s=300)[0]
    assert res["step"] == STEPS and len(res["history"]) == STEPS - 2
    assert deterministic(res["history"]) == deterministic(history[2:])
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    assert [r.pop("step") for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        r.pop("time")
    assert deterministic(rows) == deterministic(as_json(history))


def nonfinite_worker(out: str) -> dict:
    """Step 1 has a NaN gradient (finite loss), step 2 runs normally, steps 3-5 have a NaN loss:
    the run must skip 1, 3, 4 without touching the weights and stop at 5."""
    import torch

    from megatron_rl.trainer import NonFiniteError

    trainer = build(["algorithm.dynamic_sampling=false", "rollout.over_sampling=1.0",
                     "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=2"], out)
    make_loss = trainer.loss_fn

    def poisoned_loss(mbs):
        fn = make_loss(mbs)
        step = trainer.step  # the step being run

        def wrapped(logprobs, mb):
            loss, stats = fn(logprobs, mb)
            if step == 1:  # d/dx sqrt(|0 * x|) = inf * 0 = NaN, the value stays finite
                return loss + (logprobs.sum() * 0).abs().sqrt(), stats
            return (loss * math.nan, stats) if step >= 3 else (loss, stats)

        wrapped.needs_entropy = fn.needs_entropy
        return wrapped

    trainer.loss_fn = poisoned_loss
    params = lambda: [p.detach().clone() for c in trainer.actor.model for p in c.parameters()]  # noqa: E731
    adam_steps = lambda: sorted(  # noqa: E731
        int(s["step"]) for opt in trainer.actor.optimizer.chained_optimizers
        for s in opt.optimizer.state.values() if "step" in s)
    out_rows, unchanged, error = [], [], None
    for _ in range(5):
        before, steps_before = params(), adam_steps()
        try:
            out_rows.append(trainer.train_step())
        except NonFiniteError as e:
            error = str(e)
            break
        after = params()
        unchanged.append(all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
                         and adam_steps() == steps_before)
    return {"rows": out_rows, "unchanged": unchanged, "error": error, "step": trainer.step,
            "finite_after": all(torch.isfinite(p).all() for p in params())}


def test_nonfinite_steps_are_skipped_and_repeated_ones_stop_the_run(tmp_path, capfd):
    res = run_ranks(nonfinite_worker, 1, str(tmp_path), timeout_s=300)[0]
    rows = res["rows"]
    assert [m["actor/skipped"] for m in rows] == [1.0, 0.0, 1.0, 1.0]
    assert res["unchanged"] == [True, False, True, True]
    assert math.isnan(rows[0]["actor/grad_norm"]) and math.isfinite(rows[0]["actor/loss"])
    assert math.isnan(rows[2]["actor/loss"]) and res["finite_after"]
    assert res["step"] == 5 and res["error"] is not None
    assert res["error"].startswith("step 5: loss was not finite in 3 consecutive steps")
    assert "actor.lr" in res["error"]
    console = capfd.readouterr().out
    assert "step 1: grad_norm is nan; optimizer step skipped (1/3 in a row)" in console
    assert "step 4: loss is nan; optimizer step skipped (2/3 in a row)" in console


def initial_weights_worker(ckpt: str, out: str) -> dict:
    """Random init; weights from a run checkpoint; the same weights through HF safetensors."""
    import torch

    def weights(trainer) -> list[torch.Tensor]:
        return [p.detach().clone() for c in trainer.actor.model for p in c.parameters()]

    fresh = weights(build([], out))
    loaded = build([f"checkpoint.load={ckpt}"], out)
    hf_dir = loaded.actor.save_hf(f"{out}/hf", loaded.actor.arch)
    from_ckpt = weights(loaded)
    from_hf = weights(build([f"checkpoint.load={hf_dir}"], out))
    return {"changed": any(not torch.equal(a, b) for a, b in zip(fresh, from_ckpt, strict=True)),
            "hf_same": all(torch.equal(a, b) for a, b in zip(from_ckpt, from_hf, strict=True))}


def test_checkpoint_load_sets_initial_weights(runs):
    res = ok(runs["initial"][0])  # from the uninterrupted run's step_4
    assert res == {"changed": True, "hf_same": True}


def test_checkpoint_load_names_a_path_that_is_neither(tmp_path):
    from megatron_rl.run_state import load_initial_weights

    with pytest.raises(ValueError, match=f"checkpoint.load='{tmp_path}' is neither"):
        load_initial_weights(tmp_path, actor=None)


def test_resume_picks_the_newest_complete_checkpoint_and_prune_keeps_the_last(tmp_path):
    from megatron_rl.run_state import STATE_FILE, complete_checkpoints, latest_checkpoint, prune

    for name, files in [("step_1", [STATE_FILE, "metadata.json"]),
                        ("step_3", [STATE_FILE, "metadata.json"]),
                        ("step_10", [STATE_FILE, "metadata.json"]),
                        ("step_12", ["metadata.json"]),  # crashed before its trainer state
                        (".staging-step_14", [STATE_FILE, "metadata.json"])]:
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("")
    (tmp_path / "latest").write_text("step_3\n")  # stale pointer: the newest complete wins
    assert latest_checkpoint(tmp_path) == tmp_path / "step_10"
    prune(tmp_path, 2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3, 10]
    assert latest_checkpoint(tmp_path / "missing") is None


if __name__ == "__main__":  # the signal test's subprocess: one rank, run until stopped
    os.environ.setdefault("WORLD_SIZE", "1")
    result = run_worker([], sys.argv[1], await_signal_on_call=2)
    sys.exit(0 if result["stopped"] and result["step"] < int(sys.argv[2]) else 1)


def test_checkpoint_writer_helper_survives_stop_signals(monkeypatch):
    """A signal sent to every process of a job (Slurm preemption, `scontrol requeue`) must not
    kill Megatron's checkpoint-writer helper, or the save made on that signal fails."""
    import psutil
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_rl.actor import checkpoint

    monkeypatch.setattr(filesystem_async, "_results_queue", None)  # a fresh helper
    before = {p.pid for p in psutil.Process().children()}
    checkpoint.shield_writer_from_stop_signals()
    queue = filesystem_async._get_write_results_queue()
    helpers = [p for p in psutil.Process().children() if p.pid not in before]
    assert helpers  # the manager (and spawn's resource tracker)
    for proc in helpers:
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGUSR1)
    time.sleep(0.5)
    assert all(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in helpers)
    queue.put("still there")
    assert queue.get(timeout=10) == "still there"


def test_a_lone_damaged_checkpoint_stops_resume_instead_of_a_fresh_start(tmp_path):
    """A `step_<N>` directory that is not whole (saves are atomic, so it was damaged later) is
    named and skipped; with nothing else to resume, resume stops rather than start a new run
    beside it (whose pruning could later delete it)."""
    from megatron_rl.run_state import CheckpointDamaged, latest_checkpoint

    (tmp_path / "step_3").mkdir()
    (tmp_path / "step_3" / "metadata.json").write_text("garbage")
    (tmp_path / "latest").write_text("step_3\n")
    said = []
    with pytest.raises(CheckpointDamaged, match="no checkpoint in .* could be loaded"):
        latest_checkpoint(tmp_path, said.append)
    assert said == ["checkpoint step_3 skipped: trainer_state.pt is missing"]
