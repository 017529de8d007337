"""Config section owned by evaluation: samples per problem, the k of each metric, sampling,
sizes. Its own module (standard library and `configurable` only), so that the run config
imports it without importing the evaluation code."""

from dataclasses import field

from megatron_rl.configurable import require, require_positive, section


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
