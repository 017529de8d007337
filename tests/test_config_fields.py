"""No silent settings: every field of the run config is read by the code that runs.

The test walks the whole `RunConfig` tree (every field, recursively, lists of sections such as
`rewards.functions` included) and, for each dotted key, looks for a *reading site*: an attribute
access `<expr>.<field>` in the package source whose receiver `<expr>` resolves to that field's
section. Receivers are resolved statically from the source (an AST pass, no code runs):

* names annotated with a section type (`cfg: RolloutConfig`, `functions: list[...]`), names and
  `self.` attributes assigned from a resolved expression (`alg = cfg.algorithm`), loop variables
  over a list of sections (`for spec in cfg.rewards.functions`);
* `.model`, `.rollout`, ... on a resolved `RunConfig`, or on an unresolved receiver whose name
  says it is a config (`cfg`, `self.cfg`, `run_config`);
* a section's properties count as reads of the fields they read (`rollout.call_timeout_s` reads
  `request_timeout_s` and `max_retries`), and `getattr(section, name)` counts for the fields
  named by string constants in the same module.

Not reading sites: the config modules themselves (a field read only by its own `validate()` or by
the cross-section checks of `load_config` is checked but not honoured), generic dumps
(`to_dict`, `dataclasses.asdict`), and the launcher/planner modules (`megatron_rl/launch/`,
`megatron_rl/cli/plan.py`, `megatron_rl/cli/submit.py`): a field that only `megatron-rl plan`
reads is a silent setting for `train`. Fields honoured outside the train/eval code (the `slurm`
section by `megatron-rl submit`, `algorithm.preset` by the config machinery) are listed in
`READ_ELSEWHERE` with the one module that reads them, which is checked too, so the list cannot
go stale. Nothing else is exempt: a field with no reading site fails the test, naming its
dotted key.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from megatron_rl.config import RolloutConfig, RunConfig
from megatron_rl.configurable import is_section, section, walk_fields

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "megatron_rl", ROOT / "kernels"]

# Modules whose reads do not count as honouring a field (see the module docstring).
CONFIG_MODULES = {"megatron_rl/configurable.py", "megatron_rl/config.py"}
LAUNCHER_MODULES = ("megatron_rl/launch/", "megatron_rl/cli/plan.py", "megatron_rl/cli/submit.py")

# Fields honoured outside the code that `train` and `eval` run, each with the one module that
# reads it (checked: the module must read the field). Dotted key or section prefix -> module.
READ_ELSEWHERE: dict[str, str] = {
    "slurm": "megatron_rl/launch/slurm.py",  # the sbatch job of `megatron-rl submit`
    "algorithm.preset": "megatron_rl/configurable.py",  # fills the fields the caller did not set
}

# Receiver names that are taken to hold a RunConfig (or a section) when nothing else resolves.
CONFIG_NAMES = ("cfg", "config", "conf")


@dataclasses.dataclass(frozen=True)
class Ref:
    """What an expression holds: a section instance, or a list of them."""

    cls: type
    is_list: bool = False


OTHER = Ref(object)
"""An expression known to hold something other than a section (an annotated non-config)."""


def _section_classes() -> dict[str, type]:
    """Every section class of the RunConfig tree, by class name."""
    found: dict[str, type] = {"RunConfig": RunConfig}
    todo = [RunConfig]
    while todo:
        cls = todo.pop()
        for tp in typing.get_type_hints(cls).values():
            for arg in _type_args(tp):
                if is_section(arg) and arg.__name__ not in found:
                    found[arg.__name__] = arg
                    todo.append(arg)
    return found


def _type_args(tp: typing.Any) -> Iterator[typing.Any]:
    yield tp
    for arg in typing.get_args(tp):
        yield from _type_args(arg)


SECTIONS = _section_classes()
RUN_SECTIONS = {f.name: Ref(typing.get_type_hints(RunConfig)[f.name])
                for f in dataclasses.fields(RunConfig)}


def _fields(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _child(ref: Ref, attr: str) -> Ref | None:
    """The Ref of `<ref>.<attr>` when that field is itself a section or a list of sections."""
    if ref.is_list:
        return None
    tp = _fields(ref.cls).get(attr)
    if tp is None:
        return None
    if typing.get_origin(tp) is list and is_section(typing.get_args(tp)[0]):
        return Ref(typing.get_args(tp)[0], is_list=True)
    for arg in typing.get_args(tp) or (tp,):
        if is_section(arg):
            return Ref(arg)
    return None


def _annotation_ref(node: ast.expr | None) -> Ref | None:
    """The section an annotation names (`ModelConfig`, `"RunConfig"`, `list[X]`, `X | None`);
    `OTHER` for an annotation that names something else, None for none or `Any`."""
    if node is None or (isinstance(node, ast.Name) and node.id == "Any"):
        return None
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        try:
            node = ast.parse(node.value, mode="eval").body
        except SyntaxError:
            return None
    names = [n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node)
             if isinstance(n, ast.Name | ast.Attribute)]
    hits = [SECTIONS[n] for n in names if n in SECTIONS]
    if len(set(hits)) != 1:
        return OTHER if not hits and "Any" not in names else None
    is_list = any(n in ("list", "List", "Sequence", "Iterable", "tuple") for n in names)
    return Ref(hits[0], is_list)


@dataclasses.dataclass
class Read:
    """A field read at one site."""

    cls: type
    field: str
    module: str
    line: int


class _Module(ast.NodeVisitor):
    """Collects the section field reads of one module."""

    def __init__(self, rel: str, tree: ast.Module, properties: dict[tuple[type, str], set[str]]):
        self.rel = rel
        self.tree = tree
        self.properties = properties
        self.reads: list[Read] = []
        self.strings = {n.value for n in ast.walk(tree)
                        if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        self.module_env: dict[str, Ref] = {}
        self.class_env: dict[str, dict[str, Ref]] = {}
        self._class: str | None = None
        self._env: list[dict[str, Ref]] = []

    # ---- resolution ------------------------------------------------------------------------

    def resolve(self, node: ast.expr) -> Ref | None:
        if isinstance(node, ast.Name):
            for env in [*reversed(self._env), self.module_env]:
                if node.id in env:
                    return _known(env[node.id])
            return _section_named(node.id)
        if isinstance(node, ast.Attribute):
            if _is_self(node.value) and self._class is not None:
                env = self.class_env.get(self._class, {})
                if node.attr in env:
                    return _known(env[node.attr])
                return _section_named(node.attr)
            base = self.resolve(node.value)
            if base is not None:
                return _child(base, node.attr)
            if node.attr in RUN_SECTIONS and _looks_like_config(node.value):
                return RUN_SECTIONS[node.attr]
            return None
        if isinstance(node, ast.Subscript):
            base = self.resolve(node.value)
            return Ref(base.cls) if base is not None and base.is_list else None
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "replace" and node.args:  # dataclasses.replace(section, ...)
                return self.resolve(node.args[0])
            return _returns().get(name)  # a function annotated to return a section
        if isinstance(node, ast.BoolOp):
            for value in node.values:
                ref = self.resolve(value)
                if ref is not None:
                    return ref
        if isinstance(node, ast.IfExp):
            return self.resolve(node.body) or self.resolve(node.orelse)
        return None

    def bind(self, target: ast.expr, ref: Ref | None) -> None:
        """Bind a name or `self.` attribute; one named like a section (`model`, `rollout_cfg`)
        but assigned something unresolved is marked as not a section."""
        if isinstance(target, ast.Name):
            env, name = (self._env[-1] if self._env else self.module_env), target.id
        elif (isinstance(target, ast.Attribute) and _is_self(target.value)
              and self._class is not None):
            env, name = self.class_env.setdefault(self._class, {}), target.attr
        else:
            return
        if ref is None and _section_named(name) is not None:
            ref = OTHER
        if ref is not None and env.get(name) in (None, OTHER):
            env[name] = ref

    def bind_all(self, target: ast.expr, value: ast.expr | None) -> None:
        """`a, b = x.algorithm, x.actor` binds pairwise; otherwise `target = value`."""
        if (isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                and len(target.elts) == len(value.elts)):
            for t, v in zip(target.elts, value.elts, strict=True):
                self.bind_all(t, v)
        else:
            self.bind(target, self.resolve(value) if value is not None else None)

    # ---- scopes -----------------------------------------------------------------------------

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        outer = self._class
        self._class = node.name
        env = self.class_env.setdefault(node.name, {})
        for stmt in node.body:  # dataclass-style attribute annotations
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                ref = _annotation_ref(stmt.annotation)
                if ref is not None:
                    env[stmt.target.id] = ref
        self.generic_visit(node)
        self._class = outer

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        env: dict[str, Ref] = {}
        args = node.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            ref = _annotation_ref(arg.annotation)
            if ref is not None:
                env[arg.arg] = ref
        self._env.append(env)
        self.generic_visit(node)
        self._env.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._env.append({})
        self.generic_visit(node)
        self._env.pop()

    # ---- bindings ---------------------------------------------------------------------------

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)
        for target in node.targets:
            self.bind_all(target, node.value)
            self.visit(target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        self.bind(node.target, _annotation_ref(node.annotation)
                  or (self.resolve(node.value) if node.value is not None else None))
        self.visit(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.bind(node.target, self.resolve(node.value))

    def _bind_loop(self, target: ast.expr, iterable: ast.expr) -> None:
        ref = self.resolve(iterable)
        if ref is not None and ref.is_list:
            self.bind(target, Ref(ref.cls))
        if isinstance(iterable, ast.Call) and getattr(iterable.func, "id", "") == "enumerate" \
                and iterable.args and isinstance(target, ast.Tuple) and len(target.elts) == 2:
            self._bind_loop(target.elts[1], iterable.args[0])

    def visit_For(self, node: ast.For) -> None:
        self.visit(node.iter)
        self._bind_loop(node.target, node.iter)
        for stmt in [*node.body, *node.orelse]:
            self.visit(stmt)

    def visit_comprehension(self, node: ast.comprehension) -> None:
        self.visit(node.iter)
        self._bind_loop(node.target, node.iter)
        for cond in node.ifs:
            self.visit(cond)

    def _visit_comp(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp,
                    *elts: ast.expr) -> None:
        self._env.append({})
        for gen in node.generators:
            self.visit(gen)
        for elt in elts:
            self.visit(elt)
        self._env.pop()

    def visit_ListComp(self, node: ast.ListComp) -> None:
        self._visit_comp(node, node.elt)

    visit_SetComp = visit_GeneratorExp = visit_ListComp  # type: ignore[assignment]

    def visit_DictComp(self, node: ast.DictComp) -> None:
        self._visit_comp(node, node.key, node.value)

    # ---- reads ------------------------------------------------------------------------------

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.generic_visit(node)
        if not isinstance(node.ctx, ast.Load):
            return
        ref = self.resolve(node.value)
        if ref is None or ref.is_list:
            return
        self.record(ref.cls, node.attr, node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        if getattr(node.func, "id", "") != "getattr" or len(node.args) < 2:
            return
        ref = self.resolve(node.args[0])
        if ref is None or ref.is_list:
            return
        name = node.args[1]
        if isinstance(name, ast.Constant) and isinstance(name.value, str):
            self.record(ref.cls, name.value, node.lineno)
        else:  # getattr(section, k) over names listed in this module
            for field in _fields(ref.cls):
                if field in self.strings:
                    self.record(ref.cls, field, node.lineno)

    def record(self, cls: type, attr: str, line: int) -> None:
        if attr in _fields(cls):
            self.reads.append(Read(cls, attr, self.rel, line))
        for field in self.properties.get((cls, attr), ()):
            self.reads.append(Read(cls, field, self.rel, line))


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def _known(ref: Ref) -> Ref | None:
    return None if ref is OTHER else ref


def _section_named(name: str) -> Ref | None:
    """The section a name spells when nothing else resolves it: `rollout`, `model_cfg`,
    `self.parallel_cfg`, `algorithm_config`."""
    name = name.strip("_").removesuffix("_cfg").removesuffix("_config")
    return RUN_SECTIONS.get(name)


def _looks_like_config(node: ast.expr) -> bool:
    """`cfg`, `self.cfg`, `run_config`, `self._config`: names that hold a config by convention."""
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    name = name.lower().strip("_")
    return any(name == c or name.endswith("_" + c) or name.startswith(c + "_")
               for c in CONFIG_NAMES)


def _properties() -> dict[tuple[type, str], set[str]]:
    """(section, property) -> the fields the property reads from `self`."""
    out: dict[tuple[type, str], set[str]] = {}
    for cls in SECTIONS.values():
        for name, value in vars(cls).items():
            if isinstance(value, property) and value.fget is not None:
                code = value.fget.__code__
                out[(cls, name)] = {n for n in code.co_names if n in _fields(cls)}
    return out


def _python_files() -> Iterator[Path]:
    for root in SOURCES:
        yield from sorted(root.rglob("*.py"))


@cache
def _trees() -> dict[str, ast.Module]:
    """Every module of the package source, parsed, by path relative to the repository."""
    return {path.relative_to(ROOT).as_posix(): ast.parse(path.read_text(encoding="utf-8"))
            for path in _python_files()}


@cache
def _returns() -> dict[str, Ref]:
    """Functions annotated to return a section (`load_config -> RunConfig`), by name; a name
    defined twice with different returns is left out."""
    found: dict[str, Ref | None] = {}
    for tree in _trees().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                ref = _known(_annotation_ref(node.returns) or OTHER)
                if ref is not None:
                    found[node.name] = ref if found.get(node.name, ref) == ref else None
    return {name: ref for name, ref in found.items() if ref is not None}


@cache
def all_reads() -> list[Read]:
    """Every section field read in the package source, config modules excluded."""
    properties = _properties()
    section_modules = {cls.__module__ for cls in SECTIONS.values()}
    reads: list[Read] = []
    for rel, tree in _trees().items():
        if rel in CONFIG_MODULES:
            continue
        module = _Module(rel, tree, properties)
        module.visit(tree)  # first pass: bindings (self. attributes set in later methods)
        module.reads = []
        module.visit(tree)
        module_name = rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        if module_name in section_modules:  # validate() and properties are not honouring
            owned = {c.__name__ for c in SECTIONS.values() if c.__module__ == module_name}
            spans = [(n.lineno, n.end_lineno or n.lineno) for n in ast.walk(tree)
                     if isinstance(n, ast.ClassDef) and n.name in owned]
            module.reads = [r for r in module.reads
                            if not any(a <= r.line <= b for a, b in spans)]
        reads += module.reads
    return reads


def _is_launcher(module: str) -> bool:
    return module.startswith(LAUNCHER_MODULES)


def _reading_sites(cls: type, field: str, *, launcher: bool) -> list[str]:
    return sorted({f"{r.module}:{r.line}" for r in all_reads()
                   if r.cls is cls and r.field == field and _is_launcher(r.module) == launcher})


def _entry(table: dict[str, str], key: str) -> str | None:
    """The table's value for `key` or for the nearest section prefix of it."""
    parts = key.replace("[]", "").split(".")
    for n in range(len(parts), 0, -1):
        hit = table.get(".".join(parts[:n]))
        if hit is not None:
            return hit
    return None


