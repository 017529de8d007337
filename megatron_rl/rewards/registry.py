"""The one registry of reward functions, and binding a config entry to a callable.

A reward function is `fn(prompt: str, response: str, label: Any, metadata: dict, **kwargs)
-> float | dict[str, float]`. A dict result must hold the reward under "score"; its other keys
are reported as extra metrics. A user's own function is named by "package.module:function".
"""

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from megatron_rl.rewards.config import RewardFunctionConfig, RewardsConfig

RewardFn = Callable[..., float | dict[str, float]]
BoundReward = Callable[[str, str, Any, dict], float | dict[str, float]]

REWARDS: dict[str, RewardFn] = {}
"""Built-in reward functions by name; filled by `@register` when megatron_rl.rewards loads."""

CONFIG_KWARGS = ("correct_reward", "incorrect_reward")
"""RewardsConfig fields passed to functions that accept them (unless kwargs override them)."""


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a function to `REWARDS` under `name`."""
    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward function {name!r} is registered twice")
        REWARDS[name] = fn
        return fn
    return deco


def resolve(name: str) -> RewardFn:
    """The function registered as `name`, or imported from a "module:function" path."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"reward function {name!r}: cannot import module "
                             f"{module_name!r} ({e})") from e
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise ValueError(f"reward function {name!r}: module {module_name!r} has no "
                             f"callable {attr!r}")
        return fn
    if name not in REWARDS:
        raise ValueError(f"unknown reward function {name!r}; registered: "
                         f"{', '.join(sorted(REWARDS))}; or give 'package.module:function'")
    return REWARDS[name]


def bind(spec: RewardFunctionConfig, config: RewardsConfig) -> BoundReward:
    """`spec`'s function with its kwargs (and accepted RewardsConfig values) applied.

    Raises ValueError naming the function if it does not take those kwargs.
    """
    fn = resolve(spec.name)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = {k: getattr(config, k) for k in CONFIG_KWARGS if k in params}
    kwargs.update(spec.kwargs)
    try:
        inspect.signature(fn).bind("", "", None, {}, **kwargs)
    except TypeError as e:
        takes = [p for p in list(params)[4:]] or ["no keyword arguments"]
        raise ValueError(f"reward function {spec.name!r}: bad kwargs {sorted(spec.kwargs)} "
                         f"({e}); it takes: {', '.join(takes)}") from e
    return functools.partial(fn, **kwargs)
