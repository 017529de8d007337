"""RL math (docs/design.md section 4): every expected number is computed here from the formula."""

import math
import statistics
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_rl.algorithms import (
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    AlgorithmConfig,
    DynamicSamplingBuffer,
    aggregate,
    avg_at_k,
    compute_advantages,
    cons_at_k,
    denominator,
    informative_mask,
    kl_penalty,
    make_loss_fn,
    overlong_filter,
    overlong_penalty,
    pass_at_k,
    policy_loss,
    reduce_stats,
    summarize_stats,
    token_losses,
)
from megatron_rl.config import load_config

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_moe_cpu.yaml")
EPS = 1e-6


def zscore(xs: list[float], eps: float = EPS) -> list[float]:
    """(x - mean) / (unbiased std + eps), by the statistics module."""
    m, s = statistics.mean(xs), statistics.stdev(xs)
    return [(x - m) / (s + eps) for x in xs]


def approx(xs, **kw):
    return pytest.approx(list(xs), rel=1e-6, abs=1e-9, **kw)


# ---- advantages ------------------------------------------------------------------------------


def test_grpo_mixed_all_correct_all_wrong_and_singleton_groups() -> None:
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3])
    out = compute_advantages("grpo", rewards, groups, eps=EPS)
    a = 0.5 / (math.sqrt(4 * 0.25 / 3) + EPS)  # std of [1,0,0,1] with Bessel's correction
    assert out.advantages.tolist() == approx([a, -a, -a, a] + [0.0] * 9)
    assert (out.num_groups, out.singleton_groups, out.zero_std_groups) == (4, 1, 2)


def test_grpo_group_ids_are_labels_not_positions() -> None:
    out = compute_advantages("grpo", torch.tensor([1.0, 3.0, 0.0, 5.0]), torch.tensor([7, 2, 7, 2]))
    assert out.advantages.tolist() == approx([zscore([1, 0])[0], zscore([3, 5])[0],
                                              zscore([1, 0])[1], zscore([3, 5])[1]])


def test_dr_grpo_removes_only_the_mean() -> None:
    out = compute_advantages("dr_grpo", torch.tensor([1.0, 0, 0, 2, 2]),
                             torch.tensor([0, 0, 0, 1, 1]))
    assert out.advantages.tolist() == approx([2 / 3, -1 / 3, -1 / 3, 0, 0])
    assert out.zero_std_groups == 1


def test_rloo_leave_one_out_mean() -> None:
    out = compute_advantages("rloo", torch.tensor([1.0, 0, 0, 0, 4.0]),
                             torch.tensor([0, 0, 0, 0, 1]))
    assert out.advantages.tolist() == approx([1 - 0, 0 - 1 / 3, 0 - 1 / 3, 0 - 1 / 3, 0])
    assert out.singleton_groups == 1


def test_reinforce_pp_baseline_batch_normalises_live_samples() -> None:
    rewards = torch.tensor([1.0, 0, 1, 0, 0, 1, 1])
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    centred = [0.5, -0.5, 1 - 1 / 3, -1 / 3, -1 / 3]  # group 2 agrees: excluded, stays 0
    out = compute_advantages("reinforce_pp_baseline", rewards, groups, eps=EPS)
    assert out.advantages.tolist() == approx(zscore(centred) + [0, 0])


def test_weighted_rewards_reduce_to_their_sum_for_grpo() -> None:
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    out = compute_advantages("grpo", rewards, torch.tensor([0, 0, 0]),
                             weights=torch.tensor([1.0, 0.5]))
    assert out.advantages.tolist() == approx(zscore([1.0, 0.5, 1.5]))


