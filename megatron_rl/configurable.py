"""Typed configuration machinery: frozen dataclasses built from plain dicts (YAML).

Every section of the run config is a keyword-only frozen dataclass owned by the component that
uses it. This module turns a nested dict (from YAML plus dotted overrides) into those dataclasses,
type-checking each value against its field annotation, and gives sections small helpers so every
error reads the same, on one line:

    config error: <dotted.key>: <what is wrong>; <allowed values / fix>

It imports only the standard library and PyYAML, so configs can be loaded without torch.
"""

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or inconsistent.

    `key` is the dotted key the message names (empty when built from a bare message); the loader
    uses it to prefix section names onto errors raised by a section's own `validate()`.
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
        key = f"{prefix}.{self.key}" if self.key else prefix
        return config_error(key, self.problem, self.fix)


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
# Type names and value checking
# --------------------------------------------------------------------------------------------


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


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
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _fmt_literal(value: Any) -> str:
    return "null" if value is None else str(value)


def _describe(value: Any) -> str:
    """`str 'two'`, `int 3`: the type and a short repr of a bad value."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _type_error(key: str, value: Any, tp: Any) -> ConfigError:
    return config_error(key, f"got {_describe(value)}", f"expected {type_name(tp)}")


def check_value(value: Any, tp: Any, key: str) -> Any:
    """Return `value` checked (and lightly converted) against annotation `tp`.

    int is accepted for float (converted); bool is never accepted as int or float; nested
    dataclasses are built from mappings. Raises ConfigError naming `key` otherwise.
    """
    if tp is Any:
        return copy.deepcopy(value)
    if _is_union(tp):
        return _check_union(value, tp, key)
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if any(type(value) is type(a) and value == a for a in allowed):
            return value
        raise config_error(key, f"{value!r} is not allowed",
                           "allowed values: " + ", ".join(_fmt_literal(a) for a in allowed))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise _type_error(key, value, tp)
        (item_tp,) = typing.get_args(tp)
        return [check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(key, value, tp)
        key_tp, item_tp = typing.get_args(tp)
        return {check_value(k, key_tp, f"{key} (key)"): check_value(v, item_tp, f"{key}.{k}")
                for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, key)
    return _check_scalar(value, tp, key)


def _check_union(value: Any, tp: Any, key: str) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # X | None: report X's own message (e.g. the allowed Literal values)
        try:
            return check_value(value, options[0], key)
        except ConfigError as err:
            if typing.get_origin(options[0]) is not Literal or err.key != key:
                raise
            raise config_error(key, err.problem, f"{err.fix}, null") from None
    for option in options:
        try:
            return check_value(value, option, key)
        except ConfigError:
            continue
    raise _type_error(key, value, tp)


def _check_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise _type_error(key, value, tp)
    return value


# --------------------------------------------------------------------------------------------
# Building dataclasses from dicts
# --------------------------------------------------------------------------------------------


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unknown_key(key: str, name: str, valid: Iterable[str], section: str) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    where = f"of {section}" if section else "at the top level"
    return config_error(key, "unknown key", f"{hint}valid keys {where}: {', '.join(valid)}")


def _apply_preset(cls: type, data: dict[str, Any], hints: dict[str, Any], prefix: str) -> dict:
    """Merge `cls.PRESETS[data['preset']]` *under* `data`, so keys the user gave win.

    A section opts in by declaring a `preset` field and a `PRESETS: ClassVar[dict[str, dict]]`
    table; keys absent from `data` (not given in YAML or overrides) take the preset's values.
    """
    presets = getattr(cls, "PRESETS", None)
    if not presets or data.get("preset") is None:
        return data
    name = check_value(data["preset"], hints["preset"], _join(prefix, "preset"))
    return {**presets.get(name, {}), **data}


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, type-checking every value; keys absent use defaults.

    Unknown keys fail naming the full dotted key (`prefix.key`) and listing the valid keys.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise config_error(prefix or "<root>", f"got {_describe(data)}",
                           f"expected a mapping with keys: {', '.join(field_names(cls))}")
    hints = typing.get_type_hints(cls)
    data = _apply_preset(cls, dict(data), hints, prefix)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for name in data:
        if name not in fields:
            raise _unknown_key(_join(prefix, str(name)), str(name), fields, prefix)
    kwargs = {}
    for name, field in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = check_value(data[name], hints[name], key)
        elif field.default is _MISSING and field.default_factory is _MISSING:
            raise config_error(key, "missing required key", f"set {key} ({type_name(hints[name])})")
    return cls(**kwargs)


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


def validate_tree(obj: Any, prefix: str = "") -> None:
    """Call `validate()` on `obj` and every nested section, prefixing error keys with their path.

    Sections raise errors keyed by their own field names (`num_layers`); this walk turns them into
    full dotted keys (`model.num_layers`, `rewards.functions[0].name`).
    """
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        return
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, list):
            for i, item in enumerate(value):
                validate_tree(item, _join(prefix, f"{field.name}[{i}]"))
        else:
            validate_tree(value, _join(prefix, field.name))
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as err:
            raise err.with_prefix(prefix) from None


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


def _unwrap_optional(tp: Any) -> Any:
    if _is_union(tp):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _step(cls_or_tp: Any, node: Any, part: str, key: str, parent: str) -> tuple[Any, Any]:
    """Resolve one path segment: return (the child's annotation, the child container key)."""
    tp = _unwrap_optional(cls_or_tp)
    if dataclasses.is_dataclass(tp):
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
    if typing.get_origin(_unwrap_optional(tp)) is not list or not dataclasses.is_dataclass(owner):
        return {}
    field = next(f for f in dataclasses.fields(owner) if f.name == name)
    if field.default_factory is not _MISSING:
        return to_dict(field.default_factory())
    return to_dict(field.default) if isinstance(field.default, list) else []


def set_dotted(cls: type, data: dict[str, Any], path: str, value: Any) -> None:
    """Set `data[a][b][c] = value` for `path` 'a.b.c', checking each segment against `cls`.

    Missing intermediate sections are created empty; list items are addressed by index
    (`rewards.functions.0.weight`). Unknown segments fail naming the dotted key and listing
    the valid keys. Value types are checked later, by `from_dict`.
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
