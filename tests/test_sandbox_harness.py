"""HumanEval-style labels through the two-process harness (issue 17): only a harness that ran
`check(candidate)` to its end pays; exit status, custom `__eq__`, reading the program's own file
or faking output never do. All through the public `code` reward with small limits."""

import json
import secrets
import time
import types
from pathlib import Path

import pytest
from test_sandbox import sandbox_processes  # one copy of what counts as left behind

from megatron_rl.rewards import code as code_mod
from megatron_rl.rewards.code import code_reward, max_wall_s, run_tests
from megatron_rl.rewards.harness import decode, encode, free_names
from megatron_rl.rewards.sandbox import SandboxLimits

FAST = {"timeout_s": 3.0, "cpu_s": 2}
TEST = """\
def check(candidate):
    assert candidate(1, 2) == 3
    assert candidate(-1, 1) == 0
    assert candidate(10, 5) == 15
"""
LABEL = {"test": TEST, "entry_point": "add"}
CORRECT = "def add(a, b):\n    return a + b\n"


def score(program: str, label: dict | None = None, **kwargs) -> float:
    return code_reward("", f"```python\n{program}```", label or LABEL, {}, **{**FAST, **kwargs})


@pytest.fixture(autouse=True)
def clean_machine():
    """Each test leaves no sandbox or harness process and no sandbox dir behind."""
    before = {p.name for p in Path("/tmp").glob("mrl-sandbox-*")}
    yield
    assert sandbox_processes() == []
    assert {p.name for p in Path("/tmp").glob("mrl-sandbox-*")} <= before


def test_correct_program_scores_1():
    assert score(CORRECT) == 1.0
    assert run_tests(CORRECT, json.dumps(LABEL), SandboxLimits(**FAST)) == (1, 1)


def test_wrong_program_scores_0():
    assert score("def add(a, b):\n    return a - b\n") == 0.0
    assert score("def plus(a, b):\n    return a + b\n") == 0.0  # no entry point
    assert score("def add(a, b)\n    return a + b\n") == 0.0  # syntax error


def test_slow_but_correct_scores_1_too_slow_scores_0():
    slow = "import time\ndef add(a, b):\n    time.sleep(0.3)\n    return a + b\n"
    assert score(slow) == 1.0
    t = time.monotonic()
    assert score(slow.replace("0.3", "2")) == 0.0
    assert time.monotonic() - t < FAST["timeout_s"] + code_mod.HARNESS_START_S + 2
    assert score("def add(a, b):\n    while True:\n        pass\n") == 0.0


def test_printing_and_reading_stdin_do_not_break_a_correct_program():
    prog = ("import sys\nprint('debug')\nsys.stderr.write('x' * 200000)\n"
            "def add(a, b):\n    print(a, b)\n    return a + b\n")
    assert score(prog) == 1.0
    assert score("data = open(0).read()\n" + CORRECT) == 1.0


@pytest.mark.parametrize("program", [
    "import sys\nsys.exit(0)\n",
    "raise SystemExit\n",
    "import os\nos._exit(0)\n",
    "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    "def add(a, b):\n    raise SystemExit(0)\n",
    "import os\ndef add(a, b):\n    os._exit(0)\n",
    "import atexit, os\natexit.register(lambda: os._exit(0))\n"
    "def add(a, b):\n    raise RuntimeError\n",
    "import atexit, sys\natexit.register(lambda: sys.exit(0))\nsys.exit(1)\n",
    "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\ndef add(a, b):\n    1/0\n",
    "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\nraise ValueError\n",
    "import signal, os\nos.kill(os.getpid(), signal.SIGKILL)\n",
], ids=["exit-at-import", "raise-systemexit-at-import", "os_exit-at-import", "exit-at-call",
        "raise-systemexit-at-call", "os_exit-at-call", "atexit-os_exit", "atexit-sys-exit",
        "excepthook-at-call", "excepthook-at-import", "sigkill-self"])
def test_exit_status_never_pays(program):
    assert score(program) == 0.0


@pytest.mark.parametrize("program", [
    "class Any:\n    def __eq__(self, o):\n        return True\n    __hash__ = None\n"
    "def add(a, b):\n    return Any()\n",
    "class I(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n"
    "def add(a, b):\n    return I(0)\n",
    "class L(list):\n    def __eq__(self, o):\n        return True\n"
    "def add(a, b):\n    return L()\n",
    "class S(str):\n    def __eq__(self, o):\n        return True\n    __hash__ = str.__hash__\n"
    "def add(a, b):\n    return S('x')\n",
    "class Boom:\n    def __eq__(self, o):\n        raise AssertionError\n"
    "def add(a, b):\n    return Boom()\n",
    "class I(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n"
    "def add(a, b):\n    return [I(0)]\n",
    "import unittest.mock\ndef add(a, b):\n    return unittest.mock.ANY\n",
], ids=["class", "int-subclass", "list-subclass", "str-subclass", "eq-raises",
        "nested-int-subclass", "mock-ANY"])
