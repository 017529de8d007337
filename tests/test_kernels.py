"""Fused kernels (`megatron_rl.kernels`): Triton under TRITON_INTERPRET=1 vs the chunked torch
reference vs `log_softmax(...).gather` and the algorithms library, values and gradients, fp32.

Triton reads TRITON_INTERPRET when it is first imported (its own tl.* helpers are @triton.jit
too), and a pytest process has usually imported triton already. So the Triton tests here run
only under the flag: `test_triton_interpreter_suite` re-runs this file in a subprocess with
TRITON_INTERPRET=1 (or run `TRITON_INTERPRET=1 pytest tests/test_kernels.py` yourself).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

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
    env.pop("MEGATRON_RL_KERNELS", None)
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
@pytest.mark.parametrize("backend", ["reference", "triton"])
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


def test_triton_matches_reference_masked_tokens_bf16_rows(interp) -> None:
    """Masked tokens (label -100, owned by no rank) stay finite and get no gradient."""
    from megatron_rl.kernels.logprobs import logprobs_and_entropy

    x, labels, vocab_size, temp = _case("padded", t=9, v=50, seed=3)
    labels[[1, 4]] = -100
    mask = torch.ones(9)
    mask[[1, 4]] = 0
    out = {}
    for backend in ("reference", "triton"):
        a = x.clone().requires_grad_()
        lp, ent = logprobs_and_entropy(a, labels, vocab_size=vocab_size, temperature=1.3,
                                       backend=backend)
        ((lp + 0.1 * ent) * mask).sum().backward()
        out[backend] = (lp, ent, a.grad)
    for r, t in zip(out["reference"], out["triton"], strict=True):
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
@pytest.mark.parametrize("backend", ["reference", "triton"])
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


def test_reference_chunks_match_log_softmax() -> None:
    """The chunked torch path (no Triton) equals log_softmax(...).gather on a bigger shape."""
    from megatron_rl.kernels.logprobs import logprobs_and_entropy, naive_logprobs_and_entropy

    x = torch.randn(300, 1000) * 4
    labels = torch.randint(0, 1000, (300,))
    lp, ent = logprobs_and_entropy(x, labels, temperature=0.9, backend="reference",
                                   chunk_tokens=64)
    lp2, ent2 = naive_logprobs_and_entropy(x, labels, None, 0.9)
    want = torch.log_softmax(x / 0.9, -1).gather(-1, labels[:, None])[:, 0]
    torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent2, atol=1e-5, rtol=1e-5)


POLICY_CASES = {
    "grpo_k3": dict(loss_agg="seq_mean_token_mean", kl_coef=0.04, kl_estimator="k3"),
    "dapo_dual_entropy": dict(loss_agg="token_mean", eps_high=0.28, dual_clip_c=3.0,
                              entropy_coef=0.01),
    "drgrpo_k1_tis": dict(loss_agg="seq_mean_token_sum_norm", kl_coef=0.1, kl_estimator="k1",
                          tis_cap=1.5),
    "k2": dict(loss_agg="token_mean", kl_coef=0.2, kl_estimator="k2"),
}


def _policy_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, t = 3, 40
    lp = torch.randn(b, t, generator=g) * 0.3 - 2
    old = lp + torch.randn(b, t, generator=g) * 0.4
    ref = lp + torch.randn(b, t, generator=g) * 0.2
    roll = old + torch.randn(b, t, generator=g) * 0.3
    adv = torch.randn(b, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.3).float()
    mask[2] = 0  # a fully masked (filtered) sample
    ent = torch.rand(b, t, generator=g) * 3
    old[0, 5] = float("nan")  # garbage under the mask must not leak
    mask[0, 5] = 0
    return lp, old, ref, roll, adv, mask, ent


@pytest.mark.parametrize("case", list(POLICY_CASES))
def test_policy_loss_triton_reference_algorithms(interp, case: str) -> None:
    from megatron_rl.algorithms.config import AlgorithmConfig
    from megatron_rl.algorithms.policy_loss import policy_loss
    from megatron_rl.kernels.policy_loss import fused_policy_loss

    kw = {"eps_low": 0.2, "eps_high": 0.2, **POLICY_CASES[case]}
    lp0, old, ref, roll, adv, mask, ent0 = _policy_inputs()
    opt = dict(ref_logprobs=ref if kw.get("kl_coef") else None,
               rollout_logprobs=roll if kw.get("tis_cap") else None)
    outs = {}
    for backend in ("triton", "reference"):
        lp, ent = lp0.clone().requires_grad_(), ent0.clone().requires_grad_()
        loss, stats = fused_policy_loss(lp, old, adv, mask, 23.0, entropy=ent, backend=backend,
                                        **opt, **kw)
        loss.backward()
        outs[backend] = (loss, stats, lp.grad, ent.grad)
    cfg = AlgorithmConfig(**kw)
    lp, ent = lp0.clone().requires_grad_(), ent0.clone().requires_grad_()
    loss, stats = policy_loss(cfg, lp, old, adv, mask, 23.0, entropy=ent, **opt)
    loss.backward()
    want = (loss, stats, lp.grad, ent.grad)
    for backend, got in outs.items():
        torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5, msg=backend)
        assert set(got[1]) == set(want[1]), backend
        for k in want[1]:
            torch.testing.assert_close(got[1][k], want[1][k], atol=2e-5, rtol=1e-5,
                                       msg=f"{backend} {k}")
        torch.testing.assert_close(got[2], want[2], atol=1e-7, rtol=1e-5, msg=backend)
        if want[3] is None:
            assert got[3] is None or float(got[3].abs().max()) == 0.0
        else:
            torch.testing.assert_close(got[3], want[3], atol=1e-7, rtol=1e-5, msg=backend)


def test_policy_loss_zero_denominator(interp) -> None:
    from megatron_rl.kernels.policy_loss import fused_policy_loss

    lp0, old, _, _, adv, mask, _ = _policy_inputs(1)
    lp = lp0.clone().requires_grad_()
    loss, stats = fused_policy_loss(lp, old, adv, mask * 0, 0.0, backend="triton")
    loss.backward()
    assert float(loss) == 0.0 and float(lp.grad.abs().max()) == 0.0
    assert float(stats["tokens"]) == 0.0 and float(stats["ratio_max"]) == 0.0


def test_dispatch_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_rl.kernels import dispatch

    x = torch.zeros(2)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_triton(x)
    monkeypatch.setenv(dispatch.ENV, "reference")
    assert not dispatch.use_triton(x)
    monkeypatch.setenv(dispatch.ENV, "auto")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not dispatch.use_triton(x)  # CPU tensor, no interpreter
    with pytest.raises(RuntimeError):
        dispatch.use_triton(x, "triton")
    dispatch.set_backend("reference")
    try:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert not dispatch.use_triton(x)
    finally:
        dispatch.set_backend(None)
