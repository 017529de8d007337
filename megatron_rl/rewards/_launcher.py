"""Sandbox launcher: run as its own interpreter (`python -I -S _launcher.py <json>`), not imported.

`sandbox.py` starts it in a fresh session with an empty environment; it builds the sandbox and
execs the untrusted program inside (design: docs/design.md, "Code sandbox"). Steps:

1. die with the reward worker (PR_SET_PDEATHSIG) and join the run's memory cgroup, if any;
2. enter new namespaces: mount, pid, network (a downed loopback only), IPC (SysV and POSIX
   message queues die with it) and UTS; as root the program later runs under a fresh uid, and
   without root an unprivileged USER namespace maps our uid to "nobody" (65534) inside, which
   gives the launcher the rights to do the rest;
3. fork the program's process C, pid 1 of the new pid namespace (when it dies the kernel kills
   every process left in it), and report C's pid on `report_fd` so the caller can kill C
   directly even if C leaves our process group;
4. C builds a new root in a tmpfs: read-only, nosuid binds of the system's binaries and
   libraries and of the interpreter's installation (its site-packages covered by empty tmpfs),
   a minimal /dev, a fresh /proc of the new pid namespace, and /tmp: a tmpfs with a total size
   and inode quota, the only writable place (also /var/tmp and /dev/shm), holding prog.py.
   Nothing else of the host (project, venv, home dirs, /etc) exists in it. pivot_root, detach
   the old root, remount / read-only;
5. C drops every privilege: as root setgroups/setgid/setuid to the fresh uid; in a user
   namespace it drops the capability bounding set (exec as non-root inside clears the rest);
   PR_SET_NO_NEW_PRIVS (setuid binaries cannot raise privileges); rlimits; exec the program
   with an empty environment;
6. the launcher waits and exits with C's status (128 + signal when it was killed).

mode "none" (only with `allow_unsandboxed`) skips 2 and 4: rlimits and a fresh cwd only.
Only the standard library is used, and no site-packages (-S), so it starts in ~15 ms.
"""

import ctypes
import json
import os
import platform
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
MNT_DETACH = 2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203}
SYS_MOUNT_SETATTR = 442  # the same on every architecture (unified syscall table)
INSIDE_ID = 65534  # "nobody" inside the user namespace
DEVICES = ("null", "zero", "full", "random", "urandom")
LIMITS = {"cpu_s": resource.RLIMIT_CPU, "memory_bytes": resource.RLIMIT_AS,
          "file_bytes": resource.RLIMIT_FSIZE, "nproc": resource.RLIMIT_NPROC,
          "nofile": resource.RLIMIT_NOFILE, "core": resource.RLIMIT_CORE}

libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _fail(what: str, err: int | None = None) -> None:
    err = ctypes.get_errno() if err is None else err
    os.write(2, f"sandbox launcher: {what} failed: {os.strerror(err)}\n".encode())
    os._exit(125)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        _fail(what)


def _mount(src: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> int:
    return libc.mount(src.encode() if src else None, target.encode(),
                      fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                      data.encode() if data else None)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _die_with_parent() -> None:
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")


def _enter_namespaces(cfg: dict) -> None:
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if cfg["mode"] == "userns":
        uid, gid = os.getuid(), os.getgid()
        _check(libc.unshare(flags | CLONE_NEWUSER), "unshare(user, mount, pid, net, ipc, uts)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{INSIDE_ID} {uid} 1\n")
        _write("/proc/self/gid_map", f"{INSIDE_ID} {gid} 1\n")
    else:
        _check(libc.unshare(flags), "unshare(mount, pid, net, ipc, uts)")


def _readonly(target: str, recursive: bool) -> None:
    """Make the mount at `target` (and, if `recursive`, everything under it) read-only, nosuid
    and nodev. mount_setattr changes only these flags; the remount fallback must repeat the
    flags a user namespace locks (statvfs), or the kernel refuses."""
    attr = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV, 0, 0, 0)
    ret = libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD),
                       target.encode(), ctypes.c_uint(AT_RECURSIVE if recursive else 0),
                       ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    if ret == 0:
        return
    if ctypes.get_errno() not in (38, 22):  # ENOSYS (kernel < 5.12), EINVAL
        _fail(f"mount_setattr({target})")
    f = os.statvfs(target).f_flag  # ST_NOEXEC 8, ST_NOATIME 1024, ST_NODIRATIME 2048, ...
    keep = ((MS_NOEXEC if f & 8 else 0) | (1024 if f & 1024 else 0) | (2048 if f & 2048 else 0)
            | (1 << 21 if f & 4096 else 0))  # ST_RELATIME 4096 -> MS_RELATIME
    _check(_mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
                  | keep), f"remount {target} read-only")


def _mkdirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