def test_gdpo_normalises_each_reward_in_group_then_the_weighted_sum_over_batch() -> None:
    # group 0: r1 mixed, r2 all 1 (contributes 0); group 1: both mixed; group 2: all agree.
    r1 = [1, 0, 1, 0, 1, 1, 0, 0, 1, 1]
    r2 = [1, 1, 1, 1, 0, 1, 0, 1, 0, 0]
    groups = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    w1, w2 = 1.0, 0.5
    g0 = [w1 * a for a in zscore(r1[:4])]
    g1 = [w1 * a + w2 * b for a, b in zip(zscore(r1[4:8]), zscore(r2[4:8]), strict=True)]
    expected = zscore(g0 + g1) + [0.0, 0.0]
    rewards = torch.tensor([r1, r2], dtype=torch.float32).T
    out = compute_advantages("gdpo", rewards, torch.tensor(groups), eps=EPS,
                             weights=torch.tensor([w1, w2]))
    assert out.advantages.tolist() == approx(expected)
    assert out.zero_std_groups == 1
    # Not the same as GRPO on the summed reward.
    grpo = compute_advantages("grpo", rewards, torch.tensor(groups), weights=torch.tensor([w1, w2]))
    assert not torch.allclose(out.advantages, grpo.advantages)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_advantages_all_correct_and_all_wrong_give_zero(name: str) -> None:
    out = compute_advantages(name, torch.tensor([1.0, 1, 1, 0, 0, 0]),
                             torch.tensor([0, 0, 0, 1, 1, 1]))
    assert out.advantages.tolist() == [0.0] * 6
    assert out.zero_std_groups == 2


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_advantages_reject_bad_inputs(name: str) -> None:
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages(name, torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="shape"):
        compute_advantages(name, torch.tensor([1.0, 0.0]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="empty"):
        compute_advantages(name, torch.tensor([]), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        compute_advantages(name, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="weights"):
        compute_advantages(name, torch.ones(2, 2), torch.tensor([0, 0]), weights=torch.ones(3))
    with pytest.raises(ValueError, match="unknown advantage"):
        compute_advantages("ppo", torch.tensor([1.0]), torch.tensor([0]))


def test_registries_match_the_config_choices() -> None:
    hints = typing.get_type_hints(AlgorithmConfig)
    assert set(typing.get_args(hints["advantage_estimator"])) == set(ADVANTAGES)
    assert set(typing.get_args(hints["loss_agg"])) == set(AGGREGATIONS)
    assert set(typing.get_args(hints["kl_estimator"])) == set(KL_ESTIMATORS)


# ---- policy loss -----------------------------------------------------------------------------


def ref_pg(r: float, a: float, lo: float, hi: float, c: float | None = None) -> float:
    """max(-A r, -A clip(r)), then min with -c A for A < 0 (PPO / dual clip)."""
    pg = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
    return min(pg, -c * a) if (c is not None and a < 0) else pg


RATIOS = [0.05, 0.5, 0.9, 1.0, 1.1, 1.5, 3.0, 20.0]  # far outside the clip range on both sides


@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_clip_higher_and_dual_clip_on_both_signs(dual_clip: float | None) -> None:
    cfg = AlgorithmConfig(eps_low=0.2, eps_high=0.28, dual_clip_c=dual_clip, loss_agg="token_mean")
    ratios = torch.tensor([RATIOS, RATIOS], dtype=torch.float64)
    old = torch.full_like(ratios, -2.0)
    logp = (old + ratios.log()).requires_grad_()
    adv = torch.tensor([1.5, -1.5], dtype=torch.float64)
    mask = torch.ones_like(ratios)
    t = token_losses(cfg, logp, old, adv, mask)
    expected = [[ref_pg(r, a, 0.2, 0.28, dual_clip) for r in RATIOS] for a in (1.5, -1.5)]
    assert t.loss.flatten().tolist() == approx(sum(expected, []))
    t.loss.sum().backward()
    # d/dlogp(-A r) = -A r where the unclipped branch is active, else 0.
    grad = [[(-a * r if ref_pg(r, a, 0.2, 0.28, dual_clip) == -a * r else 0.0) for r in RATIOS]
            for a in (1.5, -1.5)]
    assert logp.grad.flatten().tolist() == approx(sum(grad, []))
    _, stats = policy_loss(cfg, logp, old, adv, mask, denominator("token_mean", mask))
    assert stats["clip_high_tokens"].item() == sum(r > 1.28 for r in RATIOS)
    assert stats["clip_low_tokens"].item() == sum(r < 0.8 for r in RATIOS)
    assert stats["tokens"].item() == 16 and stats["ratio_max"].item() == pytest.approx(20.0)
    if dual_clip is not None:
        assert stats["dual_clip_tokens"].item() == sum(r > dual_clip for r in RATIOS)


def test_sequence_level_ratio_gspo() -> None:
    cfg = AlgorithmConfig(sequence_level_ratio=True, eps_low=0.2, eps_high=0.28)
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp = torch.tensor([[0.1, 0.3, 5.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # the 5.0 is masked out of the mean
    t = token_losses(cfg, logp, old, torch.tensor([1.0, -1.0], dtype=torch.float64), mask)
    s0, s1 = math.exp(0.2), math.exp(-1.0)
    assert t.ratio.tolist() == [approx([s0] * 3), approx([s1] * 3)]
    assert t.loss[0, :2].tolist() == approx([ref_pg(s0, 1.0, 0.2, 0.28)] * 2)
    assert t.loss[1].tolist() == approx([ref_pg(s1, -1.0, 0.2, 0.28)] * 3)


def test_truncated_importance_sampling_weights_are_capped_and_detached() -> None:
    cfg = AlgorithmConfig(tis_cap=2.0)
    old = torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64)
    rollout = old - torch.tensor([[math.log(3.0), math.log(0.5), 0.0]], dtype=torch.float64)
    logp = old.clone().requires_grad_()
    t = token_losses(cfg, logp, old, torch.tensor([1.0], dtype=torch.float64),
                     torch.ones(1, 3), rollout_logprobs=rollout)
    assert t.tis_weight.tolist() == [approx([2.0, 0.5, 1.0])]
    assert t.loss.tolist() == [approx([-2.0, -0.5, -1.0])]  # ratio 1, A = 1
    t.loss.sum().backward()
    assert logp.grad.tolist() == [approx([-2.0, -0.5, -1.0])]
    _, stats = policy_loss(cfg, logp, old, torch.tensor([1.0], dtype=torch.float64),
                           torch.ones(1, 3), 3.0, rollout_logprobs=rollout)
    assert stats["tis_capped_tokens"].item() == 1 and stats["tis_weight_sum"].item() == 3.5


def test_kl_estimators_by_hand() -> None:
    logp, ref = torch.tensor([[-1.0]]), torch.tensor([[-1.5]])
    d = -0.5  # ref - logp
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(d) - d - 1)
    with pytest.raises(ValueError, match="unknown KL"):
        kl_penalty(logp, ref, "k4")


GAPS = [-1e4, -100.0, -30.0, -5.0, -1.0, 0.0, 0.5, 4.9, 5.0, 30.0, 88.0, 100.0, 1e4]
"""ref - logp: tiny, around the knot, where exp overflows fp32 (88) and far beyond."""
KNOT = 5.0  # the documented bound (kl.KL_GAP_KNOT), restated to test the formula


def kl_by_hand(estimator: str, d: float) -> tuple[float, float]:
    """(KL, d KL / d logp) at gap d = ref - logp: the exact formula for |d| <= 5, the tangent
    at the knot beyond."""
    f, df = {"k1": (lambda x: -x, lambda x: -1.0),
             "k2": (lambda x: 0.5 * x * x, lambda x: x),
             "k3": (lambda x: math.exp(x) - x - 1, lambda x: math.exp(x) - 1)}[estimator]
    if abs(d) <= KNOT or estimator == "k1":
        return f(d), -df(d)
    c = math.copysign(KNOT, d)
    return f(c) + df(c) * (d - c), -df(c)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_is_finite_and_bounded_at_extreme_gaps(estimator: str, dtype: torch.dtype) -> None:
    ref = torch.full((1, len(GAPS)), -3.0, dtype=dtype)
    logp = (ref - torch.tensor([GAPS], dtype=dtype)).requires_grad_()
    kl = kl_penalty(logp, ref, estimator)
    kl.sum().backward()
    assert bool(torch.isfinite(kl).all()) and bool(torch.isfinite(logp.grad).all())
    tol = dict(rel=2e-6 if dtype == torch.float32 else 1e-12, abs=1e-6)
    for i, d in enumerate((ref - logp).detach()[0].tolist()):
        value, grad = kl_by_hand(estimator, d)
        assert kl[0, i].item() == pytest.approx(value, **tol), (estimator, d)
        assert logp.grad[0, i].item() == pytest.approx(grad, **tol), (estimator, d)
    if estimator == "k3":  # the gradient never exceeds the slope at the knot, never vanishes
        assert float(logp.grad.abs().max()) <= math.exp(KNOT) - 1 + 1e-3
        assert float(logp.grad[0, -1]) == pytest.approx(-(math.exp(KNOT) - 1), rel=1e-6)
        assert float(logp.grad[0, 0]) == pytest.approx(1 - math.exp(-KNOT), rel=1e-6)


def test_k3_is_the_exact_formula_for_small_gaps_in_fp32() -> None:
    d = torch.linspace(-4.999, 4.999, 2001, dtype=torch.float32)
    logp = torch.full_like(d, -2.0)
    ref = logp + d
    gap = ref - logp  # the gap as fp32 sees it
    want = torch.exp(gap) - gap - 1
    assert torch.equal(kl_penalty(logp[None], ref[None], "k3")[0], want)
    by_math = torch.tensor([math.exp(x) - x - 1 for x in gap.double().tolist()],
                           dtype=torch.float64)
    torch.testing.assert_close(want.double(), by_math, rtol=2e-6, atol=2e-7)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_on_masked_garbage_gives_a_zero_finite_gradient(estimator: str) -> None:
    """A masked token whose log-probs are +-1e30 (padding) or beyond exp's range: the loss
    ignores it and its gradient is exactly 0 (was 0 * inf = NaN for k3)."""
    cfg = AlgorithmConfig(kl_coef=0.1, kl_estimator=estimator, loss_agg="token_mean")
    logp = torch.tensor([[-1.0, -1e30, 1e30, -500.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, 1e30, -1e30, -1.0, -2.5]])
    mask = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0]])
    loss, stats = policy_loss(cfg, logp, logp.detach(), torch.tensor([1.0]), mask, 2.0,
                              ref_logprobs=ref)
    loss.backward()
    assert bool(torch.isfinite(logp.grad).all())
    assert logp.grad[0, 1:4].tolist() == [0.0, 0.0, 0.0]
    kl = [kl_by_hand(estimator, -0.5)[0]] * 2
    assert loss.item() == pytest.approx((-1.0 - 1.0 + 0.1 * sum(kl)) / 2)
    assert stats["kl_sum"].item() == pytest.approx(sum(kl))


