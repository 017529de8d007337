"""Saved rollouts (slime's debug path, docs/design.md section 10): one file per step holding its
samples, so a step can be re-trained without an engine, bit for bit.

`<dir>/step_<N>.pt` is a `torch.save` of plain containers (dicts, lists, strings, numbers and
tensors), read back with `weights_only=True`: loading never runs code from the file.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from megatron_rl.rollout.types import Sample

FORMAT = 1
"""Version of the file layout; a file of another version is refused with a message."""


def step_file(directory: str | os.PathLike[str], step: int) -> Path:
    """Where step `step` (1-based, as in metrics.jsonl) is saved."""
    return Path(directory) / f"step_{step}.pt"


def saved_steps(directory: str | os.PathLike[str]) -> list[int]:
    """The step numbers saved in `directory`, ascending (none if it does not exist)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    steps = []
    for f in d.glob("step_*.pt"):
        suffix = f.stem.removeprefix("step_")
        if suffix.isdigit():
            steps.append(int(suffix))
    return sorted(steps)


def save_rollouts(directory: str | os.PathLike[str], step: int, samples: list[Sample],
                  report: dict[str, float]) -> Path:
    """Write step `step`'s samples and sampling report atomically (temporary file, rename)."""
    path = step_file(directory, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "step": step, "report": dict(report),
               "samples": [dataclasses.asdict(s) for s in samples]}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_rollouts(directory: str | os.PathLike[str], step: int
                  ) -> tuple[list[Sample], dict[str, float]]:
    """Step `step`'s samples and report as `save_rollouts` wrote them; one-line errors name the
    file when it is missing, unreadable or of another format."""
    path = step_file(directory, step)
    if not path.is_file():
        have = saved_steps(directory)
        raise FileNotFoundError(
            f"rollout.load_dir: {path} does not exist (saved steps there: "
            f"{_ranges(have) or 'none'}); load_dir trains only the steps a run saved")
    try:
        payload: Any = torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"rollout.load_dir: cannot read {path}: {type(err).__name__}: "
                         f"{err}".splitlines()[0]) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"rollout.load_dir: {path} is not a saved-rollouts file of format "
                         f"{FORMAT}")
    names = {f.name for f in dataclasses.fields(Sample)}
    samples = []
    for i, row in enumerate(payload["samples"]):
        if not isinstance(row, dict) or set(row) - names:
            raise ValueError(f"rollout.load_dir: {path}: sample {i} has unknown fields "
                             f"{sorted(set(row) - names) if isinstance(row, dict) else row!r}")
        samples.append(Sample(**row))
    return samples, payload["report"]


def _ranges(steps: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    out, start = [], None
    for i, s in enumerate(steps):
        if start is None:
            start = s
        if i + 1 == len(steps) or steps[i + 1] != s + 1:
            out.append(f"{start}-{s}" if s != start else f"{s}")
            start = None
    return ", ".join(out)
