"""Configured algorithms reach the update, tested through `Trainer` (the path a user runs):

- GDPO: with two rewards of different scales the advantages the actor trains on equal GDPO's,
  computed here from the paper's formula (and equal to `algorithms.gdpo`), at 1 rank and DP=2.
- Routing replay (R3): with replay on, every trained position of every actor forward uses the
  engine's experts, at 1 rank, EP=2 and TP=2; `routing/agreement` is logged either way; with an
  engine whose router differs from the actor's, replay does not widen the log-prob gap.
- Every loss option (clip-higher, dual clip, KL k1/k2/k3, TIS, entropy, aggregations, GSPO,
  overlong filtering): the loss the trainer hands the actor is the library's for that config.
- Advantage estimators (GRPO, Dr.GRPO, RLOO, REINFORCE++): the batch the trainer builds carries
  the papers' advantages; DAPO's filter ignores the overlong shaping.
- Saved rollouts: `rollout.load_dir` trains from what `rollout.save_dir` saved, bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rank_batches import ok, run_batch

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_moe_cpu.yaml")


# ---- reward functions for the GDPO test (imported by name from the reward registry) ------------

def parity(prompt: str, response: str, label: object, metadata: dict) -> float:
    """1 when the response has an even number of characters: a coin flip on a random model."""
    return float(len(response) % 2 == 0)


def vowels(prompt: str, response: str, label: object, metadata: dict) -> float:
    """A coarse reward on another scale: 10 per started group of three vowels, at most 30."""
    n = sum(ch in "aeiou" for ch in response)
    return 10.0 * min(3, (n + 2) // 3)


def _config(out: str, overrides: list[str]):
    import os

    from megatron_rl.config import load_config

    return load_config(TINY, [
        "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=12", "actor.seq_length=160", "actor.micro_batch_size=2",
        "data.train_size=200", "data.eval_size=20", "eval.size=0",
        "rewards.num_workers=0", f"data.tokenizer_cache={out}/tok", "parallel.timeout_s=120",
        f"train.output_dir={out}/run", f"logging.log_dir={out}/tb", f"checkpoint.dir={out}/ckpt",
        "logging.tensorboard=false",
    ] + overrides, world_size=int(os.environ["WORLD_SIZE"]))


class _Capture:
    """Wraps the actor's entry points to record the micro-batches each forward saw."""

    def __init__(self, actor) -> None:
        self.logprob_passes: list = []
        self.train_passes: list = []
        lp, ts = actor.logprobs_and_routing, actor.train_step

        def logprobs_and_routing(mbs, *a, **k):
            self.logprob_passes.append(list(mbs))
            return lp(mbs, *a, **k)

        def train_step(mbs, *a, **k):
            self.train_passes.append(list(mbs))
            return ts(mbs, *a, **k)

        actor.logprobs_and_routing, actor.train_step = logprobs_and_routing, train_step


def _same_row(full: torch.Tensor, trained: torch.Tensor) -> bool:
    """`trained` (a row as a micro-batch holds it: cut to the micro-batch's longest row) is
    `full` (a row built at actor.seq_length) without right padding."""
    n = trained.numel()
    return torch.equal(full[:n], trained) and not full[n:].any()


# ---- GDPO ----------------------------------------------------------------------------------------

