"""Routing replay (R3) with full activation recompute, against a Megatron-Core actor of
`configs/tiny_moe_cpu.yaml` at 1 rank, TP=2 (sequence parallel) and EP=2.

Two actors with the same weights, `actor.recompute=full` and `none`, replay engine experts that
differ from their routers' own choice over 3 micro-batches. Every router call, the forwards and
the recomputes inside backward (no pipelining: forward i, then its backward, per micro-batch),
uses the engine's experts of its own micro-batch; the loss, the grad norm and every gradient
equal the no-recompute run's.
"""

from __future__ import annotations

import pytest
import torch
from rank_batches import ok, run_cases
from test_weight_sync import SEQ, _mb, _model_cfg, _perturb

N_MB, MBS = 3, 2


def _engine_experts(n_layers: int, n_experts: int, k: int) -> list[torch.Tensor]:
    """Per micro-batch [MBS, SEQ, L, K]: k distinct random experts per token and layer."""
    g = torch.Generator().manual_seed(5)
    return [torch.rand(MBS, SEQ, n_layers, n_experts, generator=g).argsort(-1)[..., :k]
            for _ in range(N_MB)]


def _microbatches(vocab: int, experts: list[torch.Tensor] | None):
    g = torch.Generator().manual_seed(3)
    mbs = []
    for i in range(N_MB):
        mb = _mb(torch.randint(0, vocab, (MBS, SEQ + 1), generator=g))
        mb.routed_experts = None if experts is None else experts[i]
        mbs.append(mb)
    return mbs


def _gathered(call: dict[int, torch.Tensor]) -> torch.Tensor:
    """[L, SEQ * MBS, K] of one router call per MoE layer (gathers the SP slices)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    layers = []
    tp = ps.get_tensor_model_parallel_world_size()
    for layer in sorted(call):
        x = call[layer]
        if x.shape[0] != SEQ * MBS:
            parts = [torch.empty_like(x) for _ in range(tp)]
            dist.all_gather(parts, x.contiguous(), group=ps.get_tensor_model_parallel_group())
            x = torch.cat(parts)
        layers.append(x)
    return torch.stack(layers)


def _run(model_cfg, par, recompute: str, experts: list[torch.Tensor]) -> dict:
    from megatron_rl.actor import replay
    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.config import ActorConfig
    from megatron_rl.actor.step import nll_loss

    actor = Actor(model_cfg, par, ActorConfig(seq_length=SEQ, micro_batch_size=MBS, lr=1e-2,
                                              recompute=recompute))
    _perturb(actor)
    # The routers' own choice, without replay: it must differ from the engine's.
    with replay.recording(actor) as calls:
        actor.logprobs(_microbatches(model_cfg.vocab_size, None))
    own = [_gathered(c) for c in calls]
    actor.enable_routing_replay()
    with replay.recording(actor) as calls:
        step = actor.train_step(_microbatches(model_cfg.vocab_size, experts),
                                nll_loss(float(SEQ * MBS * N_MB)))
    grads = {n: p.main_grad.detach().clone()
             for n, p in actor.model[0].module.named_parameters()}
    return {"own": own, "calls": [_gathered(c) for c in calls],
            "loss": step.stats["loss"], "grad_norm": step.grad_norm, "updated": step.updated,
            "grads": grads}


def recompute_worker(parallel: dict) -> dict:
    from megatron_rl.actor.config import ParallelConfig
    from megatron_rl.actor.parallel import init_distributed

    model_cfg = _model_cfg()
    par = ParallelConfig(timeout_s=60, dp=None, **parallel)
    init_distributed(par, seed=1)
    experts = _engine_experts(model_cfg.num_layers, model_cfg.num_experts,
                              model_cfg.moe_router_topk)
    # [L, N, K] in the router's token order (token s * b + j), per micro-batch, sorted.
    want = [e.transpose(0, 1).reshape(SEQ * MBS, *e.shape[2:]).transpose(0, 1).sort(-1).values
            for e in experts]
    return {"want": want, "full": _run(model_cfg, par, "full", experts),
            "none": _run(model_cfg, par, "none", experts)}


CASES = [(1, {}), (2, {"tp": 2, "sequence_parallel": True}), (2, {"ep": 2})]


@pytest.fixture(scope="module")
def runs() -> list[list]:
    """Every case's worker; the 2-rank cases in turn in one spawn."""
    return run_cases([(world, recompute_worker, (parallel,)) for world, parallel in CASES])


@pytest.mark.parametrize(("world", "parallel"), CASES, ids=["single", "tp2-sp", "ep2"])
def test_replay_under_full_recompute(world, parallel, runs):
    for res in map(ok, runs[CASES.index((world, parallel))]):
        want, full, none = res["want"], res["full"], res["none"]
        # Not vacuous: the routers' own choice differs from the engine's.
        for own, engine in zip(none["own"], want, strict=True):
            assert (own == engine).all(-1).float().mean() < 0.5
        # Without recompute one router call per micro-batch; with it, each forward is followed
        # by its recompute in backward (forward i, backward i): all use micro-batch i's experts.
        assert len(none["calls"]) == N_MB and len(full["calls"]) == 2 * N_MB
        for i, engine in enumerate(want):
            assert torch.equal(none["calls"][i], engine)
            assert torch.equal(full["calls"][2 * i], engine)
            assert torch.equal(full["calls"][2 * i + 1], engine)
        assert full["updated"] and none["updated"]
        assert full["loss"] == pytest.approx(none["loss"], rel=1e-5)
        assert full["grad_norm"] == pytest.approx(none["grad_norm"], rel=1e-5)
        assert full["grads"].keys() == none["grads"].keys()
        for name, g in none["grads"].items():
            torch.testing.assert_close(full["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