def _bind(root: str, path: str) -> None:
    """`path` of the host, read-only at the same place under `root`; top-level symlinks (merged
    /usr: /lib -> usr/lib) are copied as symlinks."""
    if os.path.islink(path) and os.path.dirname(path) == "/":
        os.symlink(os.readlink(path), root + path)
        return
    target = root + path
    if os.path.isdir(path):
        _mkdirs(target)
    else:
        _mkdirs(os.path.dirname(target))
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
    _check(_mount(path, target, None, MS_BIND | MS_REC), f"bind {path}")
    _readonly(target, recursive=True)


def _build_root(cfg: dict, program: bytes) -> None:
    """Steps 4 of the module docstring; runs in C (pid 1 of the new pid namespace)."""
    root = cfg["root"]
    _check(_mount(None, "/", None, MS_REC | MS_PRIVATE), "make / private")
    _check(_mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m"),
           "tmpfs root")
    for path in cfg["binds"]:
        if os.path.lexists(path):
            _bind(root, path)
    for path in cfg["hide"]:  # the interpreter's site-packages: no host packages inside
        if os.path.isdir(root + path):
            _check(_mount("tmpfs", root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV,
                          "size=4k,mode=0555"), f"cover {path}")
    dev = root + "/dev"
    _mkdirs(dev)
    _check(_mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k"),
           "tmpfs /dev")
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            os.close(os.open(f"{dev}/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
            _check(_mount("/dev/" + name, f"{dev}/{name}", None, MS_BIND), f"bind /dev/{name}")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                         ("shm", "/tmp")):
        os.symlink(target, f"{dev}/{name}")
    _readonly(dev, recursive=False)
    scratch = root + "/tmp"
    _mkdirs(scratch)
    _check(_mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV,
                  f"mode=1777,size={cfg['scratch_bytes']},nr_inodes={cfg['scratch_inodes']}"),
           "tmpfs /tmp")
    _mkdirs(root + "/var")
    os.symlink("/tmp", root + "/var/tmp")
    prog = scratch + "/prog.py"
    with open(prog, "wb") as f:
        f.write(program)
    if cfg["uid"] is not None:
        os.chown(prog, cfg["uid"], cfg["uid"])
    _mkdirs(root + "/proc")
    # A fresh procfs shows only this pid namespace. Refused in some containers (a masked host
    # /proc); then the sandbox has no /proc at all, which is as safe.
    if _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC) == 0 and \
            cfg["mode"] == "userns":
        try:  # no nested user namespaces (their capabilities would reach only the sandbox's
            _write(root + "/proc/sys/user/max_user_namespaces", "0")  # mounts; less to attack)
        except OSError:
            pass
    os.chdir(root)
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is not None:
        _check(libc.syscall(ctypes.c_long(number), b".", b"."), "pivot_root")
        _check(libc.umount2(b".", MNT_DETACH), "detach the old root")
    else:  # unknown syscall number: move the new root over / (the old root stays covered)
        _check(_mount(".", "/", None, MS_MOVE), "move the new root")
        _check(libc.chroot(b"."), "chroot")
    os.chdir("/")
    _readonly("/", recursive=False)
    os.chdir("/tmp")
    libc.sethostname(b"sandbox", 7)


def _drop_privileges(cfg: dict) -> None:
    if cfg["mode"] == "root":
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])  # from root to a non-root uid: every capability is gone
    elif cfg["mode"] == "userns":
        for cap in range(64):  # what is left vanishes at exec (uid 65534 is not root inside)
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                break
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")


def _child(cfg: dict, program: bytes, parent: int) -> None:
    if cfg["mode"] != "none":
        _build_root(cfg, program)
    _drop_privileges(cfg)
    _die_with_parent()  # credentials changed: the kernel cleared the earlier setting
    if os.getppid() != parent and cfg["mode"] == "none":
        os._exit(137)  # parent died before prctl
    for name, value in cfg["limits"].items():
        resource.setrlimit(LIMITS[name], (value, value))
    argv = cfg["argv"]
    os.execve(argv[0], argv, {})


def main() -> None:
    cfg = json.loads(sys.argv[1])
    _die_with_parent()
    if os.getppid() != cfg["caller_pid"]:
        os._exit(137)  # the caller died before prctl took effect
    with open(cfg["program"], "rb") as f:
        program = f.read()
    if cfg["cgroup"]:
        _write(cfg["cgroup"], str(os.getpid()))
    if cfg["mode"] != "none":
        _enter_namespaces(cfg)
    me = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(cfg["report_fd"])
            _child(cfg, program, me)
        except BaseException as e:  # noqa: B036 - report anything, then never return to main
            os.write(2, f"sandbox launcher: {type(e).__name__}: {e}\n".encode())
        os._exit(126)
    os.write(cfg["report_fd"], f"{pid}\n".encode())
    os.close(cfg["report_fd"])
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main()
