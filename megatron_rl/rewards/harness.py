"""Trusted test harness for HumanEval-style labels, and the bootstrap of the untrusted program.

Two processes; the untrusted one never holds a test (see `megatron_rl.rewards.code`):

- the PROGRAM process runs `PROGRAM_BOOTSTRAP` inside the sandbox (`sandbox.open_program`). It
  moves the protocol off fds 0/1 (the program's own stdin/stdout/stderr become /dev/null), loads
  the candidate program from prog.py (which holds the program only) as `__main__`, then serves
  calls: one JSON request per line on its stdin ({"f": name, "a": [args], "k": [[key, value]]}),
  one JSON reply per line on its stdout ({"v": value} or {"e": [exception type, message]}).
  Values are tagged plain data (`encode`): None, bool, int, float, str, bytes, list, tuple,
  dict, set, frozenset, checked with `type(x) is ...`; anything else (a custom class, a subclass
  of int or list with its own __eq__) is answered as an error "non-plain result of type X".
- the HARNESS process (this file run as a script, by `code.run_tests`; a plain subprocess, never
  given the program) makes itself non-dumpable, reads a per-run secret from an inherited pipe
  fd, runs the label's prompt (trusted helpers) and test code, and calls `check(candidate)`
  where `candidate` forwards each call to the program process and rebuilds the reply from
  built-in constructors only (`decode`: the untrusted side can never hand the harness an object
  of its own). A closed pipe (the program exited, whatever its status), a timeout, a malformed
  or non-plain reply, or SystemExit/KeyboardInterrupt inside the candidate raise `ProgramFailed`
  (a BaseException: `except Exception` in a test cannot swallow it) and mark the run failed.
  Only when `check` returned, called the program at least once and no call failed that way
  does it write the secret to its result fd, which only it holds; the reward worker pays only
  if that fd carries the secret.
"""

import ast
import builtins
import json
import os
import select
import sys
import time

TAGS = ("n", "b", "i", "f", "s", "y", "l", "t", "d", "S", "F")

# Runs in the sandbox with `python -I -c`. Self-contained (standard library only); it keeps its
# own references, since the program replaces sys.modules["__main__"] and may clobber globals.
PROGRAM_BOOTSTRAP = r'''
def _mrl_serve():
    import builtins, json, os, sys, types
    rx, tx = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    rx, tx = os.fdopen(rx, "rb"), os.fdopen(tx, "wb")
    plain_seq = {list: "l", tuple: "t", set: "S", frozenset: "F"}

    class NonPlain(Exception):
        pass

    def enc(x):
        t = type(x)
        if x is None:
            return ["n", None]
        if t is bool:
            return ["b", x]
        if t is int:
            return ["i", x]
        if t is float:
            return ["f", x]
        if t is str:
            return ["s", x]
        if t is bytes:
            return ["y", x.hex()]
        if t in plain_seq:
            return [plain_seq[t], [enc(v) for v in x]]
        if t is dict:
            return ["d", [[enc(k), enc(v)] for k, v in x.items()]]
        raise NonPlain("non-plain result of type " + t.__module__ + "." + t.__qualname__)

    def dec(node):
        tag, v = node
        if tag in ("n", "b", "i", "f", "s"):
            return v
        if tag == "y":
            return bytes.fromhex(v)
        if tag == "d":
            return {dec(k): dec(x) for k, x in v}
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](dec(x) for x in v)

    sys.argv = ["prog.py"]
    main = types.ModuleType("__main__")
    main.__file__ = "prog.py"
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    load_error = None
    try:
        with open("prog.py") as f:
            source = f.read()
        exec(compile(source, "prog.py", "exec"), main.__dict__)
    except BaseException as e:  # SystemExit too: the program's exit status means nothing
        load_error = [type(e).__name__, "while loading the program: " + str(e)[:1000]]
    for line in rx:
        try:
            req = json.loads(line)
            if load_error is not None:
                reply = {"e": load_error}
            else:
                fn = main.__dict__[req["f"]]
                args = [dec(a) for a in req["a"]]
                kwargs = {k: dec(v) for k, v in req["k"]}
                reply = {"v": enc(fn(*args, **kwargs))}
        except BaseException as e:
            name = type(e).__name__ if type(e).__module__ == "builtins" else "CandidateError"
            if isinstance(e, NonPlain):
                name = "NonPlainResult"
            try:
                msg = str(e)[:1000]
            except BaseException:
                msg = "<unprintable>"
            reply = {"e": [name, msg]}
        try:
            out = json.dumps(reply)
        except BaseException as e:
            out = json.dumps({"e": ["EncodeError", type(e).__name__]})
        tx.write(out.encode() + b"\n")
        tx.flush()

_mrl_serve()
'''


