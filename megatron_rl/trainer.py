"""The RL loop (DESIGN.md section 3): sample -> reward -> filter -> advantages -> old log-probs
-> policy update -> weight sync -> metrics.

Colocated: rank 0 holds the rollout engine and the reward workers; every rank holds its shard
of the Megatron-Core actor. Rank 0's samples are broadcast, and each data-parallel rank trains
on its rows. Work in progress toward issue 7: checkpoint/resume, evaluation with pass@k, the
embedded default's base-model pre-training and the `train` CLI come next.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rl.actor.actor import Actor
from megatron_rl.actor.loss import policy_loss_fn
from megatron_rl.actor.parallel import init_distributed
from megatron_rl.algorithms import compute_advantages, denominator, overlong_penalty
from megatron_rl.batching import micro_batches, sample_rows
from megatron_rl.config import RunConfig
from megatron_rl.rollout.types import Sample


@dataclasses.dataclass
class _Rewards:
    """What the group sampler reads from a reward function: totals and per-function columns."""

    total: list[float]
    scores: dict[str, list[float]]


class Trainer:
    """One RL run; every method is collective over all ranks."""

    def __init__(self, cfg: RunConfig) -> None:
        from megatron_rl.data import PromptSampler, apply_template, build_dataset, build_tokenizer

        self.cfg = cfg
        init_distributed(cfg.parallel, seed=cfg.train.seed)
        self.rank = dist.get_rank()
        self.actor = Actor(cfg.model, cfg.parallel, cfg.actor, total_steps=cfg.train.steps)
        self.step = 0
        if self.rank != 0:
            return
        train = build_dataset(cfg.data, "train")
        self.tokenizer = build_tokenizer(cfg.data, cfg.model.vocab_size, train)
        # One prompt per draw: the group sampler asks for as many as it needs (over-sampling).
        self.prompts = PromptSampler(train.records, 1, cfg.data.seed, cfg.data.shuffle)
        self.encode = lambda rec: self.tokenizer.encode(
            apply_template(cfg.data.chat_template, rec.prompt, self.tokenizer))
        self.engine, self.sampler = self._rollout()

    def _rollout(self) -> tuple[Any, Any]:
        from megatron_rl.rewards import RewardComputer
        from megatron_rl.rollout.sampler import GroupSampler, reward_inputs
        from megatron_rl.rollout.transformers_engine import TransformersEngine

        engine = TransformersEngine.from_model_config(self.cfg.model, tokenizer=self.tokenizer)
        rewards = RewardComputer(self.cfg.rewards)

        def reward_fn(samples: list[Sample]) -> _Rewards:
            batch = rewards(reward_inputs(samples))
            total = [float(t) for t in batch.total]
            alg = self.cfg.algorithm
            if alg.overlong_penalty:  # DAPO's soft overlong punishment is part of the reward
                lengths = torch.tensor([len(s.response_ids) for s in samples])
                pen = overlong_penalty(lengths, alg.overlong_max_len, alg.overlong_cache_len)
                total = [t + float(p) for t, p in zip(total, pen, strict=True)]
            return _Rewards(total, {k: list(v) for k, v in batch.scores.items()})

        sampler = GroupSampler.from_config(engine, self.cfg.rollout, self.cfg.algorithm,
                                           lambda n: [self.prompts.next_batch()[0]
                                                      for _ in range(n)], reward_fn,
                                           encode=self.encode)
        return engine, sampler

    # ---- the loop ------------------------------------------------------------------------------

    def run(self, steps: int | None = None) -> list[dict[str, float]]:
        """Train for `steps` (default `train.steps`), logging every step (console line with ETA,
        tensorboard, `<output_dir>/metrics.jsonl`, learning-curve PNG at the end)."""
        from megatron_rl.metrics import MetricsLogger

        total = steps if steps is not None else self.cfg.train.steps
        history = []
        with MetricsLogger(self.cfg.logging, self.cfg.train.output_dir, total,
                           rank=self.rank) as logger:
            for _ in range(total):
                history.append(self.train_step())
                logger.log(self.step, history[-1])
        return history

    def train_step(self) -> dict[str, float]:
        """One RL step; returns its metrics (on every rank)."""
        start = time.perf_counter()
        if self.step == 0:
            self.sync_weights()
        samples, report = self.sample()
        if not samples:  # every group's rewards agreed in all generation batches
            self.step += 1
            return {"actor/skipped": 1.0, "dynamic_sampling/gen_batches": report["gen_batches"],
                    "dynamic_sampling/keep_ratio": 0.0, "throughput/step_seconds":
                    time.perf_counter() - start}
        mbs, den = self.make_batch(samples)
        self.old_logprobs(mbs)
        loss_fn = policy_loss_fn(self.cfg.algorithm, den)
        result = self.actor.train_step(mbs, loss_fn, self.cfg.rollout.temperature)
        sync = self.sync_weights()
        self.step += 1
        box = [self.metrics(samples, report, result, sync, time.perf_counter() - start)]
        dist.broadcast_object_list(box, src=0)  # rank 0 measured rollout and weight sync
        return box[0]

    def sample(self) -> tuple[list[Sample], dict[str, float]]:
        """Rank 0 generates and rewards a step's groups; every rank receives them."""
        box: list[Any] = [None]
        if self.rank == 0:
            samples, report = self.sampler.sample()
            box = [(samples, {"gen_batches": report.gen_batches,
                              "groups_seen": report.groups_seen,
                              "groups_kept": report.groups_kept,
                              "generate_seconds": report.generate_seconds})]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def make_batch(self, samples: list[Sample]) -> tuple[list, torch.Tensor]:
        """Advantages over the whole step, then this DP rank's rows as micro-batches, and the
        loss denominator all-reduced over DP."""
        alg, mbs_size = self.cfg.algorithm, self.cfg.actor.micro_batch_size
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
        groups = torch.tensor([s.group for s in samples])
        adv = compute_advantages(alg.advantage_estimator, rewards, groups, eps=alg.adv_eps)
        rows = sample_rows(samples, self.cfg.actor.seq_length)
        if alg.overlong_filter:
            truncated = torch.tensor([s.truncated for s in samples])
            rows["loss_mask"][truncated] = 0.0
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per_rank = -(-len(samples) // (dp * mbs_size)) * mbs_size  # same micro-batch count
        order = torch.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        real = order < len(samples)
        idx = torch.where(real, order, torch.zeros_like(order))
        local = {k: v[idx].clone() for k, v in rows.items()}
        local["loss_mask"][~real] = 0.0  # padding rows: nothing to learn
        mbs = micro_batches(local, adv.advantages.float()[idx], mbs_size)
        den = denominator(alg.loss_agg, [mb.loss_mask for mb in mbs], alg.loss_norm_len)
        dist.all_reduce(den, group=ps.get_data_parallel_group())
        return mbs, den

    def old_logprobs(self, mbs: list) -> None:
        """Log-probs of the current (= sampling) weights, the ratio's denominator."""
        for mb, logp in zip(mbs, self.actor.logprobs(mbs, self.cfg.rollout.temperature),
                            strict=True):
            mb.extras["old_logprobs"] = logp

    def sync_weights(self) -> dict[str, float]:
        """The actor's weights to the engine (collective; engine on rank 0)."""
        from megatron_rl.rollout.weight_sync import sync_weights

        engines = [self.engine] if self.rank == 0 else []
        bucket = self.cfg.rollout.weight_sync_bucket_mb * 2**20
        report = sync_weights(self.actor, engines, bucket)
        return {"seconds": report.seconds, "bytes": float(report.bytes)}

    def metrics(self, samples: list[Sample], report: dict[str, float], result: Any,
                sync: dict[str, float], seconds: float) -> dict[str, float]:
        """The step's scalars (DESIGN.md section 8), the same on every rank."""
        rewards = torch.tensor([s.reward for s in samples])
        first = self.cfg.rewards.functions[0].name  # the accuracy reward by convention
        correct = self.cfg.rewards.correct_reward
        hits = [s.rewards.get(first, s.reward) >= correct - 1e-6 for s in samples]
        lengths = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.float32)
        stats = result.stats
        tokens = max(stats.get("tokens", 0.0), 1.0)
        return {
            "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
            "accuracy": sum(hits) / len(hits),
            "response_length/mean": float(lengths.mean()),
            "response_length/max": float(lengths.max()),
            "response_length/clip_ratio": float(sum(s.truncated for s in samples) / len(samples)),
            "actor/loss": stats.get("loss", 0.0),
            "actor/clip_frac_low": stats.get("clip_low_tokens", 0.0) / tokens,
            "actor/clip_frac_high": stats.get("clip_high_tokens", 0.0) / tokens,
            "actor/approx_kl": stats.get("approx_kl_sum", 0.0) / tokens,
            "actor/grad_norm": result.grad_norm, "actor/lr": result.lr,
            "dynamic_sampling/gen_batches": report["gen_batches"],
            "dynamic_sampling/keep_ratio": report["groups_kept"] / max(report["groups_seen"], 1),
            "weight_sync/seconds": sync["seconds"], "weight_sync/bytes": sync["bytes"],
            "throughput/step_seconds": seconds,
            "throughput/rollout_tokens_per_s": float(lengths.sum()) / max(
                report["generate_seconds"], 1e-9),
        }