def test_kl_penalty_at_a_huge_live_gap_keeps_a_finite_gradient() -> None:
    """One live token at ref - logp = 100 (exp overflows fp32 past 88): finite loss and the
    knot's gradient, kl_coef * (e^5 - 1) / denominator, pulling logp up."""
    cfg = AlgorithmConfig(kl_coef=0.5, kl_estimator="k3", loss_agg="token_mean")
    logp = torch.tensor([[-101.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    loss, _ = policy_loss(cfg, logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2), 2.0,
                          ref_logprobs=ref)
    loss.backward()
    value, grad = kl_by_hand("k3", 100.0)
    assert loss.item() == pytest.approx(0.5 * value / 2, rel=1e-6)
    assert logp.grad.tolist() == [approx([0.5 * grad / 2, 0.0])]


EXTREME = [-1e4, -100.0, -30.0, -20.5, -1.0, 0.0, 0.1, 19.5, 30.0, 88.0, 100.0, 1e4]


@pytest.mark.parametrize("a", [1.0, -1.0])
def test_ratio_and_tis_weight_at_extreme_gaps(a: float) -> None:
    """logp - logp_old and logp_old - logp_rollout far outside +-20: the log-ratios are clamped
    at 20 before exp (finite ratio, zero gradient beyond the clamp), the TIS weight is capped."""
    cfg = AlgorithmConfig(eps_low=0.2, eps_high=0.28, tis_cap=2.0, loss_agg="token_mean")
    n = len(EXTREME)
    old = torch.full((1, n), -50.0, dtype=torch.float64)
    logp = (old + torch.tensor([EXTREME], dtype=torch.float64)).requires_grad_()
    rollout = old - torch.tensor([EXTREME[::-1]], dtype=torch.float64)
    loss, stats = policy_loss(cfg, logp, old, torch.tensor([a], dtype=torch.float64),
                              torch.ones(1, n), float(n), rollout_logprobs=rollout)
    loss.backward()
    assert math.isfinite(loss.item()) and bool(torch.isfinite(logp.grad).all())
    pg, grad, tis = [], [], []
    for gap, tis_gap in zip(EXTREME, EXTREME[::-1], strict=True):
        r = math.exp(min(max(gap, -20.0), 20.0))
        w = min(math.exp(min(max(tis_gap, -20.0), 20.0)), 2.0)
        pg.append(w * ref_pg(r, a, 0.2, 0.28))
        unclipped = ref_pg(r, a, 0.2, 0.28) == -a * r and abs(gap) <= 20.0
        grad.append(w * -a * r / n if unclipped else 0.0)
        tis.append(w)
    assert loss.item() == pytest.approx(sum(pg) / n, rel=1e-9)
    assert logp.grad[0].tolist() == approx(grad)
    assert stats["tis_weight_sum"].item() == pytest.approx(sum(tis))
    assert stats["ratio_max"].item() == pytest.approx(math.exp(20.0))
    assert math.isfinite(stats["approx_kl_sum"].item())


def test_masked_garbage_never_reaches_the_loss_or_gradient() -> None:
    """NaN, +-inf and +-1e30 in every input at masked tokens: the loss, every statistic and
    the gradients equal those of the same batch with zeros there."""
    cfg = AlgorithmConfig(kl_coef=0.1, kl_estimator="k3", tis_cap=2.0, entropy_coef=0.01,
                          dual_clip_c=3.0, loss_agg="seq_mean_token_mean")
    g = torch.Generator().manual_seed(0)
    clean = [torch.randn(2, 4, generator=g, dtype=torch.float64) * 0.3 - 1 for _ in range(4)]
    clean.append(torch.rand(2, 4, generator=g, dtype=torch.float64))  # entropy
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    junk = torch.tensor([[0.0, float("nan"), 0.0, 1e30], [-1e30, 0.0, 0.0, float("inf")]],
                        dtype=torch.float64)
    out = []
    for fill in (torch.zeros_like(junk), junk):
        x = [torch.where(mask == 0, fill, c) for c in clean]  # logp, old, rollout, ref, entropy
        logp, ent = x[0].clone().requires_grad_(), x[4].clone().requires_grad_()
        loss, stats = policy_loss(cfg, logp, x[1], torch.tensor([1.0, -2.0]), mask, 2.0,
                                  rollout_logprobs=x[2], ref_logprobs=x[3], entropy=ent)
        loss.backward()
        out.append((loss, stats, logp.grad, ent.grad))
    (l0, s0, g0, e0), (l1, s1, g1, e1) = out
    assert math.isfinite(l1.item()) and l1.item() == l0.item()
    assert torch.equal(g1, g0) and torch.equal(e1, e0)
    assert float(g1[mask == 0].abs().max()) == 0.0
    assert {k: v.item() for k, v in s1.items()} == {k: v.item() for k, v in s0.items()}


def test_kl_and_entropy_terms_enter_the_token_loss() -> None:
    cfg = AlgorithmConfig(kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01)
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0]])
    entropy = torch.tensor([[2.0, 3.0]])
    t = token_losses(cfg, logp, logp, torch.tensor([0.5]), torch.ones(1, 2),
                     ref_logprobs=ref, entropy=entropy)
    k3 = [math.exp(-0.5) + 0.5 - 1, 0.0]
    assert t.loss.tolist() == [approx([-0.5 + 0.1 * k3[i] - 0.01 * h
                                       for i, h in enumerate([2.0, 3.0])])]


