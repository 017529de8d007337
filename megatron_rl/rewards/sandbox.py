"""Run an untrusted Python program in a sandbox and collect its (capped) output.

The program is an adversary (docs/design.md, "Code sandbox"). What it gets:

- a root filesystem of its own (`_launcher.py` builds it): the system's binaries and libraries
  and the interpreter's installation, read-only and nosuid, without any site-packages; a
  minimal /dev; a /proc showing only its own processes; and /tmp (its cwd, holding prog.py), a
  tmpfs with a total quota of `scratch_mb` and `SCRATCH_INODES` files, the only writable place.
  The project, the virtualenv, home directories and /etc do not exist there. The tmpfs lives in
  the sandbox's mount namespace, so nothing it writes ever reaches the host's disk;
- new pid, network (no interface up), IPC (SysV objects, POSIX message queues) and UTS
  namespaces: it cannot see, signal or ptrace any host process, reach any socket, or leave an
  IPC object behind; the program is pid 1 of its namespace, so when it dies the kernel kills
  whatever it started;
- no privileges: as root, a fresh uid per run (from `UID_RANGE`, in no /etc/passwd); without
  root, an unprivileged user namespace in which it is "nobody". PR_SET_NO_NEW_PRIVS, and every
  mount is nosuid: a setuid binary cannot raise it;
- rlimits: CPU seconds, address space per process (`memory_mb`), size of any one file
  (`file_mb`), processes, open files, no core dumps; and a memory cgroup bounding the whole
  process tree to `memory_mb` (cgroup v2 with the memory controller delegated to us, or v1 as
  root). Without a usable cgroup, the documented fallback: the program gets ONE process (no
  threads or children, RLIMIT_NPROC), so its address-space limit bounds the total;
- a wall-clock timeout and output caps; afterwards its pid 1, process group, uid and cgroup
  are killed, and its host directory (the caller's two input files) removed by `remove_tree`,
  which cannot raise.

Where neither root nor user namespaces are available, `run_program` refuses
(`SandboxUnavailable`) unless the caller passes `allow_unsandboxed=True`
(`rewards.code.allow_unsandboxed`): then only the rlimits, a fresh cwd, an empty environment
and an audit hook against sockets remain.
"""

import contextlib
import dataclasses
import functools
import glob
import json
import logging
import os
import secrets
import select
import selectors
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("_launcher.py")
UID_RANGE = (1_000_000, 1_999_999)
"""Fresh uids for sandboxed programs when running as root (outside any /etc/passwd range)."""
SYSTEM_PATHS = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32", "/usr/bin", "/usr/sbin",
                "/usr/lib64", "/usr/lib32", "/usr/share/zoneinfo", "/etc/ld.so.cache")
"""Host paths bound read-only into the sandbox (where they exist): binaries and the dynamic
linker's paths. Of /usr/lib only the architecture's library dir (`/usr/lib/x86_64-linux-gnu`)
is bound, where the system has one; plus the interpreter's own installation."""
SCRATCH_INODES = 4096
"""Files and directories the program may create in its /tmp (bounds deep or wide trees)."""
UNREACHABLE_DIRS = ("/tmp", "/var/tmp", "/dev", "/proc")
"""The sandbox's own /tmp, /dev and /proc cover these: the interpreter cannot live there."""

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


class SandboxUnavailable(RuntimeError):
    """No isolation works on this host and the caller did not allow running unsandboxed."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    timeout_s: float = 5.0
    """Wall-clock limit; the process group is killed after it."""
    cpu_s: int = 5
    """CPU-time limit (RLIMIT_CPU), seconds."""
    memory_mb: int = 1024
    """Memory of the whole process tree (memory cgroup) and address space of each process
    (RLIMIT_AS), MiB."""
    file_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE), MiB."""
    scratch_mb: int = 64
    """Total size of everything the program may write (its /tmp tmpfs), MiB."""
    nproc: int = 16
    """Processes (and threads) the program may have at once (RLIMIT_NPROC; 1 without a memory
    cgroup, see the module docstring)."""
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
    """How programs are isolated on this host (probed once per process by `isolation`)."""

    mode: Literal["root", "userns", "none"]
    """root: namespaces + a fresh uid; userns: an unprivileged user namespace; none: rlimits
    only (refused unless allowed)."""
    memory_cgroup: str | None
    """Directory under which each run gets its own memory cgroup; None: one process only."""
    detail: str = ""
    """Why the mode or the cgroup is missing (for the refusal message and the log)."""

    @property
    def isolated(self) -> bool:
        """Namespaces, own root filesystem and no privileges are in force."""
        return self.mode != "none"