def gdpo_worker(out: str) -> dict:
    from megatron_rl.trainer import Trainer

    cfg = _config(out, [
        "algorithm.preset=gdpo", "rollout.save_dir=" + out + "/rollouts",
        "algorithm.dynamic_sampling=true", "algorithm.max_gen_batches=2",
        "rewards.functions=[{name: 'test_trainer_algorithms:parity', weight: 1.0}, "
        "{name: 'test_trainer_algorithms:vowels', weight: 0.5}]",
    ])
    trainer = Trainer(cfg)
    capture = _Capture(trainer.actor)
    trainer.run(steps=1)
    kept = None
    if trainer.rank == 0:  # the filter the sampler runs is the trainer's per-reward rule
        from megatron_rl.algorithms import informative_mask
        from megatron_rl.rollout.types import Sample

        assert trainer.sampler.filter_signal == trainer.filter_signal
        a, b = trainer.reward_names
        pairs = [(1.0, 0.0), (0.0, 2.0), (1.0, 2.0), (1.0, 2.0)]  # totals 1, 1 | 2, 2
        probe = [Sample(group=i // 2, prompt="", prompt_ids=[1], response_ids=[2],
                        rollout_logprobs=[0.0], finish_reason="stop", rewards={a: x, b: y})
                 for i, (x, y) in enumerate(pairs)]
        kept = informative_mask(trainer.filter_signal(probe), torch.tensor([0, 0, 1, 1]))
    rows = []  # (token row, advantage) of every live row this rank trained on
    for mbs in capture.train_passes:
        for mb in mbs:
            for i in range(mb.tokens.shape[0]):
                if mb.loss_mask[i].sum() > 0:
                    rows.append((mb.tokens[i].clone(), float(mb.advantages[i])))
    return {"rows": rows, "names": trainer.reward_names, "kept": kept,
            "weights": trainer.reward_weights.tolist()}