def test_policy_loss_statistics_and_summary() -> None:
    cfg = AlgorithmConfig(eps_low=0.2, eps_high=0.2, loss_agg="token_mean")
    old = torch.zeros(2, 3)
    ratios = torch.tensor([[1.5, 0.5, 1.0], [0.5, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the 9.0 is masked
    loss, stats = policy_loss(cfg, ratios.log(), old, torch.tensor([1.0, -1.0]), mask, 5.0,
                              entropy=torch.ones(2, 3))
    assert loss.item() == pytest.approx((-1.2 - 0.5 - 1.0 + 0.8 + 2.0) / 5)
    s = summarize_stats(reduce_stats([stats]))
    assert s["tokens"] == 5 and s["sequences"] == 2
    assert s["clip_frac_high"] == pytest.approx(1 / 5)
    assert s["clip_frac_low"] == pytest.approx(1 / 5)
    assert s["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.0 + 0.5 + 2.0) / 5)
    assert s["ratio_max"] == pytest.approx(2.0) and s["entropy"] == pytest.approx(1.0)
    k3 = [math.exp(-math.log(r)) + math.log(r) - 1 for r in (1.5, 0.5, 1.0, 0.5, 2.0)]
    assert s["approx_kl"] == pytest.approx(sum(k3) / 5)


def test_reduce_stats_sums_and_takes_max_of_max_keys() -> None:
    out = reduce_stats([{"tokens": 2.0, "ratio_max": 1.5}, {"tokens": 3.0, "ratio_max": 1.2}])
    assert out == {"tokens": 5.0, "ratio_max": 1.5}


def _mb(**fields: object) -> SimpleNamespace:
    """A micro-batch stand-in with the typed fields a loss reads (unset ones None)."""
    empty = dict.fromkeys(("advantages", "old_logprobs", "rollout_logprobs", "ref_logprobs",
                           "entropy"))
    return SimpleNamespace(**{**empty, **fields})


def test_make_loss_fn_reads_the_micro_batch() -> None:
    cfg = AlgorithmConfig(loss_agg="token_mean")
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.0 - math.log(1.1), -2.0]])  # ratios 1.1 and 1
    mb = _mb(loss_mask=torch.tensor([[1.0, 1.0]]), advantages=torch.tensor([2.0]),
             old_logprobs=old)
    loss, stats = make_loss_fn(cfg, 4.0)(logp, mb)
    assert loss.item() == pytest.approx(-2.0 * (1.1 + 1.0) / 4)
    assert stats["tokens"].item() == 2 and stats["ratio_max"].item() == pytest.approx(1.1)
    with pytest.raises(ValueError, match="advantages"):
        make_loss_fn(cfg, 4.0)(logp, _mb(loss_mask=mb.loss_mask))


def test_make_loss_fn_without_old_logprobs_is_an_error_unless_on_policy() -> None:
    cfg = AlgorithmConfig(loss_agg="token_mean")
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mb = _mb(loss_mask=torch.tensor([[1.0, 1.0]]), advantages=torch.tensor([2.0]))
    with pytest.raises(ValueError, match="old_logprobs"):
        make_loss_fn(cfg, 4.0)(logp, mb)
    loss, stats = make_loss_fn(cfg, 4.0, on_policy=True)(logp, mb)  # ratio exactly 1
    assert loss.item() == pytest.approx(-2.0 * 2 / 4) and stats["ratio_max"].item() == 1.0
    loss.backward()
    assert logp.grad.tolist() == [approx([-2.0 / 4, -2.0 / 4])]  # d(-A r)/dlogp = -A r / den
    # Old log-probs that are there are used, on-policy or not.
    mb.old_logprobs = logp.detach() - math.log(2.0)
    _, stats = make_loss_fn(cfg, 4.0, on_policy=True)(logp, mb)
    assert stats["ratio_max"].item() == pytest.approx(2.0)


def test_make_loss_fn_asks_for_the_entropy_only_with_the_bonus() -> None:
    assert not make_loss_fn(AlgorithmConfig(), 1.0).needs_entropy
    assert make_loss_fn(AlgorithmConfig(entropy_coef=0.01), 1.0).needs_entropy


def test_policy_loss_rejects_bad_inputs() -> None:
    cfg = AlgorithmConfig()
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(cfg, x, torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3), 1.0)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(cfg, x, x, torch.zeros(3), torch.ones(2, 3), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        policy_loss(cfg, x, x, torch.tensor([0.0, float("nan")]), torch.ones(2, 3), 1.0)
    with pytest.raises(ValueError, match="empty"):
        policy_loss(cfg, torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0),
                    torch.ones(0, 3), 1.0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(AlgorithmConfig(kl_coef=0.1), x, x, torch.zeros(2), torch.ones(2, 3), 1.0)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        policy_loss(AlgorithmConfig(tis_cap=2.0), x, x, torch.zeros(2), torch.ones(2, 3), 1.0)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(AlgorithmConfig(entropy_coef=0.1), x, x, torch.zeros(2), torch.ones(2, 3), 1.0)


# ---- aggregation -----------------------------------------------------------------------------

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), 6.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # 1-token row, empty row


