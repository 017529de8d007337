"""The one registry of reward functions, and binding a config entry to a callable.

A reward function is `fn(prompt: str, response: str, label: Any, metadata: dict, **kwargs)
-> float | dict[str, float]`. A dict result must hold the reward under "score"; its other keys
are reported as extra metrics. A user's own function is named by "package.module:function".

Two optional attributes of a function, called with its bound kwargs:

- `fn.preflight(**kwargs)`: runs once when the function is bound in the trainer's process; it
  raises (a clear message) if the function cannot work on this host (the code reward without
  a sandbox);
- `fn.max_wall_s(label, **kwargs)`: the most wall time one call on `label` may take; the reward
  pool waits that long (plus `POOL_SLACK_S`) when it exceeds `RewardsConfig.timeout_s` (a label
  with many test cases).
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

def config_kwargs(config: RewardsConfig) -> dict[str, Any]:
    """RewardsConfig values passed to functions that accept them (unless kwargs override them)."""
    return {"correct_reward": config.correct_reward, "incorrect_reward": config.incorrect_reward,
            "allow_unsandboxed": config.code.allow_unsandboxed}


POOL_SLACK_S = 1.0
"""Added to a function's own `max_wall_s`: the worker's bookkeeping around the call."""


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
    kwargs = {k: v for k, v in config_kwargs(config).items() if k in params}
    kwargs.update(spec.kwargs)
    try:
        inspect.signature(fn).bind("", "", None, {}, **kwargs)
    except TypeError as e:
        takes = [p for p in list(params)[4:]] or ["no keyword arguments"]
        raise ValueError(f"reward function {spec.name!r}: bad kwargs {sorted(spec.kwargs)} "
                         f"({e}); it takes: {', '.join(takes)}") from e
    preflight = getattr(fn, "preflight", None)
    if preflight is not None:
        preflight(**kwargs)
    return functools.partial(fn, **kwargs)


def wall_budget(fn: BoundReward, label: Any) -> float | None:
    """The bound function's own worst-case wall time on `label` (`max_wall_s`), or None."""
    base = getattr(fn, "func", fn)
    hook = getattr(base, "max_wall_s", None)
    if hook is None:
        return None
    try:
        return float(hook(label, **getattr(fn, "keywords", {}))) + POOL_SLACK_S
    except Exception:  # noqa: BLE001 - a malformed label fails in the call itself, scored 0
        return None