class ProgramFailed(BaseException):
    """The program process broke the protocol, exited, timed out or returned a non-plain value.

    A BaseException, so that a test's `except Exception` cannot swallow it; the harness also
    records it and then never reports a pass.
    """


class CandidateError(Exception):
    """The candidate raised an exception that is not one of Python's built-in ones."""


def encode(x, depth: int = 0) -> list:
    """Tagged plain data for an argument (harness side: non-plain arguments are an error)."""
    if depth > 100:
        raise ValueError("harness: argument nested too deeply")
    t = type(x)
    if x is None:
        return ["n", None]
    if t is bool:
        return ["b", x]
    if t is int:
        return ["i", x]
    if t is float:
        return ["f", x]
    if t is str:
        return ["s", x]
    if t is bytes:
        return ["y", x.hex()]
    seq = {list: "l", tuple: "t", set: "S", frozenset: "F"}
    if t in seq:
        return [seq[t], [encode(v, depth + 1) for v in x]]
    if t is dict:
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]]
    raise TypeError(f"harness: cannot pass a {t.__qualname__} to the program (plain data only)")


def decode(node, depth: int = 0):
    """Plain built-in value from an untrusted tagged node; ValueError on anything malformed."""
    if depth > 200:
        raise ValueError("result nested too deeply")
    if type(node) is not list or len(node) != 2 or type(node[0]) is not str:
        raise ValueError("malformed value")
    tag, v = node
    if tag == "n" and v is None:
        return None
    if tag == "b" and type(v) is bool:
        return bool(v)
    if tag == "i" and type(v) is int:
        return int(v)
    if tag == "f" and type(v) in (float, int):
        return float(v)
    if tag == "s" and type(v) is str:
        return str(v)
    if tag == "y" and type(v) is str:
        return bytes.fromhex(v)
    if tag in ("l", "t", "S", "F") and type(v) is list:
        items = [decode(x, depth + 1) for x in v]
        try:
            return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
        except TypeError as e:  # unhashable member of a set
            raise ValueError(f"malformed set: {e}") from None
    if tag == "d" and type(v) is list:
        out = {}
        for pair in v:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("malformed dict")
            try:
                out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
            except TypeError as e:  # unhashable key
                raise ValueError(f"malformed dict: {e}") from None
        return out
    raise ValueError(f"malformed value with tag {tag!r}")


