"""The group sampler: G responses per prompt from one or several engines, rewarded and filtered
by dynamic sampling (DAPO section 3.2) until the step's target number of groups is reached.

One generation batch: draw ceil(missing_groups * over_sampling) prompts, split them over the live
engines (one thread each), score every response with `reward_fn`, and hand the groups to
`DynamicSamplingBuffer`, which keeps groups whose `filter_signal` (by default the total reward)
varies. Repeat until the target is
reached or `max_gen_batches` batches were drawn.

Failures: an engine call that raises is retried with exponential backoff on the next live engine
(the failing one is skipped for the rest of the step and reported with its address); a call that
does not return within `timeout_s` counts as a failure and its thread is abandoned, so a dead
engine never hangs the step. When every engine has failed, `EngineError` names them all.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_rl.algorithms.dynamic_sampling import DynamicSamplingBuffer, informative_mask
from megatron_rl.rewards.pool import RewardInput
from megatron_rl.rollout.engine import EngineError, RolloutEngine
from megatron_rl.rollout.types import GenerateOutput, Sample, SamplingParams

logger = logging.getLogger(__name__)

PromptSource = Callable[[int], Sequence[Any]] | Iterable[Any]
"""`fn(n) -> n prompts`, or an iterator of prompts; a prompt is a record with `.prompt` (and
optionally `.label`, `.metadata`, `.data_source`), a string, or a list of token ids."""
RewardFn = Callable[[list[Sample]], Any]
"""Scores samples: returns a sequence of totals, or an object with `.total` (and `.scores`, one
column per function, e.g. the rewards `RewardBatch`)."""


@dataclass
class SamplerReport:
    """What one step's sampling did."""

    gen_batches: int = 0
    prompts_drawn: int = 0
    groups_seen: int = 0
    groups_kept: int = 0
    dropped_zero_std: int = 0
    """Groups whose rewards all agree (dynamic sampling)."""
    dropped_surplus: int = 0
    """Informative groups beyond the target."""
    filled: bool = False
    samples: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0
    """Tokens generated in all batches (kept or not)."""
    seconds: float = 0.0
    generate_seconds: float = 0.0
    reward_seconds: float = 0.0
    engine_failures: list[str] = field(default_factory=list)
    """One line per failed engine call: "<address>: <error>"."""
    nonfinite_rewards: int = 0
    """Samples whose reward (total or a column) was NaN or inf: each scored 0."""


