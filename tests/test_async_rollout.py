"""One-step off-policy generation (`rollout.async_generation`, issue 18), through `Trainer`: step
t+1's samples are generated in the background while step t trains, by an engine holding the
weights of step t-1's update (checked against the actor's own weights, not our bookkeeping);
the staleness is recorded per sample and logged; the importance-sampling correction is required.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_rl.launch.spawn import run_ranks

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_moe_cpu.yaml")
STEPS = 3


def _checksum(module) -> float:
    """Sum of every parameter: the same for the actor and the engine holding its weights (the
    conversion only reorders and reshapes values)."""
    return float(sum(p.detach().double().sum() for p in module.parameters()))


def async_worker(out: str) -> dict:
    import threading
    import time

    from megatron_rl.config import load_config
    from megatron_rl.trainer import Trainer

    cfg = load_config(TINY, [
        "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=12", "actor.seq_length=160", "data.train_size=100",
        "data.eval_size=10", "eval.size=0", "rewards.num_workers=0",
        f"data.tokenizer_cache={out}/tok", f"train.output_dir={out}/run",
        f"logging.log_dir={out}/tb", f"checkpoint.dir={out}/ck", "logging.tensorboard=false",
        "algorithm.dynamic_sampling=false", "actor.lr=0.01",
        "rollout.async_generation=true", "algorithm.tis_cap=2.0",
    ], world_size=1)
    trainer = Trainer(cfg)
    assert not cfg.rollout.colocated
    gens, trains = [], []
    actor_sums = [_checksum(trainer.actor.model[0])]
    sample, train_step = trainer.sampler.sample, trainer.actor.train_step

    def recorded_sample():
        start = time.monotonic()
        engine = _checksum(trainer.engine.model)
        result = sample()
        gens.append({"start": start, "end": time.monotonic(), "engine": engine,
                     "thread": threading.current_thread().name})
        return result

    def recorded_train(*a, **k):
        start = time.monotonic()
        result = train_step(*a, **k)
        trains.append({"start": start, "end": time.monotonic()})
        actor_sums.append(_checksum(trainer.actor.model[0]))
        return result

    trainer.sampler.sample, trainer.actor.train_step = recorded_sample, recorded_train
    history = trainer.run(steps=STEPS)
    trainer._await_generation()  # the step after the last one was still generating
    return {"gens": gens, "trains": trains, "actor": actor_sums, "history": history}


def test_async_generation_overlaps_training_one_step_stale(tmp_path):
    res = run_ranks(async_worker, 1, str(tmp_path), timeout_s=600)[0]
    gens, trains, actor = res["gens"], res["trains"], res["actor"]
    assert len(gens) == STEPS + 1 and len(trains) == STEPS
    # the first step's samples are generated in the step; every later one in the background
    assert gens[0]["thread"] == "MainThread"
    assert all(g["thread"].startswith("rollout") for g in gens[1:])
    for t in range(1, STEPS + 1):
        # step t+1's samples began before step t's update ended: they overlap it
        assert gens[t]["start"] < trains[t - 1]["end"]
        # ... from the weights after step t-1's update (the actor's weights, by value)
        assert gens[t]["engine"] == pytest.approx(actor[t - 1], rel=1e-9, abs=1e-6)
        assert gens[t]["engine"] != pytest.approx(actor[t], rel=1e-9, abs=1e-6)
    stale = [m["rollout/staleness_max"] for m in res["history"]]
    assert stale == [0.0] + [1.0] * (STEPS - 1)
    assert all(m["actor/skipped"] == 0.0 for m in res["history"])
    # stale samples: the actor and the engine disagree by more than precision
    assert res["history"][-1]["mismatch/logp_abs_diff_mean"] > 1e-4


def test_async_generation_needs_tis_and_its_own_devices():
    from megatron_rl.config import load_config
    from megatron_rl.configurable import ConfigError

    with pytest.raises(ConfigError, match="algorithm.tis_cap"):
        load_config(TINY, ["rollout.async_generation=true"], world_size=1)
    with pytest.raises(ConfigError, match="rollout.async_generation"):
        load_config(TINY, ["rollout.async_generation=true", "rollout.colocate=true",
                           "algorithm.tis_cap=2.0"], world_size=1)
