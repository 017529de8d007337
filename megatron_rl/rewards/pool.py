"""Run the configured reward functions over a batch, in worker processes with a time limit.

Each (sample, function) call is one task. A call that raises, or runs past its time budget
(`RewardsConfig.timeout_s`, or the function's own `max_wall_s` for that label when larger: a
code label with many cases), scores 0 for that function on that sample, is logged and counted
in `RewardBatch.failures`; a hung worker is killed (with its sandboxes, which die with it) and
replaced. Nothing a call does can fail the batch, except a function that raised on every sample
(`RewardFunctionError`: it is broken). num_workers=0 runs in the calling process: exceptions
are caught, but a hanging function cannot be interrupted there (use it for debugging).

Workers are helpers of the trainer (`become_helper`): they ignore the stop signals (SIGTERM,
SIGINT, SIGUSR1: a signal sent to the whole job is the trainer's to handle, which saves and exits
0) and die with the trainer (parent-death signal), so a `kill -9`'d trainer leaves none behind. A
worker found dead (killed from outside, or by its own function) is replaced before its next call.
"""

import contextlib
import ctypes
import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Iterator
from multiprocessing import resource_tracker
from multiprocessing import util as mp_util
from multiprocessing.connection import Connection, wait
from typing import Any

from megatron_rl.rewards import sandbox
from megatron_rl.rewards.config import RewardFunctionConfig, RewardsConfig
from megatron_rl.rewards.registry import BoundReward, bind, wall_budget

logger = logging.getLogger(__name__)


class RewardFunctionError(RuntimeError):
    """A reward function raised on every sample of a batch: it is broken, not unlucky."""


BROKEN_MIN_SAMPLES = 3
"""A function that raised on every sample of a batch this large is broken (a smaller batch may
be one prompt the function cannot handle)."""


@dataclasses.dataclass(frozen=True)
class RewardInput:
    """One sample to score."""

    prompt: str
    response: str
    label: Any
    metadata: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RewardBatch:
    """Scores of a batch: one column per function (for GDPO) and their weighted sum."""

    scores: dict[str, list[float]]
    """Function column name -> score per sample (0 where the call failed)."""
    total: list[float]
    """Per sample: sum of weight * score over the functions."""
    extras: dict[str, list[float]]
    """Extra metrics from functions returning dicts ("<column>/<key>"; NaN where absent)."""
    failures: int
    """Calls that raised or timed out."""
    errors: list[str]
    """One line per failure: sample index, function, what went wrong."""


def column_names(functions: list[RewardFunctionConfig]) -> list[str]:
    """Function names, suffixed `_2`, `_3`... when a name repeats."""
    seen: dict[str, int] = {}
    names = []
    for f in functions:
        seen[f.name] = seen.get(f.name, 0) + 1
        names.append(f.name if seen[f.name] == 1 else f"{f.name}_{seen[f.name]}")
    return names


def _split(value: Any) -> tuple[float, dict[str, float]]:
    """(score, extras) of a function's result; a dict needs a "score" key."""
    if isinstance(value, dict):
        if "score" not in value:
            raise ValueError(f"a reward returning a dict must include 'score'; got {list(value)}")
        return float(value["score"]), {k: float(v) for k, v in value.items() if k != "score"}
    return float(value), {}


class Raised(str):
    """The failure of a call whose function raised (its message), as opposed to one that timed
    out or whose worker died: only these say the function itself is broken."""


def _call(fn: BoundReward, s: RewardInput) -> tuple[bool, Any]:
    try:
        return True, _split(fn(s.prompt, s.response, s.label, s.metadata))
    except Exception as e:  # a user's reward may raise anything: report, never crash the step
        tb = traceback.format_exc(limit=-1).strip().splitlines()[-1]
        return False, Raised(f"{type(e).__name__}: {e} [{tb}]")


