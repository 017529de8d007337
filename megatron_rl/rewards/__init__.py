"""Reward functions from a sample to a score, and their registry.

Importing the package registers the built-in rewards: math, format, code, length, language,
reasoning_gym. `RewardComputer` runs the configured ones over a batch in a worker pool.
"""

from megatron_rl.rewards import code, format, gym, language, length, math  # noqa: F401 (register)
from megatron_rl.rewards.pool import RewardBatch, RewardComputer, RewardInput
from megatron_rl.rewards.registry import REWARDS, bind, register, resolve

__all__ = ["REWARDS", "RewardBatch", "RewardComputer", "RewardInput", "bind", "register",
           "resolve"]