def _gdpo_reference(r_bk: torch.Tensor, groups: torch.Tensor, w: torch.Tensor,
                    eps: float = 1e-6) -> torch.Tensor:
    """GDPO from its definition, a loop per group: each reward z-scored in its group (unbiased
    std; 0 where the reward does not vary), weighted sum, then z-scored over the batch's
    samples from groups where some reward varies (the others keep 0)."""
    b, k = r_bk.shape
    a_sum = torch.zeros(b, dtype=torch.float64)
    live = torch.zeros(b, dtype=torch.bool)
    for g in groups.unique():
        idx = (groups == g).nonzero().flatten()
        for j in range(k):
            col = r_bk[idx, j]
            if len(idx) > 1 and col.max() > col.min():
                a_sum[idx] += w[j] * (col - col.mean()) / (col.std() + eps)
                live[idx] = True
    out = torch.zeros(b, dtype=torch.float64)
    if live.sum() > 1:
        vals = a_sum[live]
        out[live] = (vals - vals.mean()) / (vals.std() + eps)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every trainer run of this module, in turn in two spawns (1 rank, then 2 ranks), each in
    a directory of its own: {name: ([result of each rank], directory)}."""
    def d(name: str) -> str:
        return str(tmp_path_factory.mktemp(name))

    batches = {1: {
        "gdpo-1rank": (gdpo_worker, (d("gdpo1"),)),
        "replay-1rank-on": (replay_worker, (d("replay_on"), [], True, PERTURB)),
        "replay-1rank-off": (replay_worker, (d("replay_off"), [], False, PERTURB)),
        "agreement": (replay_worker, (d("agreement"), [], False, 0.0)),
        "load_dir": (load_dir_worker, (d("load_dir"),)),
        "options": (options_worker, (d("options"),)),
        "estimators": (estimator_worker, (d("estimators"),)),
    }, 2: {
        "gdpo-dp2": (gdpo_worker, (d("gdpo2"),)),
        **{f"replay-{ident}-on": (replay_worker, (d(f"replay_{ident}"), overrides, True, PERTURB))
           for ident, (_, overrides) in zip(["ep2", "tp2"], REPLAY_CASES[1:], strict=True)},
    }}
    out = {}
    for world, calls in batches.items():
        results = run_batch(world, list(calls.values()), timeout_s=1800)
        for (name, (_, args)), res in zip(calls.items(), results, strict=True):
            out[name] = (res, Path(args[0]))
    return out


def _results(runs: dict, name: str) -> tuple[list, Path]:
    results, tmp = runs[name]
    return [ok(r) for r in results], tmp


@pytest.mark.parametrize("world", [1, 2], ids=["1rank", "dp2"])
def test_gdpo_advantages_reach_the_update(world, runs):
    from megatron_rl.algorithms import gdpo
    from megatron_rl.batching import token_rows
    from megatron_rl.rollout.store import load_rollouts

    results, tmp_path = _results(runs, "gdpo-1rank" if world == 1 else "gdpo-dp2")
    samples, _ = load_rollouts(tmp_path / "rollouts", 1)
    names, weights = results[0]["names"], torch.tensor(results[0]["weights"], dtype=torch.float64)
    assert names == ["test_trainer_algorithms:parity", "test_trainer_algorithms:vowels"]
    # GDPO's dynamic sampling keeps a group when any reward varies, even if the totals tie.
    assert results[0]["kept"].tolist() == [True, True, False, False]
    r_bk = torch.tensor([[s.rewards[n] for n in names] for s in samples], dtype=torch.float64)
    groups = torch.tensor([s.group for s in samples])
    for g in groups.unique():  # every kept group has a reward that varies
        col = r_bk[groups == g]
        assert (col.max(0).values > col.min(0).values).any()
    expected = _gdpo_reference(r_bk, groups, weights)
    torch.testing.assert_close(gdpo(r_bk, groups, weights=weights).advantages.double(), expected,
                               rtol=1e-5, atol=1e-6)
    # Not vacuous: GRPO on the weighted total gives other advantages for this batch.
    from megatron_rl.algorithms import grpo

    assert (grpo(r_bk @ weights, groups).advantages.double() - expected).abs().max() > 1e-2
    trained = [row for res in results for row in res["rows"]]
    tokens = token_rows(samples, 160)["tokens"]
    live = token_rows(samples, 160)["loss_mask"].sum(-1) > 0
    assert live.sum() >= len(samples) - 2  # responses fit in the rows
    assert len(trained) == int(live.sum())  # every live sample trained exactly once
    for row, adv in trained:
        hits = [i for i in range(len(samples)) if _same_row(tokens[i], row)]
        assert hits, "a trained row is not one of the step's samples"
        assert any(abs(adv - float(expected[i])) < 1e-5 for i in hits), (adv, expected[hits])


def test_gdpo_dynamic_sampling_keeps_a_group_when_any_reward_varies():
    from megatron_rl.algorithms import informative_mask

    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    # Group 0: totals tie (1 + 0 = 0 + 1) but each reward varies: kept per reward, dropped on
    # the total. Group 1: nothing varies. Group 2: the total varies.
    r_bk = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    assert informative_mask(r_bk, groups).tolist() == [True, True, False, False, True, True]
    assert informative_mask(r_bk.sum(-1), groups).tolist() == [False, False, False, False,
                                                              True, True]


# ---- routing replay ------------------------------------------------------------------------------

def replay_worker(out: str, overrides: list[str], replay: bool, perturb: float) -> dict:
    import torch.distributed as dist

    from megatron_rl.actor import replay as rr
    from megatron_rl.trainer import Trainer

    cfg = _config(out, overrides + [f"rollout.routing_replay={str(replay).lower()}",
                                    "algorithm.dynamic_sampling=false"])
    trainer = Trainer(cfg)
    if dist.get_rank() == 0 and perturb:  # the engine routes differently from the actor
        engine = trainer.engine
        update = engine.update_weights_from_tensor

        def update_and_perturb(*a, **k):
            result = update(*a, **k)
            g = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for name, p in engine.model.named_parameters():
                    if name.endswith("mlp.gate.weight"):
                        p.add_(perturb * torch.randn(p.shape, generator=g))
            return result

        engine.update_weights_from_tensor = update_and_perturb
    capture = _Capture(trainer.actor)
    with rr.recording(trainer.actor) as calls:
        history = trainer.run(steps=1)
    sp = bool(trainer.actor.config.sequence_parallel)
    mbs = [mb for p in capture.logprob_passes + capture.train_passes for mb in p]
    assert len(calls) == len(mbs)
    same = total = 0
    for call, mb in zip(calls, mbs, strict=True):
        engine = rr.to_router_order(mb.routed_experts, sp)  # [N, L, K]
        mask = rr.to_router_order(mb.loss_mask, sp) != 0
        for layer, used in call.items():
            eq = (used.sort(-1).values == engine[:, layer].sort(-1).values).all(-1)[mask]
            same, total = same + int(eq.sum()), total + int(eq.numel())
    return {"metrics": history[0], "same": same, "total": total}


PERTURB = 0.05
"""Noise added to the engine's router weights after every sync: routes differ for some tokens."""
REPLAY_CASES = [(1, []), (2, ["parallel.ep=2"]), (2, ["parallel.tp=2"])]


