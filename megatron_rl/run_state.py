"""Whole-run checkpoints (resume exactly where a run stopped) and stop signals.

A run checkpoint is `<checkpoint.dir>/step_<N>/`, a Megatron dist checkpoint directory (so
`Actor.load`, `checkpoint.resolve` and the converters read it as is) with the trainer's state
beside the tensors:

    metadata.json, *.distcp, megatron_rl.json   the actor (`Actor.save`): weights, optimizer state
                                                (Adam moments and step counts), LR scheduler
    trainer_state.pt                            rank 0: step, prompt sampler position, counters
    rng_rank<r>.pt                              each rank: torch CPU, Python, NumPy, CUDA (on
                                                GPUs), Megatron's model-parallel RNG tracker

Atomic: all of it is written under `<dir>/.staging-step_<N>/step_<N>`; rank 0 moves it to
`<dir>/step_<N>` once every rank has finished (the rename is the commit), then replaces
`<dir>/latest`. A crash at any point leaves either the complete checkpoint or none. Resume takes
the newest complete one (the highest N), not whatever `latest` names.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_rl.actor import compat
from megatron_rl.convert import check_hf_matches

STATE_FILE = "trainer_state.pt"
LATEST = "latest"
FORMAT = 1
"""Version of the trainer state's layout; bumped when it changes incompatibly."""
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


# ---- RNG ---------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Every generator that draws in a step on this rank: the torch CPU generator (the embedded
    engine samples with it; under the CPU compat layer it also stands for the CUDA generator),
    Python's and NumPy's, the CUDA generators on GPUs, and Megatron's model-parallel tracker
    (dropout in TP regions, expert init)."""
    # Megatron-Core: only saving or restoring a step needs it, not the checkpoint-file helpers
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state(),
             "megatron": {k: v.clone() if isinstance(v, torch.Tensor) else v
                          for k, v in get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available() and not compat.is_active():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (the tracker first: under the compat layer its setter
    touches the CPU generator, which is restored last)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker  # as in rng_state

    get_cuda_rng_tracker().set_states(dict(state["megatron"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


# ---- save ----------------------------------------------------------------------------------------

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_run(root: str | os.PathLike, step: int, actor: Any, trainer_state: dict[str, Any],
             keep_last: int = 0) -> Path:
    """Write `<root>/step_<step>` atomically (collective: every rank saves its actor shards and
    RNG state; `trainer_state` matters on rank 0 only); then point `latest` at it and keep the
    newest `keep_last` checkpoints (0 = all). Returns the final path."""
    root = Path(root)
    name = step_dir_name(step)
    staging, final = root / f".staging-{name}", root / name
    rng = rng_state()  # before anything else runs
    if _rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    staged = Path(actor.save(staging, name, with_optimizer=True))
    torch.save(rng, staged / _rng_file(_rank()))
    _barrier()
    if _rank() == 0:
        torch.save({"format": FORMAT, **trainer_state}, staged / STATE_FILE)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one out first
            trash = root / f".trash-{name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staged, final)
        shutil.rmtree(staging, ignore_errors=True)
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(name + "\n")
        os.replace(tmp, root / LATEST)
        prune(root, keep_last)
    _barrier()
    return final


def complete_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete run checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file() and (p / "metadata.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune(root: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` run checkpoints (0 = keep all)."""
    if keep_last <= 0:
        return
    for _, path in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


# ---- load ----------------------------------------------------------------------------------------

def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete run checkpoint under `root`, decided on rank 0 and shared with every
    rank (a shared file system may show ranks different listings); None when there is none."""
    box = [None]
    if _rank() == 0:
        done = complete_checkpoints(root)
        box = [str(done[-1][1]) if done else None]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return Path(box[0]) if box[0] else None


def load_run(path: str | os.PathLike, actor: Any) -> dict[str, Any]:
    """Load the actor (weights, optimizer, scheduler) and this rank's RNG state from a run
    checkpoint; return the trainer state (on every rank). RNG is restored last: call this after
    everything that draws at construction (model init, engine init) has run."""
    path = Path(path)
    world = dist.get_world_size() if dist.is_initialized() else 1
    saved = len(list(path.glob(_rng_file("*"))))  # the same listing on every rank
    if saved != world:
        raise ValueError(
            f"{path}: saved by {saved} ranks, this run has {world}; a run resumes exactly only "
            "at the world size it was saved with. Start a new run from its weights with "
            f"checkpoint.load={path} (and checkpoint.resume=false)")
    rng_file = path / _rng_file(_rank())
    state = torch.load(path / STATE_FILE, weights_only=False)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path / STATE_FILE}: trainer state format {state.get('format')!r}, "
                         f"this version reads {FORMAT}")
    actor.load(path, with_optimizer=True)
    set_rng_state(torch.load(rng_file, weights_only=False))
    return state


def load_initial_weights(path: str | os.PathLike, actor: Any) -> str:
    """`checkpoint.load`: a Hugging Face model dir (has config.json) or a Megatron checkpoint
    (a dist checkpoint dir, a run checkpoint, or a directory holding `latest`); weights only.
    Returns what it was ("hf" or "megatron")."""
    from megatron_rl.actor import checkpoint  # Megatron-Core, as in rng_state

    p = Path(path)
    if (p / "config.json").is_file():
        actor.load_hf(p, check_hf_matches(actor.model_cfg, p), progress=False)
        return "hf"
    try:
        checkpoint.resolve(p)
    except FileNotFoundError:
        raise ValueError(f"checkpoint.load={str(path)!r} is neither a Hugging Face model "
                         "directory (no config.json) nor a Megatron checkpoint (no "
                         "metadata.json, no 'latest' file)") from None
    actor.load(p, with_optimizer=False)
    return "megatron"


# ---- stop signals --------------------------------------------------------------------------------

class StopSignals:
    """SIGTERM and SIGUSR1 (Slurm's warning before preemption) set a flag; the loop asks
    `requested()` at the end of each step. Under torchrun a signal may reach only some ranks,
    so `requested()` is a collective: any rank's flag stops every rank at the same step.

    Used as a context manager around the loop; the previous handlers come back on exit. Outside
    the main thread (where Python cannot install handlers) it only reads the flag."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signum

    def __enter__(self) -> StopSignals:
        self.received = None
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, device: torch.device | str = "cpu") -> bool:
        """Did any rank receive a stop signal? (collective; `device` where the backend
        reduces: the GPU under NCCL)"""
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
