"""No redundant forward (issue 18): with one update per step (`algorithm.mini_batches=1`) the
trainer runs no separate old-log-prob forward; the update's own log-probs, detached, are the
ratio's denominator. Through `Trainer`, at 1 rank and DP=2, against the same step computed with
the separate forward: the same weights after the step, the same loss, and the same engine gap
and routing agreement (now measured by the update's forward). The KL reference forward still
runs when `kl_coef > 0`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rank_batches import ok, run_cases  # a module's workers in one spawn per world size

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_moe_cpu.yaml")


def step_worker(out: str, separate_forward: bool, kl: float) -> dict:
    import os

    from megatron_rl.config import load_config
    from megatron_rl.trainer import Trainer

    cfg = load_config(TINY, [
        "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=12", "actor.seq_length=160", "actor.micro_batch_size=2",
        "data.train_size=100", "data.eval_size=10", "eval.size=0", "rewards.num_workers=0",
        f"data.tokenizer_cache={out}/tok", "parallel.timeout_s=120",
        f"train.output_dir={out}/run", f"logging.log_dir={out}/tb", f"checkpoint.dir={out}/ck",
        "logging.tensorboard=false", "algorithm.dynamic_sampling=false",
        "algorithm.mini_batches=1", f"algorithm.kl_coef={kl}", "actor.lr=0.01",
        # the reference: the old path, a forward for the old log-probs
        f"algorithm.old_logprob_forward={str(separate_forward).lower()}",
    ], world_size=int(os.environ["WORLD_SIZE"]))
    trainer = Trainer(cfg)
    forwards = {"actor": 0, "reference": 0}
    lp = trainer.actor.logprobs_and_routing

    def counted(*a, **k):
        forwards["actor"] += 1
        return lp(*a, **k)

    trainer.actor.logprobs_and_routing = counted
    if trainer.reference is not None:
        ref = trainer.reference.logprobs

        def ref_counted(*a, **k):
            forwards["reference"] += 1
            return ref(*a, **k)

        trainer.reference.logprobs = ref_counted
    metrics = trainer.run(steps=1)[0]
    weights = {n: p.detach().clone() for n, p in trainer.actor.model[0].named_parameters()}
    return {"metrics": metrics, "weights": weights, "forwards": forwards}


CASES = {"1rank": (1, 0.0), "dp2-kl": (2, 0.05)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """(without, with) the separate forward per case; one spawn per world size."""
    cases, keys = [], []
    for name, (world, kl) in CASES.items():
        for separate in (False, True):
            out = str(tmp_path_factory.mktemp(f"{name}-{separate}"))
            cases.append((world, step_worker, (out, separate, kl)))
            keys.append((name, separate))
    return dict(zip(keys, run_cases(cases, timeout_s=900), strict=True))


@pytest.mark.parametrize("case", list(CASES))
def test_on_policy_update_runs_no_separate_forward(case, runs):
    kl = CASES[case][1]
    fast = [ok(r) for r in runs[case, False]]
    slow = [ok(r) for r in runs[case, True]]
    for f, s in zip(fast, slow, strict=True):
        # the reference policy's pass is an actor forward with the reference weights
        assert f["forwards"] == {"actor": int(kl > 0), "reference": int(kl > 0)}
        assert s["forwards"] == {"actor": 1 + int(kl > 0), "reference": int(kl > 0)}
        mf, ms = f["metrics"], s["metrics"]
        assert mf["actor/skipped"] == 0.0 and mf["actor/grad_norm"] > 0
        for key in ("actor/loss", "actor/pg_loss", "actor/grad_norm",
                    "mismatch/logp_abs_diff_mean", "mismatch/logp_abs_diff_max",
                    "routing/agreement", "actor/ratio_max"):
            assert mf[key] == pytest.approx(ms[key], rel=1e-5, abs=1e-6), key
        assert mf["mismatch/logp_abs_diff_mean"] > 0  # measured, not a default
        assert 0.5 < mf["routing/agreement"] <= 1.0
        assert not any(k.startswith("actor/mismatch") for k in mf)
        for name, w in f["weights"].items():
            torch.testing.assert_close(w, s["weights"][name], rtol=1e-5, atol=1e-6)
