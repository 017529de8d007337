"""Code reward: run the response's program against test cases in the sandbox.

Label formats (a JSON string of either is parsed first):

- HumanEval style: {"test": "<code defining check(candidate)>", "entry_point": "f"} and an
  optional "prompt" (signature + docstring), prepended to the program when it does not define
  the entry point. It passes only if `check(candidate)` ran to its end (see below).
- stdin/stdout cases: [{"input": "<stdin>", "output": "<expected stdout>"}, ...]. One sandboxed
  run per case, which sees only its input; the expected output stays here. A case passes if the
  run exited 0 within its limits AND its stdout equals the expected output up to trailing
  whitespace on each line and trailing blank lines: an exit status alone never pays.

Reward: the fraction of passed cases (mode="fraction") or 1/0 for all passed (mode="all").

How a HumanEval label is run (`megatron_rl.rewards.harness`), so that the program can neither
fake a pass nor see a test:

- the PROGRAM process (sandboxed by `sandbox.open_program`, every limit of `run_program`) runs
  a bootstrap that loads the program from prog.py, a file holding the program only, and serves
  calls of its functions over its stdin/stdout pipes; arguments and results cross as tagged
  plain data (None, bool, int, float, str, bytes, list, tuple, dict, set, frozenset, checked by
  exact type). A result of any other type (a class with an always-true `__eq__`, a subclass of
  int or list) fails the call. Its exit status is ignored: exiting only closes the pipe.
- the HARNESS process (trusted: a plain subprocess of this worker, never given the program)
  runs the label's prompt and test and calls `check(candidate)`, where `candidate` forwards each
  call to the program process and rebuilds the reply from built-in constructors, so `==` in the
  test compares built-in values only. It receives a fresh secret on an inherited pipe (never in
  argv, environment or a file), makes itself non-dumpable (no /proc/<pid>/fd or mem for
  same-uid processes) and, only after `check(candidate)` returned with no failed call, writes the
  secret to a result pipe that only it holds. A label pays only if that pipe carries the
  secret, the harness exited 0 and it did not run past the time budget.
- names the test reads but does not define (HumanEval's `poly`, `encode_cyclic`, ...) come from
  the label's "prompt", run in the harness, when the label has one; otherwise they are called in
  the program process like the entry point (so give such labels their prompt).

Time: a HumanEval label is one run bounded by `timeout_s` of wall clock in total (program start
and every call of the test), plus the harness's start; a stdin/stdout label is one run of at
most `timeout_s` per case. `max_wall_s` says so, and the reward pool waits that long for the
label (more than `RewardsConfig.timeout_s` when a label has many cases), so cases that passed
are paid even when others hang.

Where this host allows no isolation, the reward refuses to start (`preflight`, when the trainer
binds it) unless `rewards.code.allow_unsandboxed` is set.
"""

import hmac
import json
import logging
import os
import re
import secrets
import subprocess
import sys
import time
from typing import Any, Literal

from megatron_rl.rewards import harness
from megatron_rl.rewards.registry import register
from megatron_rl.rewards.sandbox import (
    SandboxLimits,
    open_program,
    require_isolation,
    run_program,
)

logger = logging.getLogger(__name__)

HARNESS_START_S = 2.0
"""Extra wall time allowed for the harness process itself (interpreter start, test setup)."""

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(response: str) -> str:
    """The last ```python fenced block after any think block, else the whole response."""
    text = response.rsplit("</think>", 1)[-1]
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def _normalize(out: str) -> str:
    return "\n".join(line.rstrip() for line in out.strip("\n").splitlines()).rstrip()


def run_tests(program: str, label: Any, limits: SandboxLimits,
              allow_unsandboxed: bool = False) -> tuple[int, int]:
    """(passed, total) test cases of `program` against `label` (see module docstring)."""
    if isinstance(label, str):
        label = json.loads(label)
    if _is_humaneval(label):
        entry = label["entry_point"]
        if label.get("prompt") and not re.search(rf"def\s+{re.escape(entry)}\s*\(", program):
            program = label["prompt"] + program
        return int(run_humaneval(program, label, limits, allow_unsandboxed)), 1
    if isinstance(label, list) and all(isinstance(c, dict) and {"input", "output"} <= c.keys()
                                       for c in label) and label:
        passed = 0
        for case in label:
            r = run_program(program, str(case["input"]), limits,
                            allow_unsandboxed=allow_unsandboxed)
            out = r.stdout.decode("utf-8", errors="replace")
            passed += bool(r.ok and _normalize(out) == _normalize(str(case["output"])))
        return passed, len(label)
    raise ValueError("code: label must be {'test', 'entry_point'} (HumanEval) or a non-empty "
                     "list of {'input', 'output'} cases")