@pytest.mark.parametrize(("world", "overrides"), REPLAY_CASES, ids=["1rank", "ep2", "tp2"])
def test_routing_replay_uses_the_engines_experts(world, overrides, runs, request):
    ident = request.node.callspec.id
    on, _ = _results(runs, f"replay-{ident}-on")
    # Every trained position of every forward (old log-probs and update), on every rank (under
    # SP a rank may hold only prompt positions, so count over the ranks).
    assert all(res["same"] == res["total"] for res in on) and sum(r["total"] for r in on) > 0
    m_on = on[0]["metrics"]
    assert 0.0 <= m_on["routing/agreement"] < 0.99  # the perturbed engine disagrees
    if world == 1:  # the gap, replay off vs on, from the same start (one layout is enough)
        off, _ = _results(runs, "replay-1rank-off")
        m_off = off[0]["metrics"]
        assert off[0]["same"] < off[0]["total"]  # without replay the actor routes its own way
        # Measured in the same pass either way; under replay, deeper routers see the hidden
        # states of replayed layers, so the two agreements need not be equal.
        assert 0.0 < m_off["routing/agreement"] < 0.99
        gap = "mismatch/logp_abs_diff_mean"
        assert m_on[gap] <= m_off[gap], (m_on[gap], m_off[gap])


def test_routing_agreement_is_logged_without_replay(runs):
    res = _results(runs, "agreement")[0][0]
    # Same weights, fp32: the actor's routers agree with the engine's almost everywhere.
    assert res["metrics"]["routing/agreement"] > 0.95


# ---- saved rollouts ------------------------------------------------------------------------------

def rollouts_worker(out: str, overrides: list[str]) -> dict:
    from megatron_rl.trainer import Trainer

    trainer = Trainer(_config(out, overrides + ["algorithm.dynamic_sampling=false"]))
    history = trainer.run(steps=2)
    weights = {n: p.detach().clone() for n, p in trainer.actor.model[0].named_parameters()}
    return {"history": history, "weights": weights}


def load_three_worker(out: str, overrides: list[str]) -> None:
    from megatron_rl.trainer import Trainer

    Trainer(_config(out, overrides + ["algorithm.dynamic_sampling=false"])).run(steps=3)


def load_dir_worker(tmp: str) -> dict:
    """The saved-rollouts runs in turn in one process, each a fresh Trainer (which
    re-initialises the layout and seeds): `a` saves, `b` loads, `c` loads under another config;
    then a second save into the same directory and a load of a step never saved, each giving
    the traceback it raised."""
    import os
    import traceback

    saved = f"{tmp}/rollouts"
    out = {"a": rollouts_worker(f"{tmp}/a", [f"rollout.save_dir={saved}"])}
    out["saved"] = sorted(os.listdir(saved))
    out["b"] = rollouts_worker(f"{tmp}/b", [f"rollout.load_dir={saved}"])
    out["c"] = rollouts_worker(f"{tmp}/e", [f"rollout.load_dir={saved}",
                                            "algorithm.overlong_penalty=false"])
    for key, worker, sets in (("resave", rollouts_worker, [f"rollout.save_dir={saved}"]),
                              ("unsaved", load_three_worker, [f"rollout.load_dir={saved}"])):
        try:
            worker(f"{tmp}/{key}", sets)
            out[key] = "no error"
        except Exception:  # noqa: BLE001 - the message is what the test checks
            out[key] = traceback.format_exc()
    return out


