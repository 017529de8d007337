"""The RL loop (docs/design.md section 3), one line per verb in `Trainer.train_step`:
to rollout (weight sync) -> sample (generate, reward, shape, filter) -> to training ->
advantages -> batch -> old log-probs -> update -> metrics; checkpoints around it.

Rank 0 holds the rollout engines (in-process, or clients of served ones) and the reward
workers; every rank holds its shard of the Megatron-Core actor. With colocated engines the
devices change hands twice a step (`to_rollout`, `to_training`). Rank 0's samples are
broadcast, and each data-parallel rank trains on its rows (`batching.split_updates`).
Process-group work lives behind `Actor` methods.

Checkpoints (`run_state`): every `checkpoint.save_interval` steps, at the end of `run()`, and when
SIGTERM/SIGUSR1 arrives (Slurm's preemption warning; the step in flight finishes first). With
`checkpoint.resume` the run continues from the newest complete checkpoint in `checkpoint.dir`
bit for bit: actor, optimizer, LR schedule, prompt position and every RNG are restored.
A step whose loss or grad norm is not finite is skipped (weights and optimizer untouched);
`MAX_NONFINITE_STEPS` of them in a row stop the run with `NonFiniteError`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import math
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_rl import run_state
from megatron_rl.actor.actor import Actor, StepResult
from megatron_rl.actor.loss import policy_loss_fn
from megatron_rl.actor.parallel import init_distributed
from megatron_rl.actor.step import LossFn, MicroBatch
from megatron_rl.algorithms import (
    compute_advantages,
    denominator,
    overlong_penalty,
    summarize_stats,
)
from megatron_rl.algorithms.advantages import PER_REWARD_ESTIMATORS
from megatron_rl.batching import build_batch, reward_matrix, split_updates
from megatron_rl.config import RunConfig
from megatron_rl.convert.export import is_stage_writer
from megatron_rl.data import PromptSampler, apply_template, build_dataset, build_tokenizer
from megatron_rl.evaluate import run_eval
from megatron_rl.metrics import (
    MetricsLogger,
    logprob_mismatch,
    reflection_frequency,
    response_stats,
    reward_stats,
)
from megatron_rl.rewards import RewardComputer
from megatron_rl.rewards.config import is_correct
from megatron_rl.rewards.pool import column_names
from megatron_rl.rollout.sampler import GroupSampler, reward_inputs
from megatron_rl.rollout.store import load_rollouts, save_rollouts, saved_steps
from megatron_rl.rollout.types import Sample
from megatron_rl.rollout.weight_sync import WeightSync

MAX_NONFINITE_STEPS = 3
"""Consecutive steps with a non-finite loss or grad norm after which the run stops."""


OVERLONG_COLUMN = "overlong_penalty"
"""Reward column of DAPO's soft overlong punishment (weight 1) when `algorithm.overlong_penalty`."""
_NO_SYNC = {"seconds": 0.0, "bytes": 0.0}


class RankTimeoutError(RuntimeError):
    """A rank did not reach a synchronisation point in time (stalled or dead)."""


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


@dataclasses.dataclass
class _Rewards:
    """What the group sampler reads from a reward function: totals and per-function columns."""

    total: list[float]
    scores: dict[str, list[float]]


def reward_columns(cfg: RunConfig) -> tuple[list[str], torch.Tensor]:
    """The reward columns every sample carries and their weights [K] (fp64): one per reward
    function (`rewards.functions`, names made unique as the reward pool does), then
    `OVERLONG_COLUMN` (weight 1) when DAPO's soft overlong punishment is on."""
    names = column_names(list(cfg.rewards.functions))
    weights = [f.weight for f in cfg.rewards.functions]
    if cfg.algorithm.overlong_penalty:
        if OVERLONG_COLUMN in names:
            raise ValueError(f"rewards.functions: a reward named {OVERLONG_COLUMN!r} collides "
                             "with algorithm.overlong_penalty's column; rename it")
        names, weights = names + [OVERLONG_COLUMN], weights + [1.0]
    return names, torch.tensor(weights, dtype=torch.float64)


GAP_SUM, GAP_TOKENS, GAP_MAX = ("mismatch/logp_abs_diff_sum", "mismatch/tokens",
                                "mismatch/logp_abs_diff_max")
"""Statistics an on-policy update's loss adds: |actor - engine| log-prob gap (sum, tokens, max)."""


def _with_engine_gap(fn: LossFn) -> LossFn:
    """`fn`, also summing |logp - engine logp| over the loss tokens into its statistics (reduced
    over micro-batches and DP ranks and shared along the pipeline like the loss's own)."""

    def wrapped(logprobs: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, dict]:
        loss, stats = fn(logprobs, mb)
        if mb.rollout_logprobs is not None:
            mask = mb.loss_mask != 0
            diff = (logprobs.detach().float() - mb.rollout_logprobs.float()).abs()[mask]
            stats[GAP_SUM] = diff.sum()
            stats[GAP_TOKENS] = mask.sum().float()
            stats[GAP_MAX] = diff.max() if diff.numel() else diff.new_zeros(())
        return loss, stats

    return wrapped