def set_scratch_root(path: str | None) -> None:
    """Create sandbox host dirs under `path` (the worker pool removes it if it kills a worker)."""
    global _scratch_root
    _scratch_root = path


@functools.cache
def isolation() -> Isolation:
    """Probe, once per process, which isolation works here (by running a program through it)
    and whether a memory cgroup can be made; log what is missing, once."""
    cgroup, why_no_cgroup = _memory_cgroup_parent()
    failures = []
    for mode in (("root", "userns") if os.geteuid() == 0 else ("userns",)):
        candidate = Isolation(mode, cgroup, why_no_cgroup)
        try:
            r = _run("import os\nprint(os.getpid(), os.getuid())\n", "", SandboxLimits(),
                     candidate, allow_unsandboxed=False)
        except OSError as e:
            failures.append(f"{mode}: {e}")
            continue
        pid, _, uid = r.stdout.decode(errors="replace").strip().partition(" ")
        if r.ok and pid == "1" and uid and uid != "0":
            break
        failures.append(f"{mode}: exit {r.returncode}: "
                        f"{r.stderr.decode(errors='replace').strip()[-300:]}")
    else:
        detail = "; ".join(failures) + (" (not root; unprivileged user namespaces refused: "
                                        "see user.max_user_namespaces, "
                                        "kernel.unprivileged_userns_clone, AppArmor's "
                                        "restrict_unprivileged_userns)")
        logger.warning("sandbox: no isolation works on this host: %s", detail)
        return Isolation("none", cgroup, detail)
    if cgroup is None:
        logger.warning("sandbox: no memory cgroup (%s); each program gets one process (no "
                       "threads or children) so that memory_mb bounds its total",
                       why_no_cgroup)
    return candidate


def run_program(source: str, stdin: str = "", limits: SandboxLimits | None = None, *,
                allow_unsandboxed: bool = False) -> SandboxResult:
    """Run `source` (Python) with `stdin` under `limits` and return its exit status and output.

    Raises `SandboxUnavailable` where no isolation works, unless `allow_unsandboxed`."""
    return _run(source, stdin, limits or SandboxLimits(), isolation(), allow_unsandboxed)


def _run(source: str, stdin: str, limits: SandboxLimits, iso: Isolation,
         allow_unsandboxed: bool) -> SandboxResult:
    with _launch(source, stdin, limits, iso, None, allow_unsandboxed) as proc:
        return _collect(proc, limits)


@contextlib.contextmanager
def open_program(source: str, bootstrap: str, limits: SandboxLimits | None = None, *,
                 allow_unsandboxed: bool = False) -> Iterator[subprocess.Popen]:
    """Start a sandboxed process that talks to the caller over pipes; kill it on exit.

    The same sandbox as `run_program` (prog.py holds `source`, same limits and isolation), but
    the interpreter runs `bootstrap` (Python code, `python -I -c`; it loads prog.py itself)
    instead of prog.py, with stdin, stdout and stderr as pipes (`proc.stdin`, `proc.stdout`,
    `proc.stderr`; nobody drains stderr, so the bootstrap should point fd 2 elsewhere). No wall
    clock is enforced here: the caller bounds the time it spends talking to the process (the
    CPU, memory, file and process limits apply as usual). On exit from the `with` block
    everything the program started is killed and its host dir removed.
    """
    limits = limits or SandboxLimits()
    with _launch(source, "", limits, isolation(), bootstrap, allow_unsandboxed) as proc:
        yield proc


