"""Fused kernels (`megatron_rl.kernels`): Triton under TRITON_INTERPRET=1 vs the chunked torch
path vs `log_softmax(...).gather`, and the policy-loss kernel vs the algorithms library's
`policy_loss` (the one torch reference), values, gradients and statistics, fp32.

Triton reads TRITON_INTERPRET when it is first imported (its own tl.* helpers are @triton.jit
too), and a pytest process has usually imported triton already. So the Triton tests here run
only under the flag: `test_triton_interpreter_suite` re-runs this file in a subprocess with
TRITON_INTERPRET=1 (or run `TRITON_INTERPRET=1 pytest tests/test_kernels.py` yourself).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_rl.launch.spawn import run_ranks

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="runs inside test_triton_interpreter_suite's TRITON_INTERPRET=1 "
    "subprocess (Triton reads the flag when it is first imported)")


@pytest.fixture(scope="module")
def interp():
    """The Triton kernel modules, interpreted (tests using this run only under the flag)."""
    if not INTERPRETED:
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported")
    import importlib

    return {name: importlib.import_module(name) for name in (
        "megatron_rl.kernels.triton_logprobs", "megatron_rl.kernels.triton_policy_loss")}


@pytest.mark.skipif(INTERPRETED, reason="this is the launcher")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_interpreter_suite() -> None:
    """Run this file's interpreter tests in a fresh process with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def _case(kind: str, t: int = 6, v: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, v, generator=g) * 3
    vocab_size, temp = v, 1.0
    if kind == "all_negative":
        x = x - 60.0
    elif kind == "padded":
        vocab_size = v - 7
        x[:, vocab_size:] = 80.0  # would dominate if not masked
    elif kind == "temperature":
        temp = 0.6
    labels = torch.randint(0, vocab_size, (t,), generator=g)
    return x, labels, vocab_size, temp


