"""The prompt record: the contract between data and rollout.

A dataset is a list of `PromptRecord`s whatever its source (jsonl, parquet, reasoning-gym).
Rollout formats `prompt` with a chat template, generates, and hands `label`, `metadata` and
`data_source` to the reward functions unchanged.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]
"""One chat turn: {"role": "system" | "user" | "assistant", "content": str}."""

Prompt = str | list[Message]
"""A prompt is plain text or a list of chat messages (verl and slime accept both)."""


class DataError(ValueError):
    """A data file or row is missing or malformed; the message names the file and line/row."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt with what its rewards need.

    prompt: text or chat messages, before any chat template.
    label: the reference answer (verl `reward_model.ground_truth`, slime `label`).
    data_source: which dataset or task the prompt comes from (picks/labels rewards, metrics).
    metadata: extra per-prompt data for rewards; reasoning-gym rows carry
        {"task": task name, "entry": the reasoning-gym entry dict}.
    index: position of the record in its dataset (stable id for logs and resumption).
    """

    prompt: Prompt
    label: Any
    data_source: str
    metadata: dict[str, Any] = field(default_factory=dict)
    index: int = 0


_MISSING = object()


def get_dotted(row: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    """`row["a"]["b"]` for key "a.b"; `default` (or KeyError naming the key) when absent.

    A key present literally with dots (e.g. a flat "reward_model.ground_truth" column) wins.
    """
    if key in row:
        return row[key]
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is _MISSING:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def check_prompt(value: Any) -> str | None:
    """Why `value` is not a valid prompt (text or [{role, content}] messages), or None if it is."""
    if isinstance(value, str):
        return None if value.strip() else "prompt is empty"
    if isinstance(value, list | tuple):
        if not value:
            return "prompt has no messages"
        for i, msg in enumerate(value):
            if not isinstance(msg, Mapping):
                return f"prompt message {i} is a {type(msg).__name__}, not a {{role, content}} dict"
            for name in ("role", "content"):
                if not isinstance(msg.get(name), str):
                    return f"prompt message {i} has no string {name!r}"
        return None
    return f"prompt is a {type(value).__name__}, not text or a list of messages"


def as_prompt(value: str | list[Mapping[str, Any]] | tuple) -> Prompt:
    """A checked prompt as plain Python: text, or a list of {role, content} dicts."""
    if isinstance(value, str):
        return value
    return [{"role": m["role"], "content": m["content"]} for m in value]