def require_isolation(allow_unsandboxed: bool) -> None:
    """Raise `SandboxUnavailable` (saying how to fix it) if programs would run unsandboxed and
    that was not allowed."""
    iso = isolation()
    if not iso.isolated and not allow_unsandboxed:
        raise SandboxUnavailable(
            f"sandbox: untrusted programs cannot be isolated on this host ({iso.detail}); "
            "run as root or enable unprivileged user namespaces, or set "
            "rewards.code.allow_unsandboxed=true to run them with rlimits only (a program "
            "can then read your files and signal your processes)")


@contextlib.contextmanager
def _launch(source: str, stdin: str, limits: SandboxLimits, iso: Isolation,
            bootstrap: str | None, allow_unsandboxed: bool) -> Iterator[subprocess.Popen]:
    if not iso.isolated and not allow_unsandboxed:
        require_isolation(False)
    workdir = tempfile.mkdtemp(prefix="mrl-sandbox-", dir=_scratch_root)
    uid = (secrets.randbelow(UID_RANGE[1] - UID_RANGE[0]) + UID_RANGE[0]
           if iso.mode == "root" else None)
    cgroup = proc = pidfd = None
    report_r = report_w = -1
    try:
        with open(os.path.join(workdir, "prog.py"), "w") as f:
            f.write(source)
        os.mkdir(os.path.join(workdir, "root"), 0o700)
        cgroup = _make_cgroup(iso.memory_cgroup, limits) if iso.isolated else None
        report_r, report_w = os.pipe()
        cfg = _launcher_config(workdir, limits, iso, uid, bootstrap, cgroup, report_w)
        with open(os.devnull, "rb") if bootstrap else _stdin_file(workdir, stdin) as stdin_f:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(LAUNCHER), json.dumps(cfg)],
                cwd=workdir, env={}, stdin=subprocess.PIPE if bootstrap else stdin_f,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                close_fds=True, pass_fds=(report_w,))
        os.close(report_w)
        report_w = -1
        pidfd = _program_pidfd(report_r)
        yield proc
    finally:
        try:
            _kill_all(proc, pidfd, uid, cgroup)
        finally:
            for fd in (report_r, report_w, pidfd):
                if fd is not None and fd >= 0:
                    os.close(fd)
            if cgroup:
                _remove_cgroup(cgroup)
            remove_tree(workdir)


def _stdin_file(workdir: str, stdin: str):
    path = os.path.join(workdir, "stdin.txt")
    with open(path, "w") as f:
        f.write(stdin)
    return open(path, "rb")


