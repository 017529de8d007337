"""Sandbox launcher: run as its own interpreter (`python -I -S _launcher.py <json>`), not imported.

It is the sandbox's first process, started by `sandbox.run_program` in a fresh session with an
empty environment and the sandbox directory as cwd. Still privileged, it

1. asks the kernel to SIGKILL it when its parent (the reward worker) dies,
2. sets the resource limits (inherited by everything it starts),
3. enters new network, mount and pid namespaces (those the caller asked for): no interface but a
   downed loopback; /tmp, /var/tmp, /dev/shm and /run/lock replaced by the sandbox's own
   directory (the program's cwd, seen as /tmp), so the world-writable places of the host cannot
   be written; directories on the interpreter's path that the sandbox uid may not traverse
   (pyenv under /root) are covered by a tmpfs holding only the interpreter's subtree,
4. forks the program's process, which becomes pid 1 of the new pid namespace (when the namespace's
   pid 1 dies the kernel kills every process left in it: no fork-bomb leftovers), mounts a fresh
   /proc (host processes, and their environ files, are not visible), drops to the unprivileged
   uid/gid and execs the program with an empty environment,
5. waits and exits with the program's status (128 + signal when it was killed).

Only the standard library is used, and no site-packages (-S), so it starts in ~15 ms.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 4096, 8192, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
HOST_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
LIMITS = {"cpu_s": resource.RLIMIT_CPU, "memory_bytes": resource.RLIMIT_AS,
          "file_bytes": resource.RLIMIT_FSIZE, "nproc": resource.RLIMIT_NPROC,
          "nofile": resource.RLIMIT_NOFILE, "core": resource.RLIMIT_CORE}

libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        sys.stderr.write(f"sandbox launcher: {what} failed: {os.strerror(err)}\n")
        os._exit(125)


def _die_with_parent() -> None:
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")


def _enter_namespaces(cfg: dict) -> None:
    flags = (CLONE_NEWNET if cfg["netns"] else 0) | (CLONE_NEWNS if cfg["mountns"] else 0)
    flags |= CLONE_NEWPID if cfg["pidns"] else 0
    if flags:
        _check(libc.unshare(flags), "unshare")
    if cfg["mountns"]:  # private propagation first, so nothing we mount leaks to the host
        _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount private /")
        for parent, child in cfg["expose"]:
            _expose(parent, child, cfg["hold"])
        scratch = cfg["scratch"]
        # a dir that contains the scratch dir goes last, or the later binds could not find it
        for d in sorted(HOST_WRITABLE_DIRS, key=lambda d: scratch.startswith(d + "/")):
            if os.path.isdir(d):
                _check(libc.mount(scratch.encode(), d.encode(), None, MS_BIND, None), f"bind {d}")


def _expose(parent: str, child: str, hold: str) -> None:
    """Make `parent/child` reachable for the sandbox uid although `parent` is not (e.g. the
    interpreter under /root/.pyenv): cover `parent` with an empty tmpfs, then move `child` back
    into it. The rest of `parent` (e.g. /root's other files) stays hidden."""
    keep = os.path.join(hold, child)
    os.makedirs(keep, exist_ok=True)
    _check(libc.mount(f"{parent}/{child}".encode(), keep.encode(), None, MS_BIND | MS_REC, None),
           f"bind {parent}/{child}")
    _check(libc.mount(b"tmpfs", parent.encode(), b"tmpfs", 0, b"mode=0755,size=64k"),
           f"tmpfs on {parent}")
    os.mkdir(os.path.join(parent, child))
    _check(libc.mount(keep.encode(), f"{parent}/{child}".encode(), None, MS_MOVE, None),
           f"move {child} into {parent}")


def _child(cfg: dict, parent: int) -> None:
    if cfg["pidns"] and cfg["mountns"]:
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        _check(libc.mount(b"proc", b"/proc", b"proc", flags, None), "mount /proc")
    if cfg["mountns"]:
        os.chdir("/tmp")  # = the sandbox dir; its host path is hidden under the /tmp bind
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    _die_with_parent()  # credentials changed: the kernel cleared the earlier setting
    if os.getppid() != parent and not cfg["pidns"]:
        os._exit(137)  # parent died before prctl
    argv = cfg["argv"]
    os.execve(argv[0], argv, {})


def main() -> None:
    cfg = json.loads(sys.argv[1])
    _die_with_parent()
    if os.getppid() != cfg["caller_pid"]:
        os._exit(137)  # the caller died before prctl took effect
    for name, value in cfg["limits"].items():
        resource.setrlimit(LIMITS[name], (value, value))
    _enter_namespaces(cfg)
    me = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            _child(cfg, me)
        except BaseException as e:  # noqa: B036 - report anything, then never return to main
            sys.stderr.write(f"sandbox launcher: {type(e).__name__}: {e}\n")
        os._exit(126)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