HELPER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""Stop signals: the trainer's to handle (it saves and exits 0); its helpers ignore them."""
PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread while helper processes start (`spawn` children
    inherit the mask across exec): a helper cannot die of a job-wide signal before
    `become_helper` ignores it, and none is lost for the trainer (a blocked signal waits, or
    goes to another thread). multiprocessing's resource tracker, started here if not yet, keeps
    SIGUSR1 blocked for good (it ignores SIGINT/SIGTERM itself; it exits when the trainer and
    every helper are gone)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HELPER_IGNORED_SIGNALS)
    try:
        resource_tracker.ensure_running()  # unblocks SIGINT/SIGTERM on its way out: block again
        signal.pthread_sigmask(signal.SIG_BLOCK, HELPER_IGNORED_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def become_helper(parent_pid: int) -> None:
    """First thing in a helper process started under `stop_signals_blocked` (main thread): ignore
    the stop signals, ask the kernel to SIGKILL this process when its parent dies (Linux; the
    "parent" is the thread that started it, so start helpers from a long-lived thread), and exit
    if the parent already died before that took effect."""
    for sig in HELPER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELPER_IGNORED_SIGNALS)
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(0)  # orphaned before the death signal was armed


def _worker_main(conn: Connection, config: RewardsConfig, scratch: str, parent_pid: int) -> None:
    become_helper(parent_pid)
    sandbox.set_scratch_root(scratch)
    fns = [bind(spec, config) for spec in config.functions]
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        task_id, fn_index, sample = msg
        conn.send((task_id, *_call(fns[fn_index], sample)))


WORKER_START_GRACE_S = 60.0
"""Extra time for a worker's first call (spawn, imports such as reasoning-gym's generators), so
a slow start on a loaded machine is not scored as a timed-out sample."""


@dataclasses.dataclass
class _Worker:
    process: mp.Process
    conn: Connection
    scratch: str
    task: tuple[int, int] | None = None
    deadline: float = 0.0
    budget: float = 0.0
    fresh: bool = True
    """No call finished yet: the first call also pays for the process start and lazy imports."""


