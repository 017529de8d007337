"""Typed configuration machinery: config sections as strict pydantic dataclasses.

Every section of the run config is a keyword-only frozen dataclass owned by the component that
uses it, declared with `@section`. That makes it a pydantic dataclass in strict mode with unknown
keys forbidden, so pydantic does the type checking (int is accepted for float and stored as a
float; bool is never an int or a float; no string is parsed into a number), and it adds what is
ours, for configs built from YAML and in Python alike:

* a section's `PRESETS` table fills the fields the caller did not pass (`preset="dapo"`);
* a section's `validate()` (field-level range checks) runs on every construction, including
  `dataclasses.replace`;
* every error is one `ConfigError` line naming the dotted key, with close-match suggestions for
  unknown keys:

    config error: <dotted.key>: <what is wrong>; <allowed values / fix>

`from_dict` builds a section tree from nested dicts (YAML plus dotted `a.b.c=value` overrides,
see `apply_overrides`), building nested sections itself because pydantic's strict dataclasses
accept only instances for nested dataclass fields, and prefixing errors with the full path.

It imports only the standard library, PyYAML and pydantic, so configs load without torch.
"""

import copy
import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, Union

import pydantic
import pydantic.dataclasses
import yaml

T = TypeVar("T")

_MISSING = dataclasses.MISSING

SECTION_CONFIG = pydantic.ConfigDict(strict=True, extra="forbid")
"""pydantic settings of every section: strict types, unknown keys refused."""


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or inconsistent.

    `key` is the dotted key the message names (empty when built from a bare message); `from_dict`
    uses it to prefix section paths onto errors raised while building a nested section.
    """

    def __init__(self, message: str, key: str = "", problem: str = "", fix: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.problem = problem
        self.fix = fix

    def with_prefix(self, prefix: str) -> "ConfigError":
        """The same error with `prefix.` put in front of its key (used for nested sections)."""
        if not prefix:
            return self
        if not self.key:  # built from a bare message: keep it whole
            return config_error(prefix, str(self).removeprefix("config error: "))
        return config_error(f"{prefix}.{self.key}", self.problem, self.fix)


def config_error(key: str, problem: str, fix: str = "") -> ConfigError:
    """Build a one-line `ConfigError`: `config error: <key>: <problem>; <fix>`."""
    text = f"config error: {key}: {problem}" + (f"; {fix}" if fix else "")
    return ConfigError(" ".join(text.split()), key=key, problem=problem, fix=fix)


def require(cond: bool, key: str, problem: str, fix: str = "") -> None:
    """Raise `config_error(key, problem, fix)` unless `cond` holds; for sections' `validate()`."""
    if not cond:
        raise config_error(key, problem, fix)


def require_positive(obj: Any, *names: str) -> None:
    """Require each named numeric field of `obj` (if not None) to be > 0."""
    for name in names:
        value = getattr(obj, name)
        require(value is None or value > 0, name, f"must be > 0, got {value!r}",
                "use a positive value")


def require_non_negative(obj: Any, *names: str) -> None:
    """Require each named numeric field of `obj` (if not None) to be >= 0."""
    for name in names:
        value = getattr(obj, name)
        require(value is None or value >= 0, name, f"must be >= 0, got {value!r}",
                "use zero or a positive value")


def divisors(n: int) -> list[int]:
    """Positive divisors of n, for 'choose one of ...' hints."""
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else []


def one_of(values: Iterable[Any]) -> str:
    """`{1, 2, 4}`: a set of allowed values as shown in messages."""
    return "{" + ", ".join(str(v) for v in values) + "}"


# --------------------------------------------------------------------------------------------
# YAML: PyYAML follows YAML 1.1, where `1e-6` (no dot) is a string. Configs are full of such
# learning rates, so our loader also resolves exponent-only floats.
# --------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-6`, `5E+3` as floats (YAML 1.2 behaviour)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML text safely (no tags), reading `1e-6` as a float."""
    return yaml.load(text, Loader=_Loader)  # safe: _Loader derives from SafeLoader


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@typing.dataclass_transform(kw_only_default=True, frozen_default=True,
                            field_specifiers=(dataclasses.field,))
