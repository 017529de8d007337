"""Evaluation on held-out prompts: what `megatron_rl.evaluate` exports (see its docstring)."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_rl.algorithms.pass_at_k import avg_at_k, cons_at_k, pass_at_k
from megatron_rl.data import DataConfig, PromptRecord, apply_template, build_dataset
from megatron_rl.evaluate.config import EvalConfig
from megatron_rl.rewards import RewardBatch, RewardComputer, RewardInput
from megatron_rl.rewards.config import is_correct
from megatron_rl.rewards.extract import extract_answer
from megatron_rl.rollout.engine import RolloutEngine
from megatron_rl.rollout.sampler import reward_inputs
from megatron_rl.rollout.types import GenerateOutput, Sample, SamplingParams

if TYPE_CHECKING:  # the run config imports evaluate.config
    from megatron_rl.config import RunConfig

__all__ = ["METRICS_FILE", "RESULTS_FILE", "EvalConfig", "EvalResult", "EvalRow", "eval_data",
           "eval_metrics", "evaluate", "run_eval"]

RESULTS_FILE = "eval_results.jsonl"
METRICS_FILE = "eval_metrics.json"
PROGRESS_MIN_BATCHES = 4
"""Print a progress line per batch of prompts only from this many batches on."""


@dataclass
class EvalRow:
    """One problem: its prompt, reference answer and every sampled response."""

    index: int
    prompt: Any
    label: Any
    responses: list[str]
    answers: list[str | None]
    """The answer extracted from each response (None where there is none)."""
    correct: list[bool]
    response_lengths: list[int]
    """Tokens of each response."""


@dataclass
class EvalResult:
    """Aggregate metrics (`eval/pass@k`, ...) and the per-problem rows behind them."""

    metrics: dict[str, float]
    rows: list[EvalRow]

    def write(self, path: str | Path) -> Path:
        """Write one JSON line per problem to `path` (parents created); returns the path."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(dataclasses.asdict(r), default=str) for r in self.rows]
        out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return out


