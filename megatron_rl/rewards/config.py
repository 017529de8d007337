"""Config section owned by rewards: which reward functions run, with what weights."""

from dataclasses import field
from typing import Any

from megatron_rl.configurable import require, require_non_negative, require_positive, section

CORRECT_TOL = 1e-6
"""Slack when comparing a score with `correct_reward` (float scores of exact answers)."""


def is_correct(score: float, correct_reward: float) -> bool:
    """A sample is correct when its accuracy score reaches `correct_reward`: the one rule the
    trainer's `accuracy` and evaluation's pass@k share."""
    return score >= correct_reward - CORRECT_TOL


@section
class RewardFunctionConfig:
    """One reward function from the registry, its weight and its own arguments."""

    name: str
    """Registry name of the reward function."""
    weight: float = 1.0
    """Weight of this reward in the total (and in GDPO's weighted sum of advantages)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Free-form keyword arguments passed to the function."""

    def validate(self) -> None:
        """A registry name is given."""
        require(bool(self.name.strip()), "name", "is empty", "give a reward function name")


@section
class CodeSandboxConfig:
    """The operator's settings of the code reward's sandbox (the task's limits are the `code`
    function's kwargs)."""

    allow_unsandboxed: bool = False
    """Run untrusted programs with rlimits only where this host allows no isolation (neither
    root nor unprivileged user namespaces). Off: the code reward refuses to start there. A
    program run this way can read your files and signal your processes."""


def _default_functions() -> list[RewardFunctionConfig]:
    return [RewardFunctionConfig(name="reasoning_gym")]


@section
class RewardsConfig:
    """Reward computation: functions, accuracy values, sandboxing limits."""

    functions: list[RewardFunctionConfig] = field(default_factory=_default_functions)
    """Reward functions; several give GDPO one reward per function."""
    correct_reward: float = 1.0
    """Score of a correct answer."""
    incorrect_reward: float = 0.0
    """Score of a wrong answer (DAPO uses -1)."""
    timeout_s: float = 10.0
    """Time limit of one reward evaluation, in seconds."""
    num_workers: int = 2
    """Worker processes that evaluate rewards; 0 = in the calling process."""
    accuracy: str | None = None
    """Name of the reward function whose score counts as correct/accuracy (hit when >=
    correct_reward); None = the first function."""
    code: CodeSandboxConfig = field(default_factory=CodeSandboxConfig)
    """Sandbox settings of the code reward."""

    def validate(self) -> None:
        """At least one function; positive timeout; `accuracy` names a configured function."""
        require(len(self.functions) >= 1, "functions", "is empty",
                "give at least one, e.g. [{name: reasoning_gym}]")
        require_positive(self, "timeout_s")
        require_non_negative(self, "num_workers")
        names = [f.name for f in self.functions]
        require(self.accuracy is None or self.accuracy in names, "accuracy",
                f"{self.accuracy!r} is not a configured reward function",
                f"use one of {names} or leave it unset for the first")

    @property
    def accuracy_function(self) -> RewardFunctionConfig:
        """The reward function whose score decides correctness (accuracy, eval's pass@k): the
        one `accuracy` names (the first of that name), else the first function. Its score
        column in a `RewardBatch` is its name."""
        if self.accuracy is None:
            return self.functions[0]
        return next(f for f in self.functions if f.name == self.accuracy)