class Remote:
    """Calls into the program process over its stdin/stdout pipes, under one deadline."""

    def __init__(self, to_fd: int, from_fd: int, deadline: float, max_reply: int):
        self.to_fd, self.from_fd = to_fd, from_fd
        self.deadline, self.max_reply = deadline, max_reply
        self.buf = b""
        self.failure: str | None = None
        self.calls = 0

    def fail(self, why: str) -> "ProgramFailed":
        self.failure = self.failure or why
        return ProgramFailed(why)

    def stub(self, name: str):
        def call(*args, **kwargs):
            return self.call(name, args, kwargs)
        call.__name__ = call.__qualname__ = name
        return call

    def call(self, name: str, args: tuple, kwargs: dict):
        if self.failure is not None:
            raise ProgramFailed(self.failure)
        req = json.dumps({"f": name, "a": [encode(a) for a in args],
                          "k": [[k, encode(v)] for k, v in kwargs.items()]}).encode() + b"\n"
        self.calls += 1
        self._send(req)
        try:
            reply = json.loads(self._recv_line())
            if type(reply) is not dict or len(reply) != 1:
                raise ValueError("malformed reply")
            if "v" in reply:
                return decode(reply["v"])
            err = reply.get("e")
            if type(err) is not list or len(err) != 2 or not all(type(s) is str for s in err):
                raise ValueError("malformed error reply")
        except (ValueError, RecursionError) as e:
            raise self.fail(f"bad reply from the program: {e}") from None
        kind, msg = err
        cls = getattr(builtins, kind, None) if kind.isidentifier() else None
        if (isinstance(cls, type) and issubclass(cls, Exception)
                and not issubclass(cls, Warning)):
            raise cls(msg)  # a built-in exception the test may expect (ValueError, ...)
        if kind in ("CandidateError",):
            raise CandidateError(msg)
        raise self.fail(f"{name}: {kind}: {msg}")  # SystemExit, non-plain result, load failure

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.fail("timed out")
        return left

    def _send(self, data: bytes) -> None:
        while data:
            _, w, _ = select.select([], [self.to_fd], [], self._left())
            if not w:
                continue
            try:
                n = os.write(self.to_fd, data)
            except (BrokenPipeError, OSError) as e:
                raise self.fail(f"program is gone ({type(e).__name__})") from None
            data = data[n:]

    def _recv_line(self) -> bytes:
        while b"\n" not in self.buf:
            r, _, _ = select.select([self.from_fd], [], [], self._left())
            if not r:
                continue
            chunk = os.read(self.from_fd, 1 << 16)
            if not chunk:
                raise self.fail("program exited (closed its pipe)")
            self.buf += chunk
            if len(self.buf) > self.max_reply and b"\n" not in self.buf:
                raise self.fail("reply too large")
        line, self.buf = self.buf.split(b"\n", 1)
        if len(line) > self.max_reply:
            raise self.fail("reply too large")
        return line


def free_names(source: str) -> set[str]:
    """Names `source` reads but never binds (and that are not builtins): the program's helpers."""
    loaded, bound = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return {n for n in loaded - bound if not hasattr(builtins, n)}


def _harden(caller_pid: int) -> None:
    """PR_SET_DUMPABLE 0 (same-uid processes cannot open our /proc/<pid>/{fd,mem,environ}) and
    PR_SET_PDEATHSIG SIGKILL (we die with the reward worker)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.prctl(4, 0, 0, 0, 0)
        libc.prctl(1, 9, 0, 0, 0)
    except Exception:  # noqa: BLE001 - defence in depth only
        pass
    if os.getppid() != caller_pid:
        os._exit(1)  # the worker died before PDEATHSIG took effect


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    os.close(fd)
    return data


def main() -> int:
    cfg = json.loads(sys.argv[1])
    _harden(cfg["caller_pid"])
    secret = _read_all(cfg["secret_fd"])
    spec = json.loads(sys.stdin.read())
    remote = Remote(cfg["to_fd"], cfg["from_fd"], cfg["deadline"], cfg["max_reply"])
    entry = spec["entry_point"]
    candidate = remote.stub(entry)
    ns: dict = {"__name__": "__harness__", "__builtins__": builtins}
    if spec.get("prompt"):  # trusted helpers of the label (e.g. HumanEval's poly, encode_shift)
        exec(compile(spec["prompt"], "<prompt>", "exec"), ns)
    ns[entry] = candidate
    for name in free_names(spec["test"]) - ns.keys():
        ns[name] = remote.stub(name)  # helpers only the program defines (no prompt in the label)
    exec(compile(spec["test"], "<test>", "exec"), ns)
    check = ns.get("check")
    if not callable(check):
        print("harness: the test defines no check(candidate)", file=sys.stderr)
        return 2
    try:
        check(candidate)
    except ProgramFailed as e:
        print(f"harness: program failed: {e}", file=sys.stderr)
        return 1
    if remote.failure is not None:
        print(f"harness: program failed: {remote.failure}", file=sys.stderr)
        return 1
    if remote.calls == 0:
        print("harness: check(candidate) never called the program", file=sys.stderr)
        return 1
    if time.monotonic() > remote.deadline:
        print("harness: timed out", file=sys.stderr)
        return 1
    os.write(cfg["result_fd"], secret)  # the proof that check(candidate) ran to its end
    return 0


if __name__ == "__main__":
    sys.exit(main())
