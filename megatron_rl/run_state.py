"""Whole-run checkpoints (resume exactly where a run stopped) and stop signals.

A run checkpoint is `<checkpoint.dir>/step_<N>/`, a Megatron dist checkpoint directory (so
`Actor.load`, `checkpoint.resolve` and the converters read it as is) with the trainer's state
beside the tensors:

    metadata.json, *.distcp, megatron_rl.json   the actor (`Actor.save`): weights, optimizer state
                                                (Adam moments and step counts), LR scheduler
    trainer_state.pt                            rank 0: step, prompt sampler position, counters
    rng_rank<r>.pt                              each rank: torch CPU, Python, NumPy, CUDA (on
                                                GPUs), Megatron's model-parallel RNG tracker

    manifest.json                               written last: every other file's size and CRC32

Atomic: all of it is written under `<dir>/.staging-step_<N>/step_<N>`; rank 0 moves it to
`<dir>/step_<N>` once every rank has finished (the rename is the commit), then replaces
`<dir>/latest`. A crash at any point leaves either the complete checkpoint or none.

Verified, not assumed: resume takes the newest checkpoint (the highest N, not whatever `latest`
names) whose files match its manifest, and falls back past one that does not verify or that
Megatron's loader fails on, printing one line per skipped checkpoint (`checkpoint step_6 skipped:
__0_0.distcp is 1234 bytes, manifest says 5678`). Checkpoints saved before manifests existed are
judged as before: complete when `trainer_state.pt` and `metadata.json` exist. The checksums are
spread over the ranks (each reads 1/world of the files) and cost a read of the checkpoint.
Pruning renames a checkpoint to `.deleting-step_<N>` before deleting it, so a crash mid-delete
never leaves a partial `step_<N>`; such leftovers (and stale staging dirs) go at the next save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_rl.actor import compat
from megatron_rl.atomic import DELETING_PREFIX, delete_aside
from megatron_rl.convert import check_hf_matches

STATE_FILE = "trainer_state.pt"
LATEST = "latest"
MANIFEST = "manifest.json"
_LOAD_ERRORS: tuple[type[BaseException], ...] = (Exception,)
try:  # torch's distributed-checkpoint reader wraps a rank's failure in a BaseException
    from torch.distributed.checkpoint.api import CheckpointException

    _LOAD_ERRORS += (CheckpointException,)
except ImportError:  # pragma: no cover - older torch
    pass
_LEFTOVERS = (".staging-", DELETING_PREFIX, ".trash-")  # .trash-: older versions' name
"""Prefixes of directories a save or prune interrupted by a crash leaves behind."""
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

class CheckpointDamaged(ValueError):
    """A run checkpoint's files are missing, damaged or unreadable (resume skips it)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _from_rank0(obj: Any) -> Any:
    box = [obj]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def _crc32(file: Path) -> int:
    crc = 0
    with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def _one_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, at most `limit` characters; for torch's
    CheckpointException, the first failing rank's error."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = min(failures.items())
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, BaseException):
            return f"rank {rank}: {_one_line(inner, limit)}"
    text = (str(e).strip().splitlines() or [""])[0]
    if not text and isinstance(e, EOFError):
        text = "a file ends early (truncated?)"
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _write_manifest(path: Path) -> None:
    """Collective: every file under `path` with its size and CRC32 (each rank checksums a share
    of the files), written by rank 0 as `manifest.json`, the checkpoint's last file."""
    names = _from_rank0(sorted(str(f.relative_to(path)) for f in path.rglob("*")
                               if f.is_file() and f.name != MANIFEST) if _rank() == 0 else None)
    mine = {n: [(path / n).stat().st_size, _crc32(path / n)] for n in names[_rank()::_world()]}
    files: dict[str, Any] = {}
    for part in _gather(mine):
        files.update(part)
    if _rank() == 0:
        tmp = path / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps({"files": {n: {"size": files[n][0], "crc32": files[n][1]}
                                             for n in names}}, indent=0))
        os.replace(tmp, path / MANIFEST)