def test_load_dir_trains_bit_identically_without_an_engine(runs):
    (res,), tmp_path = _results(runs, "load_dir")
    saved = tmp_path / "rollouts"
    a, b, c = res["a"], res["b"], res["c"]
    assert res["saved"] == ["step_1.pt", "step_2.pt"]
    for key in ("actor/loss", "actor/grad_norm", "reward/mean", "accuracy", "actor/entropy"):
        assert [m[key] for m in a["history"]] == [m[key] for m in b["history"]], key
    assert b["history"][0]["weight_sync/bytes"] == 0.0  # no engine was there to update
    for name, w in a["weights"].items():
        assert torch.equal(w, b["weights"][name]), name
    # Loaded under another config, the samples are paid by that config (shaping recomputed):
    # without the overlong punishment the logged reward is the functions' alone.
    from megatron_rl.rollout.store import load_rollouts

    for step, m in enumerate(c["history"], start=1):
        samples, _ = load_rollouts(saved, step)
        acc = [s.rewards["reasoning_gym"] for s in samples]
        assert m["reward/mean"] == pytest.approx(sum(acc) / len(acc))
        assert "reward/overlong_penalty" not in m and a["history"][step - 1]["reward/mean"] < 0
    # A save_dir holding rollouts is never overwritten by a new run.
    assert "already holds saved rollouts" in res["resave"], res["resave"]
    # A step that was not saved is one clear line naming the file (at start, before training).
    assert "has no step_3.pt" in res["unsaved"], res["unsaved"]
    assert sorted(p.name for p in saved.iterdir()) == ["step_1.pt", "step_2.pt"]


# ---- every loss option and estimator through the trainer -----------------------------------------

LOSS_OPTIONS = {  # name: algorithm fields layered on the run's (GRPO preset, KL k3, TIS, entropy)
    "grpo": {},
    "clip_higher": {"eps_high": 0.28},
    "dual_clip": {"dual_clip_c": 1.5},
    "kl_k1": {"kl_estimator": "k1"},
    "kl_k2": {"kl_estimator": "k2"},
    "token_mean": {"loss_agg": "token_mean"},
    "dr_grpo_agg": {"loss_agg": "seq_mean_token_sum_norm", "loss_norm_len": 16},
    "gspo": {"sequence_level_ratio": True},
    "no_tis": {"tis_cap": None},
}


