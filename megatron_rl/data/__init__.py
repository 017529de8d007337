"""Prompt datasets, chat templates and synthetic tasks.

What the trainer and rollout call:
    train = build_dataset(cfg.data, "train")          # PromptDataset of PromptRecords
    tokenizer = build_tokenizer(cfg.data, cfg.model.vocab_size, train)
    sampler = PromptSampler(train.records, cfg.rollout.prompts_per_step, cfg.data.seed,
                            cfg.data.shuffle)          # state_dict() goes in the checkpoint
    for record in sampler.next_batch():
        text = apply_template(cfg.data.chat_template, record.prompt, tokenizer)
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from megatron_rl.data.config import DataConfig
from megatron_rl.data.files import LoadedRecords, RowKeys, load_records
from megatron_rl.data.records import DataError, Message, Prompt, PromptRecord, get_dotted
from megatron_rl.data.sampler import PromptSampler
from megatron_rl.data.synthetic import task_splits
from megatron_rl.data.templates import R1_ZERO_TEMPLATE, TEMPLATES, apply_template
from megatron_rl.data.tokenizer import load_tokenizer, tokenizer_texts, train_tokenizer

__all__ = [
    "DataConfig", "DataError", "Message", "Prompt", "PromptDataset", "PromptRecord",
    "PromptSampler", "R1_ZERO_TEMPLATE", "TEMPLATES", "apply_template", "build_dataset",
    "build_tokenizer", "get_dotted", "load_records", "load_tokenizer", "tokenizer_dir",
    "train_tokenizer",
]


@dataclass
class PromptDataset:
    """The records of one split, with what was dropped on the way (for logs and metrics).

    skipped: malformed file rows skipped (data.skip_malformed).
    eval_dropped: synthetic eval items dropped because their question is also in train.
    """

    records: list[PromptRecord]
    split: str
    skipped: int = 0
    eval_dropped: int = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> PromptRecord:
        return self.records[i]


def build_dataset(cfg: DataConfig, split: Literal["train", "eval"] = "train") -> PromptDataset:
    """The prompts of `split` from the configured source.

    reasoning_gym: train_size items of `task`, and eval_size held-out items disjoint from them.
    jsonl/parquet: all of `path` for train; the first eval_size rows of `eval_path` for eval
    (no eval_path: an empty eval set).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if cfg.source == "reasoning_gym":
        splits = task_splits(cfg.task, cfg.train_size, cfg.eval_size, cfg.seed, cfg.task_kwargs)
        if split == "train":
            return PromptDataset(list(splits.train), split)
        return PromptDataset(list(splits.eval), split, eval_dropped=splits.eval_dropped)
    path = cfg.path if split == "train" else cfg.eval_path
    if path is None:
        return PromptDataset([], split)
    loaded: LoadedRecords = load_records(
        path, cfg.source, RowKeys(cfg.prompt_key, cfg.label_key), cfg.skip_malformed,
        limit=None if split == "train" else cfg.eval_size)
    return PromptDataset(loaded.records, split, skipped=loaded.skipped)


def build_tokenizer(cfg: DataConfig, vocab_size: int, train: PromptDataset | None = None) -> Any:
    """`cfg.tokenizer` if set, else the demo tokenizer trained on the train prompts (cached)."""
    return load_tokenizer(tokenizer_dir(cfg, vocab_size, train))


def tokenizer_dir(cfg: DataConfig, vocab_size: int, train: PromptDataset | None = None
                  ) -> str | Path:
    """The directory `build_tokenizer` loads: `cfg.tokenizer`, else the demo tokenizer trained
    on the train prompts (in `cfg.tokenizer_cache`, trained on first use)."""
    if cfg.tokenizer:
        return cfg.tokenizer
    train = train if train is not None else build_dataset(cfg, "train")
    texts = tokenizer_texts(train.records, cfg.chat_template)
    return train_tokenizer(texts, vocab_size, cfg.tokenizer_cache)
