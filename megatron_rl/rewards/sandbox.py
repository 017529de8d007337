"""Run an untrusted Python program in a sandbox and collect its (capped) output.

What is enforced, and how (see `_launcher.py` for the privileged steps):

- separate process in its own session, started with an EMPTY environment (the caller's variables
  are not passed) and `python -I` (no PYTHON* variables, no user site, cwd not on sys.path);
- a fresh temporary directory as cwd, owned by the sandbox uid, removed afterwards;
- rlimits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), size of any written file
  (RLIMIT_FSIZE), processes (RLIMIT_NPROC), open files (RLIMIT_NOFILE), no core dumps;
- an unprivileged uid when we are root. Root ignores RLIMIT_NPROC (and file permissions), so
  as root the program runs under a fresh uid of its own (not in /etc/passwd, picked at random per
  run from `UID_RANGE`). That makes RLIMIT_NPROC count only this sandbox's processes, keeps the
  repository and other root-owned files read-only for it, and hides the caller's
  /proc/<pid>/environ. Not root: the program keeps our uid, and RLIMIT_NPROC is set to the uid's
  current process count plus the allowance (it then counts all of the uid's processes);
- no network: a new network namespace (only a downed loopback). If the kernel refuses
  namespaces, this is logged once and an audit hook that raises on socket creation, connect,
  bind and DNS lookups is installed instead (weaker: ctypes could bypass it);
- host writable dirs (/tmp, /var/tmp, /dev/shm, /run/lock) hidden behind the sandbox's temp
  dir in a new mount namespace (the program runs in it as /tmp), so writing "outside" lands
  inside it; other places are root-owned and read-only for the sandbox uid;
- a new pid namespace whose pid 1 is the program: when it exits or is killed, the kernel kills
  every process it left behind; the launcher dies with the worker (PR_SET_PDEATHSIG);
- a wall-clock timeout, after which the whole process group is killed (and, as root, any process
  left with the sandbox uid);
- stdout and stderr each read up to `max_output_bytes`; more kills the program.
"""

import contextlib
import dataclasses
import functools
import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("_launcher.py")
UID_RANGE = (1_000_000, 1_999_999)
"""Fresh uids for sandboxed programs when running as root (outside any /etc/passwd range)."""

_NO_NET_HOOK = """\
import sys, runpy
def _no_net(event, args):
    if event in ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
                 "socket.sendto", "socket.gethostbyname"):
        raise PermissionError("network access is disabled in the sandbox")
sys.addaudithook(_no_net)
"""
_NO_NET_BOOTSTRAP = _NO_NET_HOOK + """\
sys.argv = ["prog.py"]
runpy.run_path("prog.py", run_name="__main__")
"""

_scratch_root: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    timeout_s: float = 5.0
    """Wall-clock limit; the process group is killed after it."""
    cpu_s: int = 5
    """CPU-time limit (RLIMIT_CPU), seconds."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS), MiB."""
    file_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE), MiB."""
    nproc: int = 16
    """Processes (and threads) the program may have at once (RLIMIT_NPROC)."""
    max_output_bytes: int = 1 << 20
    """Cap on each of stdout and stderr; exceeding it kills the program."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run."""

    returncode: int
    """Exit status; 128 + signal number when killed (e.g. 137 after SIGKILL)."""
    stdout: bytes
    stderr: bytes
    timed_out: bool
    output_exceeded: bool
    wall_s: float

    @property
    def ok(self) -> bool:
        """Exited 0 within the limits."""
        return self.returncode == 0 and not self.timed_out and not self.output_exceeded


@dataclasses.dataclass(frozen=True)
class Isolation:
    """Which kernel isolation features work here (probed once)."""

    netns: bool
    mountns: bool
    pidns: bool
    setuid: bool


def set_scratch_root(path: str | None) -> None:
    """Create sandbox temp dirs under `path` (the worker pool removes it if it kills a worker)."""
    global _scratch_root
    _scratch_root = path