def _program_pidfd(report_r: int) -> int | None:
    """A pidfd of the program's pid 1, as the launcher reports it (None if it failed first)."""
    data = b""
    deadline = time.monotonic() + 30
    while not data.endswith(b"\n") and time.monotonic() < deadline:
        ready, _, _ = select.select([report_r], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(report_r, 64)
        if not chunk:
            break
        data += chunk
    if not data.endswith(b"\n"):
        return None
    try:
        return os.pidfd_open(int(data))
    except (OSError, ValueError):  # gone already, or a kernel without pidfds (< 5.3)
        return None


def _launcher_config(workdir: str, limits: SandboxLimits, iso: Isolation, uid: int | None,
                     bootstrap: str | None, cgroup: str | None, report_fd: int) -> dict:
    python = program_interpreter()
    if bootstrap is not None:
        argv = [python, "-I", "-c", bootstrap if iso.isolated else _NO_NET_HOOK + bootstrap]
    else:
        argv = [python, "-I", "prog.py"] if iso.isolated else [python, "-I", "-c",
                                                                _NO_NET_BOOTSTRAP]
    if iso.mode == "none":  # RLIMIT_NPROC counts all of our uid's processes
        nproc = _own_process_count() + limits.nproc
    else:
        nproc = limits.nproc if iso.memory_cgroup else 1
        nproc += iso.mode == "userns"  # the launcher counts in the user namespace too
    mib = 1 << 20
    return {
        # only as root does the program get a fresh uid: unsandboxed it keeps ours (without a
        # mount namespace a fresh uid may not even reach the interpreter, pyenv under /root)
        "caller_pid": os.getpid(), "mode": iso.mode, "uid": uid,
        "argv": argv, "program": os.path.join(workdir, "prog.py"),
        "root": os.path.join(workdir, "root"), "binds": sandbox_binds(),
        "hide": hidden_site_dirs(), "scratch_bytes": limits.scratch_mb * mib,
        "scratch_inodes": SCRATCH_INODES,
        "cgroup": os.path.join(cgroup, "cgroup.procs") if cgroup else None,
        "report_fd": report_fd,
        "limits": {"cpu_s": limits.cpu_s, "memory_bytes": limits.memory_mb * mib,
                   "file_bytes": limits.file_mb * mib, "nproc": nproc, "nofile": 64, "core": 0},
    }


@functools.cache
def program_interpreter() -> str:
    """The base interpreter the program runs with, by its real path.

    Not the virtualenv's `python`: the venv is not in the sandbox (the program needs only the
    standard library). The real binary's prefix is the base installation, which the launcher
    binds into the sandbox at the same path.
    """
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    if any(python == d or python.startswith(d + "/") for d in UNREACHABLE_DIRS):
        raise RuntimeError(f"sandbox: the Python interpreter {python} lives under a directory "
                           f"the sandbox replaces ({', '.join(UNREACHABLE_DIRS)}); install "
                           "Python elsewhere to run the code reward")
    return python


@functools.cache
def sandbox_binds() -> list[str]:
    """Host paths bound read-only into the sandbox: `SYSTEM_PATHS`, the system's library dir,
    and the interpreter's installation (its whole prefix, or where the prefix is a system one
    such as /usr, just its standard library, binary and libpython)."""
    binds = [p for p in SYSTEM_PATHS if os.path.lexists(p)]
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    libdir = f"/usr/lib/{multiarch}" if multiarch else ""
    binds.append(libdir if libdir and os.path.isdir(libdir) else "/usr/lib")
    prefix = os.path.realpath(sys.base_prefix)
    python = program_interpreter()
    if prefix in ("/", "/usr", "/usr/local") or not python.startswith(prefix + "/"):
        binds += [os.path.realpath(sysconfig.get_path("stdlib")), python]
        binds += glob.glob(os.path.join(sysconfig.get_config_var("LIBDIR") or "/nonexistent",
                                        "libpython3*"))
    else:
        binds.append(prefix)
    return _dedup(binds)


def _dedup(binds: list[str]) -> list[str]:
    """`binds` without repeats and without paths inside an earlier (non-symlink) bind."""
    out: list[str] = []
    for p in binds:
        if p in out:
            continue
        r = os.path.realpath(p)
        if not os.path.islink(p) and any(
                r.startswith(os.path.realpath(q) + "/") for q in out if not os.path.islink(q)):
            continue
        out.append(p)
    return out


@functools.cache
def hidden_site_dirs() -> list[str]:
    """Package directories inside the bound paths, covered by an empty tmpfs in the sandbox:
    no installed package (this project's own, a benchmark's reference solutions) is
    readable."""
    bases = {os.path.realpath(sys.base_prefix), "/usr", "/usr/local"}
    found = set()
    for base in bases:
        for lib in ("lib", "lib64"):
            for pattern in ("python3*/site-packages", "python3*/dist-packages"):
                found.update(os.path.realpath(p) for p in glob.glob(f"{base}/{lib}/{pattern}"))
    bound = [os.path.realpath(p) for p in sandbox_binds() if not os.path.islink(p)]
    return sorted(d for d in found
                  if os.path.isdir(d) and any(d.startswith(b + "/") for b in bound))


def _memory_cgroup_parent() -> tuple[str | None, str]:
    """(directory under which per-run memory cgroups can be made, or None; why not)."""
    try:
        cgroups = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError as e:
        return None, f"cannot read /proc/self/cgroup: {e}"
    tried = []
    for line in cgroups:
        _, controllers, path = line.split(":", 2)
        v2 = controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        for m in mounts:
            fields, _, fs = m.partition(" - ")
            fstype, _, super_opts = (fs.split(" ") + ["", ""])[:3]
            parts = fields.split(" ")
            if v2 != (fstype == "cgroup2") or (not v2 and (
                    fstype != "cgroup" or "memory" not in super_opts.split(","))):
                continue
            root, mountpoint = parts[3], parts[4]
            rel = path[len(root):] if root != "/" and path.startswith(root) else path
            parent = mountpoint + rel.rstrip("/") if rel != "/" else mountpoint
            if v2:
                try:
                    if "memory" not in Path(parent, "cgroup.subtree_control").read_text().split():
                        tried.append(f"{parent}: memory controller not delegated")
                        continue
                except OSError as e:
                    tried.append(f"{parent}: {e}")
                    continue
            try:
                probe = _make_cgroup(parent, SandboxLimits())
            except OSError as e:
                tried.append(f"{parent}: {e.strerror or e}")
                continue
            _remove_cgroup(probe)
            return parent, ""
    return None, "; ".join(tried) or "no cgroup memory controller mounted"


def _make_cgroup(parent: str | None, limits: SandboxLimits) -> str | None:
    """A fresh cgroup under `parent` limited to `memory_mb` (no swap) and the process count."""
    if parent is None:
        return None
    path = os.path.join(parent, f"mrl-sandbox-{secrets.token_hex(6)}")
    os.mkdir(path)
    try:
        limit = str(limits.memory_mb << 20)
        v2 = os.path.exists(os.path.join(path, "memory.max"))
        settings = ([("memory.max", limit), ("memory.swap.max", "0"),
                     ("pids.max", str(limits.nproc + 2))] if v2 else
                    [("memory.limit_in_bytes", limit), ("memory.memsw.limit_in_bytes", limit)])
        for name, value in settings:
            file = os.path.join(path, name)
            if name == settings[0][0] or os.path.exists(file):
                with open(file, "w") as f:
                    f.write(value)
    except OSError:
        _remove_cgroup(path)
        raise
    return path


def _remove_cgroup(path: str) -> None:
    """Kill what is left in the cgroup and remove it; never raises (a leftover is logged)."""
    for _ in range(200):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            try:
                for pid in Path(path, "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
            time.sleep(0.01)
    logger.error("sandbox: could not remove cgroup %s", path)


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


def _kill_all(proc: subprocess.Popen | None, pidfd: int | None, uid: int | None,
              cgroup: str | None) -> None:
    """Kill the program's pid 1 (its namespace dies with it, even if it left our process
    group), the launcher's group, and as root anything still running as `uid`."""
    if pidfd is not None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(OSError):
            if proc.stdin:
                proc.stdin.close()
        _killpg(proc)
        proc.wait()
        for f in (proc.stdout, proc.stderr):
            f.close()
    if pidfd is not None:  # the launcher reaps it; if the launcher died first, init does
        select.select([pidfd], [], [], 5.0)
    if uid is None:
        return
    for _ in range(100):  # a fork bomb outside a pid namespace may race us; bounded by NPROC
        pids = processes_of_uid(uid)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
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


def remove_tree(path: str) -> None:
    """Remove the directory `path` and everything under it; never raises, never recurses.

    Iterative, with one directory fd at a time and names relative to it, so a tree thousands
    of levels deep (longer than PATH_MAX, deeper than Python's recursion limit) or with
    unreadable directories is removed too. A failure is logged, not raised."""
    try:
        _remove_tree(path)
    except Exception as e:  # noqa: BLE001 - cleanup must never fail the caller
        if os.path.lexists(path):
            logger.error("sandbox: could not remove %s: %s", path, e)


def _remove_tree(path: str) -> None:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        if not os.path.islink(path):
            os.chmod(path, 0o700)  # the program may have made it unreadable or read-only
        fd = os.open(path, flags)
    except FileNotFoundError:
        return
    names: list[str] = []  # path from `path` down to the directory `fd` is open on
    try:
        while True:
            sub = None
            with os.scandir(fd) as entries:
                for e in entries:
                    if e.is_dir(follow_symlinks=False):
                        sub = e.name
                        break
                    os.unlink(e.name, dir_fd=fd)
            if sub is not None:
                with contextlib.suppress(OSError):
                    os.chmod(sub, 0o700, dir_fd=fd)  # the program may have made it unreadable
                child = os.open(sub, flags, dir_fd=fd)
                os.close(fd)
                fd = child
                names.append(sub)
                continue
            if not names:
                break
            parent = os.open("..", flags, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(names.pop(), dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)