def _module_reads(module: str, cls: type, field: str) -> bool:
    """Whether `module` reads `cls.field`: a resolved read, or for the config machinery (not
    analysed) the field's name as an attribute or a string (`kwargs.get("preset")`)."""
    if any(r.module == module and r.cls is cls and r.field == field for r in all_reads()):
        return True
    if module not in CONFIG_MODULES:
        return False
    source = (ROOT / module).read_text(encoding="utf-8")
    return re.search(rf"""(\.{field}\b|["']{field}["'])""", source) is not None


def unread_fields(root: type) -> list[str]:
    """`<dotted key>: <why>` for every field below section `root` that no code honours."""
    unread = []
    for key, cls, field in walk_fields(root):
        elsewhere = _entry(READ_ELSEWHERE, key)
        if elsewhere is not None:
            if not _module_reads(elsewhere, cls, field):
                unread.append(f"{key}: READ_ELSEWHERE names {elsewhere}, which does not read it")
        elif not _reading_sites(cls, field, launcher=False):
            launcher = ", ".join(_reading_sites(cls, field, launcher=True))
            unread.append(f"{key}: " + (f"only the launcher/planner reads it ({launcher})"
                                        if launcher else "no module reads it"))
    return unread


def test_the_walk_covers_the_whole_tree() -> None:
    """The walk reaches nested sections and lists of sections, so new sections are seen."""
    keys = {key for key, _, _ in walk_fields(RunConfig)}
    assert {"model.num_layers", "rewards.functions[].weight", "rewards.functions[].kwargs",
            "slurm.job_name", "eval.k", "train.steps"} <= keys
    assert not any(key in keys for key in RUN_SECTIONS)  # sections are walked into, not leaves
    assert len(keys) > 150