class RewardComputer:
    """Scores batches with `config.functions`; keep one per run (workers start lazily)."""

    def __init__(self, config: RewardsConfig) -> None:
        config.validate()
        self.config = config
        self.names = column_names(config.functions)
        self.weights = [f.weight for f in config.functions]
        self._fns = [bind(spec, config) for spec in config.functions]  # errors surface here
        self._ctx = mp.get_context("spawn")  # the trainer holds threads: never fork it
        self._workers: list[_Worker] = []
        self.failures_total = 0
        # At interpreter exit multiprocessing SIGTERMs daemonic children and joins them: workers
        # ignore SIGTERM, so they are killed first (exitpriority >= 0 runs before that).
        mp_util.Finalize(self, _kill_all, args=(self._workers,), exitpriority=10)

    def __enter__(self) -> "RewardComputer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, samples: list[RewardInput]) -> RewardBatch:
        """Scores of every function on every sample, and the weighted totals."""
        tasks = [(i, j) for i in range(len(samples)) for j in range(len(self._fns))]
        results: dict[tuple[int, int], tuple[bool, Any]] = {}
        if self.config.num_workers == 0:
            for i, j in tasks:
                results[i, j] = _call(self._fns[j], samples[i])
        else:
            self._run_pool(tasks, samples, results)
        return self._assemble(samples, results)

    def _assemble(self, samples: list[RewardInput],
                  results: dict[tuple[int, int], tuple[bool, Any]]) -> RewardBatch:
        n = len(samples)
        scores = {name: [0.0] * n for name in self.names}
        extras: dict[str, list[float]] = {}
        errors = []
        failed: dict[str, list[tuple[int, str]]] = {name: [] for name in self.names}
        for (i, j), (ok, value) in sorted(results.items()):
            name = self.names[j]
            if not ok:
                errors.append(f"sample {i}: reward {name!r} failed: {value}")
                failed[name].append((i, value))
                continue
            scores[name][i] = value[0]
            for k, v in value[1].items():
                extras.setdefault(f"{name}/{k}", [float("nan")] * n)[i] = v
        self._report(failed, n)
        self.failures_total += len(errors)
        total = [sum(w * scores[name][i] for name, w in zip(self.names, self.weights,
                                                                 strict=True))
                 for i in range(n)]
        return RewardBatch(scores, total, extras, len(errors), errors)

    def _report(self, failed: dict[str, list[tuple[int, str]]], n: int) -> None:
        """One warning per function and batch (how many samples failed, the first reason); a
        function that raised on every sample of a batch of `BROKEN_MIN_SAMPLES` or more is
        broken, not unlucky: `RewardFunctionError` names it (timeouts and dead workers never
        count as broken)."""
        for name, mine in failed.items():
            if not mine:
                continue
            raised = [why for _, why in mine if isinstance(why, Raised)]
            if n >= BROKEN_MIN_SAMPLES and len(raised) == n:
                raise RewardFunctionError(
                    f"reward {name!r} raised on all {n} samples of the batch, e.g. {raised[0]}; "
                    "fix the function (one that fails on some samples scores 0 there)")
            i, why = mine[0]
            logger.warning("reward %r failed on %d of %d samples (scored 0), e.g. sample %d: %s",
                           name, len(mine), n, i, why)

    def _run_pool(self, tasks: list[tuple[int, int]], samples: list[RewardInput],
                  results: dict[tuple[int, int], tuple[bool, Any]]) -> None:
        while len(self._workers) < self.config.num_workers:
            self._workers.append(self._start_worker())
        todo = deque(tasks)
        retried: set[tuple[int, int]] = set()
        while todo or any(w.task for w in self._workers):
            for k, w in enumerate(self._workers):
                if w.task is None and todo:
                    if not w.process.is_alive():  # killed between calls: replace, do not fail
                        logger.warning("reward worker %d died (exit code %s): replaced",
                                       w.process.pid, w.process.exitcode)
                        self._replace(w)
                        w = self._workers[k]
                    w.task = todo.popleft()
                    grace = WORKER_START_GRACE_S if w.fresh else 0.0
                    w.budget = self._budget(*w.task, samples)
                    w.deadline = time.monotonic() + w.budget + grace
                    try:
                        w.conn.send((0, w.task[1], samples[w.task[0]]))
                    except OSError:  # died just now: its sentinel reports it below
                        pass
            busy = [w for w in self._workers if w.task]
            timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy],
                             timeout))
            for w in busy:
                if w.conn in ready or w.process.sentinel in ready:
                    try:
                        _, ok, value = w.conn.recv()
                        results[w.task] = (ok, value)
                        w.task, w.fresh = None, False
                        continue
                    except (EOFError, OSError):  # died on this call: once more on a new one
                        if w.task in retried:
                            results[w.task] = (False, "reward worker died")
                        else:
                            retried.add(w.task)
                            todo.appendleft(w.task)
                elif time.monotonic() < w.deadline:
                    continue
                else:
                    results[w.task] = (False, f"timed out after {w.budget:g} s")
                self._replace(w)

    def _budget(self, i: int, j: int, samples: list[RewardInput]) -> float:
        """Seconds a call may take: `timeout_s`, or the function's own bound for the label."""
        own = wall_budget(self._fns[j], samples[i].label)
        return max(self.config.timeout_s, own or 0.0)

    def _start_worker(self) -> _Worker:
        scratch = tempfile.mkdtemp(prefix="mrl-reward-worker-")
        parent, child = self._ctx.Pipe()
        p = self._ctx.Process(target=_worker_main,
                              args=(child, self.config, scratch, os.getpid()),
                              daemon=True, name="reward-worker")
        with stop_signals_blocked():
            p.start()
        child.close()
        return _Worker(p, parent, scratch)

    def _stop(self, w: _Worker, kill: bool) -> None:
        if kill:
            w.process.kill()
        else:
            try:
                w.conn.send(None)
            except OSError:
                pass
        w.process.join(timeout=None if kill else 5)
        if w.process.is_alive():
            w.process.kill()
            w.process.join()
        w.conn.close()
        sandbox.remove_tree(w.scratch)  # sandboxes of a killed worker; never raises

    def _replace(self, w: _Worker) -> None:
        self._stop(w, kill=True)
        self._workers[self._workers.index(w)] = self._start_worker()

    def close(self) -> None:
        """Stop the workers."""
        for w in self._workers:
            self._stop(w, kill=False)
        self._workers.clear()


def _kill_all(workers: list[_Worker]) -> None:
    for w in workers:
        w.process.kill()
        w.process.join()
        sandbox.remove_tree(w.scratch)
    workers.clear()
