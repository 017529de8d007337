"""The actor's building blocks at one rank: MoE features of the builder, the portable layers,
log-probs over a padded vocabulary, the CPU compat layer, bf16, recompute, atomic checkpoints.

Megatron keeps process-global state, so the checks run in a spawned process: one for the whole
module (`rank_batches`), each worker starting its own actor.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from rank_batches import Failed, ok, run_batch

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_moe_cpu.yaml")
SMALL = ["actor.seq_length=16", "actor.micro_batch_size=2", "rollout.max_new_tokens=8",
         "parallel.timeout_s=60"]
# DeepSeek-V3's MoE recipe in miniature: a first dense layer, sigmoid router with expert bias
# (aux-loss free), group-limited routing, scaled top-k weights, a shared expert.
DEEPSEEK_MOE = [
    "model.hf_architecture=null", "model.num_layers=3", "model.moe_layer_freq=[0,1,1]",
    "model.num_experts=8",
    "model.moe_router_topk=2", "model.moe_router_score_function=sigmoid",
    "model.moe_router_enable_expert_bias=true", "model.moe_router_bias_update_rate=0.01",
    "model.moe_router_load_balancing_type=seq_aux_loss", "model.moe_aux_loss_coeff=0.001",
    "model.moe_router_num_groups=4", "model.moe_router_group_topk=2",
    "model.moe_router_topk_scaling_factor=2.5", "model.moe_shared_expert_intermediate_size=64",
]


def _actor(overrides: list[str]):
    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.parallel import init_distributed
    from megatron_rl.config import load_config

    cfg = load_config(TINY, SMALL + overrides, world_size=int(os.environ["WORLD_SIZE"]))
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    return cfg, Actor(cfg.model, cfg.parallel, cfg.actor, total_steps=4)


def _batch(vocab: int, n: int = 2, b: int = 2, s: int = 16, seed: int = 0):
    from megatron_rl.actor.step import MicroBatch

    g = torch.Generator().manual_seed(seed)
    mbs = []
    for _ in range(n):
        t = torch.randint(0, vocab, (b, s + 1), generator=g)
        mbs.append(MicroBatch(t[:, :-1], t[:, 1:], torch.ones(b, s)))
    return mbs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every worker of this module, run in turn in one 1-rank spawn: {name: result}, and
    "checkpoint_root": where the checkpoint worker saved."""
    ckpt_root = tmp_path_factory.mktemp("ckpt")
    calls = {
        "deepseek": (deepseek_worker, ()),
        "recompute_none": (recompute_worker, ("none",)),
        "recompute_full": (recompute_worker, ("full",)),
        "bf16": (bf16_worker, ()),
        "layers": (layers_worker, ()),
        "checkpoint": (checkpoint_worker, (str(ckpt_root),)),
        "policy_kernel": (policy_impl_worker, ("kernel",)),
        "policy_algorithms": (policy_impl_worker, ("algorithms",)),
        "bad_layout": (deepseek_like_bad_worker, (["parallel.tp=3"],)),
    }
    results = run_batch(1, list(calls.values()))
    return {name: res for name, (res,) in zip(calls, results, strict=True)} | {
        "checkpoint_root": ckpt_root}


def deepseek_worker() -> dict:
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_rl.actor.step import nll_loss

    cfg, actor = _actor(DEEPSEEK_MOE)
    layers = actor.model[0].module.decoder.layers
    kinds = [type(layer.mlp) for layer in layers]
    routers = [layer.mlp.router for layer in layers if isinstance(layer.mlp, MoELayer)]
    bias_before = [r.expert_bias.clone() for r in routers]
    mbs = _batch(cfg.model.vocab_size)
    res = actor.train_step(mbs, nll_loss(float(sum(m.loss_mask.sum() for m in mbs))))
    return {
        "dense_first": kinds[0] is MLP and all(k is MoELayer for k in kinds[1:]),
        "shared": all(layer.mlp.shared_experts is not None for layer in layers[1:]),
        "bias_moved": [float((r.expert_bias - b).abs().max()) for r, b in zip(routers, bias_before,
                                                                               strict=True)],
        "loss": res.stats["loss"], "updated": res.updated, "grad_norm": res.grad_norm,
    }