@functools.cache
def isolation() -> Isolation:
    """Probe, once per process, which namespaces the kernel lets us create; log what is missing."""
    def works(flag: int) -> bool:
        code = f"import ctypes,sys; sys.exit(ctypes.CDLL(None).unshare({flag}) != 0)"
        r = subprocess.run([sys.executable, "-I", "-S", "-c", code], env={},
                           capture_output=True, timeout=30)
        return r.returncode == 0

    iso = Isolation(netns=works(0x40000000), mountns=works(0x00020000),
                    pidns=works(0x20000000 | 0x00020000), setuid=os.geteuid() == 0)
    if not iso.netns:
        logger.warning("sandbox: network namespaces unavailable; blocking sockets with an audit "
                       "hook instead (weaker)")
    if not iso.mountns:
        logger.warning("sandbox: mount namespaces unavailable; the program can write to "
                       "world-writable dirs such as /tmp")
    if not iso.pidns:
        logger.warning("sandbox: pid namespaces unavailable; leftovers are killed by group/uid")
    if not iso.setuid:
        logger.warning("sandbox: not root; programs run as our own uid and RLIMIT_NPROC counts "
                       "all of its processes")
    return iso


def run_program(source: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `source` (Python) with `stdin` under `limits` and return its exit status and output."""
    limits = limits or SandboxLimits()
    iso = isolation()
    workdir = Path(tempfile.mkdtemp(prefix="mrl-sandbox-", dir=_scratch_root))
    uid = secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) + UID_RANGE[0] if iso.setuid else None
    try:
        _prepare(workdir, source, stdin, uid)
        cfg = _launcher_config(workdir, limits, iso, uid)
        with open(workdir / "stdin.txt", "rb") as stdin_f:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(cfg)],
                cwd=workdir, env={}, stdin=stdin_f, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        try:
            return _collect(proc, limits)
        finally:
            _kill_all(proc, uid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def open_program(source: str, bootstrap: str,
                 limits: SandboxLimits | None = None) -> Iterator[subprocess.Popen]:
    """Start a sandboxed process that talks to the caller over pipes; kill it on exit.

    The same sandbox as `run_program` (prog.py holds `source`, same limits and isolation), but
    the interpreter runs `bootstrap` (Python code, `python -I -c`; it loads prog.py itself)
    instead of prog.py, with stdin, stdout and stderr as pipes (`proc.stdin`, `proc.stdout`,
    `proc.stderr`; nobody drains stderr, so the bootstrap should point fd 2 elsewhere). No wall
    clock is enforced here: the caller bounds the time it spends talking to the process (the
    CPU, memory, file and process limits apply as usual). On exit from the `with` block the whole
    process tree is killed (as `run_program` does) and the sandbox dir removed.
    """
    limits = limits or SandboxLimits()
    iso = isolation()
    workdir = Path(tempfile.mkdtemp(prefix="mrl-sandbox-", dir=_scratch_root))
    uid = secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) + UID_RANGE[0] if iso.setuid else None
    try:
        _prepare(workdir, source, "", uid)
        cfg = _launcher_config(workdir, limits, iso, uid, bootstrap=bootstrap)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(cfg)],
            cwd=workdir, env={}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        try:
            yield proc
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
            _kill_all(proc, uid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _prepare(workdir: Path, source: str, stdin: str, uid: int | None) -> None:
    (workdir / "prog.py").write_text(source)
    (workdir / "stdin.txt").write_text(stdin)
    (workdir / "hold").mkdir(mode=0o700)  # launcher's mount holding area, root only
    if uid is not None:
        for p in (workdir, workdir / "prog.py"):
            os.chown(p, uid, uid)


def _launcher_config(workdir: Path, limits: SandboxLimits, iso: Isolation,
                     uid: int | None, bootstrap: str | None = None) -> dict:
    nproc = limits.nproc if uid is not None else _own_process_count() + limits.nproc
    python = program_interpreter()
    if bootstrap is not None:
        argv = [python, "-I", "-c", bootstrap if iso.netns else _NO_NET_HOOK + bootstrap]
    else:
        argv = [python, "-I", "prog.py"] if iso.netns else [python, "-I", "-c", _NO_NET_BOOTSTRAP]
    mib = 1 << 20
    return {
        "caller_pid": os.getpid(), "uid": uid, "argv": argv, "scratch": str(workdir),
        "hold": str(workdir / "hold"), "expose": _hidden_ancestors() if uid is not None else [],
        "netns": iso.netns, "mountns": iso.mountns, "pidns": iso.pidns and iso.mountns,
        "limits": {"cpu_s": limits.cpu_s, "memory_bytes": limits.memory_mb * mib,
                   "file_bytes": limits.file_mb * mib, "nproc": nproc, "nofile": 64, "core": 0},
    }


HIDDEN_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
"""Host directories the mount namespace replaces with the sandbox's own (see `_launcher.py`)."""


@functools.cache
def program_interpreter() -> str:
    """The base interpreter the program runs with, by its real path.

    Not the virtualenv's `python`: a venv may live under a directory the sandbox hides (a clone
    under /tmp), and the program needs only the standard library. The real binary's prefix is
    the base installation, which the launcher makes reachable for the sandbox uid.
    """
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    if any(python == d or python.startswith(d + "/") for d in HIDDEN_DIRS):
        raise RuntimeError(f"sandbox: the Python interpreter {python} lives under a directory "
                           f"the sandbox hides ({', '.join(HIDDEN_DIRS)}); install Python "
                           "elsewhere to run the code reward")
    return python


@functools.cache
def _hidden_ancestors() -> list[tuple[str, str]]:
    """(dir, child) pairs on the interpreter's paths where `dir` is not world-traversable."""
    pairs: set[tuple[str, str]] = set()
    base = os.path.realpath(sys.base_prefix)
    for p in {program_interpreter(), base}:
        parts = Path(p).parts
        for i in range(1, len(parts) - 1):
            d = Path(*parts[: i + 1])
            if not os.stat(d).st_mode & 0o001:
                pairs.add((str(d), parts[i + 1]))
                break
    return sorted(pairs)


def _collect(proc: subprocess.Popen, limits: SandboxLimits) -> SandboxResult:
    """Read stdout/stderr until EOF, the deadline or the output cap; then reap."""
    start = time.monotonic()
    deadline = start + limits.timeout_s
    out = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    timed_out = exceeded = False
    with selectors.DefaultSelector() as sel:
        for f in out:
            os.set_blocking(f.fileno(), False)
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fileobj.fileno(), 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = out[key.fileobj]
                buf += chunk[: limits.max_output_bytes + 1 - len(buf)]
                if len(buf) > limits.max_output_bytes:
                    exceeded = True
            if exceeded:
                break
    if timed_out or exceeded:
        _killpg(proc)
    try:
        code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
        _killpg(proc)
        code = proc.wait()
    code = 128 - code if code < 0 else code  # Popen reports signals as negative numbers
    return SandboxResult(code, bytes(out[proc.stdout][: limits.max_output_bytes]),
                         bytes(out[proc.stderr][: limits.max_output_bytes]), timed_out,
                         exceeded, time.monotonic() - start)


def _killpg(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the session's process group, then (as root) anything still running as `uid`."""
    _killpg(proc)
    proc.wait()
    for f in (proc.stdout, proc.stderr):
        f.close()
    if uid is None:
        return
    for _ in range(100):  # a fork bomb outside a pid namespace may race us; bounded by NPROC
        pids = processes_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    logger.error("sandbox: processes of uid %d survived cleanup", uid)


def processes_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) pids owned by `uid`, from /proc."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            with open(f"/proc/{entry.name}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return pids


def _own_process_count() -> int:
    return len(processes_of_uid(os.getuid()))
