"""Micro-batches without padding (issue 18): rows cut to each micro-batch's longest row,
micro-batches by token budget, and shared prompts (a group's prompt fed once, its responses
after it under an attention mask) give the same loss and gradients as rows padded to
`actor.seq_length` (fp32 tolerance), at 1 rank, TP=2 with sequence parallelism, PP=2 (one shape
per update), EP=2 and DP=2; the budget is kept and every DP rank runs as many micro-batches.

Each layout runs in one set of processes: the same weights take the same step's rows through
`batching.split_updates` (the trainer's own cut) three ways, and the policy loss (the trainer's
`policy_loss_fn`) backward fills the gradient buffers each time. The MoE load-balancing loss is
off: it is computed per micro-batch over every token it holds, so it depends on how rows are
grouped and padded (in every framework); the policy loss does not.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from rank_batches import ok, run_cases  # a module's workers in one spawn per world size

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_moe_cpu.yaml")
SEQ, ROWS, BUDGET = 64, 12, 100
LAYOUTS = {
    "1rank": (1, []),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pp=2"]),
    "ep2": (2, ["parallel.ep=2"]),
    "dp2": (2, []),
}


def _samples(vocab: int):
    from megatron_rl.rollout.types import Sample

    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(ROWS):
        if i % 4 == 0:  # a group of 4 samples of one prompt
            prompt = torch.randint(1, vocab, (int(torch.randint(3, 12, (), generator=g)),),
                                   generator=g).tolist()
        response = int(torch.randint(2, SEQ - len(prompt) - 8, (), generator=g))
        ids = prompt + torch.randint(1, vocab, (response,), generator=g).tolist()
        out.append(Sample(group=i // 4, prompt="", prompt_ids=ids[:len(prompt)],
                          response_ids=ids[len(prompt):],
                          rollout_logprobs=(-torch.rand(response, generator=g)).tolist(),
                          finish_reason="stop", rewards={"r": float(i % 3)}))
    return out


def parity_worker(overrides: list[str]) -> dict:
    import torch.distributed as dist

    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.loss import policy_loss_fn
    from megatron_rl.actor.parallel import init_distributed
    from megatron_rl.actor.step import forward_backward
    from megatron_rl.algorithms import denominator
    from megatron_rl.batching import build_batch, split_updates
    from megatron_rl.config import load_config

    cfg = load_config(TINY, [
        f"actor.seq_length={SEQ}", "actor.params_dtype=float32", "parallel.timeout_s=60",
        "rollout.max_new_tokens=16", "model.moe_aux_loss_coeff=0.0", "actor.lr=0.001",
        "algorithm.preset=dapo",
    ] + overrides, world_size=int(os.environ["WORLD_SIZE"]))
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    actor = Actor(cfg.model, cfg.parallel, cfg.actor, total_steps=1)
    g = torch.Generator().manual_seed(4)
    batch = build_batch(_samples(cfg.model.vocab_size), reward_names=["r"],
                        weights=torch.ones(1), advantages=torch.randn(ROWS, generator=g),
                        seq_length=SEQ, mask_truncated=False)
    pp = cfg.parallel.pp
    sp = bool(actor.config.sequence_parallel)
    variants = {"padded": {"pad_to_seq_length": True}, "trimmed": {},
                "shared": {"share_prompts": True}}
    if pp == 1:
        variants["budget"] = {"max_tokens": BUDGET}
        variants["shared_budget"] = {"max_tokens": 2 * BUDGET, "share_prompts": True}
    results = {}
    for name, kw in variants.items():
        (mbs,) = split_updates(batch, updates=1, dp_size=actor.dp_size, dp_rank=actor.dp_rank,
                               micro_batch_size=2, pad_multiple=cfg.parallel.tp if sp else 1,
                               same_shape=pp > 1, **kw)
        den = actor.dp_sum(denominator(cfg.algorithm.loss_agg, [mb.loss_mask for mb in mbs]))
        fn = policy_loss_fn(cfg.algorithm, den, on_policy=True)
        for chunk in actor.model:
            chunk.train()
            chunk.zero_grad_buffer()
        mb0 = mbs[0].input_tokens
        stats = forward_backward(actor.model, mbs, fn, actor.shape(mb0.shape[1], mb0.shape[0]))
        grads = {n: p.main_grad.detach().clone() for chunk in actor.model
                 for n, p in chunk.named_parameters()}
        counts = torch.tensor([len(mbs)], dtype=torch.float64)
        top = counts.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        results[name] = {
            "loss": stats["loss"], "tokens": stats["tokens"], "grads": grads,
            "shapes": [tuple(mb.input_tokens.shape) for mb in mbs],
            "fed": sum(int(mb.input_tokens.numel()) for mb in mbs),
            "live_rows": [int((mb.loss_mask.sum(1) > 0).sum()) for mb in mbs],
            "same_count": int(top.item()) == len(mbs),
        }
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Every layout's parity run and the trainer run, one spawn per world size."""
    names = list(LAYOUTS) + ["trainer"]
    cases = [(LAYOUTS[n][0], parity_worker, (LAYOUTS[n][1],)) for n in LAYOUTS]
    cases.append((1, trainer_worker, (str(tmp_path_factory.mktemp("trainer")),)))
    names.append("trainer_shared")
    cases.append((1, trainer_worker, (str(tmp_path_factory.mktemp("shared")),
                                      ["actor.share_prompts=true"])))
    return dict(zip(names, run_cases(cases, timeout_s=900), strict=True))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_unpadded_micro_batches_match_padded(layout, runs):
    for rank in [ok(r) for r in runs[layout]]:
        padded = rank["padded"]
        assert all(s[1] == SEQ for s in padded["shapes"])
        for name in [v for v in rank if v != "padded"]:
            got = rank[name]
            assert got["tokens"] == padded["tokens"] > 0
            assert got["loss"] == pytest.approx(padded["loss"], rel=1e-5, abs=1e-7), name
            for key, grad in padded["grads"].items():
                torch.testing.assert_close(got["grads"][key], grad, rtol=1e-4, atol=1e-6,
                                           msg=lambda m, k=key, n=name: f"{n} {k}: {m}")
            assert got["same_count"]
            # less than the padded shape: that is the point
            assert sum(b * s for b, s in got["shapes"]) < sum(b * s for b, s in padded["shapes"])
            if layout in ("tp2_sp",):
                assert all(s % 2 == 0 for _, s in got["shapes"])
            if layout == "pp2":
                assert len({s for s in got["shapes"]}) == 1  # one shape per schedule
        # a group's prompt once: fewer positions fed than one row per sample
        assert rank["shared"]["fed"] < rank["trimmed"]["fed"]
        if "budget" in rank:
            for (b, s), live in zip(rank["budget"]["shapes"], rank["budget"]["live_rows"],
                                    strict=True):
                assert b * s <= BUDGET or b == 1
                assert live == b or (live == 0 and b == 1)  # only padding micro-batches
            for b, s in rank["shared_budget"]["shapes"]:  # packed rows x their longest
                assert b * s <= 2 * BUDGET or b == 1