@pytest.mark.parametrize(("agg", "norm_len", "den", "value"), [
    ("token_mean", None, 3, (1 + 2 + 4) / 3),
    ("seq_mean_token_mean", None, 2, ((1 + 2) / 2 + 4 / 1) / 2),
    ("seq_mean_token_sum_norm", 4, 2 * 4, (1 + 2 + 4) / (2 * 4)),
])
def test_aggregations_by_hand(agg: str, norm_len: int | None, den: float, value: float) -> None:
    d = denominator(agg, MASK, norm_len)
    assert d.item() == den
    assert aggregate(agg, LOSS, MASK, d).item() == pytest.approx(value)  # masked NaN ignored
    assert denominator(agg, [MASK[:1], MASK[1:]], norm_len).item() == den


def test_aggregation_edge_cases() -> None:
    zero = torch.zeros(2, 3)
    assert aggregate("token_mean", LOSS[:2], zero, denominator("token_mean", zero)).item() == 0.0
    with pytest.raises(ValueError, match="norm_len"):
        denominator("seq_mean_token_sum_norm", MASK)
    with pytest.raises(ValueError, match="unknown loss_agg"):
        denominator("mean", MASK)
    with pytest.raises(ValueError, match="shape"):
        aggregate("token_mean", LOSS, MASK[:2], 1.0)
    with pytest.raises(ValueError, match="at least one"):
        denominator("token_mean", [])