def options_worker(out: str) -> dict:
    """One step with every input of the loss present (KL reference, engine log-probs, entropy),
    two updates, overlong filtering; then the trainer's own loss function for each option is
    compared with the library's `policy_loss` on the real micro-batches, at log-probs that move
    every knob (ratios far outside the clip, a reference far away)."""
    import dataclasses

    from megatron_rl.algorithms import denominator, policy_loss
    from megatron_rl.trainer import Trainer

    cfg = _config(out, [
        "actor.lr=0.05",  # large: the second update's ratios leave the clip range
        "algorithm.preset=grpo", "algorithm.kl_coef=0.05", "algorithm.tis_cap=2.0",
        "algorithm.entropy_coef=0.01", "algorithm.mini_batches=2",
        "algorithm.overlong_filter=true", "rollout.save_dir=" + out + "/rollouts",
        "rewards.functions=[{name: 'test_trainer_algorithms:parity', weight: 1.0}]",
    ])
    trainer = Trainer(cfg)
    sample = trainer.sampler.sample

    def half_finished():  # a random model rarely stops: let every other response "stop"
        samples, report = sample()
        for s in samples[::2]:
            s.finish_reason = "stop"
        return samples, report

    trainer.sampler.sample = half_finished
    capture = _Capture(trainer.actor)
    history = trainer.run(steps=1)
    checks = {}
    for name, fields in LOSS_OPTIONS.items():
        alg = dataclasses.replace(cfg.algorithm, **fields)
        trainer.cfg = dataclasses.replace(cfg, algorithm=alg)
        g = torch.Generator().manual_seed(5)
        got, want, plain = [], [], []
        for update in capture.train_passes:
            fn = trainer.loss_fn(update)  # what the trainer hands the actor for this update
            den = denominator(alg.loss_agg, [mb.loss_mask for mb in update], alg.loss_norm_len)
            for mb in update:
                # Log-probs and engine log-probs far enough from the old ones that the clip,
                # dual clip, TIS cap and KL all act; an entropy to weigh.
                lp = mb.old_logprobs + torch.randn(mb.old_logprobs.shape, generator=g)
                roll = mb.rollout_logprobs + torch.randn(lp.shape, generator=g)
                ent = torch.rand(lp.shape, generator=g) * 3
                mb_x = dataclasses.replace(mb, entropy=ent, rollout_logprobs=roll)
                got.append(fn(lp, mb_x)[0])
                kw = dict(rollout_logprobs=roll, ref_logprobs=mb.ref_logprobs, entropy=ent)
                want.append(policy_loss(alg, lp, mb.old_logprobs, mb.advantages, mb.loss_mask,
                                        den, **kw)[0])
                plain.append(policy_loss(cfg.algorithm, lp, mb.old_logprobs, mb.advantages,
                                         mb.loss_mask, den, **kw)[0])
        checks[name] = (float(sum(got)), float(sum(want)), float(sum(plain)))
    trainer.cfg = cfg
    inputs = {"ref": all(mb.ref_logprobs is not None for mb in update),
              "rollout": all(mb.rollout_logprobs is not None for mb in update),
              "needs_entropy": bool(trainer.loss_fn(update).needs_entropy)}
    rows = [(mb.tokens[i].clone(), float(mb.loss_mask[i].sum()))
            for p in capture.train_passes for mb in p for i in range(mb.tokens.shape[0])]
    return {"checks": checks, "inputs": inputs, "metrics": history[0], "rows": rows}


def test_every_loss_option_reaches_the_update(runs):
    from megatron_rl.batching import token_rows
    from megatron_rl.rollout.store import load_rollouts

    (res,), tmp_path = _results(runs, "options")
    assert res["inputs"] == {"ref": True, "rollout": True, "needs_entropy": True}
    for name, (got, want, plain) in res["checks"].items():
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9), name
        if name != "grpo":  # the option changes the loss at these inputs: not vacuous
            assert abs(want - plain) > 1e-6, name
    m = res["metrics"]
    assert m["actor/kl"] > 0 and 0 < m["actor/tis_weight_mean"] <= 2.0
    assert m["actor/clip_frac_high"] + m["actor/clip_frac_low"] > 0  # stale second update
    # Overlong filtering: every truncated sample trains no token, every other one does.
    samples, _ = load_rollouts(tmp_path / "rollouts", 1)
    assert any(s.truncated for s in samples) and not all(s.truncated for s in samples)
    tokens = token_rows(samples, 160)["tokens"]
    for row, trained in res["rows"]:
        hits = [s for i, s in enumerate(samples) if _same_row(tokens[i], row)]
        if hits and trained > 0:
            assert not any(s.truncated for s in hits)
        elif hits:
            assert all(s.truncated for s in hits)


ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


