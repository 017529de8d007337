"""Config section owned by rewards: which reward functions run, with what weights."""

from dataclasses import field
from typing import Any

from megatron_rl.configurable import require, require_non_negative, require_positive, section


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

    def validate(self) -> None:
        """At least one function; positive timeout."""
        require(len(self.functions) >= 1, "functions", "is empty",
                "give at least one, e.g. [{name: reasoning_gym}]")
        require_positive(self, "timeout_s")
        require_non_negative(self, "num_workers")
