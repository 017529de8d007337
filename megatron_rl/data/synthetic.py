"""reasoning-gym as a prompt source: verifiable tasks generated offline, train and held-out eval.

We write no generators: `reasoning_gym.create_dataset(task, size, seed, **task_kwargs)` makes the
items and `reasoning_gym.get_score_answer_fn(task)(answer, entry)` scores them. Each record keeps
label = entry["answer"] and metadata = {"task": task, "entry": entry} (JSON-safe), which is all
the reward side needs to call that scorer.

Held-out split: reasoning-gym seeds item i with `Random(seed + i)`, so the eval split starts at
`seed + EVAL_SEED_OFFSET` (far beyond any train index) and eval items whose question text also
appears in train are dropped and counted (small tasks repeat questions).
"""

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

from megatron_rl.data.records import DataError, PromptRecord

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 2**30
"""Eval item i uses seed + 2**30 + i; train uses seed + i with i < train_size < 2**30."""


@dataclass
class TaskSplits:
    """Train and eval records of one task, and how many eval items collided with train."""

    train: list[PromptRecord]
    eval: list[PromptRecord]
    eval_dropped: int


def _jsonable(value: Any) -> Any:
    """json.dumps fallback: sets become sorted lists, anything else its repr."""
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    return repr(value)


def task_names() -> list[str]:
    """All task names the installed reasoning-gym registers."""
    from reasoning_gym.factory import DATASETS  # heavy: only synthetic datasets need it

    return sorted(DATASETS)


def generate(task: str, size: int, seed: int, task_kwargs: dict[str, Any] | None = None,
             first_index: int = 0) -> list[PromptRecord]:
    """`size` records of `task` from reasoning-gym, deterministic in (task, seed, task_kwargs)."""
    import reasoning_gym  # heavy, as in task_names

    if task not in task_names():
        raise DataError(f"unknown reasoning-gym task {task!r}; installed tasks include "
                        f"{', '.join(task_names()[:12])}, ... (see reasoning_gym.factory)")
    try:
        dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **(task_kwargs or {}))
    except (TypeError, ValueError, AssertionError) as e:
        raise DataError(f"reasoning-gym task {task!r} rejects task_kwargs "
                        f"{task_kwargs}: {e}") from e
    records = []
    for i, entry in enumerate(dataset):
        entry = json.loads(json.dumps(entry, default=_jsonable))
        records.append(PromptRecord(prompt=entry["question"], label=entry["answer"],
                                    data_source=task, metadata={"task": task, "entry": entry},
                                    index=first_index + i))
    return records


def task_splits(task: str, train_size: int, eval_size: int, seed: int,
                task_kwargs: dict[str, Any] | None = None) -> TaskSplits:
    """Train split (seed) and a disjoint eval split (seed + EVAL_SEED_OFFSET) of `task`.

    Cached per arguments (the train and eval datasets are built from one call; countdown
    takes ~15 ms an item). The records are shared: treat them as read-only.
    """
    return _task_splits(task, train_size, eval_size, seed, json.dumps(task_kwargs or {},
                                                                       sort_keys=True))


@functools.lru_cache(maxsize=4)
def _task_splits(task: str, train_size: int, eval_size: int, seed: int,
                 kwargs_json: str) -> TaskSplits:
    task_kwargs = json.loads(kwargs_json)
    train = generate(task, train_size, seed, task_kwargs)
    candidates = (generate(task, eval_size, seed + EVAL_SEED_OFFSET, task_kwargs)
                  if eval_size else [])
    seen = {r.prompt for r in train}
    held_out = [r for r in candidates if r.prompt not in seen]
    dropped = len(candidates) - len(held_out)
    if dropped:
        log.info("%s: dropped %d of %d eval prompts also in train", task, dropped, len(candidates))
    held_out = [PromptRecord(r.prompt, r.label, r.data_source, r.metadata, index=i)
                for i, r in enumerate(held_out)]
    return TaskSplits(train=train, eval=held_out, eval_dropped=dropped)
