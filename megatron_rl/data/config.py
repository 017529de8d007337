"""Config section owned by data: where prompts come from and how they are formatted."""

from dataclasses import field
from typing import Any, Literal

from megatron_rl.configurable import require, require_non_negative, require_positive, section


@section
class DataConfig:
    """Prompt dataset, its field names, chat template and tokenizer."""

    source: Literal["reasoning_gym", "jsonl", "parquet"] = "reasoning_gym"
    """reasoning_gym = synthetic tasks generated on the fly; jsonl/parquet = files at path."""
    path: str | None = None
    """Training prompts file (jsonl/parquet)."""
    eval_path: str | None = None
    """Evaluation prompts file; None = a held-out synthetic set (reasoning_gym) or no eval."""
    task: str = "basic_arithmetic"
    """reasoning_gym task name."""
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    """Arguments of the reasoning_gym task generator."""
    train_size: int = 10000
    """Synthetic training prompts to generate."""
    eval_size: int = 200
    """Evaluation prompts (synthetic: generated; files: the first N)."""
    prompt_key: str = "prompt"
    """Dotted field of a record holding the prompt (verl/slime naming)."""
    label_key: str = "reward_model.ground_truth"
    """Dotted field of a record holding the reference answer (verl); a row without it falls
    back to its top-level `label` field (slime naming)."""
    chat_template: Literal["r1_zero", "tokenizer", "none"] = "r1_zero"
    """Prompt format: DeepSeek-R1-Zero template, the tokenizer's own chat template, or raw."""
    shuffle: bool = True
    """Shuffle prompts each epoch."""
    seed: int = 1
    """Seed of the dataset generator and the shuffle."""
    skip_malformed: bool = False
    """Skip records missing prompt/label instead of failing (the count is logged and kept)."""
    tokenizer: str | None = None
    """Tokenizer dir or HF name; None = the demo tokenizer trained for the tiny model."""
    tokenizer_cache: str = "outputs/tokenizer"
    """Where the trained demo tokenizer is cached, one subdir per hash of its inputs."""

    def validate(self) -> None:
        """File sources need a path; sizes are in range."""
        if self.source in ("jsonl", "parquet"):
            require(bool(self.path), "path", f"is required when source is {self.source!r}",
                    f"set data.path to a .{self.source} file")
        else:
            require(bool(self.task.strip()), "task", "is empty", "e.g. basic_arithmetic")
            for name in ("path", "eval_path"):  # a file the run would silently not read
                require(getattr(self, name) is None, name,
                        f"is set but source is {self.source!r}, which generates its prompts",
                        "set data.source to jsonl or parquet to read the file")
        require_positive(self, "train_size")
        require(self.train_size < 2**30, "train_size", f"must be < 2**30, got {self.train_size}",
                "the held-out eval split uses seeds from seed + 2**30 on")
        require_non_negative(self, "eval_size")
        require(bool(self.prompt_key.strip()), "prompt_key", "is empty", "e.g. prompt")
        require(bool(self.label_key.strip()), "label_key", "is empty",
                "e.g. reward_model.ground_truth")
