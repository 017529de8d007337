"""Evaluation on held-out prompts: pass@k, cons@k and avg@k (DESIGN.md sections 4 and 8).

    megatron-rl eval CONFIG [--set K=V ...] (--checkpoint DIR | --hf DIR) [--out FILE]

Each problem gets `eval.n_samples` responses from a rollout engine; each response is scored by
the configured rewards, and it is *correct* when the first reward function's score reaches
`rewards.correct_reward` (the trainer's accuracy convention). Per problem, with c correct of n:
pass@k = 1 - C(n-c, k)/C(n, k) (Chen et al. 2021), cons@k = the majority answer of the first k
samples is correct (R1's cons@64), avg@k = mean correctness of the first k samples (DAPO's
avg@32); the benchmark value is the mean over problems. cons@k votes on the answer that the
rewards' own extractor finds (`rewards.extract.extract_answer`), whitespace removed.

Sampling is plain temperature sampling (no top-p/top-k), seeded per batch of prompts from
`seed`, so a run is reproducible for a fixed engine, batch size and seed. No stop strings by
default: the model sees the same sampling it was trained with (responses end at EOS).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_rl.algorithms.pass_at_k import avg_at_k, cons_at_k, pass_at_k
from megatron_rl.configurable import require, require_positive, section
from megatron_rl.rewards.extract import extract_answer

if TYPE_CHECKING:
    from megatron_rl.config import RunConfig
    from megatron_rl.data import PromptRecord
    from megatron_rl.rewards import RewardBatch, RewardInput
    from megatron_rl.rollout.engine import RolloutEngine
    from megatron_rl.rollout.types import GenerateOutput

RESULTS_FILE = "eval_results.jsonl"
METRICS_FILE = "eval_metrics.json"
PROGRESS_MIN_BATCHES = 4
"""Print a progress line per batch of prompts only from this many batches on."""
CORRECT_TOL = 1e-6
"""Slack when comparing a score with `correct_reward` (as the trainer's accuracy does)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
"""Any of these in an HF model directory means it brings its own tokenizer."""


def _default_k() -> list[int]:
    return [1, 4, 8]


@section
class EvalConfig:
    """Held-out evaluation: samples per problem, the k of each metric, sampling, sizes."""

    n_samples: int = 8
    """Responses sampled per problem (n of the pass@k estimator)."""
    k: list[int] = field(default_factory=_default_k)
    """The k values reported for pass@k, cons@k and avg@k (each <= n_samples)."""
    temperature: float = 1.0
    """Sampling temperature (DeepSeek-R1 evaluates at 0.6; ours defaults to the rollout's 1.0)."""
    max_new_tokens: int | None = None
    """Longest response in tokens; None = rollout.max_new_tokens."""
    size: int | None = None
    """Problems to evaluate; None = data.eval_size; 0 = `train` skips its before/after eval."""
    batch_prompts: int = 32
    """Prompts per engine call (each expands to n_samples rows)."""

    def validate(self) -> None:
        """Positive sizes; k non-empty, distinct and within n_samples."""
        require_positive(self, "n_samples", "temperature", "max_new_tokens", "batch_prompts")
        require(self.size is None or self.size >= 0, "size", f"is {self.size}",
                "give a count of problems, 0 to skip, or leave it unset for data.eval_size")
        require(bool(self.k), "k", "is empty", "give at least one, e.g. [1]")
        require(len(set(self.k)) == len(self.k), "k", f"has duplicates: {self.k}",
                "list each k once")
        bad = [k for k in self.k if not 1 <= k <= self.n_samples]
        require(not bad, "k", f"{bad} not in 1..n_samples={self.n_samples}",
                f"use k values <= {self.n_samples} or raise eval.n_samples")


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
    correct_reward: float,
    seed: int,
    stop: Sequence[str] = (),
    extract: Callable[[str], str | None] = extract_answer,
) -> EvalResult:
    """Sample `cfg.n_samples` responses per record, score them, and aggregate the metrics.

    `encode` turns a record into prompt ids (chat template + tokenizer); `rewards` is a
    `RewardComputer` (its first column decides correctness); `extract` finds the answer that
    cons@k votes on. Batch b of `cfg.batch_prompts` records samples with seed `seed + b`.
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
        rows += _score(batch, outputs, rewards, correct_reward, extract)
        if len(batches) >= PROGRESS_MIN_BATCHES:
            print(f"[eval] batch {b + 1}/{len(batches)}: {len(rows)}/{len(records)} problems, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return EvalResult(eval_metrics(rows, cfg.k), rows)


def _sampling(cfg: EvalConfig, max_new_tokens: int, stop: Sequence[str], seed: int) -> Any:
    from megatron_rl.rollout.types import SamplingParams

    return SamplingParams(temperature=cfg.temperature, max_new_tokens=max_new_tokens,
                          stop=list(stop), n=cfg.n_samples, seed=seed)


def _score(batch: Sequence[PromptRecord], outputs: list[list[GenerateOutput]],
           rewards: Callable[[list[RewardInput]], RewardBatch], correct_reward: float,
           extract: Callable[[str], str | None]) -> list[EvalRow]:
    """Reward every response of a batch; correct = first reward function's score."""
    from megatron_rl.rollout.sampler import reward_inputs

    if len(outputs) != len(batch):
        raise ValueError(f"engine returned {len(outputs)} groups for {len(batch)} prompts")
    groups = [[_sample(g, rec, out) for out in group]
              for g, (rec, group) in enumerate(zip(batch, outputs, strict=True))]
    batch_scores = rewards(reward_inputs([s for group in groups for s in group]))
    first = iter(next(iter(batch_scores.scores.values())))  # the accuracy reward's column
    rows = []
    for rec, group in zip(batch, groups, strict=True):
        scores = [next(first) for _ in group]
        rows.append(EvalRow(
            index=rec.index, prompt=rec.prompt, label=rec.label,
            responses=[s.response_text for s in group],
            answers=[extract(s.response_text) for s in group],
            correct=[score >= correct_reward - CORRECT_TOL for score in scores],
            response_lengths=[len(s.response_ids) for s in group]))
    return rows