def _is_humaneval(label: Any) -> bool:
    return isinstance(label, dict) and "test" in label and "entry_point" in label


def max_wall_s(label: Any, timeout_s: float = 5.0, **_: Any) -> float:
    """Worst-case wall time of `run_tests` on `label` with `SandboxLimits.timeout_s = timeout_s`
    (the reward pool waits this long for the label)."""
    if isinstance(label, str):
        label = json.loads(label)
    if _is_humaneval(label):
        return timeout_s + HARNESS_START_S
    return timeout_s * max(1, len(label)) + 1.0


def run_humaneval(program: str, label: dict, limits: SandboxLimits,
                  allow_unsandboxed: bool = False) -> bool:
    """True iff the trusted harness proved that `check(candidate)` ran to its end against the
    sandboxed `program` (see the module docstring)."""
    secret = secrets.token_hex(32).encode()
    spec = json.dumps({"test": label["test"], "entry_point": label["entry_point"],
                       "prompt": label.get("prompt") or ""})
    sec_r, sec_w = os.pipe()
    res_r, res_w = os.pipe()
    try:
        os.write(sec_w, secret)
        os.close(sec_w)
        sec_w = -1
        deadline = time.monotonic() + limits.timeout_s
        with open_program(program, harness.PROGRAM_BOOTSTRAP, limits,
                          allow_unsandboxed=allow_unsandboxed) as prog:
            cfg = {"caller_pid": os.getpid(), "secret_fd": sec_r, "result_fd": res_w,
                   "to_fd": prog.stdin.fileno(), "from_fd": prog.stdout.fileno(),
                   "deadline": deadline,
                   "max_reply": limits.max_output_bytes}
            proc = subprocess.Popen(
                [sys.executable, "-I", harness.__file__, json.dumps(cfg)], env={},
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(sec_r, res_w, cfg["to_fd"], cfg["from_fd"]), close_fds=True,
                cwd="/")
            for fd in (sec_r, res_w):  # only the harness holds them now
                os.close(fd)
            sec_r = res_w = -1
            try:
                _, err = proc.communicate(spec.encode(),
                                          timeout=max(0.0, deadline - time.monotonic())
                                          + HARNESS_START_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                logger.debug("code: harness timed out")
                return False
        if proc.returncode != 0:
            logger.debug("code: harness exited %d: %s", proc.returncode,
                         err.decode(errors="replace")[-2000:])
            return False
        os.set_blocking(res_r, False)
        try:
            proof = os.read(res_r, 4096)
        except BlockingIOError:
            proof = b""
        return hmac.compare_digest(proof, secret)
    finally:
        for fd in (sec_r, sec_w, res_r, res_w):
            if fd >= 0:
                os.close(fd)


@register("code")
def code_reward(prompt: str, response: str, label: Any, metadata: dict, *,
                mode: Literal["fraction", "all"] = "fraction", timeout_s: float = 5.0,
                cpu_s: int = 5, memory_mb: int = 1024, file_mb: int = 16, scratch_mb: int = 64,
                nproc: int = 16, max_output_bytes: int = 1 << 20,
                allow_unsandboxed: bool = False) -> float:
    """Fraction (or all-or-nothing) of the label's test cases the response's program passes.

    Limits (`SandboxLimits`) apply to each run (a HumanEval label is one run, a stdin/stdout
    case is one run); the pool waits `max_wall_s(label, timeout_s)` for a label.
    `allow_unsandboxed` comes from `rewards.code.allow_unsandboxed`.
    """
    if mode not in ("fraction", "all"):
        raise ValueError(f"code: mode must be 'fraction' or 'all', got {mode!r}")
    limits = SandboxLimits(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb,
                           file_mb=file_mb, scratch_mb=scratch_mb, nproc=nproc,
                           max_output_bytes=max_output_bytes)
    passed, total = run_tests(extract_program(response), label, limits, allow_unsandboxed)
    if mode == "all":
        return float(passed == total)
    return passed / total


def _preflight(allow_unsandboxed: bool = False, **_: Any) -> None:
    """Refuse to start where programs would run unsandboxed, unless that was allowed."""
    require_isolation(allow_unsandboxed)


code_reward.preflight = _preflight
code_reward.max_wall_s = max_wall_s