def test_custom_eq_never_passes(program):
    assert score(program) == 0.0
    label = {"test": "def check(candidate):\n    assert [candidate(1, 2)] == [3]\n",
             "entry_point": "add"}
    assert score(program, label) == 0.0


def test_non_plain_result_fails_even_if_the_test_swallows_exceptions():
    test = ("def check(candidate):\n    for a in range(3):\n        try:\n"
            "            assert candidate(a, 1) == a + 1\n        except:\n            pass\n")
    label = {"test": test, "entry_point": "add"}
    assert score(CORRECT, label) == 1.0
    test_exc = test.replace("except:", "except Exception:")
    for prog in ("import os\ndef add(a, b):\n    os._exit(0)\n",
                 "class I(int):\n    pass\ndef add(a, b):\n    return I(a + b)\n",
                 "import sys\nsys.exit(0)\n"):
        assert score(prog, label) == 0.0, prog
        assert score(prog, {**label, "test": test_exc}) == 0.0, prog


def test_program_file_holds_no_test():
    token = "tok_" + secrets.token_hex(8)
    # the "program" returns everything it can read in its own dir and process
    spy = ("import os\ndef spy():\n    out = open(__file__).read()\n"
           "    for n in os.listdir('.'):\n        try:\n            out += open(n).read()\n"
           "        except OSError:\n            pass\n"
           "    out += open('/proc/self/cmdline').read() + open('/proc/self/environ').read()\n"
           "    return out\n")
    label = {"test": f"def check(candidate):\n    seen = candidate()\n"
                     f"    assert 'def spy' in seen and {token!r} not in seen\n",
             "entry_point": "spy"}
    assert score(spy, label) == 1.0  # it ran, and the test's token was nowhere to be seen


def test_reading_expected_values_from_own_file_fails():
    prog = ("import re, os, sys\nsrc = open(__file__).read()\nfor n in os.listdir('.'):\n"
            "    try:\n        src += open(n).read()\n    except OSError:\n        pass\n"
            "pairs = dict(re.findall(r'candidate\\((.*?)\\) == (\\S+)', src))\n"
            "def add(a, b):\n    return int(pairs[f'{a}, {b}'])\n")
    assert score(prog) == 0.0
    prog2 = ("def add(a, b):\n    import sys, os\n"
             "    text = open(sys.modules['__main__'].__file__).read()\n"
             "    assert 'check' not in text\n    return 0\n")
    assert score(prog2) == 0.0


@pytest.mark.parametrize("program", [
    "print('PASSED')\nprint('{\"v\": [\"i\", 3]}')\nimport sys\nsys.exit(0)\n",
    "import os\nfor fd in range(64):\n    try:\n"
    "        os.write(fd, b'ok\\nPASSED\\n' + b'0' * 64)\n"
    "    except OSError:\n        pass\nos._exit(0)\n",
    "import os\nfor fd in range(64):\n    try:\n"
    "        os.write(fd, b'{\"v\": [\"i\", 3]}\\n' * 3)\n    except OSError:\n        pass\n"
    "def add(a, b):\n    return 0\n",
])
def test_fake_success_output_fails(program):
    assert score(program) == 0.0


def test_reading_harness_secret_via_proc_fails():
    prog = r'''
import os, re, glob
found = set()
for path in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline') + glob.glob('/proc/*/mem'):
    try:
        found.update(re.findall(rb'[0-9a-f]{64}', open(path, 'rb').read(1 << 20)))
    except (OSError, ValueError):
        pass
for path in glob.glob('/proc/*/fd/*'):
    for mode in (os.O_RDONLY | os.O_NONBLOCK, os.O_WRONLY | os.O_NONBLOCK):
        try:
            fd = os.open(path, mode)
        except OSError:
            continue
        try:
            if mode & os.O_WRONLY:
                for s in found or {b'0' * 64}:
                    os.write(fd, s)
            else:
                found.update(re.findall(rb'[0-9a-f]{64}', os.read(fd, 1 << 16)))
        except OSError:
            pass
        os.close(fd)
pid = os.getppid()
for p in (f'/proc/{pid}/environ', f'/proc/{pid}/cmdline', f'/proc/{pid}/fd'):
    try:
        found.add(repr(os.listdir(p) if p.endswith('fd') else open(p, 'rb').read()).encode())
    except OSError:
        pass
def add(a, b):
    return 0
'''
    assert score(prog) == 0.0