def merge_results(results: list[StepResult]) -> StepResult:
    """One step's metrics from its updates: stats averaged over the updates that ran (maxima,
    keys ending in `_max`, reduced by max), grad norm averaged, the last lr; skipped only when
    every update was."""
    ran = [r for r in results if r.updated] or results
    keys = {k for r in ran for k in r.stats}
    stats = {k: max(r.stats[k] for r in ran if k in r.stats) if k.endswith("_max") else
             sum(r.stats[k] for r in ran if k in r.stats) / sum(k in r.stats for r in ran)
             for k in keys}
    return StepResult(stats, sum(r.grad_norm for r in ran) / len(ran), results[-1].lr,
                      any(r.updated for r in results), None if ran[0].updated else
                      results[-1].nonfinite, results[0].routing)


class _Timer:
    """Wall time since `restart()` ("step") and the time spent inside `with timer(name):`."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self._start, self._spent = time.perf_counter(), {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._spent[name] = self._spent.get(name, 0.0) + time.perf_counter() - t0

    def seconds(self) -> dict[str, float]:
        return {"step": time.perf_counter() - self._start, **self._spent}


class Trainer:
    """One RL run; every method is collective over all ranks.

    Attributes: `step` (the last step begun; completed once `train_step` returns),
    `stopped_by_signal` (the last `run()` ended early on SIGTERM/SIGUSR1, after saving),
    `resumed_from` (the checkpoint this run continued, or None), `signals` (the stop-signal
    flag), `last_checkpoint` (path of the newest save, or None).
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        init_distributed(cfg.parallel, seed=cfg.train.seed)
        self.rank = dist.get_rank()
        self.actor = Actor(cfg.model, cfg.parallel, cfg.actor,
                           total_steps=cfg.train.steps * cfg.algorithm.mini_batches)
        self._rank0_group = dist.new_group(  # waits for rank 0's host work (gloo: monitored)
            backend="gloo", timeout=datetime.timedelta(seconds=cfg.parallel.rank0_work_timeout_s))
        self.step = 0
        self.nonfinite_streak = 0
        self.stopped_by_signal = False
        self.resumed_from: Path | None = None
        self.last_checkpoint: Path | None = None
        self._saved_at: int | None = None  # the step last_checkpoint holds
        self.signals = run_state.StopSignals()
        self.reference: Any = None  # the initial policy, for the KL penalty (kl_coef > 0)
        self._engine_stale = True  # the engine starts from random weights
        self.timer = _Timer()
        self.reward_names, self.reward_weights = reward_columns(cfg)
        if cfg.rollout.routing_replay:
            self.actor.enable_routing_replay()
        self.engines: list[Any] = []
        self._phase = "start"  # colocation: "rollout" (engines hold the devices) or "train"
        if self.rank == 0:
            train = build_dataset(cfg.data, "train")
            self.tokenizer = build_tokenizer(cfg.data, cfg.model.vocab_size, train)
            # One prompt per draw: the group sampler asks for as many as it needs (over-sampling).
            self.prompts = PromptSampler(train.records, 1, cfg.data.seed, cfg.data.shuffle)
            if cfg.rollout.load_dir is None:
                self.engines = self._engines()
                self.engine = self.engines[0]  # evaluation generates here
                self.reward_computer = RewardComputer(cfg.rewards)
                self.sampler = self._sampler()
        ro = cfg.rollout
        self.weight_sync: WeightSync | None = None  # none without an engine (load_dir)
        self._sync_to: list[Any] = []
        if ro.load_dir is None:
            self.weight_sync = WeightSync(
                self.actor, ro.weight_sync, ro.weight_sync_bucket_mb * 2**20,
                in_process=not ro.engine_urls, timeout_s=ro.request_timeout_s,
                disk_dir=ro.weight_sync_dir or Path(cfg.train.output_dir) / "weights")
            self._sync_to = self._sync_engines()
        # rollout.async_generation (rank 0): the next step's samples, generating while this step
        # trains; `_ready` holds them once awaited (before the engines' weights change).
        self._version = 0  # steps of this process whose update changed the actor's weights
        self._engine_version = 0  # the `_version` of the weights the engines hold
        self._generation: concurrent.futures.Future | None = None
        self._ready: tuple[str, Any] | None = None
        self._generator = (concurrent.futures.ThreadPoolExecutor(1, "rollout")
                           if self.rank == 0 and ro.async_generation else None)
        self._restore()  # last: it restores the RNG that construction has drawn from
        self._check_saved_rollouts()

    def _engines(self) -> list[Any]:
        """Rank 0's rollout engines: a client per server of `rollout.engine_urls` (SGLang or
        `megatron-rl serve`; the group sampler spreads each step's prompts over them, weight
        sync updates them all), or one in-process engine: SGLang's on a GPU, else the embedded
        `TransformersEngine` (the default, and SGLang's stand-in on CPU)."""
        ro = self.cfg.rollout
        if ro.engine_urls:
            engines = self._engine_clients()
            for engine in engines:  # fail now, naming the host, not at the first step
                engine.model_info()
            return engines
        if ro.engine == "sglang":
            engine = self._sglang_in_process()
            if engine is not None:
                return [engine]
        from megatron_rl.rollout.transformers_engine import TransformersEngine

        return [TransformersEngine.from_model_config(self.cfg.model, tokenizer=self.tokenizer,
                                                     timeout_s=ro.call_timeout_s)]

    def _engine_clients(self) -> list[Any]:
        """An HTTP client per `rollout.engine_urls` server."""
        from megatron_rl.rollout.sglang_engine import SGLangEngine

        ro = self.cfg.rollout
        return [SGLangEngine.from_config(ro, url) for url in ro.engine_urls]

    def _sglang_in_process(self) -> Any:
        """SGLang's in-process engine on this rank's GPUs (`slurm.engine_tp`/`engine_ep`,
        memory saver on when colocated), loading `checkpoint.load`; None without CUDA, where
        the embedded engine stands in (said once)."""
        if not torch.cuda.is_available():
            self._say("rollout.engine=sglang without engine_urls: no CUDA here, so the embedded "
                      "engine stands in for SGLang's in-process engine")
            return None
        from megatron_rl.rollout.sglang_engine import SGLangInProcessEngine

        cfg = self.cfg
        if not cfg.checkpoint.load:
            raise ValueError("rollout.engine=sglang in-process loads checkpoint.load (an HF "
                             "directory): set checkpoint.load")
        return SGLangInProcessEngine(
            model_path=cfg.checkpoint.load, tp_size=cfg.slurm.engine_tp,
            ep_size=cfg.slurm.engine_ep, enable_memory_saver=cfg.rollout.colocated,
            random_seed=cfg.train.seed)

    def _sync_engines(self) -> list[Any]:
        """The engines this rank delivers weights to: rank 0's own; with served engines, every
        pipeline stage's writer holds clients of its own (docs/design.md section 6)."""
        if self.rank == 0 or not self.cfg.rollout.engine_urls:
            return self.engines
        return self._engine_clients() if is_stage_writer() else []

    def _sampler(self) -> GroupSampler:
        """The group sampler: prompts from the dataset, rewards from `self.reward`. It asks the
        engines for their routed experts when replay needs them, and from the embedded engine
        for every MoE model (they cost nothing there and give `routing/agreement`)."""
        cfg = self.cfg

        def encode(rec: Any) -> list[int]:
            return self.tokenizer.encode(apply_template(cfg.data.chat_template, rec.prompt,
                                                        self.tokenizer))

        experts = cfg.model.num_experts > 0 and (cfg.rollout.routing_replay
                                                 or cfg.rollout.engine == "transformers")
        return GroupSampler.from_config(
            self.engines, cfg.rollout, cfg.algorithm,
            lambda n: [self.prompts.next_batch()[0] for _ in range(n)], self.reward,
            encode=encode, return_routed_experts=experts, filter_signal=self.filter_signal)

    def _check_saved_rollouts(self) -> None:
        """Refuse a `rollout.save_dir` holding another run's rollouts (never overwrite them) and
        an evaluation that `rollout.load_dir` (no engine) cannot run (every rank raises)."""
        ro = self.cfg.rollout
        if ro.load_dir is not None and (self.cfg.train.eval_interval > 0
                                        or self.cfg.eval.size != 0):
            raise ValueError("rollout.load_dir trains from saved samples without an engine, so "
                             "it cannot evaluate: set train.eval_interval=0 and eval.size=0")
        if ro.save_dir is None or self.resumed_from is not None:
            return  # a resumed run rewrites only the steps after its checkpoint: its own
        later = self._from_rank0(lambda: [n for n in saved_steps(ro.save_dir) if n > self.step])
        if later:
            raise ValueError(f"rollout.save_dir: {ro.save_dir} already holds saved rollouts "
                             f"(step_{later[0]}.pt ...); choose an empty directory or remove "
                             "them")

    def _check_loadable(self, end: int) -> None:
        """With `rollout.load_dir`, every step up to `end` must have been saved: fail before
        training, not after the steps that are there (rank 0 reads, every rank raises)."""
        load_dir = self.cfg.rollout.load_dir
        if load_dir is None:
            return
        wanted = range(self.step + 1, end + 1)
        def missing_steps() -> list[int]:
            have = set(saved_steps(load_dir))  # one listing, not one per step
            return [n for n in wanted if n not in have]

        missing = self._from_rank0(missing_steps)
        if missing:
            raise ValueError(f"rollout.load_dir: {load_dir} has no step_{missing[0]}.pt "
                             f"({len(missing)} of steps {wanted.start}-{end} missing); lower "
                             "train.steps or point load_dir at a run that saved them")

    # ---- the loop ------------------------------------------------------------------------------

    def run(self, steps: int | None = None) -> list[dict[str, float]]:
        """Train up to step `train.steps` (or `steps` more steps), logging every step (console
        line with ETA, tensorboard, `<output_dir>/metrics.jsonl`, learning-curve PNG at the end),
        saving every `checkpoint.save_interval` steps and at the end. On SIGTERM/SIGUSR1 the
        step in flight finishes, a checkpoint is saved and `run` returns early with
        `stopped_by_signal` set. Returns the metrics of the steps run by this call."""
        end = self.step + steps if steps is not None else self.cfg.train.steps
        self._check_loadable(end)
        self.stopped_by_signal = False
        history = []
        if threading.current_thread() is threading.main_thread():
            from megatron_rl.actor import checkpoint

            checkpoint.shield_writer_from_stop_signals()
        with self.signals, MetricsLogger(self.cfg.logging, self.cfg.train.output_dir, end,
                                         rank=self.rank, start_step=self.step) as logger:
            while self.step < end:
                history.append(self.train_step())
                if self._eval_due():
                    history[-1].update(self.evaluate())
                logger.log(self.step, history[-1])
                if self.signals.requested(self.actor.device):
                    self.stopped_by_signal = True
                    break
                if self._save_due():
                    self.save()
            if history and self._saved_at != self.step:  # still under the handlers: a second
                self.save()                               # signal cannot kill the save
        if history and all(h.get("actor/skipped", 0.0) for h in history):
            self._say(f"warning: none of the {len(history)} steps trained (every one skipped: no "
                      "group whose rewards vary, or a non-finite loss); check the rewards, or "
                      "raise rollout.n_samples_per_prompt / algorithm.max_gen_batches")
        if self.stopped_by_signal:
            self._say(f"stop signal received: saved step {self.step} to {self.last_checkpoint}; "
                      f"resume with checkpoint.resume=true")
        return history

    def train_step(self) -> dict[str, float]:
        """One RL step (docs/design.md section 3); returns its metrics (on every rank).

        `sample` is DAPO's generation loop on rank 0: generate G responses per prompt, score
        them (`reward`: the reward functions, then the overlong shaping column), and keep the
        groups dynamic sampling finds informative, until the step is full."""
        self.timer.restart()
        sync = self.to_rollout()                              # engines: devices, new weights
        self.step += 1                                        # the step being run (1-based)
        samples, report = self.sample()                       # generate, reward, shape, filter
        self.to_training()                                    # the actor: devices back
        if not samples:                                       # no informative group at all
            return self.skipped_step(report)
        advantages = self.advantages(samples)                 # per group, from rewards [B, K]
        updates = self.batch(samples, advantages)             # mini-batches of micro-batches
        routing = self.old_logprobs(updates)                  # ratio denominators (+ KL ref)
        result = self.update(updates)                         # one optimizer step each
        self._engine_stale |= result.updated                  # synced before the next rollout
        self._version += int(result.updated)
        if self.on_policy:                                    # measured by the update itself
            routing = result.routing
        return self.log_metrics(samples, report, result, sync, updates, routing)

    def sample(self) -> tuple[list[Sample], dict[str, float]]:
        """Rank 0 generates, rewards and filters a step's groups (or reads the ones a run saved,
        `rollout.load_dir`), saving them when `rollout.save_dir` is set; every rank receives
        them."""
        ro, step = self.cfg.rollout, self.step

        def draw() -> tuple[list[Sample], dict[str, float]]:
            if ro.load_dir is not None:
                return self.loaded(step)
            if not ro.async_generation:
                return self._generate(step, self._engine_version)
            # async: this step's samples were generated while the last step trained (the first
            # step's now); the next step's start now, with the weights just synced
            kind, value = self._ready or ("ok", self._generate(step, self._engine_version))
            self._ready = None
            self._generation = self._generator.submit(self._generate, step + 1,
                                                      self._engine_version)
            if kind == "error":
                raise value
            return value

        return self._from_rank0(draw, f"step {step}: generation and rewards")

    def _generate(self, step: int, version: int) -> tuple[list[Sample], dict[str, float]]:
        """Rank 0: step `step`'s samples from the engines, which hold the weights after
        `version` steps (recorded on each sample: its staleness when trained)."""
        ro = self.cfg.rollout
        samples, report = self.sampler.sample()
        for s in samples:
            s.metadata["policy_version"] = version
        summary = {"gen_batches": report.gen_batches, "groups_seen": report.groups_seen,
                   "groups_kept": report.groups_kept,
                   "generate_seconds": report.generate_seconds,
                   "nonfinite_rewards": report.nonfinite_rewards}
        if ro.save_dir is not None:
            save_rollouts(ro.save_dir, step, samples, summary)
        return samples, summary

    def _await_generation(self) -> float:
        """Rank 0, async: wait for the samples generating in the background (before the
        engines' weights or the prompt sampler's state change); returns the seconds waited."""
        if self._generation is None:
            return 0.0
        t0 = time.perf_counter()
        try:
            self._ready = ("ok", self._generation.result())
        except Exception as err:  # noqa: BLE001 - raised on every rank by the next draw
            self._ready = ("error", err)
        self._generation = None
        return time.perf_counter() - t0

    def loaded(self, step: int) -> tuple[list[Sample], dict[str, float]]:
        """Step `step`'s saved samples, paid under this run's config: the reward functions'
        scores as saved, shaping and the total recomputed (`reward`'s rule), so what is logged
        is what trains. Nothing was generated: the rollout throughput is not a number."""
        samples, report = load_rollouts(self.cfg.rollout.load_dir, step)
        if samples:
            k = len(self.cfg.rewards.functions)
            scores = {n: [s.rewards[n] for s in samples] for n in self.reward_names[:k]
                      if all(n in s.rewards for s in samples)}
            missing = [n for n in self.reward_names[:k] if n not in scores]
            if missing:
                raise ValueError(f"rollout.load_dir: step_{step}.pt has no score for reward "
                                 f"function(s) {missing} (it holds {sorted(samples[0].rewards)})")
            paid = self.shaped(samples, scores)
            for i, s in enumerate(samples):
                s.rewards = {n: paid.scores[n][i] for n in self.reward_names}
                s.reward = paid.total[i]
        return samples, {**report, "generate_seconds": math.nan}

    def evaluate(self) -> dict[str, float]:
        """Held-out pass@k, cons@k and avg@k of the current policy (`eval` section), generated
        by rank 0's engine; rows written to `<output_dir>/eval/step_<N>.jsonl`. The same
        metrics on every rank."""
        self.to_rollout()

        def run() -> dict[str, float]:
            result = run_eval(self.cfg, self.engine)
            result.write(Path(self.cfg.train.output_dir) / "eval" / f"step_{self.step}.jsonl")
            return result.metrics

        return self._from_rank0(run, f"step {self.step}: evaluation")

    def _from_rank0(self, fn: Any, what: str = "rank 0's work") -> Any:
        """`fn()` computed on rank 0 (rollout, rewards, eval: minutes, not a collective's
        seconds), then handed to every rank; an error `fn` raises is raised on every rank, so
        the whole job stops with the same message.

        Waiting is bounded twice: the other ranks wait for rank 0 up to
        `parallel.rank0_work_timeout_s` (a slow generation is not a dead rank), and rank 0,
        once done, gives each of them `parallel.timeout_s` to answer a monitored barrier, which
        names the ranks that did not (stalled or dead) instead of blocking in a broadcast."""
        result: tuple[str, Any] = ("ok", None)
        if self.rank == 0:
            try:
                result = ("ok", fn())
            except Exception as err:  # noqa: BLE001 - handed to every rank, raised there
                result = ("error", err)
        self._all_ranks_here(what)
        box: list[Any] = [result]
        dist.broadcast_object_list(box, src=0)  # everyone is here: the default group's timeout
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def _all_ranks_here(self, what: str) -> None:
        """Every rank reaches this point: rank 0 within `parallel.timeout_s` of finishing its
        work, the others within `parallel.rank0_work_timeout_s` of starting to wait."""
        if dist.get_world_size() == 1:
            return
        par = self.cfg.parallel
        timeout = par.timeout_s if self.rank == 0 else par.rank0_work_timeout_s
        try:
            dist.monitored_barrier(group=self._rank0_group, wait_all_ranks=True,
                                   timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError as err:
            if self.rank == 0:
                found = re.search(r"Ranks? ([\d, ]+) failed", str(err))
                ranks = found.group(1).replace(" ", "").strip(",").split(",") if found else []
                raise RankTimeoutError(
                    f"{what}: rank(s) {', '.join(ranks) or '?'} did not answer within "
                    f"parallel.timeout_s={par.timeout_s:g} s (stalled or dead); stopping the "
                    "job") from None
            raise RankTimeoutError(
                f"{what}: rank {self.rank}: rank 0 stopped (see its message) or did not finish "
                f"within parallel.rank0_work_timeout_s={par.rank0_work_timeout_s:g} s") from None

    def reward(self, samples: list[Sample]) -> _Rewards:
        """Score `samples` with every reward function; then shaping, the one place it applies:
        DAPO's soft overlong punishment is one more column (`OVERLONG_COLUMN`, weight 1), so the
        total and GDPO's per-reward normalisation both see it."""
        batch = self.reward_computer(reward_inputs(samples))
        return self.shaped(samples, {name: [float(x) for x in col]
                                     for name, col in batch.scores.items()})

    def shaped(self, samples: list[Sample], scores: dict[str, list[float]]) -> _Rewards:
        """The reward functions' `scores` plus the shaping columns, and the weighted total."""
        alg = self.cfg.algorithm
        if alg.overlong_penalty:
            lengths = torch.tensor([len(s.response_ids) for s in samples])
            pen = overlong_penalty(lengths, alg.overlong_max_len, alg.overlong_cache_len)
            scores = {**scores, OVERLONG_COLUMN: pen.double().tolist()}
        matrix = torch.tensor([scores[n] for n in self.reward_names], dtype=torch.float64).T
        return _Rewards((matrix @ self.reward_weights).tolist(), scores)

    def filter_signal(self, samples: list[Sample]) -> torch.Tensor:
        """What dynamic sampling compares within a group (docs/design.md section 4): the reward
        functions' columns [B, K] when the estimator normalises each on its own (GDPO: a group
        is kept when any reward varies, even if the totals tie), else their weighted total
        [B]. Shaping columns never count: DAPO keeps a group for 0 < #correct < G, whatever
        its lengths."""
        k = len(self.cfg.rewards.functions)  # the reward functions' columns come first
        rewards = reward_matrix(samples, self.reward_names[:k])
        if self.cfg.algorithm.advantage_estimator in PER_REWARD_ESTIMATORS:
            return rewards
        return rewards @ self.reward_weights[:k]

    def advantages(self, samples: list[Sample]) -> torch.Tensor:
        """Advantages [B] over the whole step by `algorithm.advantage_estimator`, from the
        per-column rewards [B, K] and their weights: GDPO normalises each column in its group;
        every other estimator reads the weighted total."""
        alg = self.cfg.algorithm
        rewards = reward_matrix(samples, self.reward_names)
        groups = torch.tensor([s.group for s in samples])
        return compute_advantages(alg.advantage_estimator, rewards, groups, eps=alg.adv_eps,
                                  weights=self.reward_weights).advantages

    def batch(self, samples: list[Sample], advantages: torch.Tensor) -> list[list[MicroBatch]]:
        """The step's typed batch (overlong filtering applied there), cut into
        `algorithm.mini_batches` updates, each split over the data-parallel ranks."""
        alg, actor = self.cfg.algorithm, self.cfg.actor
        batch = build_batch(samples, reward_names=self.reward_names, weights=self.reward_weights,
                            advantages=advantages, seq_length=actor.seq_length,
                            mask_truncated=alg.overlong_filter)
        par = self.cfg.parallel
        return split_updates(batch, updates=alg.mini_batches,
                             dp_size=self.actor.dp_size, dp_rank=self.actor.dp_rank,
                             micro_batch_size=actor.micro_batch_size,
                             max_tokens=actor.max_tokens_per_micro_batch,
                             pad_multiple=par.tp if self.actor.config.sequence_parallel else 1,
                             same_shape=par.pp > 1, pad_to_seq_length=actor.pad_to_seq_length,
                             share_prompts=actor.share_prompts)

    @property
    def on_policy(self) -> bool:
        """One update per step (`algorithm.mini_batches=1`): the weights that sampled are the
        ones being trained, so the ratio's denominator is the update's own log-probs, detached
        (ratio 1, the same gradient), and no separate forward runs for it (unless
        `algorithm.old_logprob_forward`)."""
        alg = self.cfg.algorithm
        return alg.mini_batches == 1 and not alg.old_logprob_forward

    def old_logprobs(self, updates: list[list[MicroBatch]]) -> float:
        """Log-probs of the sampling weights (the ratio's denominator; none when `on_policy`),
        and of the reference policy when the KL penalty is on; returns the routing agreement
        of that pass (NaN when it did not run)."""
        temperature = self.cfg.rollout.temperature
        mbs = [mb for part in updates for mb in part]
        agreement = math.nan
        with self.timer("actor"):
            if not self.on_policy:
                logprobs, agreement = self.actor.logprobs_and_routing(mbs, temperature)
                for mb, logp in zip(mbs, logprobs, strict=True):
                    mb.old_logprobs = logp
            if self.reference is not None:
                for mb, logp in zip(mbs, self.reference.logprobs(self.actor, mbs, temperature),
                                    strict=True):
                    mb.ref_logprobs = logp
        return agreement

    def update(self, updates: list[list[MicroBatch]]) -> StepResult:
        """One optimizer step per mini-batch, each over its own global loss denominator."""
        with self.timer("actor"):
            results = [self.actor.train_step(part, self.loss_fn(part),
                                             self.cfg.rollout.temperature,
                                             measure_routing=self.on_policy)
                       for part in updates]
        for result in results:  # a skipped update never touched the weights
            self.check_finite(result)
        return merge_results(results)

    def loss_fn(self, mbs: list[MicroBatch]) -> LossFn:
        """The policy loss over the aggregation's denominator of `mbs` on every DP rank, so an
        update's loss does not depend on how its samples are split over ranks. It always asks
        the actor for the token entropy: the log-prob pass computes it anyway, and it is a
        standard metric."""
        alg = self.cfg.algorithm
        den = self.actor.dp_sum(denominator(alg.loss_agg, [mb.loss_mask for mb in mbs],
                                            alg.loss_norm_len))
        fn = policy_loss_fn(alg, den, backend=self.cfg.actor.kernels, on_policy=self.on_policy)
        if self.on_policy:  # no old log-probs to compare with the engine's: measure it here
            fn = _with_engine_gap(fn)
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

    def to_rollout(self) -> dict[str, float]:
        """Hand the devices to the engines with the actor's current weights; returns what the
        weight sync moved. Colocated (`rollout.colocate`, docs/design.md section 6): gradients
        and optimizer state go to host, the engines take their weights' memory back, the
        weights are synced, the parameters go to host, the engines take their KV cache back."""
        if self._phase == "rollout":
            return dict(_NO_SYNC)
        waited = self._await_generation()  # async: nothing may generate while weights change
        colocated = self.cfg.rollout.colocated
        if colocated:
            self.actor.offload(params=False)
            self._engines_memory("resume_memory_occupation", ["weights"])
        sync = self.sync_weights() if self._engine_stale else dict(_NO_SYNC)
        if colocated:
            self.actor.offload(params=True)
            self._engines_memory("resume_memory_occupation", ["kv_cache"])
        self._phase = "rollout"
        return {**sync, "waited": waited}

    def to_training(self) -> None:
        """Colocated: the engines release their memory and the actor comes back from host."""
        if self._phase == "train":
            return
        if self.cfg.rollout.colocated:
            self._engines_memory("release_memory_occupation", None)
            self.actor.onload()
        self._phase = "train"

    def _engines_memory(self, method: str, tags: list[str] | None) -> None:
        """`method(tags)` on rank 0's engines; an engine's error stops every rank."""
        if self.cfg.rollout.load_dir is not None:
            return
        def call() -> None:
            for engine in self.engines:
                getattr(engine, method)(tags)

        self._from_rank0(call, f"after step {self.step}: engines {method}({tags})")

    def sync_weights(self) -> dict[str, float]:
        """The actor's weights to the engines (collective; `rollout.weight_sync`)."""
        if self.weight_sync is None:  # no engine to update (rollout.load_dir)
            self._engine_stale = False
            return dict(_NO_SYNC)
        report = self.weight_sync.sync(self._sync_to)
        self._engine_stale = False
        self._engine_version = self._version
        return {"seconds": report.seconds, "bytes": float(report.bytes)}

    # ---- metrics -------------------------------------------------------------------------------

    def log_metrics(self, samples: list[Sample], report: dict[str, float], result: StepResult,
                    sync: dict[str, float], updates: list[list[MicroBatch]],
                    routing: float) -> dict[str, float]:
        """The step's metrics, the same on every rank (rank 0 measured rollout and sync)."""
        mbs = [mb for part in updates for mb in part]
        gap = self.logprob_gap(mbs, result)
        box = [self.metrics(samples, report, result, sync, gap, routing, self.timer.seconds())]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def skipped_step(self, report: dict[str, float]) -> dict[str, float]:
        """A step whose generation batches held no informative group: nothing to train."""
        return {"actor/skipped": 1.0, "dynamic_sampling/gen_batches": report["gen_batches"],
                "dynamic_sampling/keep_ratio": 0.0,
                "throughput/step_seconds": self.timer.seconds()["step"]}

    def logprob_gap(self, mbs: list[MicroBatch], result: StepResult) -> dict[str, float]:
        """|old log-prob (actor) - rollout log-prob (engine)| over the trained tokens of the
        whole step (all DP ranks): how far the engine samples from the policy being trained.
        On-policy, the update's forward measured it (`_with_engine_gap`)."""
        if self.on_policy:
            tokens = result.stats.pop(GAP_TOKENS, 0.0)
            total = result.stats.pop(GAP_SUM, 0.0)
            return {"mismatch/logp_abs_diff_mean": total / max(tokens, 1.0),
                    "mismatch/logp_abs_diff_max": result.stats.pop(GAP_MAX, 0.0)}
        live = [mb.loss_mask != 0 for mb in mbs]  # micro-batches differ in length: flatten
        pairs = list(zip(mbs, live, strict=True))
        mask = torch.cat([m[m] for m in live]).float()
        local = logprob_mismatch(torch.cat([mb.old_logprobs[m] for mb, m in pairs]),
                                 torch.cat([mb.rollout_logprobs[m] for mb, m in pairs]), mask)
        mean_key, = (k for k in local if k.endswith("_mean"))
        max_key, = (k for k in local if k.endswith("_max"))
        tokens = float(mask.sum())
        sums = self.actor.dp_sum(torch.tensor([local[mean_key] * tokens, tokens],
                                              dtype=torch.float64))
        peak = self.actor.dp_max(torch.tensor([local[max_key]], dtype=torch.float64))
        return {mean_key: float(sums[0] / sums[1].clamp(min=1.0)), max_key: float(peak[0])}

    def metrics(self, samples: list[Sample], report: dict[str, float], result: StepResult,
                sync: dict[str, float], gap: dict[str, float], routing: float,
                seconds: dict[str, float]) -> dict[str, float]:
        """The step's scalars (docs/design.md section 8)."""
        accuracy = self.cfg.rewards.accuracy_function.name  # its score column
        correct = self.cfg.rewards.correct_reward
        hits = [is_correct(s.rewards.get(accuracy, s.reward), correct) for s in samples]
        columns = {n: [s.rewards.get(n, math.nan) for s in samples] for n in self.reward_names}
        lengths = [len(s.response_ids) for s in samples]
        trained = self._version - int(result.updated)  # the weights the update started from
        stale = [trained - s.metadata.get("policy_version", trained) for s in samples]
        stats = result.stats
        trained = sum(min(len(s.prompt_ids) + len(s.response_ids) - 1,
                          self.cfg.actor.seq_length) for s in samples)  # rows' real tokens
        out = {
            **reward_stats(columns, [s.reward for s in samples]),
            "accuracy": sum(hits) / len(hits),
            **response_stats(lengths, self.cfg.rollout.max_new_tokens),
            **reflection_frequency([s.response_text for s in samples]),
            **gap,
            "routing/agreement": routing,
            # Reward calls that returned NaN/inf, scored 0 (saved rollouts of older runs: 0).
            "rewards/nonfinite": report.get("nonfinite_rewards", 0.0),
            "actor/loss": 0.0, "actor/entropy": math.nan, "actor/clip_frac_low": 0.0,
            "actor/clip_frac_high": 0.0, "actor/approx_kl": 0.0,
            # pg_loss, clip fractions, approx KL, ratio mean/max, and where on: KL to the
            # reference, dual-clip fraction, TIS weight: per trained token of the step.
            **{f"actor/{k}": v for k, v in summarize_stats(stats).items()},
            "actor/grad_norm": result.grad_norm, "actor/lr": result.lr,
            "actor/skipped": 0.0 if result.updated else 1.0,
            "dynamic_sampling/gen_batches": report["gen_batches"],
            "dynamic_sampling/keep_ratio": report["groups_kept"] / max(report["groups_seen"], 1),
            "weight_sync/seconds": sync["seconds"], "weight_sync/bytes": sync["bytes"],
            # async generation: how long this step waited for its samples, and how many
            # updates behind the trained weights the weights that generated them were
            "rollout/wait_seconds": sync.get("waited", 0.0),
            "rollout/staleness_mean": sum(stale) / len(stale),
            "rollout/staleness_max": float(max(stale)),
            "throughput/step_seconds": seconds["step"],
            "throughput/rollout_tokens_per_s": sum(lengths) / max(report["generate_seconds"],
                                                                  1e-9),
            "throughput/train_tokens_per_s": trained / max(seconds["actor"], 1e-9),
        }
        return out

    # ---- checkpoints ---------------------------------------------------------------------------

    def _eval_due(self) -> bool:
        interval = self.cfg.train.eval_interval
        return interval > 0 and self.step % interval == 0

    def _save_due(self) -> bool:
        interval = self.cfg.checkpoint.save_interval
        return interval > 0 and self.step % interval == 0

    def save(self) -> Path:
        """A whole-run checkpoint of the current step (collective; see `run_state`)."""
        self.to_training()  # the actor's state on its devices (after an evaluation)
        if self.rank == 0:  # async: the prompt sampler's state must not move while saved; the
            self._await_generation()  # samples in flight are lost to a resumed run
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
        path = run_state.latest_checkpoint(ck.dir, self._say) if ck.resume else None
        if ck.resume and path is None:
            self._say(f"checkpoint.resume: no complete checkpoint in {ck.dir}; starting fresh")
        if ck.load:  # also when resuming: the KL reference is the initial policy
            kind = run_state.load_initial_weights(ck.load, self.actor)
            if path is None:
                self._say(f"initial weights: {kind} checkpoint {ck.load}")
        if self.cfg.algorithm.kl_coef > 0:
            from megatron_rl.actor.reference import ReferencePolicy

            self.reference = ReferencePolicy.from_actor(self.actor)
        if path is None:
            return
        path, state = run_state.resume(ck.dir, self.actor, self._say, start=path)
        self.step, self.nonfinite_streak = state["step"], state["nonfinite_streak"]
        self.resumed_from = self.last_checkpoint = path
        self._saved_at = self.step
        if self.rank == 0:
            self.prompts.load_state_dict(state["prompts"])
        self._say(f"resumed from {path} at step {self.step}")

    def _say(self, line: str) -> None:
        if self.rank == 0:
            print(line, flush=True)