def test_split_updates_deals_every_row_once_within_the_budget():
    """Pure check of the token-budget cut: over all DP ranks every row trains exactly once,
    each micro-batch fits the budget (or is a single row), ranks balance tokens and agree on
    the micro-batch count."""
    from megatron_rl.batching import build_batch, split_updates

    batch = build_batch(_samples(512) * 3, reward_names=["r"], weights=torch.ones(1),
                        advantages=torch.arange(3 * ROWS, dtype=torch.float32),
                        seq_length=SEQ, mask_truncated=False)
    for dp in (1, 2, 3):
        seen, counts, tokens = [], set(), []
        for rank in range(dp):
            parts = split_updates(batch, updates=2, dp_size=dp, dp_rank=rank,
                                  micro_batch_size=2, max_tokens=BUDGET)
            counts.add(tuple(len(p) for p in parts))
            mine = 0
            for mbs in parts:
                for mb in mbs:
                    b, s = mb.tokens.shape
                    assert b * s <= BUDGET or b == 1
                    live = mb.loss_mask.sum(1) > 0
                    seen += mb.advantages[live].long().tolist()
                    mine += int((mb.tokens[live] != 0).sum())
            tokens.append(mine)
        assert sorted(seen) == list(range(3 * ROWS))
        assert len(counts) == 1
        assert max(tokens) - min(tokens) <= SEQ  # balanced to within one row


def test_trainer_trains_on_budget_micro_batches(runs):
    res = ok(runs["trainer"][0])
    assert res["shapes"] and all(b * s <= 200 or b == 1 for b, s in res["shapes"])
    assert max(s for _, s in res["shapes"]) < 160  # cut to the rows, not actor.seq_length
    assert res["metrics"]["actor/skipped"] == 0.0


def test_trainer_trains_on_shared_prompts(runs):
    """Through `Trainer` (the embedded engine, on-policy): each micro-batch feeds a group's
    prompt once, the step trains, and the routers measured in that packed forward agree with
    the engine's experts, which are mapped to the packed layout (a wrong mapping or mask
    shows as a low agreement)."""
    res = ok(runs["trainer_shared"][0])
    plain = ok(runs["trainer"][0])
    assert res["metrics"]["actor/skipped"] == 0.0
    assert res["packed"] and all(res["packed"])
    assert sum(b * s for b, s in res["shapes"]) < sum(b * s for b, s in plain["shapes"])
    assert res["metrics"]["routing/agreement"] > 0.95
    assert res["metrics"]["routing/agreement"] == pytest.approx(
        plain["metrics"]["routing/agreement"], abs=0.02)
    assert res["metrics"]["actor/loss"] == pytest.approx(plain["metrics"]["actor/loss"],
                                                         rel=1e-3, abs=1e-6)


def trainer_worker(out: str, extra: list[str] = ()) -> dict:
    from megatron_rl.config import load_config
    from megatron_rl.trainer import Trainer

    cfg = load_config(TINY, [
        "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=12", "actor.seq_length=160", "actor.max_tokens_per_micro_batch=200",
        "data.train_size=100", "data.eval_size=10", "eval.size=0", "rewards.num_workers=0",
        f"data.tokenizer_cache={out}/tok", f"train.output_dir={out}/run",
        f"logging.log_dir={out}/tb", f"checkpoint.dir={out}/ck", "logging.tensorboard=false",
        "algorithm.dynamic_sampling=false", *extra,
    ], world_size=1)
    trainer = Trainer(cfg)
    shapes = []
    step = trainer.actor.train_step

    packed = []

    def capture(mbs, *a, **k):
        shapes.extend(tuple(mb.input_tokens.shape) for mb in mbs)
        packed.extend(mb.shared is not None for mb in mbs)
        return step(mbs, *a, **k)

    trainer.actor.train_step = capture
    return {"metrics": trainer.run(steps=1)[0], "shapes": shapes, "packed": packed}
