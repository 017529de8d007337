"""Config section owned by pretrain: the embedded default's base model."""


from megatron_rl.configurable import require, require_non_negative, require_positive, section


@section
class PretrainConfig:
    """A short pre-training that makes the tiny demo's base model (cached on disk).

    Used only when `steps > 0` and `checkpoint.load` is unset: the run then starts RL from this
    base instead of random weights. Real models come from `checkpoint.load` instead.
    """

    steps: int = 0
    """Optimizer steps of pre-training; 0 = none (RL starts from checkpoint.load or random)."""
    batch_size: int = 32
    """Worked solutions per step."""
    lr: float = 3.0e-3
    """Peak AdamW learning rate (linear warmup, cosine decay to 0)."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    work_fraction: float = 0.3
    """Share of worked answers in the last `mixed_steps` steps; the rest are guesses (see
    `megatron_rl.data.worked`). The base model then answers right only some of the time, which
    is what RL amplifies."""
    mixed_steps: int = 200
    """Final steps on the mixed corpus. The steps before see worked answers only, so the model
    learns the arithmetic first (a small model needs every worked example to learn it) and then
    how often to skip it."""
    step_accuracy: float = 0.95
    """Probability that one step of a worked corpus solution is right."""
    seed: int = 0
    """Seed of the initial weights, the corpus slips and the batch order."""
    cache_dir: str = "outputs/base_model"
    """Where base models are cached, one subdirectory per hash of everything they depend on."""

    def validate(self) -> None:
        """Counts in range, a probability in (0, 1]."""
        require_non_negative(self, "steps", "warmup_steps", "mixed_steps")
        require_positive(self, "batch_size")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}", "e.g. 3e-3")
        require(0 < self.step_accuracy <= 1, "step_accuracy",
                f"must be in (0, 1], got {self.step_accuracy}", "e.g. 0.95")
        require(0 <= self.work_fraction <= 1, "work_fraction",
                f"must be in [0, 1], got {self.work_fraction}", "e.g. 0.3")
        require(bool(self.cache_dir.strip()), "cache_dir", "is empty", "give a directory path")
