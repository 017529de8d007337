"""Several rank workers of a test module run in turn in one spawned process group.

Spawning ranks costs each an interpreter start and the torch + Megatron import (about 7 s a
rank on a 2-core CI machine), more than the work of most tests; a module's workers run in one
spawn instead, each test then checking its own worker's results. Every worker starts by
(re-)initialising its layout (`init_distributed` destroys the previous model-parallel groups);
Megatron's MoE logging tracker, sized by the first model's layer count and never reset, is
emptied before each call, as a fresh process has it.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from megatron_rl.launch.spawn import run_ranks


class Failed(str):
    """The traceback of a worker that raised (the next worker still ran)."""


def _in_turn(calls: list[tuple[str, str, tuple]]) -> list:
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    out: list = []
    for module, name, args in calls:
        get_moe_layer_wise_logging_tracker().clear()
        try:
            out.append(getattr(importlib.import_module(module), name)(*args))
        except Exception:  # noqa: BLE001 - reported by the test that owns the call
            out.append(Failed(traceback.format_exc()))
    return out


def run_batch(world: int, calls: Sequence[tuple[Callable[..., Any], Sequence[Any]]],
              timeout_s: float = 1200) -> list[list]:
    """`fn(*args)` for each `(fn, args)` in turn on `world` ranks of one spawn; per call, the
    results of every rank in rank order (a `Failed` traceback where the worker raised)."""
    per_rank = run_ranks(_in_turn, world,
                         [(fn.__module__, fn.__name__, tuple(args)) for fn, args in calls],
                         timeout_s=timeout_s)
    return [[rank[i] for rank in per_rank] for i in range(len(calls))]


def ok(result: Any) -> Any:
    """`result`, failing the test with the worker's traceback where it raised."""
    if isinstance(result, Failed):
        pytest.fail(str(result), pytrace=False)
    return result


def run_cases(cases: Sequence[tuple[int, Callable[..., Any], Sequence[Any]]],
              timeout_s: float = 1200) -> list[list]:
    """`(world, fn, args)` per case; the cases of one world size run in turn in one spawn of
    that many ranks. Per case, the results of every rank in rank order (as `run_batch`)."""
    out: list[list] = [[] for _ in cases]
    for world in sorted({case[0] for case in cases}):
        idx = [i for i, case in enumerate(cases) if case[0] == world]
        results = run_batch(world, [(cases[i][1], cases[i][2]) for i in idx], timeout_s)
        for i, res in zip(idx, results, strict=True):
            out[i] = res
    return out
