"""The RL loop (DESIGN.md section 3): sample -> reward -> filter -> advantages -> old log-probs
-> policy update -> weight sync -> metrics -> checkpoint.

Colocated: rank 0 holds the rollout engine and the reward workers; every rank holds its shard
of the Megatron-Core actor. Rank 0's samples are broadcast, and each data-parallel rank trains
on its rows.

Checkpoints (`run_state`): every `checkpoint.save_interval` steps, at the end of `run()`, and when
SIGTERM/SIGUSR1 arrives (Slurm's preemption warning; the step in flight finishes first). With
`checkpoint.resume` the run continues from the newest complete checkpoint in `checkpoint.dir`
bit for bit: actor, optimizer, LR schedule, prompt position and every RNG are restored.
A step whose loss or grad norm is not finite is skipped (weights and optimizer untouched);
`MAX_NONFINITE_STEPS` of them in a row stop the run with `NonFiniteError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rl import run_state
from megatron_rl.actor.actor import Actor, StepResult
from megatron_rl.actor.loss import policy_loss_fn
from megatron_rl.actor.parallel import init_distributed
from megatron_rl.actor.step import LossFn, MicroBatch
from megatron_rl.algorithms import compute_advantages, denominator, overlong_penalty
from megatron_rl.batching import micro_batches, sample_rows
from megatron_rl.config import RunConfig
from megatron_rl.metrics import (
    logprob_mismatch,
    reflection_frequency,
    response_stats,
    reward_stats,
)
from megatron_rl.rollout.types import Sample

MAX_NONFINITE_STEPS = 3
"""Consecutive steps with a non-finite loss or grad norm after which the run stops."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


@dataclasses.dataclass
class _Rewards:
    """What the group sampler reads from a reward function: totals and per-function columns."""

    total: list[float]
    scores: dict[str, list[float]]