def test_deepseek_style_moe_builds_and_trains(runs):
    res = ok(runs["deepseek"])
    assert res["dense_first"] and res["shared"]
    assert res["updated"] and torch.isfinite(torch.tensor([res["loss"], res["grad_norm"]])).all()
    # Aux-loss-free balancing: finalize_model_grads moved every router's expert bias.
    assert all(m > 0 for m in res["bias_moved"])


def recompute_worker(recompute: str) -> dict:
    from megatron_rl.actor.step import nll_loss

    cfg, actor = _actor([f"actor.recompute={recompute}", "actor.clip_grad=0"])
    mbs = _batch(cfg.model.vocab_size)
    for chunk in actor.model:
        chunk.train()
        chunk.zero_grad_buffer()
    from megatron_rl.actor.step import forward_backward

    stats = forward_backward(actor.model, mbs, nll_loss(64.0), actor.shape(16, 2))
    grads = {n: p.main_grad.clone() for n, p in actor.model[0].module.named_parameters()}
    return {"loss": stats["loss"], "grads": grads}


def test_recompute_gives_the_same_loss_and_gradients(runs):
    plain, full = ok(runs["recompute_none"]), ok(runs["recompute_full"])
    assert full["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    for name, g in plain["grads"].items():
        torch.testing.assert_close(full["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)


def bf16_worker() -> dict:
    from megatron_rl.actor.step import nll_loss

    cfg, actor = _actor(["actor.params_dtype=bfloat16"])
    p = next(actor.model[0].module.parameters())
    before = p.detach().float().clone()
    mbs = _batch(cfg.model.vocab_size)
    res = actor.train_step(mbs, nll_loss(64.0))
    return {"dtype": str(p.dtype), "updated": res.updated, "moved": float((p.float() - before)
                                                                           .abs().max()),
            "type_name": torch.zeros(1).type()}


def test_bf16_params_train_on_cpu(runs):
    res = ok(runs["bf16"])
    assert res["dtype"] == "torch.bfloat16" and res["updated"] and res["moved"] > 0
    # The optimizers saw CUDA type names only inside their constructors.
    assert res["type_name"] == "torch.FloatTensor"


def layers_worker() -> dict:
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_rl.actor import compat
    from megatron_rl.actor.layers import RMSNorm, SDPACoreAttention, _packed_causal_mask
    from megatron_rl.actor.logprobs import token_logprobs

    cfg, actor = _actor([])
    tcfg = actor.config
    out: dict = {"compat": compat.is_active(), "cuda_zeros": str(torch.zeros(2, device="cuda")
                                                                 .device)}
    # RMSNorm = Hugging Face Llama's formula.
    norm = RMSNorm(tcfg, 8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 8)
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    out["rmsnorm"] = float((norm(x) - ref).abs().max())
    # SDPA core attention with GQA and causal masking = explicit softmax attention.
    attn = SDPACoreAttention(tcfg, 1, AttnMaskType.causal, "self")
    s, b, n, g, h = 5, 2, 4, 2, tcfg.kv_channels
    q, k, v = torch.randn(s, b, n, h), torch.randn(s, b, g, h), torch.randn(s, b, g, h)
    got = attn(q, k, v, None)
    kk, vv = k.repeat_interleave(n // g, 2), v.repeat_interleave(n // g, 2)
    scores = torch.einsum("sbnh,tbnh->bnst", q, kk) / h**0.5
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    want = torch.einsum("bnst,tbnh->sbnh", scores.softmax(-1), vv).reshape(s, b, n * h)
    out["sdpa"] = float((got - want).abs().max())
    # Packed sequences [0,3) and [3,5): causal within each, nothing across.
    mask = _packed_causal_mask(torch.tensor([0, 3, 5]), 5)
    out["packed"] = mask.int().tolist()
    # Padded vocabulary ids never receive probability.
    logits = torch.randn(1, 3, 8)
    padded = torch.cat([logits, torch.full((1, 3, 4), 50.0)], dim=-1)
    labels = torch.tensor([[1, 7, 0]])
    lp = token_logprobs(padded, labels, vocab_size=8, temperature=0.7)
    want_lp = torch.log_softmax(logits / 0.7, -1).gather(-1, labels[..., None])[..., 0]
    out["logprobs"] = float((lp - want_lp).abs().max())
    return out


def test_portable_layers_and_logprobs(runs):
    res = ok(runs["layers"])
    assert res["compat"] and res["cuda_zeros"] == "cpu"
    assert res["rmsnorm"] < 1e-6 and res["sdpa"] < 1e-5 and res["logprobs"] < 1e-5
    assert res["packed"] == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]
    ]


def checkpoint_worker(root: str) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_rl.actor import checkpoint

    _, actor = _actor([])
    first = actor.save(root, "step1")
    real_save = dist_checkpointing.save

    def crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise OSError("disk full (simulated, after the files were written)")

    checkpoint.dist_checkpointing.save = crash
    try:
        actor.save(root, "step2")
        crashed = False
    except OSError:
        crashed = True
    checkpoint.dist_checkpointing.save = real_save
    try:
        checkpoint.resolve(os.path.join(root, "nowhere"))
        missing = ""
    except FileNotFoundError as e:
        missing = str(e)
    return {"first": first, "crashed": crashed, "latest": str(checkpoint.resolve(root)),
            "step2_exists": os.path.exists(os.path.join(root, "step2")), "missing": missing}


def test_checkpoint_save_is_atomic(runs):
    res = ok(runs["checkpoint"])
    assert res["crashed"]
    assert not res["step2_exists"], "a failed save must not look like a checkpoint"
    assert res["latest"] == res["first"] == str(runs["checkpoint_root"] / "step1")
    assert "nowhere" in res["missing"] and "metadata.json" in res["missing"]


def test_bad_layout_fails_with_config_error_in_the_rank(runs):
    res = runs["bad_layout"]
    assert isinstance(res, Failed) and "parallel" in res.splitlines()[-1], res


def deepseek_like_bad_worker(overrides: list[str]) -> None:
    _actor(overrides)


def policy_impl_worker(impl: str) -> dict:
    """One step of the clipped loss with KL and entropy bonus, by the fused kernel's dispatcher
    or by the algorithms library, from the same weights and batch."""
    import dataclasses

    from megatron_rl.actor.loss import policy_loss_fn
    from megatron_rl.algorithms import denominator, make_loss_fn

    cfg, actor = _actor(["algorithm.dual_clip_c=3.0"])
    mbs = _batch(cfg.model.vocab_size)
    g = torch.Generator().manual_seed(3)
    for mb, logp in zip(mbs, actor.logprobs(mbs), strict=True):
        mb.advantages = torch.randn(2, generator=g)
        mb.old_logprobs = logp + 0.3 * torch.randn(logp.shape, generator=g)
        mb.ref_logprobs = logp + 0.1 * torch.randn(logp.shape, generator=g)
    alg = dataclasses.replace(cfg.algorithm, kl_coef=0.05, entropy_coef=0.01)
    den = denominator(alg.loss_agg, [mb.loss_mask for mb in mbs])
    fn = policy_loss_fn(alg, den) if impl == "kernel" else make_loss_fn(alg, den)
    if impl == "algorithms":  # the library reads the entropy from the micro-batch too
        fn.needs_entropy = True
    res = actor.train_step(mbs, fn)
    return {"stats": res.stats, "grad_norm": res.grad_norm}


def test_fused_policy_loss_in_the_actor_matches_the_algorithms_library(runs):
    kernel, library = ok(runs["policy_kernel"]), ok(runs["policy_algorithms"])
    assert kernel["grad_norm"] == pytest.approx(library["grad_norm"], rel=1e-5)
    assert "entropy_sum" in kernel["stats"] and "kl_sum" in kernel["stats"]
    for key, value in library["stats"].items():
        assert kernel["stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