def _check_file(path: Path, name: str, size: int, crc: int) -> str | None:
    f = path / name
    if not f.is_file():
        return f"{name} is missing"
    got = f.stat().st_size
    if got != size:
        return f"{name} is {got} bytes, manifest says {size}"
    got_crc = _crc32(f)
    if got_crc != crc:
        return f"{name} has CRC32 {got_crc:08x}, manifest says {crc:08x}"
    return None


def verify(path: str | os.PathLike) -> str | None:
    """Collective: why the run checkpoint `path` is not whole (None when it verifies). With a
    manifest every listed file must exist with its size and CRC32 (each rank checks a share);
    without one (saved before manifests) it is whole when its trainer state and metadata exist."""
    path = Path(path)
    problem, entries = None, None
    if _rank() == 0:
        if (path / MANIFEST).is_file():
            try:
                files = json.loads((path / MANIFEST).read_text())["files"]
                entries = [(n, int(e["size"]), int(e["crc32"])) for n, e in files.items()]
            except Exception as e:  # noqa: BLE001 - any damage to the manifest
                problem = f"{MANIFEST} cannot be read ({_one_line(e)})"
        else:
            for name in (STATE_FILE, "metadata.json"):
                if problem is None and not (path / name).is_file():
                    problem = f"{name} is missing"
    problem, entries = _from_rank0((problem, entries) if _rank() == 0 else None)
    if problem or entries is None:
        return problem
    mine = {}
    for i in range(_rank(), len(entries), _world()):
        found = _check_file(path, *entries[i])
        if found:
            mine[i] = found
    problems: dict[int, str] = {}
    for part in _gather(mine):
        problems.update(part)
    return problems[min(problems)] if problems else None


def _optimizers(actor: Any) -> list[Any]:
    """The Megatron optimizers of `actor` (one per chained optimizer)."""
    opt = getattr(actor, "optimizer", None)
    return list(getattr(opt, "chained_optimizers", [opt] if opt is not None else []))


def _empty_optimizers(actor: Any) -> list[int]:
    """Indices of the optimizers that hold no state yet (no update has been applied)."""
    return [i for i, o in enumerate(_optimizers(actor))
            if hasattr(getattr(o, "optimizer", None), "state") and not o.optimizer.state]


def clean_leftovers(root: str | os.PathLike) -> None:
    """Delete what interrupted saves and prunes left in `root` (rank 0)."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(_LEFTOVERS):
                shutil.rmtree(p, ignore_errors=True)


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
        clean_leftovers(root)
        staging.mkdir(parents=True)
    _barrier()
    # Before the first optimizer update the optimizer holds no state, and Megatron's loader
    # would then look for state the checkpoint lacks: save Megatron's placeholder state (what
    # its loader builds, with a step of 1, as Megatron saves no step of 0 and torch's Adam
    # needs one) and drop it again after saving and after loading (`empty_optimizers`).
    empty = _empty_optimizers(actor)
    opts = _optimizers(actor)
    for i in empty:
        opts[i].init_state_fn(opts[i].optimizer, opts[i].config)
        for param_state in opts[i].optimizer.state.values():
            param_state.setdefault("step", torch.tensor(1.0))
    try:
        staged = Path(actor.save(staging, name, with_optimizer=True))
    finally:
        for i in empty:
            opts[i].optimizer.state.clear()
    torch.save(rng, staged / _rng_file(_rank()))
    _barrier()
    if _rank() == 0:
        torch.save({"format": FORMAT, "world_size": _world(), "empty_optimizers": empty,
                    **trainer_state}, staged / STATE_FILE)
    _barrier()
    _write_manifest(staged)  # last
    if _rank() == 0:
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one out first
            delete_aside(final)
        os.replace(staged, final)
        shutil.rmtree(staging, ignore_errors=True)
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(name + "\n")
        os.replace(tmp, root / LATEST)
        prune(root, keep_last)
    _barrier()
    return final


def checkpoint_dirs(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `step_<N>` directory under `root`, whole or not, oldest first.
    Saves are atomic (staged, then renamed), so one that is not whole was damaged later."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def complete_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete run checkpoints under `root`, oldest first."""
    return [(s, p) for s, p in checkpoint_dirs(root)
            if (p / STATE_FILE).is_file() and (p / "metadata.json").is_file()]