def test_every_config_field_is_read_by_the_code_that_runs() -> None:
    """Each dotted field has a reading site outside the config modules and the launcher, or is
    read by the module READ_ELSEWHERE names; otherwise it is a silent setting."""
    unread = unread_fields(RunConfig)
    assert not unread, ("config fields that nothing honours (read them where they take effect, "
                        "refuse them with a ConfigError, or list a launcher-only field in "
                        "READ_ELSEWHERE with its module): " + "; ".join(unread))


def test_read_elsewhere_names_real_fields_and_modules() -> None:
    """READ_ELSEWHERE keys are dotted keys or section prefixes; its modules exist."""
    keys = [key.replace("[]", "") for key, _, _ in walk_fields(RunConfig)]
    for entry, module in READ_ELSEWHERE.items():
        assert any(k == entry or k.startswith(entry + ".") for k in keys), entry
        assert (ROOT / module).is_file(), module


@section
class _Probe:
    """A section whose one field nothing reads."""

    never_read_by_anything: int = 0


@section
class _ProbeRoot:
    """A run config with one section more: the walk must find the new field unread."""

    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    probe: _Probe = dataclasses.field(default_factory=_Probe)
    probes: list[_Probe] = dataclasses.field(default_factory=list)


def test_the_walk_fails_on_a_field_nobody_reads() -> None:
    """The check can fail: a field added to a section (or to a list of sections) and read
    nowhere is reported by its dotted key; the read fields around it are not."""
    assert unread_fields(_ProbeRoot) == ["probe.never_read_by_anything: no module reads it",
                                         "probes[].never_read_by_anything: no module reads it"]
    # a section's properties count for the fields they read (rollout.call_timeout_s)
    assert _reading_sites(RolloutConfig, "max_retries", launcher=False)