class GroupSampler:
    """Produces one step's `list[Sample]`: `target_groups` groups of `group_size` responses."""

    def __init__(self, engines: RolloutEngine | Sequence[RolloutEngine],
                 sampling: SamplingParams, group_size: int, target_groups: int,
                 prompts: PromptSource, reward_fn: RewardFn, *,
                 encode: Callable[[Any], list[int]] | None = None,
                 over_sampling: float = 1.0, dynamic_sampling: bool = True,
                 max_gen_batches: int = 1, max_retries: int = 3, backoff_s: float = 0.5,
                 timeout_s: float | None = 600.0,
                 return_routed_experts: bool = False,
                 filter_signal: Callable[[list[Sample]], torch.Tensor] | None = None) -> None:
        self.engines = [engines] if isinstance(engines, RolloutEngine) else list(engines)
        if not self.engines:
            raise ValueError("GroupSampler: no engines")
        if group_size < 1 or target_groups < 1 or over_sampling < 1:
            raise ValueError(f"group_size ({group_size}) and target_groups ({target_groups}) "
                             f"must be >= 1 and over_sampling ({over_sampling}) >= 1")
        self.sampling = SamplingParams(**{**vars(sampling), "n": group_size})
        self.group_size, self.target_groups = group_size, target_groups
        self.reward_fn, self.encode = reward_fn, encode
        self.over_sampling, self.dynamic_sampling = over_sampling, dynamic_sampling
        self.max_gen_batches = max_gen_batches if dynamic_sampling else 1
        self.max_retries, self.backoff_s, self.timeout_s = max_retries, backoff_s, timeout_s
        self.return_routed_experts = return_routed_experts
        self.filter_signal = filter_signal or _total_reward
        self._draw = _drawer(prompts)
        self._pool = ThreadPoolExecutor(max_workers=len(self.engines),
                                        thread_name_prefix="rollout")

    @classmethod
    def from_config(cls, engines: RolloutEngine | Sequence[RolloutEngine], rollout: Any,
                    algorithm: Any, prompts: PromptSource, reward_fn: RewardFn,
                    **kwargs: Any) -> GroupSampler:
        """From `RolloutConfig` (sampling, G, over-sampling, retries, routing replay) and
        `AlgorithmConfig` (dynamic_sampling, max_gen_batches); `kwargs` (e.g. `encode`,
        `filter_signal`) pass through and win."""
        sampling = SamplingParams(temperature=rollout.temperature, top_p=rollout.top_p,
                                  top_k=rollout.top_k, max_new_tokens=rollout.max_new_tokens)
        kwargs.setdefault("timeout_s", rollout.call_timeout_s)
        kwargs.setdefault("return_routed_experts", rollout.routing_replay)
        return cls(engines, sampling, rollout.n_samples_per_prompt, rollout.prompts_per_step,
                   prompts, reward_fn, over_sampling=rollout.over_sampling,
                   dynamic_sampling=algorithm.dynamic_sampling,
                   max_gen_batches=algorithm.max_gen_batches, max_retries=rollout.max_retries,
                   **kwargs)

    def sample(self) -> tuple[list[Sample], SamplerReport]:
        """One step: generate, reward, filter, until full; samples carry `group` 0..groups-1."""
        start = time.perf_counter()
        report = SamplerReport()
        buffer: DynamicSamplingBuffer[Sample] = DynamicSamplingBuffer(
            target_groups=self.target_groups, max_gen_batches=self.max_gen_batches)
        dead: set[int] = set()
        kept = 0
        while buffer.wants_more():
            missing = self.target_groups - kept
            n = math.ceil(missing * self.over_sampling) if self.dynamic_sampling else missing
            prompts = list(self._draw(n))
            report.prompts_drawn += len(prompts)
            samples = self._generate(prompts, dead, report)
            self._score(samples, report)
            if not self.dynamic_sampling:  # every group is kept
                report.gen_batches = report.groups_seen = report.groups_kept = len(prompts)
                report.gen_batches, report.filled = 1, len(prompts) >= self.target_groups
                return self._finish(_by_group(samples), report, start)
            signal = self.filter_signal(samples)
            group_ids = torch.tensor([s.group for s in samples])
            kept += len(set(group_ids[informative_mask(signal, group_ids)].tolist()))
            buffer.add(samples, signal, group_ids)
        groups, ds = buffer.take()
        report.gen_batches, report.groups_seen = ds.gen_batches, ds.groups_seen
        report.groups_kept, report.filled = ds.groups_kept, ds.filled
        report.dropped_zero_std, report.dropped_surplus = ds.dropped_zero_std, ds.dropped_surplus
        return self._finish(groups, report, start)

    def _finish(self, groups: list[list[Sample]], report: SamplerReport,
                start: float) -> tuple[list[Sample], SamplerReport]:
        out = [s for g, members in enumerate(groups) for s in _regroup(members, g)]
        report.samples, report.seconds = len(out), time.perf_counter() - start
        return out, report

    def close(self) -> None:
        """Stop the worker threads (hung engine calls are left behind, never joined)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- one generation batch -------------------------------------------------------------------

    def _generate(self, prompts: list[Any], dead: set[int],
                  report: SamplerReport) -> list[Sample]:
        """Split the prompts over the live engines; failed chunks move to another engine."""
        t0 = time.perf_counter()
        ids = [self._ids(p) for p in prompts]
        live = [i for i in range(len(self.engines)) if i not in dead] or self._all_dead(report)
        chunks = _split(list(range(len(prompts))), len(live))
        futures = {c: self._pool.submit(self._with_failover, [ids[i] for i in chunk],
                                        live[c], dead, report)
                   for c, chunk in enumerate(chunks)}
        samples = []
        for c, chunk in enumerate(chunks):
            outs = futures[c].result()
            for k, idx in enumerate(chunk):
                samples += [self._to_sample(prompts[idx], ids[idx], out, idx) for out in outs[k]]
        report.generate_seconds += time.perf_counter() - t0
        report.prompt_tokens += sum(len(x) for x in ids) * self.group_size
        report.response_tokens += sum(len(s.response_ids) for s in samples)
        return samples

    def _with_failover(self, ids: list[list[int]], first: int, dead: set[int],
                       report: SamplerReport) -> list[list[GenerateOutput]]:
        """Generate on engine `first`, else on the next live engines, with backoff."""
        engine_idx = first
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            engine = self.engines[engine_idx]
            try:
                return self._call(engine, ids)
            except Exception as e:  # any engine failure: report, try another engine
                report.engine_failures.append(f"{engine.address}: {type(e).__name__}: {e}")
                dead.add(engine_idx)
            live = [i for i in range(len(self.engines)) if i not in dead]
            if not live:
                break
            engine_idx = live[attempt % len(live)]
        return self._all_dead(report)

    def _call(self, engine: RolloutEngine, ids: list[list[int]]) -> list[list[GenerateOutput]]:
        """One engine call bounded by `timeout_s`: it runs on its own daemon thread, abandoned
        (never joined) on timeout, so a hung in-process engine cannot hang the step."""
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["out"] = engine.generate(input_ids=ids, sampling_params=self.sampling,
                                             return_routed_experts=self.return_routed_experts)
            except BaseException as e:  # handed to the caller's thread
                box["error"] = e

        thread = threading.Thread(target=run, daemon=True, name=f"generate@{engine.address}")
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            raise EngineError(f"engine at {engine.address} did not answer within "
                              f"{self.timeout_s} s")
        if "error" in box:
            raise box["error"]
        outs = box["out"]
        if len(outs) != len(ids) or any(len(g) != self.group_size for g in outs):
            raise EngineError(f"engine at {engine.address} returned {len(outs)} groups for "
                              f"{len(ids)} prompts (or groups not of size {self.group_size})")
        return outs

    def _all_dead(self, report: SamplerReport) -> Any:
        lines = "\n  ".join(report.engine_failures[-len(self.engines) * 2:])
        raise EngineError(f"all {len(self.engines)} rollout engines failed:\n  {lines}")

    # -- samples and rewards --------------------------------------------------------------------

    def _ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if self.encode is None:
            raise ValueError("GroupSampler: prompts are not token ids; pass encode=")
        return list(self.encode(prompt))

    def _to_sample(self, prompt: Any, ids: list[int], out: GenerateOutput, group: int) -> Sample:
        meta = dict(getattr(prompt, "metadata", None) or {})
        if getattr(prompt, "data_source", None) is not None:
            meta.setdefault("data_source", prompt.data_source)
        return Sample(group=group, prompt=getattr(prompt, "prompt", prompt), prompt_ids=ids,
                      response_ids=list(out.output_ids), rollout_logprobs=list(out.output_logprobs),
                      finish_reason=out.finish_reason, response_text=out.text,
                      label=getattr(prompt, "label", None), metadata=meta,
                      routed_experts=out.routed_experts)

    def _score(self, samples: list[Sample], report: SamplerReport) -> None:
        """Set `reward` (and per-function `rewards`) on each sample. A reward that is not a
        finite number (NaN or inf: a reward function's bug) never reaches dynamic sampling or
        the trainer: it scores 0 (the column that is not finite, and the total when it is not),
        the sample is counted in `report.nonfinite_rewards`, a warning names the reward, and
        the step goes on. The other columns keep their scores (the trainer's advantages and
        filter read the columns, so a shaping penalty still counts)."""
        t0 = time.perf_counter()
        result = self.reward_fn(samples)
        totals = list(getattr(result, "total", result))
        if len(totals) != len(samples):
            raise ValueError(f"reward_fn returned {len(totals)} rewards for {len(samples)} samples")
        scores = getattr(result, "scores", None) or {}
        culprits: dict[str, int] = {}
        for i, s in enumerate(samples):
            s.reward = float(totals[i])
            s.rewards = {name: float(col[i]) for name, col in scores.items()}
            bad = [name for name, v in s.rewards.items() if not math.isfinite(v)]
            if bad or not math.isfinite(s.reward):
                for name in bad:
                    s.rewards[name] = 0.0
                for name in bad or ["reward_fn"]:
                    culprits[name] = culprits.get(name, 0) + 1
                if not math.isfinite(s.reward):
                    s.reward = 0.0
                report.nonfinite_rewards += 1
        if culprits:
            logger.warning("reward not a finite number (NaN or inf), scored 0: %s of %d samples",
                           ", ".join(f"{n!r} for {c}" for n, c in culprits.items()),
                           len(samples))
        report.reward_seconds += time.perf_counter() - t0


def _total_reward(samples: list[Sample]) -> torch.Tensor:
    """The default dynamic-sampling signal: each sample's total reward [B]."""
    return torch.tensor([s.reward for s in samples], dtype=torch.float64)


def reward_inputs(samples: Sequence[Sample]) -> list[RewardInput]:
    """Samples as the rewards package's `RewardInput`s (prompt text, response, label, metadata)."""
    return [RewardInput(prompt=_prompt_text(s.prompt), response=s.response_text, label=s.label,
                        metadata=s.metadata) for s in samples]


def computer_reward_fn(computer: Callable[[list[Any]], Any]) -> RewardFn:
    """Adapt a `RewardComputer` (RewardInput batch -> RewardBatch) to the sampler's `reward_fn`."""
    return lambda samples: computer(reward_inputs(samples))


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        return "\n".join(str(m.get("content", "")) for m in prompt)
    return str(prompt)


def _by_group(samples: list[Sample]) -> list[list[Sample]]:
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    return list(groups.values())


def _regroup(members: list[Sample], group: int) -> list[Sample]:
    for s in members:
        s.group = group
    return members


def _split(items: list[int], parts: int) -> list[list[int]]:
    """Contiguous, nearly equal chunks (empty ones dropped)."""
    size = math.ceil(len(items) / max(parts, 1)) if items else 1
    return [items[i:i + size] for i in range(0, len(items), size)]


def _drawer(prompts: PromptSource) -> Callable[[int], Sequence[Any]]:
    if callable(prompts) and not isinstance(prompts, Iterator):
        return prompts  # type: ignore[return-value]
    it = iter(prompts)

    def draw(n: int) -> list[Any]:
        out = []
        for _ in range(n):
            try:
                out.append(next(it))
            except StopIteration:
                break
        if not out:
            raise ValueError("GroupSampler: the prompt iterator is exhausted")
        return out

    return draw