def estimator_worker(out: str) -> dict:
    """One real step (GRPO), capturing what the actor trained on; then, for every estimator,
    the micro-batches the trainer builds from the same samples (`advantages`, then `batch`)."""
    import dataclasses

    from megatron_rl.rollout.store import load_rollouts
    from megatron_rl.trainer import Trainer

    cfg = _config(out, [
        "algorithm.advantage_estimator=grpo", "algorithm.dynamic_sampling=false",
        "rollout.save_dir=" + out + "/rollouts",
        "rewards.functions=[{name: 'test_trainer_algorithms:parity', weight: 1.0}, "
        "{name: 'test_trainer_algorithms:vowels', weight: 0.5}]"])
    trainer = Trainer(cfg)
    capture = _Capture(trainer.actor)
    trainer.run(steps=1)
    samples, _ = load_rollouts(out + "/rollouts", 1)
    # DAPO's filter (this config's preset) reads the reward functions, never the shaping: a
    # group whose only difference is the overlong penalty carries no signal.
    from megatron_rl.algorithms import informative_mask
    from megatron_rl.rollout.types import Sample

    a, b, pen = trainer.reward_names
    probe = [Sample(group=0, prompt="", prompt_ids=[1], response_ids=[2], rollout_logprobs=[0.0],
                    finish_reason="stop", rewards={a: 1.0, b: 10.0, pen: p}) for p in (0.0, -1.0)]
    filtered = informative_mask(trainer.filter_signal(probe), torch.tensor([0, 0])).tolist()
    passes = {"trained": capture.train_passes}
    for estimator in ESTIMATORS:
        trainer.cfg = dataclasses.replace(cfg, algorithm=dataclasses.replace(
            cfg.algorithm, advantage_estimator=estimator))
        passes[estimator] = trainer.batch(samples, trainer.advantages(samples))
    return {"filtered": filtered} | {
        k: [(mb.tokens[i].clone(), float(mb.advantages[i]))
            for p in v for mb in p for i in range(mb.tokens.shape[0])
            if mb.loss_mask[i].sum() > 0] for k, v in passes.items()}


def _reference_advantages(estimator: str, r: torch.Tensor, groups: torch.Tensor,
                          eps: float = 1e-6) -> torch.Tensor:
    """The papers' formulas on the total reward, a loop per group (unbiased std)."""
    out = torch.zeros_like(r)
    centred = torch.zeros_like(r)
    live = torch.zeros(len(r), dtype=torch.bool)
    for g in groups.unique():
        idx = (groups == g).nonzero().flatten()
        x, n = r[idx], len(idx)
        if n < 2 or x.max() == x.min():
            continue
        live[idx] = True
        if estimator == "grpo":
            out[idx] = (x - x.mean()) / (x.std() + eps)
        elif estimator == "dr_grpo":
            out[idx] = x - x.mean()
        elif estimator == "rloo":
            out[idx] = torch.stack([x[i] - (x.sum() - x[i]) / (n - 1) for i in range(n)])
        centred[idx] = x - x.mean()
    if estimator == "reinforce_pp_baseline":
        vals = centred[live]
        out[live] = (vals - vals.mean()) / (vals.std() + eps)
    return out


def test_advantage_estimators_reach_the_update(runs):
    from megatron_rl.batching import token_rows
    from megatron_rl.rollout.store import load_rollouts

    (rows,), tmp_path = _results(runs, "estimators")
    samples, _ = load_rollouts(tmp_path / "rollouts", 1)
    # The paid reward: both functions by weight, plus the tiny config's (DAPO) soft overlong
    # punishment, a column of weight 1.
    assert all("overlong_penalty" in s.rewards for s in samples)
    total = torch.tensor([s.rewards["test_trainer_algorithms:parity"]
                          + 0.5 * s.rewards["test_trainer_algorithms:vowels"]
                          + s.rewards["overlong_penalty"] for s in samples], dtype=torch.float64)
    groups = torch.tensor([s.group for s in samples])
    tokens = token_rows(samples, 160)["tokens"]
    assert rows["filtered"] == [False, False]
    # What the actor trained on is what `batch` builds for the configured estimator.
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1]
               for a, b in zip(rows["trained"], rows["grpo"], strict=True))
    for estimator in ESTIMATORS:
        expected = _reference_advantages(estimator, total, groups)
        assert expected.abs().max() > 0  # some group varies: not vacuous
        assert rows[estimator]
        for row, adv in rows[estimator]:
            hits = [i for i in range(len(samples)) if _same_row(tokens[i], row)]
            assert any(abs(adv - float(expected[i])) < 1e-5 for i in hits), \
                (estimator, adv, expected[hits])