def _sample(group: int, rec: PromptRecord, out: GenerateOutput) -> Any:
    """A response as the rollout's `Sample`, with the record's label and metadata."""
    from megatron_rl.rollout.types import Sample

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


# ---- the `megatron-rl eval` command ----------------------------------------------------------


def cli_main(args: argparse.Namespace) -> int:
    """`megatron-rl eval`: engine and evaluation on rank 0; user errors print one line, exit 1
    (2 without a model to evaluate)."""
    if not (args.checkpoint or args.hf):
        print("megatron-rl eval: give the model to evaluate: --checkpoint DIR or --hf DIR",
              file=sys.stderr)
        return 2
    try:
        if args.hf:
            cfg, engine = _hf_engine(args.hf, args.config, args.overrides)
        else:
            cfg, engine = _checkpoint_engine(args.checkpoint, args.config, args.overrides)
        if engine is None:  # not rank 0: it only took part in the weight sync, if any
            return 0
        result = run_eval(cfg, engine)
    except (ValueError, OSError) as err:
        print(f"megatron-rl eval: {err}", file=sys.stderr)
        return 1
    finally:
        if args.checkpoint:
            _teardown()
    out = result.write(args.out or Path(cfg.train.output_dir) / RESULTS_FILE)
    (out.parent / METRICS_FILE).write_text(json.dumps(result.metrics, indent=1) + "\n")
    print(format_table(result.metrics))
    print(f"[eval] wrote {out} and {out.parent / METRICS_FILE}", file=sys.stderr)
    return 0


def run_eval(cfg: RunConfig, engine: Any) -> EvalResult:
    """Evaluate `engine` (a `TransformersEngine` with its tokenizer) on the config's eval set."""
    from megatron_rl.data import apply_template
    from megatron_rl.rewards import RewardComputer

    tokenizer = engine.tokenizer
    records = _eval_records(cfg)
    template = cfg.data.chat_template

    def encode(rec: PromptRecord) -> list[int]:
        return tokenizer.encode(apply_template(template, rec.prompt, tokenizer))

    order = cfg.rewards.functions[0].kwargs.get("order")  # the first reward's own extractors
    extract = functools.partial(extract_answer, order=order) if order else extract_answer
    with RewardComputer(cfg.rewards) as rewards:
        return evaluate(engine, records, encode, rewards, cfg.eval,
                        max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens,
                        correct_reward=cfg.rewards.correct_reward, seed=cfg.train.seed,
                        extract=extract)


def format_table(metrics: dict[str, float]) -> str:
    """Metrics as a two-column text table."""
    width = max(len("metric"), *(len(k) for k in metrics))
    lines = [f"{'metric':<{width}}  value"]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in metrics.items()]
    return "\n".join(lines)