@settings(max_examples=60, deadline=None)
@given(data=st.data(), agg=st.sampled_from(sorted(AGGREGATIONS)), gspo=st.booleans(),
       dual=st.sampled_from([None, 3.0]))
def test_loss_and_gradient_do_not_depend_on_the_micro_batch_split(data, agg, gspo, dual) -> None:
    b = data.draw(st.integers(1, 7), label="B")
    t = data.draw(st.integers(1, 5), label="T")
    floats = st.floats(-2.0, 2.0, allow_nan=False, width=64)
    lp = torch.tensor(data.draw(st.lists(floats, min_size=b * t, max_size=b * t)),
                      dtype=torch.float64).view(b, t) - 1.0
    old = lp - 0.5 * torch.tensor(data.draw(st.lists(floats, min_size=b * t, max_size=b * t)),
                                  dtype=torch.float64).view(b, t)
    adv = torch.tensor(data.draw(st.lists(floats, min_size=b, max_size=b)), dtype=torch.float64)
    bits = data.draw(st.lists(st.booleans(), min_size=b * t, max_size=b * t))
    mask = torch.tensor(bits, dtype=torch.float64).view(b, t)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, b), max_size=4)) + [b]))
    cfg = AlgorithmConfig(loss_agg=agg, sequence_level_ratio=gspo, dual_clip_c=dual,
                          eps_low=0.2, eps_high=0.28)

    whole = lp.clone().requires_grad_()
    den = denominator(agg, mask, norm_len=t)
    loss_whole, stats_whole = policy_loss(cfg, whole, old, adv, mask, den)
    loss_whole.backward()

    split = lp.clone().requires_grad_()
    bounds = list(zip([0] + cuts[:-1], cuts, strict=True))
    den_split = denominator(agg, [mask[i:j] for i, j in bounds], norm_len=t)
    assert den_split.item() == den.item()
    parts = [policy_loss(cfg, split[i:j], old[i:j], adv[i:j], mask[i:j], den_split)
             for i, j in bounds]
    loss_split = sum(p[0] for p in parts)
    loss_split.backward()

    assert loss_split.item() == pytest.approx(loss_whole.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(split.grad, whole.grad, rtol=1e-12, atol=1e-12)
    summed = reduce_stats(p[1] for p in parts)
    for key, value in stats_whole.items():
        assert summed[key] == pytest.approx(value.item(), rel=1e-5, abs=1e-5), key


# ---- dynamic sampling ------------------------------------------------------------------------


def test_informative_mask_keeps_groups_with_reward_spread() -> None:
    rewards = torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 0.5, 0.5])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 4])  # mixed, all right, all wrong, single, tie
    assert informative_mask(rewards, groups).tolist() == [True, True] + [False] * 7
    with pytest.raises(ValueError, match="NaN"):
        informative_mask(torch.tensor([float("nan")]), torch.tensor([0]))
    with pytest.raises(ValueError, match="empty"):
        informative_mask(torch.tensor([]), torch.tensor([]))