def prune(root: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` run checkpoints (0 = keep all). Each is renamed
    to `.deleting-step_<N>` first, so a crash mid-delete never leaves a partial `step_<N>`."""
    if keep_last <= 0:
        return
    for _, path in complete_checkpoints(root)[:-keep_last]:
        delete_aside(path)


# ---- load ----------------------------------------------------------------------------------------

def latest_checkpoint(root: str | os.PathLike, say: Any = print,
                      below: int | None = None) -> Path | None:
    """The newest run checkpoint under `root` that verifies (step below `below`, if given),
    decided on rank 0 and shared with every rank (a shared file system may show ranks different
    listings; collective). Each newer one that does not verify is named with why on one line
    (rank 0, through `say`). None when there is none; `CheckpointDamaged` when there are some
    and none verifies (starting afresh beside them would mix two runs' checkpoints)."""
    found = _from_rank0([(s, str(p)) for s, p in checkpoint_dirs(root)
                         if below is None or s < below] if _rank() == 0 else None)
    for _, p in reversed(found):
        problem = verify(p)
        if problem is None:
            return Path(p)
        if _rank() == 0:
            say(f"checkpoint {Path(p).name} skipped: {problem}")
    if found:
        raise CheckpointDamaged(f"checkpoint.resume: no checkpoint in {root} could be loaded "
                                "(each is named above with why); move them aside to start fresh")
    return None


def resume(root: str | os.PathLike, actor: Any, say: Any = print,
           start: Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest run checkpoint under `root` that verifies and loads (from `start`, an
    already verified one, if given); one that fails to load is skipped to the previous one with
    one line. Returns (path, trainer state), or None when `root` holds no checkpoint at all;
    raises `CheckpointDamaged` when it holds some but none verifies and loads. Collective."""
    path = start if start is not None else latest_checkpoint(root, say)
    while path is not None:
        try:
            return path, load_run(path, actor)
        except CheckpointDamaged as e:  # raised on every rank
            if _rank() == 0:
                say(f"checkpoint {path.name} skipped: {e}")
        below = int(_STEP_DIR.match(path.name).group(1))
        path = latest_checkpoint(root, say, below=below)
        if path is None:
            raise CheckpointDamaged(
                f"checkpoint.resume: no checkpoint in {root} could be loaded (each is named "
                "above with why); move them aside to start fresh")
    return None


def _agree(problem: str | None) -> None:
    """Collective: raise `CheckpointDamaged` on every rank when any rank found a problem (so no
    rank goes on into a collective load the others have left)."""
    problems = [p for p in _gather(problem) if p]
    if problems:
        raise CheckpointDamaged(problems[0])


def load_run(path: str | os.PathLike, actor: Any) -> dict[str, Any]:
    """Load the actor (weights, optimizer, scheduler) and this rank's RNG state from a run
    checkpoint; return the trainer state (on every rank). RNG is restored last: call this after
    everything that draws at construction (model init, engine init) has run. A missing or
    unreadable file, or any failure of Megatron's loader, raises `CheckpointDamaged` naming it
    on every rank (collective)."""
    path = Path(path)
    world = _world()
    state, problem = None, None
    try:
        state = torch.load(path / STATE_FILE, weights_only=False)
    except FileNotFoundError:
        problem = f"{STATE_FILE} is missing"
    except Exception as e:  # noqa: BLE001 - truncated, garbage: the file is damaged
        problem = f"{STATE_FILE} cannot be read ({_one_line(e)})"
    _agree(problem)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path / STATE_FILE}: trainer state format {got!r}, "
                         f"this version reads {FORMAT}")
    saved = state.get("world_size")
    if saved is None:  # saved before the world size was recorded: count the RNG files
        ranks = [int(m.group(1)) for f in path.glob(_rng_file("*"))
                 if (m := re.match(r"rng_rank(\d+)\.pt$", f.name))]
        saved = max(ranks) + 1 if ranks else None
    if saved is not None and saved != world:
        raise ValueError(
            f"{path}: saved by {saved} ranks, this run has {world}; a run resumes exactly only "
            "at the world size it was saved with. Start a new run from its weights with "
            f"checkpoint.load={path} (and checkpoint.resume=false)")
    rng_file, rng = path / _rng_file(_rank()), None
    try:
        rng = torch.load(rng_file, weights_only=False)
    except FileNotFoundError:
        problem = f"{rng_file.name} is missing"
    except Exception as e:  # noqa: BLE001 - damaged
        problem = f"{rng_file.name} cannot be read ({_one_line(e)})"
    _agree(problem)
    try:
        actor.load(path, with_optimizer=True)
    except _LOAD_ERRORS as e:  # whatever Megatron's loader raises
        problem = f"failed to load ({_one_line(e)})"
    _agree(problem)
    opts = _optimizers(actor)
    for i in state.get("empty_optimizers", ()):  # saved before the first update: stay empty
        opts[i].optimizer.state.clear()
    set_rng_state(rng)
    return state


def load_initial_weights(path: str | os.PathLike, actor: Any) -> str:
    """`checkpoint.load`: a Hugging Face model dir (has config.json) or a Megatron checkpoint
    (a dist checkpoint dir, a run checkpoint, or a directory holding `latest`); weights only.
    Returns what it was ("hf" or "megatron"). A checkpoint that does not verify or load raises
    one line naming the path and what is wrong."""
    from megatron_rl.actor import checkpoint  # Megatron-Core, as in rng_state

    p = Path(path)
    if (p / "config.json").is_file():
        actor.load_hf(p, check_hf_matches(actor.model_cfg, p), progress=False)
        return "hf"
    try:
        resolved = checkpoint.resolve(p)
    except FileNotFoundError:
        raise ValueError(f"checkpoint.load={str(path)!r} is neither a Hugging Face model "
                         "directory (no config.json) nor a Megatron checkpoint (no "
                         "metadata.json, no 'latest' file)") from None
    if _from_rank0((resolved / MANIFEST).is_file() if _rank() == 0 else None):  # verify it
        problem = verify(resolved)
        if problem:
            raise ValueError(f"checkpoint.load={str(path)!r}: {resolved} is damaged: {problem}")
    try:
        actor.load(p, with_optimizer=False)
    except _LOAD_ERRORS as e:  # whatever Megatron's loader raises
        raise ValueError(f"checkpoint.load={str(path)!r}: cannot load the weights of {resolved}: "
                         f"{_model_differences(resolved, actor) or _one_line(e)}") from None
    return "megatron"


def _model_differences(path: Path, actor: Any) -> str:
    """The model fields a checkpoint was saved with that differ from this run's ('' if none
    or unknown)."""
    import dataclasses

    try:
        saved = json.loads((path / "megatron_rl.json").read_text()).get("model") or {}
        here = json.loads(json.dumps(dataclasses.asdict(actor.model_cfg)))
    except Exception:  # noqa: BLE001 - no info saved: nothing to compare
        return ""
    diff = [f"{k}={saved[k]!r} saved, {here[k]!r} here" for k in sorted(saved)
            if k in here and saved[k] != here[k]]
    return ("the model differs: " + "; ".join(diff)) if diff else ""


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
