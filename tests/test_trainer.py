"""The RL loop end to end on the tiny config, small: it runs, the weights the engine samples with
follow the actor, and the same metrics come out on every rank."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_rl.launch.spawn import run_ranks

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_moe_cpu.yaml")


def trainer_worker(overrides: list[str], out: str) -> list[dict]:
    import os

    import torch

    from megatron_rl.config import load_config
    from megatron_rl.trainer import Trainer

    cfg = load_config(TINY, overrides + [
        "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=12", "actor.seq_length=128", "actor.micro_batch_size=2",
        "data.train_size=200", "data.eval_size=20", "algorithm.max_gen_batches=2",
        "rewards.num_workers=0", f"data.tokenizer_cache={out}/tok", "parallel.timeout_s=120",
        # A random model rarely answers right: keep every group so the update always runs.
        "algorithm.dynamic_sampling=false",
        f"train.output_dir={out}/run", f"logging.log_dir={out}/tb", f"checkpoint.dir={out}/ckpt",
    ], world_size=int(os.environ["WORLD_SIZE"]))
    trainer = Trainer(cfg)
    history = trainer.run(steps=2)
    trainer.to_rollout()  # weights reach the engine before it next generates (collective)
    trainer.to_training()  # and the actor, offloaded while it generated, comes back
    if trainer.rank == 0:  # the engine samples with the actor's latest weights
        from megatron_rl.actor.step import MicroBatch

        ids = torch.arange(1, 17)[None]
        mb = MicroBatch(ids[:, :-1], ids[:, 1:], torch.ones(1, 15))
        engine_lp = torch.log_softmax(trainer.engine.model(ids[:, :-1]).logits.float(), -1)
        engine_lp = engine_lp.gather(-1, ids[:, 1:, None])[..., 0]
        actor_lp = trainer.actor.logprobs([mb])[0]
        history.append({"sync_gap": float((engine_lp - actor_lp).abs().max()),
                        "updates": trainer.actor.scheduler.num_steps})
    else:
        trainer.actor.logprobs([__import__("megatron_rl.actor.step", fromlist=["x"]).MicroBatch(
            torch.arange(1, 16)[None], torch.arange(2, 17)[None], torch.ones(1, 15))])
    return history


@pytest.mark.parametrize(("world", "overrides"),
                         [(1, []), (2, ["parallel.ep=2", "algorithm.mini_batches=2"])],
                         ids=["1rank", "ep2-2minibatches"])
def test_two_rl_steps(world, overrides, tmp_path):
    results = run_ranks(trainer_worker, world, overrides, str(tmp_path), timeout_s=600)
    for history in results:
        for m in history[:2]:
            assert 0.0 <= m["accuracy"] <= 1.0 and m["response_length/mean"] > 0
            assert m["actor/grad_norm"] == m["actor/grad_norm"]  # finite, not NaN
            assert m["weight_sync/bytes"] > 0
            # Section 8 metrics: entropy, train/rollout log-prob gap (same weights, fp32: tiny),
            # reflection words, per-function reward means, training throughput.
            assert 0 < m["actor/entropy"] < 7 and m["actor/skipped"] == 0.0
            assert 0 <= m["mismatch/logp_abs_diff_mean"] <= m["mismatch/logp_abs_diff_max"] < 1e-3
            assert "reflection/wait" in m and "reward/reasoning_gym" in m
            assert m["throughput/train_tokens_per_s"] > 0
    assert results[0][:2] == results[-1][:2]  # every rank reports the same step metrics
    assert results[0][2]["sync_gap"] < 1e-4
    # One update per mini-batch. A single update is on-policy (ratio 1, KL to the sampling
    # policy 0); a second one runs after the first moved the weights, so its ratio is not 1.
    mini = 2 if "algorithm.mini_batches=2" in overrides else 1
    assert results[0][2]["updates"] == 2 * mini
    kl = [m["actor/approx_kl"] for m in results[0][:2]]
    assert all(k > 1e-7 for k in kl) if mini > 1 else all(abs(k) < 1e-6 for k in kl), kl
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"reward/mean"' in lines[0]
    assert (tmp_path / "run" / "learning_curve.png").stat().st_size > 0
    # run() ends with a whole-run checkpoint, every rank's RNG included.
    saved = tmp_path / "ckpt" / "step_2"
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_2"
    assert {"trainer_state.pt", "metadata.json"} <= {p.name for p in saved.iterdir()}
    assert len(list(saved.glob("rng_rank*.pt"))) == world
