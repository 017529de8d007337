"""The reference policy: swapped into the actor's own parameters, it gives the initial weights'
log-probs exactly, and leaves the actor (weights, storage, DDP buffers, optimizer) as it was.

Each run trains two actors with the same initial weights in lockstep, one of them with a
reference forward between steps; the next step must agree bitwise. That catches a swap that
rebinds `param.data` (with the distributed optimizer the params are views into Megatron DDP's
param buffer, which the optimizer writes the update into) or that leaks reference values.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from rank_batches import ok, run_cases

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_moe_cpu.yaml")
BATCH, SEQ, ROWS_PER_MB = 4, 32, 2
BASE = ["actor.seq_length=32", f"actor.micro_batch_size={ROWS_PER_MB}", "actor.lr=0.01",
        "rollout.max_new_tokens=16", "parallel.timeout_s=60", "model.moe_aux_loss_coeff=0"]
# A routing bias that training moves (aux-loss-free balancing, as in DeepSeek-V3): a persistent
# buffer, not a parameter, that the reference must swap too. A large update rate makes the
# moved bias change routing, so leaving it out of the swap changes the log-probs.
EXPERT_BIAS = ["model.hf_architecture=", "model.moe_router_score_function=sigmoid",
               "model.moe_router_enable_expert_bias=true", "model.moe_router_bias_update_rate=0.5"]


def _setup(overrides: list[str]):
    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.parallel import init_distributed
    from megatron_rl.actor.reference import model_tensors
    from megatron_rl.config import load_config

    cfg = load_config(TINY, BASE + overrides, world_size=int(os.environ["WORLD_SIZE"]))
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    actor = Actor(cfg.model, cfg.parallel, cfg.actor, total_steps=4)
    twin = Actor(cfg.model, cfg.parallel, cfg.actor, total_steps=4)
    with torch.no_grad():
        for (_, a), (_, b) in zip(model_tensors(actor), model_tensors(twin), strict=True):
            b.copy_(a)
    twin.optimizer.reload_model_params()  # fp32 main params of bf16 runs follow the copy
    return cfg, actor, twin


def _micro_batches(vocab: int):
    """This DP rank's rows of a fixed batch, `ROWS_PER_MB` rows per micro-batch."""
    from megatron.core import parallel_state as ps

    from megatron_rl.actor.step import MicroBatch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g)
    mask = torch.ones(BATCH, SEQ)
    mask[:, :8] = 0
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    lo, hi = rank * BATCH // dp, (rank + 1) * BATCH // dp
    return [MicroBatch(tokens[i : i + ROWS_PER_MB, :-1], tokens[i : i + ROWS_PER_MB, 1:],
                       mask[i : i + ROWS_PER_MB]) for i in range(lo, hi, ROWS_PER_MB)], mask.sum()


def _ddp_views(actor) -> int:
    """How many parameters are views into a Megatron DDP param buffer (distributed optimizer)."""
    spans = []
    for chunk in actor.model:
        for buf in chunk.buffers + chunk.expert_parallel_buffers:
            data = buf.param_data
            if data is not None:
                start = data.data_ptr()
                spans.append((start, start + data.numel() * data.element_size()))
    return sum(any(lo <= p.data_ptr() < hi for lo, hi in spans)
               for chunk in actor.model for p in chunk.module.parameters())