def test_secret_is_not_in_argv_or_environment(monkeypatch):
    secret = secrets.token_hex(32)
    monkeypatch.setattr(code_mod, "secrets", types.SimpleNamespace(token_hex=lambda n: secret))
    seen = []
    real_popen = code_mod.subprocess.Popen

    def spy(args, **kwargs):
        seen.append((args, kwargs.get("env")))
        return real_popen(args, **kwargs)

    monkeypatch.setattr(code_mod.subprocess, "Popen", spy)
    assert score(CORRECT) == 1.0
    assert seen, "the harness was not started through code.subprocess.Popen"
    for args, env in seen:
        assert secret not in " ".join(args) and secret not in json.dumps(env)


def test_a_check_that_never_calls_the_program_does_not_pay():
    label = {"test": "def check(candidate):\n    pass\n", "entry_point": "add"}
    assert score(CORRECT, label) == 0.0


def test_helpers_from_label_prompt_run_in_the_harness():
    prompt = "def twice(x):\n    return 2 * x\n\ndef half(x):\n    \"\"\"x / 2\"\"\"\n"
    test = ("def check(candidate):\n    for x in (2, 8, 10):\n"
            "        assert twice(candidate(x)) == x\n")
    label = {"test": test, "entry_point": "half", "prompt": prompt}
    assert score("def half(x):\n    return x // 2\n", label) == 1.0
    assert score("    return x // 2\n", label) == 1.0  # completion only: prompt prepended
    cheat = "def twice(x):\n    return 4\ndef half(x):\n    return 2\n"
    assert score(cheat, label) == 0.0  # the program's own `twice` is not the test's
    no_prompt = {"test": test, "entry_point": "half"}  # helper then comes from the program
    assert score("def twice(x):\n    return 2 * x\ndef half(x):\n    return x // 2\n",
                 no_prompt) == 1.0


def test_builtin_exceptions_reach_the_test_and_plain_values_round_trip():
    test = ("def check(candidate):\n    try:\n        candidate(-1)\n        assert False\n"
            "    except ValueError:\n        pass\n"
            "    assert candidate(3) == {'a': [1, 2.5, (None, True)], 'b': {1, 2},"
            " 3: frozenset({b'x'}), 'c': float('inf')}\n")
    label = {"test": test, "entry_point": "f"}
    prog = ("def f(x):\n    if x < 0:\n        raise ValueError('negative')\n"
            "    return {'a': [1, 2.5, (None, True)], 'b': {1, 2}, 3: frozenset({b'x'}),"
            " 'c': float('inf')}\n")
    assert score(prog, label) == 1.0
    assert score(prog.replace("2.5", "2.50001"), label) == 0.0
    assert score(prog.replace("(None, True)", "[None, True]"), label) == 0.0


def test_codec_is_strict():
    value = {"a": [1, 2.5, (None, True)], 3: {frozenset({b"x"})}, "s": "\udcff"}
    assert decode(json.loads(json.dumps(encode(value)))) == value
    for bad in (["i", True], ["b", 1], ["x", 1], ["l", [["i", 1], "oops"]], ["S", [["l", []]]],
                ["d", [[["l", []], ["n", None]]]], ["s", 1], [], ["i"]):
        with pytest.raises(ValueError):
            decode(bad)
    with pytest.raises(TypeError):
        encode(object())
    assert free_names("import math\ndef check(c):\n    assert poly(c(1)) == math.pi\n") == {
        "poly"}


def test_stdin_stdout_cases_fractions_and_exit_status_alone_never_pays():
    label = [{"input": "1 2\n", "output": "3"}, {"input": "5 5\n", "output": "10\n"},
             {"input": "1 1\n", "output": "3"}]
    prog = "print(sum(map(int, input().split())))\n"
    assert score(prog, label) == 2 / 3
    assert score(prog, label, mode="all") == 0.0
    assert score("import sys\nsys.exit(0)\n", label) == 0.0
    assert score("import os\nos._exit(0)\n", label) == 0.0
    assert score("print(3)\nimport sys\nsys.exit(1)\n", label) == 0.0  # right output, bad exit


def test_max_wall_s_follows_the_number_of_cases():
    cases = [{"input": "", "output": ""}] * 4
    assert max_wall_s(cases, 5.0) >= 20.0
    assert max_wall_s(json.dumps(LABEL), 5.0) >= 5.0