def _data(cfg: RunConfig) -> Any:
    """The data section with eval.size (when set) as the eval set's size."""
    if cfg.eval.size is None:
        return cfg.data
    return dataclasses.replace(cfg.data, eval_size=cfg.eval.size)


def _eval_records(cfg: RunConfig) -> list[PromptRecord]:
    from megatron_rl.data import build_dataset

    return build_dataset(_data(cfg), "eval").records


def _tokenizer(cfg: RunConfig, vocab_size: int) -> Any:
    """The config's tokenizer (data.tokenizer, or the demo tokenizer trained on the prompts)."""
    from megatron_rl.data import build_tokenizer

    return build_tokenizer(_data(cfg), vocab_size)


def _teardown() -> None:
    """Leave the process groups of the checkpoint route, if it made any."""
    import torch.distributed as dist

    if dist.is_initialized():
        from megatron_rl.actor.parallel import destroy_distributed

        destroy_distributed()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _hf_engine(path: str, config: str, overrides: Sequence[str]) -> tuple[RunConfig, Any]:
    """A `TransformersEngine` on the HF model at `path` (rank 0; None on other ranks)."""
    from megatron_rl.config import load_config

    hf_dir = Path(path)
    if not (hf_dir / "config.json").is_file():
        what = "no config.json" if hf_dir.is_dir() else "directory not found"
        raise FileNotFoundError(f"{path}: not a Hugging Face model directory ({what})")
    cfg = load_config(config, overrides)
    if _rank() != 0:
        return cfg, None
    import torch
    import transformers

    from megatron_rl.data import load_tokenizer
    from megatron_rl.rollout.transformers_engine import TransformersEngine

    try:  # fp32, as the embedded engine runs the actor's weights
        model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot load a Hugging Face causal LM ({first})") from e
    own = any((hf_dir / f).is_file() for f in TOKENIZER_FILES)
    tokenizer = load_tokenizer(hf_dir) if own else _tokenizer(cfg, model.config.vocab_size)
    return cfg, TransformersEngine(model, tokenizer, timeout_s=cfg.rollout.call_timeout_s)


def _checkpoint_engine(path: str, config: str,
                       overrides: Sequence[str]) -> tuple[RunConfig, Any]:
    """Load a megatron-rl dist checkpoint into the actor (collective) and push its weights
    into a `TransformersEngine` on rank 0 (None on other ranks). The model comes from the
    checkpoint's recorded config; the layout from the run config."""
    if not Path(path).is_dir():  # before importing Megatron-Core
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    from megatron_rl.actor import checkpoint
    from megatron_rl.actor.config import ModelConfig
    from megatron_rl.config import load_config
    from megatron_rl.configurable import from_dict
    from megatron_rl.convert.registry import ARCHS

    info = checkpoint.read_info(path)  # FileNotFoundError naming the path
    if not info.get("model") or info.get("arch") not in ARCHS:
        raise ValueError(f"{path}: no model config/architecture recorded in "
                         f"{checkpoint.INFO}; evaluate checkpoints written by megatron-rl")
    cfg = load_config(config, overrides, model=from_dict(ModelConfig, info["model"]))
    require(cfg.parallel.pp == 1, "parallel.pp", "eval pushes weights into an engine on rank 0, "
            "which sees only its pipeline stage", "use parallel.pp=1")
    arch = ARCHS[info["arch"]]
    engine = None
    if _rank() == 0:  # before the collectives: other ranks wait at most parallel.timeout_s
        from megatron_rl.rollout.transformers_engine import TransformersEngine

        tokenizer = _tokenizer(cfg, cfg.model.vocab_size)
        engine = TransformersEngine.from_model_config(cfg.model, arch, tokenizer=tokenizer,
                                                      timeout_s=cfg.rollout.call_timeout_s)
    _load_into(engine, path, cfg, arch)
    return cfg, engine


def _load_into(engine: Any, path: str, cfg: RunConfig, arch: Any) -> None:
    """Build the actor, load the checkpoint's weights and sync them into `engine` (collective);
    the actor is dropped afterwards."""
    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.parallel import init_distributed
    from megatron_rl.rollout.weight_sync import sync_weights

    init_distributed(cfg.parallel, seed=cfg.train.seed)
    actor = Actor(cfg.model, cfg.parallel, cfg.actor)
    actor.load(path, with_optimizer=False)
    bucket = cfg.rollout.weight_sync_bucket_mb * 2**20
    sync_weights(actor, [engine] if engine is not None else [], bucket, arch=arch)