class Trainer:
    """One RL run; every method is collective over all ranks.

    Attributes: `step` (completed steps), `stopped_by_signal` (the last `run()` ended early on
    SIGTERM/SIGUSR1, after saving), `resumed_from` (the checkpoint this run continued, or None),
    `signals` (the stop-signal flag), `last_checkpoint` (path of the newest save, or None).
    """

    def __init__(self, cfg: RunConfig) -> None:
        from megatron_rl.data import PromptSampler, apply_template, build_dataset, build_tokenizer

        self.cfg = cfg
        init_distributed(cfg.parallel, seed=cfg.train.seed)
        self.rank = dist.get_rank()
        self.actor = Actor(cfg.model, cfg.parallel, cfg.actor, total_steps=cfg.train.steps)
        self.step = 0
        self.nonfinite_streak = 0
        self.stopped_by_signal = False
        self.resumed_from: Path | None = None
        self.last_checkpoint: Path | None = None
        self._saved_at: int | None = None  # the step last_checkpoint holds
        self.signals = run_state.StopSignals()
        self._engine_stale = True  # the engine starts from random weights
        if self.rank == 0:
            train = build_dataset(cfg.data, "train")
            self.tokenizer = build_tokenizer(cfg.data, cfg.model.vocab_size, train)
            # One prompt per draw: the group sampler asks for as many as it needs (over-sampling).
            self.prompts = PromptSampler(train.records, 1, cfg.data.seed, cfg.data.shuffle)
            self.encode = lambda rec: self.tokenizer.encode(
                apply_template(cfg.data.chat_template, rec.prompt, self.tokenizer))
            self.engine, self.sampler = self._rollout()
        self._restore()  # last: it restores the RNG that construction has drawn from

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
        """Train up to step `train.steps` (or `steps` more steps), logging every step (console
        line with ETA, tensorboard, `<output_dir>/metrics.jsonl`, learning-curve PNG at the end),
        saving every `checkpoint.save_interval` steps and at the end. On SIGTERM/SIGUSR1 the
        step in flight finishes, a checkpoint is saved and `run` returns early with
        `stopped_by_signal` set. Returns the metrics of the steps run by this call."""
        from megatron_rl.metrics import MetricsLogger

        end = self.step + steps if steps is not None else self.cfg.train.steps
        self.stopped_by_signal = False
        history = []
        with self.signals, MetricsLogger(self.cfg.logging, self.cfg.train.output_dir, end,
                                         rank=self.rank) as logger:
            while self.step < end:
                history.append(self.train_step())
                logger.log(self.step, history[-1])
                if self.signals.requested(self.actor.device):
                    self.stopped_by_signal = True
                    break
                if self._save_due():
                    self.save()
            if history and self._saved_at != self.step:  # still under the handlers: a second
                self.save()                               # signal cannot kill the save
        if self.stopped_by_signal:
            self._say(f"stop signal received: saved step {self.step} to {self.last_checkpoint}; "
                      f"resume with checkpoint.resume=true")
        return history

    def train_step(self) -> dict[str, float]:
        """One RL step; returns its metrics (on every rank)."""
        start = time.perf_counter()
        if self._engine_stale:
            self.sync_weights()
        samples, report = self.sample()
        if not samples:  # every group's rewards agreed in all generation batches
            self.step += 1
            return {"actor/skipped": 1.0, "dynamic_sampling/gen_batches": report["gen_batches"],
                    "dynamic_sampling/keep_ratio": 0.0, "throughput/step_seconds":
                    time.perf_counter() - start}
        mbs, den = self.make_batch(samples)
        actor_start = time.perf_counter()
        self.old_logprobs(mbs)
        result = self.actor.train_step(mbs, self.loss_fn(den), self.cfg.rollout.temperature)
        actor_seconds = time.perf_counter() - actor_start
        self.step += 1
        self.check_finite(result)
        sync = self.sync_weights() if result.updated else {"seconds": 0.0, "bytes": 0.0}
        box = [self.metrics(samples, report, result, sync, self.logprob_gap(mbs),
                            {"step": time.perf_counter() - start, "actor": actor_seconds})]
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

    def make_batch(self, samples: list[Sample]) -> tuple[list[MicroBatch], torch.Tensor]:
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

    def old_logprobs(self, mbs: list[MicroBatch]) -> None:
        """Log-probs of the current (= sampling) weights, the ratio's denominator."""
        for mb, logp in zip(mbs, self.actor.logprobs(mbs, self.cfg.rollout.temperature),
                            strict=True):
            mb.extras["old_logprobs"] = logp

    def loss_fn(self, den: torch.Tensor) -> LossFn:
        """The policy loss over the step's global denominator. It always asks the actor for the
        token entropy: the log-prob pass computes it anyway, and it is a standard metric."""
        fn = policy_loss_fn(self.cfg.algorithm, den)
        fn.needs_entropy = True
        return fn

    def check_finite(self, result: StepResult) -> None:
        """Count skipped non-finite steps; stop the run after `MAX_NONFINITE_STEPS` in a row."""
        if result.nonfinite is None:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        value = result.stats.get("loss", math.nan) if result.nonfinite == "loss" \
            else result.grad_norm
        self._say(f"step {self.step}: {result.nonfinite} is {value}; optimizer step skipped "
                  f"({self.nonfinite_streak}/{MAX_NONFINITE_STEPS} in a row)")
        if self.nonfinite_streak >= MAX_NONFINITE_STEPS:
            raise NonFiniteError(
                f"step {self.step}: {result.nonfinite} was not finite in {self.nonfinite_streak} "
                f"consecutive steps (last {value}); every update was skipped, so training stops. "
                f"Lower actor.lr (now {self.cfg.actor.lr:g}) or actor.clip_grad, and check the "
                "data and rewards for NaN/inf")

    def sync_weights(self) -> dict[str, float]:
        """The actor's weights to the engine (collective; engine on rank 0)."""
        from megatron_rl.rollout.weight_sync import sync_weights

        engines = [self.engine] if self.rank == 0 else []
        bucket = self.cfg.rollout.weight_sync_bucket_mb * 2**20
        report = sync_weights(self.actor, engines, bucket)
        self._engine_stale = False
        return {"seconds": report.seconds, "bytes": float(report.bytes)}

    # ---- metrics -------------------------------------------------------------------------------

    def logprob_gap(self, mbs: list[MicroBatch]) -> dict[str, float]:
        """|old log-prob (actor) - rollout log-prob (engine)| over the trained tokens of the
        whole step (all DP ranks): how far the engine samples from the policy being trained."""
        mask = torch.cat([mb.loss_mask for mb in mbs])
        local = logprob_mismatch(torch.cat([mb.extras["old_logprobs"] for mb in mbs]),
                                 torch.cat([mb.extras["rollout_logprobs"] for mb in mbs]), mask)
        mean_key, = (k for k in local if k.endswith("_mean"))
        max_key, = (k for k in local if k.endswith("_max"))
        tokens, dev = float(mask.sum()), self.actor.device
        sums = torch.tensor([local[mean_key] * tokens, tokens], dtype=torch.float64, device=dev)
        peak = torch.tensor([local[max_key]], dtype=torch.float64, device=dev)
        dist.all_reduce(sums, group=ps.get_data_parallel_group())
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        return {mean_key: float(sums[0] / sums[1].clamp(min=1.0)), max_key: float(peak[0])}

    def metrics(self, samples: list[Sample], report: dict[str, float], result: StepResult,
                sync: dict[str, float], gap: dict[str, float],
                seconds: dict[str, float]) -> dict[str, float]:
        """The step's scalars (DESIGN.md section 8), the same on every rank."""
        first = self.cfg.rewards.functions[0].name  # the accuracy reward by convention
        correct = self.cfg.rewards.correct_reward
        hits = [s.rewards.get(first, s.reward) >= correct - 1e-6 for s in samples]
        names = [f.name for f in self.cfg.rewards.functions]
        columns = {n: [s.rewards.get(n, math.nan) for s in samples] for n in names}
        lengths = [len(s.response_ids) for s in samples]
        stats = result.stats
        tokens = max(stats.get("tokens", 0.0), 1.0)
        trained = sum(min(len(s.prompt_ids) + len(s.response_ids) - 1,
                          self.cfg.actor.seq_length) for s in samples)  # rows' real tokens
        out = {
            **reward_stats(columns, [s.reward for s in samples]),
            "accuracy": sum(hits) / len(hits),
            **response_stats(lengths, self.cfg.rollout.max_new_tokens),
            **reflection_frequency([s.response_text for s in samples]),
            **gap,
            "actor/loss": stats.get("loss", 0.0),
            "actor/entropy": stats.get("entropy_sum", math.nan) / tokens,
            "actor/clip_frac_low": stats.get("clip_low_tokens", 0.0) / tokens,
            "actor/clip_frac_high": stats.get("clip_high_tokens", 0.0) / tokens,
            "actor/approx_kl": stats.get("approx_kl_sum", 0.0) / tokens,
            "actor/grad_norm": result.grad_norm, "actor/lr": result.lr,
            "actor/skipped": 0.0 if result.updated else 1.0,
            "dynamic_sampling/gen_batches": report["gen_batches"],
            "dynamic_sampling/keep_ratio": report["groups_kept"] / max(report["groups_seen"], 1),
            "weight_sync/seconds": sync["seconds"], "weight_sync/bytes": sync["bytes"],
            "throughput/step_seconds": seconds["step"],
            "throughput/rollout_tokens_per_s": sum(lengths) / max(report["generate_seconds"],
                                                                  1e-9),
            "throughput/train_tokens_per_s": trained / max(seconds["actor"], 1e-9),
        }
        return out

    # ---- checkpoints ---------------------------------------------------------------------------

    def _save_due(self) -> bool:
        interval = self.cfg.checkpoint.save_interval
        return interval > 0 and self.step % interval == 0

    def save(self) -> Path:
        """A whole-run checkpoint of the current step (collective; see `run_state`)."""
        state = {"step": self.step, "nonfinite_streak": self.nonfinite_streak}
        if self.rank == 0:
            state["prompts"] = self.prompts.state_dict()
        ck = self.cfg.checkpoint
        self.last_checkpoint = run_state.save_run(ck.dir, self.step, self.actor, state,
                                                  ck.keep_last)
        self._saved_at = self.step
        return self.last_checkpoint

    def _restore(self) -> None:
        """Resume from the newest checkpoint in `checkpoint.dir` (`checkpoint.resume`), else load
        the initial weights of `checkpoint.load`, if any."""
        ck = self.cfg.checkpoint
        path = run_state.latest_checkpoint(ck.dir) if ck.resume else None
        if ck.resume and path is None:
            self._say(f"checkpoint.resume: no complete checkpoint in {ck.dir}; starting fresh")
        if path is None:
            if ck.load:
                kind = run_state.load_initial_weights(ck.load, self.actor)
                self._say(f"initial weights: {kind} checkpoint {ck.load}")
            return
        state = run_state.load_run(path, self.actor)
        self.step, self.nonfinite_streak = state["step"], state["nonfinite_streak"]
        self.resumed_from = self.last_checkpoint = path
        self._saved_at = self.step
        if self.rank == 0:
            self.prompts.load_state_dict(state["prompts"])
            self._rewind_metrics()
        self._say(f"resumed from {path} at step {self.step}")

    def _rewind_metrics(self) -> None:
        """Drop the rows of `metrics.jsonl` after the resumed step (a crashed run may have
        logged steps past its last checkpoint; they are about to be run again)."""
        file = Path(self.cfg.train.output_dir) / "metrics.jsonl"
        if not file.is_file():
            return
        lines = file.read_text().splitlines(keepends=True)
        keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
        if len(keep) != len(lines):
            file.write_text("".join(keep))

    def _say(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)