def section(cls: type[T]) -> type[T]:
    """Make `cls` a config section: a frozen, keyword-only, strict pydantic dataclass.

    On every construction (keywords, `from_dict`, `dataclasses.replace`): `cls.PRESETS[preset]`
    (when the class has a `PRESETS` table and the caller passed `preset`) fills the fields the
    caller did not pass; pydantic checks the types; `cls.validate()` (if defined) checks ranges.
    Any failure is a one-line `ConfigError` naming the field. `dataclasses.replace` passes every
    field, so it re-validates without re-applying a preset over the values already there.
    """
    if "__post_init__" in vars(cls):
        raise TypeError(f"{cls.__name__}: sections check themselves in validate(), "
                        "not __post_init__")

    def __post_init__(self: Any) -> None:
        validate = getattr(self, "validate", None)
        if validate is not None:
            validate()

    cls.__post_init__ = __post_init__  # type: ignore[attr-defined]
    built = pydantic.dataclasses.dataclass(cls, frozen=True, kw_only=True,
                                           config=SECTION_CONFIG)
    pydantic_init = built.__init__

    @functools.wraps(pydantic_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs = _with_preset(type(self), kwargs)
        try:
            pydantic_init(self, *args, **kwargs)
        except pydantic.ValidationError as err:
            raise _config_error_of(type(self), err, kwargs) from None

    built.__init__ = __init__  # type: ignore[method-assign]
    return typing.cast(type[T], built)


def is_section(tp: Any) -> bool:
    """Whether `tp` is a config section class (a dataclass, in practice one made by `section`)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _with_preset(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with `cls.PRESETS[kwargs['preset']]` merged *under* them, so given keys win.

    An unknown preset name is left for pydantic to refuse (with the allowed names).
    """
    presets = getattr(cls, "PRESETS", None)
    name = kwargs.get("preset")
    if not presets or not isinstance(name, str) or name not in presets:
        return kwargs
    return {**presets[name], **kwargs}


# --------------------------------------------------------------------------------------------
# pydantic errors -> one-line ConfigErrors
# --------------------------------------------------------------------------------------------


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _unwrap_optional(tp: Any) -> Any:
    """`X` for `X | None`; anything else unchanged."""
    if _is_union(tp):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def type_name(tp: Any) -> str:
    """Human-readable name of an annotation, as shown in error messages."""
    if tp is Any:
        return "any value"
    if tp is type(None):
        return "null"
    if _is_union(tp):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(_fmt_literal(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"dict[{type_name(k)}, {type_name(v)}]"
    if is_section(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _fmt_literal(value: Any) -> str:
    return "null" if value is None else str(value)


def _describe(value: Any) -> str:
    """`str 'two'`, `int 3`: the type and a short repr of a bad value."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _locate(cls: type, loc: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[str, Any, Any]:
    """(dotted key, annotation, value) that pydantic error location `loc` points at.

    Follows list indices (`k[1]`) and dict keys (`task_kwargs.x`) below the field; stops at a
    union (pydantic then reports each member; we report the union as a whole).
    """
    name = str(loc[0])
    key, tp, value = name, typing.get_type_hints(cls).get(name, Any), kwargs.get(name)
    rest = list(loc[1:])
    while rest:
        inner = _unwrap_optional(tp)
        origin = typing.get_origin(inner)
        part = rest.pop(0)
        if origin is list and isinstance(part, int) and isinstance(value, list):
            key, tp, value = f"{key}[{part}]", typing.get_args(inner)[0], value[part]
        elif origin is dict and isinstance(value, Mapping) and part in value:
            key_tp, item_tp = typing.get_args(inner)
            if rest[:1] == ["[key]"]:
                return f"{key} (key {part!r})", key_tp, part
            key, tp, value = f"{key}.{part}", item_tp, value[part]
        else:
            break
    return key, tp, value


def _config_error_of(cls: type, err: pydantic.ValidationError,
                     kwargs: Mapping[str, Any]) -> ConfigError:
    """The first error pydantic found building `cls(**kwargs)`, as a one-line ConfigError."""
    first = err.errors(include_url=False)[0]
    kind, loc, ctx = first["type"], first["loc"], first.get("ctx") or {}
    if isinstance(ctx.get("error"), ConfigError):  # raised by the section's validate()
        return ctx["error"]
    if not loc:
        return config_error(cls.__name__, first["msg"])
    if kind == "unexpected_keyword_argument":
        return _unknown_key(str(loc[0]), str(loc[0]), field_names(cls), "")
    key, tp, value = _locate(cls, loc, kwargs)
    if kind in ("missing", "missing_argument", "missing_keyword_only_argument"):
        return config_error(key, "missing required key", f"expected {type_name(tp)}")
    allowed = typing.get_args(_unwrap_optional(tp))
    if kind == "literal_error" and typing.get_origin(_unwrap_optional(tp)) is Literal:
        names = [_fmt_literal(a) for a in allowed]
        if _unwrap_optional(tp) is not tp:
            names.append("null")
        return config_error(key, f"{value!r} is not allowed", "allowed values: " + ", ".join(names))
    if kind == "dataclass_exact_type":
        return config_error(key, f"got {_describe(value)}",
                            f"expected a {ctx.get('class_name', 'section')} instance "
                            "(from_dict builds one from a mapping)")
    return config_error(key, f"got {_describe(value)}", f"expected {type_name(tp)}")


def _unknown_key(key: str, name: str, valid: Iterable[str], section: str) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    where = f" of {section}" if section else ""
    return config_error(key, "unknown key", f"{hint}valid keys{where}: {', '.join(valid)}")


# --------------------------------------------------------------------------------------------
# Building sections from dicts, and back
# --------------------------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build section `cls` from a mapping; keys absent take the preset's or the defaults.

    Nested sections (and lists or dicts of them) are built from their mappings first; then the
    section is constructed, so pydantic checks every value and `validate()` runs. Errors name the
    full dotted key (`prefix.key`); unknown keys also list the valid keys.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise config_error(prefix or "<root>", f"got {_describe(data)}",
                           f"expected a mapping with keys: {', '.join(field_names(cls))}")
    names = field_names(cls)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in names:
            raise _unknown_key(_join(prefix, str(name)), str(name), names, prefix)
        kwargs[name] = _build(value, hints[name], _join(prefix, name))
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.with_prefix(prefix) from None


def _build(value: Any, tp: Any, key: str) -> Any:
    """`value` with the mappings that stand for sections in annotation `tp` built into them
    (and tuples for lists made lists, as YAML never gives them); other values are left for
    pydantic to check."""
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if is_section(tp) and isinstance(value, Mapping):
        return from_dict(tp, value, key)
    if is_section(tp) and value is not None and not isinstance(value, tp):
        raise config_error(key, f"got {_describe(value)}",
                           f"expected a mapping with keys: {', '.join(field_names(tp))}")
    if origin is list and isinstance(value, list | tuple):
        (item_tp,) = typing.get_args(tp)
        return [_build(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict and isinstance(value, Mapping):
        item_tp = typing.get_args(tp)[1]
        return {k: _build(v, item_tp, f"{key}.{k}") for k, v in value.items()}
    return value


def field_names(cls: type) -> list[str]:
    """Names of a dataclass's init fields, sorted (for 'valid keys' messages)."""
    return sorted(f.name for f in dataclasses.fields(cls) if f.init)


def to_dict(obj: Any) -> Any:
    """Plain dict/list/scalar form of a (nested) dataclass, suitable for YAML."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


def walk_fields(cls: type, prefix: str = "") -> list[tuple[str, type, str]]:
    """(dotted key, owning section, field name) of every leaf field below section `cls`.

    Lists and dicts of sections appear once, as `key[]` (`rewards.functions[].weight`).
    """
    out: list[tuple[str, type, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _unwrap_optional(hints[f.name])
        origin = typing.get_origin(tp)
        item = (typing.get_args(tp)[0] if origin is list else typing.get_args(tp)[1]
                if origin is dict else None)
        if is_section(tp):
            out += walk_fields(tp, _join(prefix, f.name))
        elif item is not None and is_section(item):
            out += walk_fields(item, _join(prefix, f.name) + "[]")
        else:
            out.append((_join(prefix, f.name), cls, f.name))
    return out


# --------------------------------------------------------------------------------------------
# Dotted overrides: `a.b.c=value`
# --------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b.c=value` into (`a.b.c`, parsed value); the value is read as YAML."""
    path, sep, raw = text.partition("=")
    path = path.strip()
    if not sep or not path:
        raise config_error(text or "<empty>", "override is not of the form key=value",
                           "write e.g. parallel.tp=2")
    try:
        return path, yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = f"cannot parse value {raw!r} as YAML ({type(err).__name__})"
        raise config_error(path, problem, "quote strings or write [a, b] for lists") from None


def _step(cls_or_tp: Any, node: Any, part: str, key: str, parent: str) -> tuple[Any, Any]:
    """Resolve one path segment: return (the child's annotation, the child container key)."""
    tp = _unwrap_optional(cls_or_tp)
    if is_section(tp):
        hints = typing.get_type_hints(tp)
        if part not in field_names(tp):
            raise _unknown_key(key, part, field_names(tp), parent)
        return hints[part], part
    origin = typing.get_origin(tp)
    if origin is dict:
        return typing.get_args(tp)[1], part
    if tp is Any and isinstance(node, Mapping | type(None)):
        return Any, part
    if origin is list or (tp is Any and isinstance(node, list)):
        item_tp = typing.get_args(tp)[0] if origin is list else Any
        size = len(node) if isinstance(node, list) else 0
        if not part.isdigit() or int(part) >= size:
            raise config_error(key, f"not an index of {parent} (it has {size} items)",
                               f"use 0..{size - 1} or set the whole list: {parent}=[...]")
        return item_tp, int(part)
    raise config_error(key, f"{parent} is {type_name(tp)}, it has no sub-keys",
                       f"set {parent}=<value> instead")


def _empty_child(owner: Any, name: str, tp: Any) -> Any:
    """Container to create for a missing path segment: {} for sections and dicts (so presets
    still see which keys were given), the field's default items for lists (so `.0.` indexes)."""
    if typing.get_origin(_unwrap_optional(tp)) is not list or not is_section(owner):
        return {}
    field = next(f for f in dataclasses.fields(owner) if f.name == name)
    if field.default_factory is not _MISSING:
        return to_dict(field.default_factory())
    return to_dict(field.default) if isinstance(field.default, list) else []


def set_dotted(cls: type, data: dict[str, Any], path: str, value: Any) -> None:
    """Set `data[a][b][c] = value` for `path` 'a.b.c', checking each segment against `cls`.

    Missing intermediate sections are created empty; list items are addressed by index
    (`rewards.functions.0.weight`). Unknown segments fail naming the dotted key and listing
    the valid keys. Value types are checked later, when `from_dict` builds the sections.
    """
    parts = path.split(".")
    tp: Any = cls
    node: Any = data
    for depth, part in enumerate(parts):
        key = ".".join(parts[: depth + 1])
        owner = _unwrap_optional(tp)
        tp, slot = _step(tp, node, part, key, ".".join(parts[:depth]))
        if depth == len(parts) - 1:
            node[slot] = value
            return
        child = node[slot] if isinstance(node, list) else node.get(slot)
        if child is None:
            child = node[slot] = _empty_child(owner, part, tp)
        elif not isinstance(child, Mapping | list):
            raise config_error(key, f"is {_describe(child)}, cannot set {path} inside it",
                               f"expected {type_name(tp)}")
        node = child


def apply_overrides(cls: type, data: Mapping[str, Any], overrides: Iterable[str]) -> dict:
    """Return a deep copy of `data` with each `a.b.c=value` override applied (in order)."""
    out = copy.deepcopy(dict(data))
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(cls, out, path, value)
    return out