def test_dynamic_sampling_buffer_fills_across_batches_and_reports() -> None:
    buf = DynamicSamplingBuffer(target_groups=3, max_gen_batches=3)
    buf.add(["a0", "a1", "b0", "b1", "c0", "c1"], torch.tensor([1.0, 0, 1, 1, 0, 1]),
            torch.tensor([0, 0, 1, 1, 2, 2]))
    assert buf.wants_more()
    buf.add(["d0", "d1", "e0", "e1", "f0", "f1"], torch.tensor([0.0, 0, 1, 0, 0, 1]),
            torch.tensor([0, 0, 1, 1, 2, 2]))  # ids reused: fine, they are per batch
    assert not buf.wants_more()
    groups, report = buf.take()
    assert groups == [["a0", "a1"], ["c0", "c1"], ["e0", "e1"]]
    assert (report.gen_batches, report.groups_seen, report.groups_kept) == (2, 6, 3)
    assert (report.dropped_zero_std, report.dropped_surplus, report.filled) == (2, 1, True)
    assert buf.take()[0] == [] and buf.wants_more()  # emptied and reset


def test_dynamic_sampling_buffer_stops_at_max_gen_batches() -> None:
    buf = DynamicSamplingBuffer(target_groups=5, max_gen_batches=2)
    for _ in range(2):
        buf.add(["x", "y", "z", "w"], torch.tensor([1.0, 0, 1, 1]), torch.tensor([0, 0, 1, 1]))
    assert not buf.wants_more()
    groups, report = buf.take()
    assert len(groups) == 2 and not report.filled and report.dropped_zero_std == 2
    with pytest.raises(ValueError):
        DynamicSamplingBuffer(target_groups=0, max_gen_batches=1)
    with pytest.raises(ValueError, match="samples"):
        DynamicSamplingBuffer(target_groups=1, max_gen_batches=1).add(["x"], torch.ones(2),
                                                                      torch.zeros(2))


# ---- overlong --------------------------------------------------------------------------------


def test_soft_overlong_punishment_dapo_eq13() -> None:
    l_max, l_cache = 20, 4
    lengths = [1, 16, 17, 18, 19, 20, 21, 100]

    def r_length(y: int) -> float:
        if y <= l_max - l_cache:
            return 0.0
        return ((l_max - l_cache) - y) / l_cache if y <= l_max else -1.0

    out = overlong_penalty(torch.tensor(lengths), l_max, l_cache)
    assert out.tolist() == approx([r_length(y) for y in lengths])
    assert out.tolist()[:6] == approx([0, 0, -0.25, -0.5, -0.75, -1.0])
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(torch.tensor([3]), 4, 4)
    with pytest.raises(ValueError, match="empty"):
        overlong_penalty(torch.tensor([]), 4, 2)


