"""Code reward: run the response's program against test cases in the sandbox.

Label formats (a JSON string of either is parsed first):

- HumanEval style: {"test": "<code defining check(candidate)>", "entry_point": "f"} and an
  optional "prompt" (signature + docstring), prepended when the program does not define the
  entry point. One run: program + test + `check(f)`; it passes if it exits 0.
- stdin/stdout cases: [{"input": "<stdin>", "output": "<expected stdout>"}, ...]. One run per
  case; it passes if stdout equals the expected output up to trailing whitespace on each line
  and trailing blank lines.

Reward: the fraction of passed cases (mode="fraction") or 1/0 for all passed (mode="all").
"""

import json
import re
from typing import Any, Literal

from megatron_rl.rewards.registry import register
from megatron_rl.rewards.sandbox import SandboxLimits, run_program

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(response: str) -> str:
    """The last ```python fenced block after any think block, else the whole response."""
    text = response.rsplit("</think>", 1)[-1]
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def _normalize(out: str) -> str:
    return "\n".join(line.rstrip() for line in out.strip("\n").splitlines()).rstrip()


def run_tests(program: str, label: Any, limits: SandboxLimits) -> tuple[int, int]:
    """(passed, total) test cases of `program` against `label` (see module docstring)."""
    if isinstance(label, str):
        label = json.loads(label)
    if isinstance(label, dict) and "test" in label and "entry_point" in label:
        entry = label["entry_point"]
        if label.get("prompt") and not re.search(rf"def\s+{re.escape(entry)}\s*\(", program):
            program = label["prompt"] + program
        source = f"{program}\n\n{label['test']}\n\ncheck({entry})\n"
        return int(run_program(source, "", limits).ok), 1
    if isinstance(label, list) and all(isinstance(c, dict) and {"input", "output"} <= c.keys()
                                       for c in label) and label:
        passed = 0
        for case in label:
            r = run_program(program, str(case["input"]), limits)
            out = r.stdout.decode("utf-8", errors="replace")
            passed += r.ok and _normalize(out) == _normalize(str(case["output"]))
        return passed, len(label)
    raise ValueError("code: label must be {'test', 'entry_point'} (HumanEval) or a non-empty "
                     "list of {'input', 'output'} cases")


@register("code")
def code_reward(prompt: str, response: str, label: Any, metadata: dict, *,
                mode: Literal["fraction", "all"] = "fraction", timeout_s: float = 5.0,
                cpu_s: int = 5, memory_mb: int = 1024, nproc: int = 16,
                max_output_bytes: int = 1 << 20) -> float:
    """Fraction (or all-or-nothing) of the label's test cases the response's program passes.

    Limits apply to each run; keep RewardsConfig.timeout_s above cases x timeout_s.
    """
    if mode not in ("fraction", "all"):
        raise ValueError(f"code: mode must be 'fraction' or 'all', got {mode!r}")
    limits = SandboxLimits(timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb, nproc=nproc,
                           max_output_bytes=max_output_bytes)
    passed, total = run_tests(extract_program(response), label, limits)
    if mode == "all":
        return float(passed == total)
    return passed / total
