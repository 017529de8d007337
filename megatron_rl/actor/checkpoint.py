"""Megatron `dist_checkpointing` save/load, atomic and re-shardable.

A checkpoint is written into `<dir>/.tmp-<name>` by all ranks and renamed to `<dir>/<name>` by
rank 0 only once every rank has finished, so a crash mid-save never leaves a checkpoint that
looks complete. `<dir>/latest` names the newest one and is itself replaced atomically.
Tensors are stored by their global (unsharded) keys, so a checkpoint saved under one
TP/PP/EP/DP layout loads under another.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async

from megatron_rl.atomic import DELETING_PREFIX, delete_aside

LATEST = "latest"
INFO = "megatron_rl.json"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_sharded(
    state: dict[str, Any], root: str | os.PathLike, name: str, info: dict | None = None,
    latest: bool = True,
) -> Path:
    """Save a sharded state dict as `<root>/<name>` atomically; returns the final path.

    `info` (JSON) is stored beside the tensors and read back by `read_info`. `latest`: point
    `<root>/latest` at it (a training run's checkpoint root); a conversion writes a standalone
    directory and touches nothing beside it.
    """
    root = Path(root)
    final, tmp = root / name, root / f".tmp-{name}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _rank() == 0:
        (tmp / INFO).write_text(json.dumps(info or {}, indent=1, sort_keys=True))
        if final.exists():  # moved out whole first: a crash never leaves it half-deleted
            delete_aside(final)
        os.replace(tmp, final)
        if latest:
            latest_tmp = root / f".{LATEST}.tmp"
            latest_tmp.write_text(name + "\n")
            os.replace(latest_tmp, root / LATEST)
    _barrier()
    return final


def shield_writer_from_stop_signals() -> None:
    """Start Megatron's checkpoint-writer helper process now, as a helper of this process: it
    ignores SIGTERM, SIGINT and SIGUSR1 and dies with its parent.

    Megatron's first save starts a multiprocessing manager process (`_get_write_results_queue`).
    A signal sent to every process of a job (Slurm's preemption SIGTERM, `scontrol requeue`,
    `--signal` without `B:`) would kill that helper with the default action, and the save the
    trainer makes on that very signal would fail (BrokenPipeError); a helper that merely ignored
    the signals would outlive a `kill -9`'d trainer forever. So the manager is started here with
    `rewards.pool.become_helper` as its initializer (signals ignored, parent-death SIGKILL) under
    `stop_signals_blocked`, and its queue is the one Megatron uses. Main thread only (the
    parent-death signal follows the starting thread); idempotent.
    """
    from multiprocessing.managers import SyncManager

    from megatron_rl.rewards.pool import become_helper, stop_signals_blocked

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    with stop_signals_blocked():
        manager.start(become_helper, (os.getpid(),))
    filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager alive


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a root holding `latest`, -> the checkpoint directory."""
    path = Path(path)
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a Megatron dist checkpoint (no metadata.json) and no '{LATEST}' file"
        )
    return path


def read_info(path: str | os.PathLike) -> dict:
    """The `info` a checkpoint was saved with ({} for checkpoints written by others)."""
    file = resolve(path) / INFO
    return json.loads(file.read_text()) if file.is_file() else {}


def load_sharded(sharded_state: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Load tensors for `sharded_state` (this rank's shards) from a checkpoint dir or root."""
    return dist_checkpointing.load(sharded_state, str(resolve(path)))


def prune(root: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints under `root` (rank 0 only)."""
    root = Path(root)
    if _rank() != 0 or keep_last <= 0 or not root.is_dir():
        return
    done = sorted(
        (p for p in root.iterdir()
         if p.is_dir() and not p.name.startswith(".") and (p / "metadata.json").is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    for old in done[:-keep_last]:
        delete_aside(old)
    for leftover in root.glob(DELETING_PREFIX + "*"):  # of deletes a crash interrupted
        shutil.rmtree(leftover, ignore_errors=True)