@pytest.mark.parametrize("kind", ["plain", "all_negative", "padded", "temperature"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logprobs_entropy_match_log_softmax(interp, kind: str, backend: str) -> None:
    from megatron_rl.kernels.logprobs import logprobs_and_entropy, naive_logprobs_and_entropy

    x, labels, vocab_size, temp = _case(kind)
    gl, ge = torch.randn(len(labels)), torch.randn(len(labels))
    a = x.clone().requires_grad_()
    lp, ent = logprobs_and_entropy(a, labels, vocab_size=vocab_size, temperature=temp,
                                   backend=backend, chunk_tokens=4)
    (lp * gl + ent * ge).sum().backward()
    b = x.clone().requires_grad_()
    lp2, ent2 = naive_logprobs_and_entropy(b, labels, vocab_size, temp)
    (lp2 * gl + ent2 * ge).sum().backward()
    assert lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp, lp2, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent2, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=2e-6, rtol=1e-5)
    assert bool(torch.isfinite(a.grad).all())
    if kind == "padded":
        assert float(a.grad[:, vocab_size:].abs().max()) == 0.0


def test_triton_matches_torch_masked_tokens_bf16_rows(interp) -> None:
    """Masked tokens (label -100, owned by no rank) stay finite and get no gradient."""
    from megatron_rl.kernels.logprobs import logprobs_and_entropy

    x, labels, vocab_size, temp = _case("padded", t=9, v=50, seed=3)
    labels[[1, 4]] = -100
    mask = torch.ones(9)
    mask[[1, 4]] = 0
    out = {}
    for backend in ("torch", "triton"):
        a = x.clone().requires_grad_()
        lp, ent = logprobs_and_entropy(a, labels, vocab_size=vocab_size, temperature=1.3,
                                       backend=backend)
        ((lp + 0.1 * ent) * mask).sum().backward()
        out[backend] = (lp, ent, a.grad)
    for r, t in zip(out["torch"], out["triton"], strict=True):
        torch.testing.assert_close(t, r, atol=2e-6, rtol=1e-5)
    assert bool(torch.isfinite(out["triton"][0]).all())
    assert float(out["triton"][2][[1, 4]].abs().max()) == 0.0


def test_int64_row_offsets(interp) -> None:
    """Row offsets are computed in int64: T*V passes 2^31 at T=16.6k rows of V=129280."""
    mod = interp["megatron_rl.kernels.triton_logprobs"]
    rows = torch.tensor([0, 1, 16_600, 16_700, 20_000], dtype=torch.int32)
    out = torch.zeros(len(rows), dtype=torch.int64)
    mod.offset_probe_kernel[(len(rows),)](rows, out, 129_280)
    want = rows.long() * 129_280
    assert int(want.max()) > 2**31 - 1  # an int32 product would wrap here
    assert out.tolist() == want.tolist()


def tp2_worker(backend: str) -> dict:
    import torch.distributed as dist

    from megatron_rl.kernels.logprobs import logprobs_and_entropy

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    x, labels, vocab_size, _ = _case("padded", t=5, v=48, seed=7)  # 41 real ids, 2 x 24 slices
    labels = torch.tensor([30, 25, 40, 3, 24])  # mostly owned by rank 1
    v_local = 24
    a = x[:, rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
    lp, ent = logprobs_and_entropy(a, labels, vocab_start=rank * v_local, vocab_size=vocab_size,
                                   temperature=0.8, group=dist.group.WORLD, backend=backend)
    (lp * torch.arange(1.0, 6.0) + 0.5 * ent).sum().backward()
    return {"lp": lp.detach(), "ent": ent.detach(), "grad": a.grad}


@needs_interpreter
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tp2_labels_on_other_rank(backend: str) -> None:
    from megatron_rl.kernels.logprobs import naive_logprobs_and_entropy

    res = run_ranks(tp2_worker, 2, backend, timeout_s=120)
    x, _, vocab_size, _ = _case("padded", t=5, v=48, seed=7)
    labels = torch.tensor([30, 25, 40, 3, 24])
    b = x.clone().requires_grad_()
    lp, ent = naive_logprobs_and_entropy(b, labels, vocab_size, 0.8)
    (lp * torch.arange(1.0, 6.0) + 0.5 * ent).sum().backward()
    for r in res:
        torch.testing.assert_close(r["lp"], lp.detach(), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(r["ent"], ent.detach(), atol=2e-5, rtol=1e-5)
    grad = torch.cat([r["grad"] for r in res], dim=1)
    torch.testing.assert_close(grad, b.grad, atol=2e-6, rtol=1e-5)


def test_torch_chunks_match_log_softmax() -> None:
    """The chunked torch path (no Triton) equals log_softmax(...).gather on a bigger shape."""
    from megatron_rl.kernels.logprobs import logprobs_and_entropy, naive_logprobs_and_entropy

    x = torch.randn(300, 1000) * 4
    labels = torch.randint(0, 1000, (300,))
    lp, ent = logprobs_and_entropy(x, labels, temperature=0.9, backend="torch",
                                   chunk_tokens=64)
    lp2, ent2 = naive_logprobs_and_entropy(x, labels, None, 0.9)
    want = torch.log_softmax(x / 0.9, -1).gather(-1, labels[:, None])[:, 0]
    torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent2, atol=1e-5, rtol=1e-5)


FEATURES = {
    "plain": dict(),
    "k1_tis": dict(kl_coef=0.1, kl_estimator="k1", tis_cap=1.5),
    "k2_dual_entropy": dict(kl_coef=0.2, kl_estimator="k2", dual_clip_c=3.0, entropy_coef=0.01),
    "k3_all": dict(kl_coef=0.04, kl_estimator="k3", dual_clip_c=2.0, tis_cap=2.0,
                   entropy_coef=0.02),
    "ref_without_penalty": dict(kl_coef=0.0, kl_estimator="k3"),  # KL as a statistic only
}
LOSS_AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


def _policy_inputs(seed: int = 0, extreme: bool = False):
    """Log-probs [3, 40] around -2 with ratios on both sides of the clip range (clip-higher and
    dual clip act), a fully masked sample and garbage (NaN, +-1e30) under the mask. `extreme`
    adds live tokens whose gaps to ref / old / rollout are far past every bound."""
    g = torch.Generator().manual_seed(seed)
    b, t = 3, 40
    lp = torch.randn(b, t, generator=g) * 0.3 - 2
    old = lp + torch.randn(b, t, generator=g) * 0.6
    ref = lp + torch.randn(b, t, generator=g) * 0.5
    roll = old + torch.randn(b, t, generator=g) * 0.5
    adv = torch.tensor([1.3, -0.7, 0.4])
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    mask[2] = 0  # a fully masked (filtered) sample
    ent = torch.rand(b, t, generator=g) * 3
    old[0, 5] = float("nan")  # garbage under the mask must not leak
    mask[0, 5] = 0
    for x, v in ((lp, 1e30), (ref, -1e30), (roll, 1e30), (ent, -1e30)):
        x[1, 7] = v
    mask[1, 7] = 0
    if extreme:
        gaps = [-1e4, -100.0, -30.0, 0.0, 30.0, 88.0, 100.0, 1e4]
        cols = torch.arange(10, 10 + len(gaps))
        for row in (0, 1):
            mask[row, cols] = 1.0
            lp[row, cols] = -2.0
            ref[row, cols] = -2.0 + torch.tensor(gaps)  # ref - logp
            old[row, cols] = -2.0 - torch.tensor(gaps[::-1])  # logp - old
            roll[row, cols] = old[row, cols] - torch.tensor(gaps)  # old - rollout
    return lp, old, ref, roll, adv, mask, ent


def _abs_sums(cfg, inputs, den: float) -> dict[str, float]:
    """sum over live tokens of |term| for the sums whose terms can cancel (fp64): fp32 rounding
    of a sum is relative to these, not to the sum (k1 at gaps of +-1e4, say)."""
    from megatron_rl.algorithms.aggregation import token_weights
    from megatron_rl.algorithms.policy_loss import token_losses

    lp, old, ref, roll, adv, mask, ent = (x.double() for x in inputs)
    t = token_losses(cfg, lp, old, adv, mask, ref_logprobs=ref, entropy=ent,
                     rollout_logprobs=roll if cfg.tis_cap else None)
    live = mask != 0

    def total(x: torch.Tensor) -> float:
        return float(x.abs()[live].sum())

    w = token_weights(cfg.loss_agg, mask, den, torch.float64)
    return {"loss": total(w * t.loss), "pg_loss_sum": total(t.pg), "kl_sum": total(t.kl),
            "entropy_sum": total(ent)}


def _compare_with_algorithms(cfg, inputs, den: float = 23.0, tol: float = 1e-5) -> None:
    """Triton (interpreted) vs `algorithms.policy_loss`: loss, both gradients, every statistic,
    to fp32 rounding (rtol, and 1e-6 of the summed magnitudes where terms cancel)."""
    from megatron_rl.algorithms.policy_loss import policy_loss
    from megatron_rl.kernels.policy_loss import fused_policy_loss

    lp0, old, ref, roll, adv, mask, ent0 = inputs
    out = []
    for fn in (functools.partial(fused_policy_loss, backend="triton"), policy_loss):
        lp, ent = lp0.clone().requires_grad_(), ent0.clone().requires_grad_()
        loss, stats = fn(cfg, lp, old, adv, mask, den, ref_logprobs=ref,
                         rollout_logprobs=roll if cfg.tis_cap else None, entropy=ent)
        loss.backward()
        out.append((loss, stats, lp.grad, ent.grad))
    (loss, stats, g_lp, g_ent), (w_loss, w_stats, w_lp, w_ent) = out
    scale = _abs_sums(cfg, inputs, den)
    assert bool(torch.isfinite(loss)) and bool(torch.isfinite(g_lp).all())
    torch.testing.assert_close(loss, w_loss, atol=1e-6 + 1e-6 * scale["loss"], rtol=tol)
    assert set(stats) == set(w_stats)
    for k in w_stats:
        assert bool(torch.isfinite(stats[k])), k
        torch.testing.assert_close(stats[k], w_stats[k], atol=2e-5 + 1e-6 * scale.get(k, 0.0),
                                   rtol=tol, msg=k)
    torch.testing.assert_close(g_lp, w_lp, atol=1e-7, rtol=tol)
    assert float(g_lp[mask == 0].abs().max()) == 0.0
    if w_ent is None or cfg.entropy_coef == 0:
        assert g_ent is None or float(g_ent.abs().max()) == 0.0
    else:
        torch.testing.assert_close(g_ent, w_ent, atol=1e-7, rtol=tol)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("features", list(FEATURES))
def test_policy_loss_triton_matches_the_algorithms(interp, loss_agg: str, features: str) -> None:
    from megatron_rl.algorithms.config import AlgorithmConfig

    cfg = AlgorithmConfig(loss_agg=loss_agg, eps_low=0.2, eps_high=0.28, **FEATURES[features])
    _compare_with_algorithms(cfg, _policy_inputs())


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_policy_loss_triton_matches_the_algorithms_at_extreme_gaps(interp,
                                                                   estimator: str) -> None:
    """ref - logp, logp - old and old - rollout in {-1e4, ..., 88, 100, 1e4} on live tokens:
    the bounded KL, the clamped ratio and the capped TIS weight agree and stay finite."""
    from megatron_rl.algorithms.config import AlgorithmConfig

    cfg = AlgorithmConfig(loss_agg="token_mean", eps_high=0.28, kl_coef=0.04,
                          kl_estimator=estimator, dual_clip_c=3.0, tis_cap=2.0,
                          entropy_coef=0.01)
    _compare_with_algorithms(cfg, _policy_inputs(1, extreme=True))


def test_policy_loss_zero_denominator(interp) -> None:
    from megatron_rl.algorithms.config import AlgorithmConfig
    from megatron_rl.kernels.policy_loss import fused_policy_loss

    lp0, old, _, _, adv, mask, _ = _policy_inputs(1)
    lp = lp0.clone().requires_grad_()
    loss, stats = fused_policy_loss(AlgorithmConfig(), lp, old, adv, mask * 0, 0.0,
                                    backend="triton")
    loss.backward()
    assert float(loss) == 0.0 and float(lp.grad.abs().max()) == 0.0
    assert float(stats["tokens"]) == 0.0 and float(stats["ratio_max"]) == 0.0


def test_gspo_runs_the_algorithms_under_every_backend(interp) -> None:
    """The sequence-level ratio has no kernel: the triton backend runs the torch function."""
    from megatron_rl.algorithms.config import AlgorithmConfig
    from megatron_rl.algorithms.policy_loss import policy_loss
    from megatron_rl.kernels.policy_loss import fused_policy_loss

    cfg = AlgorithmConfig(sequence_level_ratio=True, eps_high=0.28)
    lp, old, _, _, adv, mask, _ = _policy_inputs(2)
    got = fused_policy_loss(cfg, lp, old, adv, mask, 5.0, backend="triton")
    want = policy_loss(cfg, lp, old, adv, mask, 5.0)
    assert torch.equal(got[0], want[0])
    assert all(torch.equal(got[1][k], want[1][k]) for k in want[1])


@pytest.mark.parametrize("features", list(FEATURES))
@pytest.mark.parametrize("gspo", [False, True])
def test_policy_loss_fn_torch_is_the_algorithms_bit_for_bit(features: str, gspo: bool) -> None:
    """The trainer's `policy_loss_fn` on backend torch: loss, statistics and gradients
    bit-identical to `algorithms.policy_loss` on the same micro-batch."""
    from megatron_rl.actor.loss import policy_loss_fn
    from megatron_rl.algorithms.config import AlgorithmConfig
    from megatron_rl.algorithms.policy_loss import policy_loss

    cfg = AlgorithmConfig(loss_agg="seq_mean_token_mean", sequence_level_ratio=gspo,
                          **FEATURES[features])
    lp0, old, ref, roll, adv, mask, ent = _policy_inputs(3, extreme=True)
    mb = SimpleNamespace(loss_mask=mask, advantages=adv, old_logprobs=old, ref_logprobs=ref,
                         rollout_logprobs=roll, entropy=ent)
    lp = lp0.clone().requires_grad_()
    fn = policy_loss_fn(cfg, 17.0, backend="torch")
    assert fn.needs_entropy == (cfg.entropy_coef > 0)
    loss, stats = fn(lp, mb)
    loss.backward()
    lp2 = lp0.clone().requires_grad_()
    loss2, stats2 = policy_loss(cfg, lp2, old, adv, mask, 17.0, ref_logprobs=ref,
                                rollout_logprobs=roll, entropy=ent)
    loss2.backward()
    assert torch.equal(loss, loss2) and torch.equal(lp.grad, lp2.grad)
    assert stats.keys() == stats2.keys()
    assert all(torch.equal(stats[k], stats2[k]) for k in stats)


def test_policy_loss_fn_needs_old_logprobs_unless_on_policy() -> None:
    from megatron_rl.actor.loss import policy_loss_fn
    from megatron_rl.algorithms.config import AlgorithmConfig

    lp, _, _, _, adv, mask, _ = _policy_inputs(4)
    mb = SimpleNamespace(loss_mask=mask, advantages=adv, old_logprobs=None, ref_logprobs=None,
                         rollout_logprobs=None, entropy=None)
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss_fn(AlgorithmConfig(), 5.0, backend="torch")(lp, mb)
    _, stats = policy_loss_fn(AlgorithmConfig(), 5.0, backend="torch", on_policy=True)(lp, mb)
    assert float(stats["ratio_max"]) == 1.0


def test_backend_is_an_argument_not_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_rl.kernels import dispatch

    x = torch.zeros(2)
    monkeypatch.setenv("MEGATRON_RL_KERNELS", "torch")  # no longer read
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_triton(x, "auto") and dispatch.use_triton(x, "triton")
    assert not dispatch.use_triton(x, "torch")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not dispatch.use_triton(x, "auto")  # CPU tensor, no interpreter
    with pytest.raises(RuntimeError, match="'triton'"):
        dispatch.use_triton(x, "triton")
    with pytest.raises(ValueError, match="reference"):
        dispatch.use_triton(x, "reference")
    assert not hasattr(dispatch, "set_backend")


def test_actor_config_kernels_field_lists_the_backends() -> None:
    from megatron_rl.actor.config import ActorConfig
    from megatron_rl.kernels import dispatch

    hint = typing.get_type_hints(ActorConfig)["kernels"]
    assert typing.get_args(hint) == dispatch.BACKENDS == ("auto", "triton", "torch")
    assert ActorConfig().kernels == "auto"
