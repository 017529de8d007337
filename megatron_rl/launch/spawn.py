"""Run a function on N local ranks (spawned processes, env:// rendezvous on a free port).

Used by multi-process tests and benchmarks. A rank that raises fails the whole run at once
(the others are killed) and a run that exceeds its deadline is killed too, so a bug in a
collective surfaces as an error with the failing rank's traceback, never as a hang.
"""

from __future__ import annotations

import os
import pickle
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from megatron_rl.actor.parallel import destroy_distributed, free_port


class RankFailure(RuntimeError):
    """A spawned rank raised, died or timed out."""


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple, q) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        # Plain pickle copies tensors; torch would share memory that dies with this process.
        q.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        q.put((rank, False, traceback.format_exc()))
    finally:
        try:
            destroy_distributed()
        except Exception:  # noqa: BLE001 - teardown after a failure may fail too
            pass


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300.0
) -> list[Any]:
    """Call `fn(*args)` on `world_size` ranks; return the per-rank results in rank order.

    `fn` must be importable by module path (spawned children re-import it).
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, args, q), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RankFailure(
                    f"ranks {sorted(set(range(world_size)) - set(results))} did not finish "
                    f"within {timeout_s:.0f} s"
                )
            try:
                rank, ok, value = q.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and r not in results]
                if dead:
                    raise RankFailure(f"rank {dead[0]} died with exit code "
                                      f"{procs[dead[0]].exitcode} before reporting") from None
                continue
            if not ok:
                raise RankFailure(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10 if len(results) == world_size else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]


class ServeProcess:
    """`megatron-rl serve ARGS` as a child process (tests, benchmarks, local engines): started
    at once; `url()` waits for the line it prints when it listens; `stop()` ends it (SIGTERM,
    then SIGKILL)."""

    def __init__(self, args: list[str], cwd: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None) -> None:
        import subprocess
        import sys
        import threading

        self.proc = subprocess.Popen([sys.executable, "-m", "megatron_rl", "serve", *args],
                                     cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self._lines.put(x) for x in self.proc.stdout],
                         daemon=True).start()
        self._url: str | None = None

    def url(self, timeout_s: float = 300.0) -> str:
        """The server's URL, once it listens (kills it and raises if it never says so)."""
        if self._url is None:
            try:
                line = self._lines.get(timeout=timeout_s)
            except queue.Empty:
                self.proc.kill()
                raise RuntimeError(f"megatron-rl serve did not print its URL in {timeout_s:.0f} "
                                   "s") from None
            if "ready at " not in line:
                self.proc.kill()
                raise RuntimeError(f"megatron-rl serve said {line.strip()!r}, not its URL")
            self._url = line.split("ready at ")[1].strip()
        return self._url

    @property
    def port(self) -> int:
        return int(self.url().rsplit(":", 1)[1])

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (a graceful shutdown), SIGKILL after `timeout_s`; the exit status."""
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()