def evaluate(
    engine: RolloutEngine,
    records: Sequence[PromptRecord],
    encode: Callable[[PromptRecord], list[int]],
    rewards: Callable[[list[RewardInput]], RewardBatch],
    cfg: EvalConfig,
    *,
    max_new_tokens: int,
    accuracy: str,
    correct_reward: float,
    seed: int,
    stop: Sequence[str] = (),
    extract: Callable[[str], str | None] = extract_answer,
) -> EvalResult:
    """Sample `cfg.n_samples` responses per record, score them, and aggregate the metrics.

    `encode` turns a record into prompt ids (chat template + tokenizer); `rewards` is a
    `RewardComputer`, whose score column `accuracy` decides correctness (a response is correct
    when it scores >= `correct_reward`); `extract` finds the answer that cons@k votes on. Batch b
    of `cfg.batch_prompts` records samples with seed `seed + b`.
    """
    if not records:
        raise ValueError("evaluation has no prompts: set data.eval_size > 0 (or data.eval_path "
                         "for file datasets)")
    batches = [records[i:i + cfg.batch_prompts]
               for i in range(0, len(records), cfg.batch_prompts)]
    rows: list[EvalRow] = []
    start = time.perf_counter()
    for b, batch in enumerate(batches):
        params = _sampling(cfg, max_new_tokens, stop, seed + b)
        outputs = engine.generate(input_ids=[encode(r) for r in batch], sampling_params=params)
        rows += _score(batch, outputs, rewards, accuracy, correct_reward, extract)
        if len(batches) >= PROGRESS_MIN_BATCHES:
            print(f"[eval] batch {b + 1}/{len(batches)}: {len(rows)}/{len(records)} problems, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return EvalResult(eval_metrics(rows, cfg.k), rows)


def _sampling(cfg: EvalConfig, max_new_tokens: int, stop: Sequence[str],
              seed: int) -> SamplingParams:
    return SamplingParams(temperature=cfg.temperature, max_new_tokens=max_new_tokens,
                          stop=list(stop), n=cfg.n_samples, seed=seed)


def _score(batch: Sequence[PromptRecord], outputs: list[list[GenerateOutput]],
           rewards: Callable[[list[RewardInput]], RewardBatch], accuracy: str,
           correct_reward: float, extract: Callable[[str], str | None]) -> list[EvalRow]:
    """Reward every response of a batch; correct = the `accuracy` column's score reaches
    `correct_reward`."""
    if len(outputs) != len(batch):
        raise ValueError(f"engine returned {len(outputs)} groups for {len(batch)} prompts")
    groups = [[_sample(g, rec, out) for out in group]
              for g, (rec, group) in enumerate(zip(batch, outputs, strict=True))]
    batch_scores = rewards(reward_inputs([s for group in groups for s in group]))
    if accuracy not in batch_scores.scores:
        raise ValueError(f"rewards returned no {accuracy!r} column (columns: "
                         f"{sorted(batch_scores.scores)})")
    column = iter(batch_scores.scores[accuracy])
    rows = []
    for rec, group in zip(batch, groups, strict=True):
        scores = [next(column) for _ in group]
        rows.append(EvalRow(
            index=rec.index, prompt=rec.prompt, label=rec.label,
            responses=[s.response_text for s in group],
            answers=[extract(s.response_text) for s in group],
            correct=[is_correct(score, correct_reward) for score in scores],
            response_lengths=[len(s.response_ids) for s in group]))
    return rows


def _sample(group: int, rec: PromptRecord, out: GenerateOutput) -> Sample:
    """A response as the rollout's `Sample`, with the record's label and metadata."""
    return Sample(group=group, prompt=rec.prompt, prompt_ids=list(out.prompt_ids),
                  response_ids=list(out.output_ids), rollout_logprobs=list(out.output_logprobs),
                  finish_reason=out.finish_reason, response_text=out.text, label=rec.label,
                  metadata={"data_source": rec.data_source, **rec.metadata})


def eval_metrics(rows: Sequence[EvalRow], ks: Sequence[int]) -> dict[str, float]:
    """Means over problems of pass@k, cons@k and avg@k, overall accuracy and response length."""
    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    out: dict[str, float] = {}
    for k in ks:
        out[f"eval/pass@{k}"] = mean([pass_at_k(len(r.correct), sum(r.correct), k) for r in rows])
    for k in ks:
        out[f"eval/cons@{k}"] = mean([cons_at_k([_vote(a) for a in r.answers], r.correct, k)
                                      for r in rows])
    for k in ks:
        out[f"eval/avg@{k}"] = mean([avg_at_k(r.correct, k) for r in rows])
    out["eval/accuracy"] = mean([float(c) for r in rows for c in r.correct])
    out["eval/response_length"] = mean([float(n) for r in rows for n in r.response_lengths])
    return out


def _vote(answer: str | None) -> str | None:
    """The form answers are compared in for majority voting: whitespace removed."""
    return None if answer is None else "".join(answer.split())


def run_eval(cfg: RunConfig, engine: Any) -> EvalResult:
    """Evaluate `engine` (a `TransformersEngine` with its tokenizer) on the config's eval set."""
    tokenizer = engine.tokenizer
    records = _eval_records(cfg)
    template = cfg.data.chat_template

    def encode(rec: PromptRecord) -> list[int]:
        return tokenizer.encode(apply_template(template, rec.prompt, tokenizer))

    accuracy = cfg.rewards.accuracy_function
    order = accuracy.kwargs.get("order")  # cons@k votes with the accuracy reward's extractors
    extract = functools.partial(extract_answer, order=order) if order else extract_answer
    with RewardComputer(cfg.rewards) as rewards:
        return evaluate(engine, records, encode, rewards, cfg.eval,
                        max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                        accuracy=accuracy.name, correct_reward=cfg.rewards.correct_reward,
                        seed=cfg.train.seed, extract=extract)


def eval_data(cfg: RunConfig) -> DataConfig:
    """The data section with eval.size (when set) as the eval set's size."""
    if cfg.eval.size is None:
        return cfg.data
    return dataclasses.replace(cfg.data, eval_size=cfg.eval.size)


def _eval_records(cfg: RunConfig) -> list[PromptRecord]:
    return build_dataset(eval_data(cfg), "eval").records