def swap_worker(overrides: list[str], with_kl: bool) -> dict:
    from megatron_rl.actor.reference import ReferencePolicy, model_tensors
    from megatron_rl.actor.step import nll_loss

    cfg, actor, twin = _setup(overrides)
    mbs, tokens = _micro_batches(cfg.model.vocab_size)
    loss = nll_loss(float(tokens))
    initial = actor.logprobs(mbs)
    ref = ReferencePolicy.from_actor(actor)
    for _ in range(2):
        for a in (actor, twin):
            assert a.train_step(mbs, loss).updated
    named = model_tensors(actor)
    before = [t.clone() for _, t in named]
    ptrs = [t.data_ptr() for _, t in named]
    trained = actor.logprobs(mbs)
    ref_lp = ref.logprobs(actor, mbs)
    after = model_tensors(actor)
    out = {
        "ref_equals_initial": all(torch.equal(r, i) for r, i in zip(ref_lp, initial, strict=True)),
        "trained_moved": max(float((t - i).abs().max()) for t, i in zip(trained, initial,
                                                                         strict=True)),
        "weights_restored": all(torch.equal(b, t) for b, (_, t) in zip(before, after,
                                                                       strict=True)),
        "same_storage": ptrs == [t.data_ptr() for _, t in after],
        "logprobs_restored": all(torch.equal(a, b) for a, b in zip(actor.logprobs(mbs), trained,
                                                                   strict=True)),
        "bias_moved": [float((t - h).abs().max()) for (n, t), h in zip(named, ref.host,
                                                                      strict=True)
                       if n.endswith("expert_bias")],
        "ddp_views": _ddp_views(actor),
        "dtype": str(named[0][1].dtype),
    }
    # One more step on both actors: bitwise the same whether or not a reference forward ran.
    ra, rb = actor.train_step(mbs, loss), twin.train_step(mbs, loss)
    out["step_same"] = (ra.stats == rb.stats and ra.grad_norm == rb.grad_norm
                        and all(torch.equal(a, b) for (_, a), (_, b) in
                                zip(model_tensors(actor), model_tensors(twin), strict=True)))
    out["step_moved"] = max(float((b - t).abs().max()) for b, (_, t) in
                            zip(before, model_tensors(actor), strict=True))
    if with_kl:
        out["kl"] = _kl_steps(cfg, twin, mbs)
    return out


def _kl_steps(cfg, actor, mbs) -> list[float]:
    """Two policy-loss steps with the KL penalty against a reference taken now: the mean KL the
    loss saw at each (0 at the first: the reference is the current policy)."""
    import dataclasses

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_rl.actor.loss import policy_loss_fn
    from megatron_rl.actor.reference import ReferencePolicy
    from megatron_rl.algorithms import denominator

    alg = dataclasses.replace(cfg.algorithm, kl_coef=0.1, kl_estimator="k3")
    ref = ReferencePolicy.from_actor(actor)
    g = torch.Generator().manual_seed(1)
    den = denominator(alg.loss_agg, [mb.loss_mask for mb in mbs])
    dist.all_reduce(den, group=ps.get_data_parallel_group())
    kls = []
    for _ in range(2):
        old, ref_lp = actor.logprobs(mbs), ref.logprobs(actor, mbs)
        for mb, o, r in zip(mbs, old, ref_lp, strict=True):
            mb.old_logprobs, mb.ref_logprobs = o, r
            mb.advantages = torch.randn(mb.tokens.shape[0], generator=g)
        res = actor.train_step(mbs, policy_loss_fn(alg, den))
        assert res.updated
        kls.append(res.stats["kl_sum"] / res.stats["tokens"])
    return kls


def _check(res: dict) -> None:
    assert res["trained_moved"] > 1e-4, "training did not change the log-probs: vacuous test"
    assert res["ref_equals_initial"]
    assert res["weights_restored"] and res["same_storage"] and res["logprobs_restored"]
    assert res["step_moved"] > 0 and res["step_same"]


TWO_RANKS = {
    "tp2_ep2": ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1",
                "parallel.sequence_parallel=true"],
    "dp2_distopt_bf16": ["actor.use_distributed_optimizer=true", "actor.params_dtype=bfloat16"],
}


@pytest.fixture(scope="module")
def runs() -> dict:
    """Every swap run: the 1-rank one, then the 2-rank layouts in turn in one spawn."""
    cases = {"single": (1, swap_worker, (EXPERT_BIAS, True)),
             **{name: (2, swap_worker, (overrides, False)) for name, overrides in
                TWO_RANKS.items()}}
    return dict(zip(cases, run_cases(list(cases.values()), timeout_s=600), strict=True))


def test_reference_swap_single_rank_with_expert_bias_and_kl(runs):
    res = ok(runs["single"][0])
    _check(res)
    assert len(res["bias_moved"]) == 2 and max(res["bias_moved"]) > 0  # a bias per MoE layer
    kl0, kl1 = res["kl"]
    assert abs(kl0) < 1e-9  # reference == policy at the first step
    assert kl1 > 1e-6  # one update later the policy has moved away from the reference


@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_reference_swap_two_ranks(name, runs):
    overrides = TWO_RANKS[name]
    results = [ok(res) for res in runs[name]]
    for res in results:
        _check(res)
    if "actor.use_distributed_optimizer=true" in overrides:
        # The params are views into DDP's buffer: why the swap must copy, never rebind.
        assert all(r["ddp_views"] > 0 and r["dtype"] == "torch.bfloat16" for r in results)