def test_overlong_filter_masks_truncated_rows() -> None:
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    out = overlong_filter(mask, torch.tensor([False, True, True]))
    assert out.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="shape"):
        overlong_filter(mask, torch.tensor([True]))


# ---- evaluation estimators -------------------------------------------------------------------


@pytest.mark.parametrize(("n", "c", "k"), [(5, 2, 2), (5, 0, 3), (5, 5, 1), (5, 4, 2), (10, 3, 1),
                                           (200, 7, 100), (64, 1, 64)])
def test_pass_at_k_unbiased(n: int, c: int, k: int) -> None:
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)  # math.comb(a, b) = 0 when b > a
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert pass_at_k(n, c, 1) == pytest.approx(c / n)
    with pytest.raises(ValueError):
        pass_at_k(n, n + 1, k)
    with pytest.raises(ValueError):
        pass_at_k(n, c, n + 1)


def test_cons_at_k_and_avg_at_k() -> None:
    answers = ["4", "5", "4", None, "5", "5"]
    correct = [True, False, True, False, False, False]
    assert cons_at_k(answers, correct) == 0.0  # "5" has 3 votes
    assert cons_at_k(answers, correct, k=3) == 1.0  # "4" has 2 of the first 3
    assert cons_at_k(["a", "b"], [True, False]) == 1.0  # tie: first seen wins
    assert cons_at_k([None, None], [False, False]) == 0.0
    assert avg_at_k([1, 0, 1, 1]) == 0.75 and avg_at_k([1, 0, 1, 1], k=2) == 0.5
    with pytest.raises(ValueError):
        cons_at_k(["a"], [True, False])
    with pytest.raises(ValueError):
        avg_at_k([])


# ---- presets through the config loader -------------------------------------------------------


def test_dapo_preset_from_the_tiny_config() -> None:
    alg = load_config(TINY, world_size=1).algorithm
    assert (alg.preset, alg.eps_low, alg.eps_high) == ("dapo", 0.2, 0.28)
    assert alg.loss_agg == "token_mean" and alg.dynamic_sampling and alg.kl_coef == 0.0
    assert alg.overlong_penalty and not alg.overlong_filter
    assert (alg.overlong_max_len, alg.overlong_cache_len) == (48, 48 // 4)  # max_new_tokens 48


def test_dapo_with_overlong_filtering_instead_of_soft_punishment() -> None:
    alg = load_config(TINY, ["algorithm.overlong_penalty=false", "algorithm.overlong_filter=true"],
                      world_size=1).algorithm
    assert alg.overlong_filter and not alg.overlong_penalty and alg.eps_high == 0.28


def test_grpo_preset_and_user_keys_win() -> None:
    alg = load_config(TINY, ["algorithm.preset=grpo"], world_size=1).algorithm
    assert (alg.eps_low, alg.eps_high, alg.loss_agg) == (0.2, 0.2, "seq_mean_token_mean")
    assert (alg.kl_coef, alg.kl_estimator) == (0.001, "k3")
    assert not alg.dynamic_sampling and not alg.overlong_penalty
    alg = load_config(TINY, ["algorithm.preset=grpo", "algorithm.kl_coef=0.04"],
                      world_size=1).algorithm
    assert alg.kl_coef == 0.04


@pytest.mark.parametrize(("preset", "estimator", "agg"), [
    ("dr_grpo", "dr_grpo", "seq_mean_token_sum_norm"), ("gdpo", "gdpo", "token_mean")])
def test_other_presets(preset: str, estimator: str, agg: str) -> None:
    alg = load_config(TINY, [f"algorithm.preset={preset}"], world_size=1).algorithm
    assert (alg.advantage_estimator, alg.loss_agg, alg.kl_coef) == (estimator, agg, 0.0)
    assert not alg.dynamic_sampling


def test_dr_grpo_normalising_length_resolves_to_max_new_tokens() -> None:
    alg = load_config(TINY, ["algorithm.preset=dr_grpo"], world_size=1).algorithm
    assert alg.loss_norm_len == 48  # rollout.max_new_tokens of the tiny config
    alg = load_config(TINY, ["algorithm.preset=dr_grpo", "algorithm.loss_norm_len=100"],
                      world_size=1).algorithm
    assert alg.loss_norm_len == 100
