"""Options: one typed grammar for YAML files, `key=value` overrides and Python keyword arguments.

Every config of the package is a frozen dataclass with `ConfigMixin`. Its field types are the
grammar: `check_fields` turns what YAML, JSON or a command line gave into the field's type, or
refuses it with a message naming the field, the value and what is allowed. YAML is read as
YAML 1.2 (the version the YAML spec has had since 2009): `1e-3` is a float, `no` / `off` /
`yes` are strings, only `true` / `false` are booleans, and a key given twice is an error.

    lr=5e-4            -> 0.0005 (float field)
    mixed_precision=no -> "no"   (a Literal["no", "bf16", "fp16"] field)
    lock_image=false   -> False; lock_image='false', =no or =0 are refused (a bool field)
    class_names=abc    -> refused (a list field); class_names=[a, b] -> ("a", "b")
    vision_overrides.depth=4 -> {"depth": 4} merged into the mapping field
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

C = TypeVar("C", bound="ConfigMixin")

# ---------------------------------------------------------------------------- YAML 1.2


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema scalars and duplicate keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_Yaml12Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 16) if text.startswith("0x") else int(text)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).lower()
    if text.endswith("inf"):
        return -math.inf if text.startswith("-") else math.inf
    return math.nan if text.endswith("nan") else float(text)


_Yaml12Loader.add_constructor(_INT, _construct_int)
_Yaml12Loader.add_constructor(_FLOAT, _construct_float)


def parse_yaml(text: str, where: str = "YAML") -> Any:
    """Parse YAML 1.2 text (see the module docstring).

    Raises:
        ValueError: Not valid YAML, or a key given twice (the message names `where` and the line).
    """
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: {' '.join(str(err).split())}") from None


def read_yaml_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping in a YAML file (an empty file is `{}`).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not YAML, a duplicate key, or not a mapping at the top.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = parse_yaml(path.read_text(), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of fields at the top, found {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------- field types


def at_least(minimum: int | float, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose value (when not `None`) must be `>= minimum`; for a tuple
    field, each item."""
    return dataclasses.field(default=default, metadata={"min": minimum})


def _describe(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin in (tuple, list, Sequence):
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list (each item {_describe(args[0])})"
        if args:
            return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
        return "a list"
    if origin in (dict, Mapping) or annotation is dict:
        return "a mapping"
    if annotation is Any:
        return "anything"
    return {bool: "true or false", int: "an int", float: "a number", str: "a string", Path: "a path"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


class _Mismatch(Exception):
    pass


def _coerce(value: Any, annotation: Any) -> Any:
    """`value` as `annotation` (lists become tuples, ints floats, dicts nested configs) or
    raise `_Mismatch`. Strings are never read as numbers or booleans here: that is YAML's job."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise _Mismatch
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option)
            except _Mismatch:
                continue
        raise _Mismatch
    if annotation is type(None):
        if value is None:
            return None
        raise _Mismatch
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if annotation is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if annotation is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise _Mismatch
    if origin in (tuple, list, Sequence):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if args:
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        return tuple(value)
    if origin in (dict, Mapping) or annotation is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        value_type = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, value_type) for k, v in value.items()}
    if isinstance(annotation, type) and issubclass(annotation, ConfigMixin):
        if isinstance(value, annotation):
            return value
        if isinstance(value, Mapping):
            return annotation.from_dict(dict(value))
        raise _Mismatch
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _Mismatch
    return value  # an annotation this grammar does not describe: the config checks it


def _shown(value: Any) -> str:
    return f"the string {value!r}" if isinstance(value, str) else repr(value)


def check_fields(config: Any) -> None:
    """Bring every field of a dataclass instance to its annotated type and check `at_least`
    bounds, in place (the dataclass may be frozen).

    Raises:
        ValueError: A field whose value does not fit its type, naming field, value and type.
    """
    cls = type(config)
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(config, f.name)
        try:
            coerced = _coerce(value, hints[f.name])
        except _Mismatch:
            raise ValueError(
                f"{cls.__name__}.{f.name} must be {_describe(hints[f.name])}, got {_shown(value)}"
            ) from None
        except ValueError as err:  # a nested config's own message
            raise ValueError(f"{cls.__name__}.{f.name}: {err}") from None
        minimum = f.metadata.get("min")
        items = coerced if isinstance(coerced, tuple) else (coerced,)  # a bound holds for each item
        if minimum is not None and any(v is not None and v < minimum for v in items):
            each = "each item of " if isinstance(coerced, tuple) else ""
            raise ValueError(f"{each}{cls.__name__}.{f.name} must be >= {minimum}, got {coerced!r}")
        if coerced is not value:
            object.__setattr__(config, f.name, coerced)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


# ---------------------------------------------------------------------------- the mixin


class ConfigMixin:
    """`replace`, `to_dict`, `from_dict` and typed checking for a frozen dataclass config.

    A subclass calls `check_fields(self)` first in its `__post_init__` (or inherits the one
    here) and adds only the rules that involve several fields.
    """

    def __post_init__(self) -> None:
        check_fields(self)

    def replace(self: C, **changes: Any) -> C:
        """A copy with `changes` applied and validated again.

        Raises:
            ValueError: A name that is not a field (the fields are listed).
        """
        _check_names(type(self), changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain types (tuples as lists, nested configs as mappings), ready for JSON or YAML."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from a mapping (a `config.json`, YAML); `model_type` is skipped.

        Raises:
            ValueError: Not a mapping, an unknown key (the known ones are listed), a missing
                field that has no default, or a value that does not fit its field.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a {cls.__name__} must be a mapping of fields, got {type(data).__name__}")
        data = {k: v for k, v in data.items() if k != "model_type"}
        _check_names(cls, data)
        missing = [
            f.name for f in dataclasses.fields(cls)
            if f.init and f.name not in data
            and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ValueError(f"a {cls.__name__} needs the fields {missing}; they have no default")
        return cls(**data)

    @classmethod
    def from_yaml(cls: type[C], path: str | os.PathLike, overrides: Sequence[str] = ()) -> C:
        """Read a YAML 1.2 file of fields, then apply `key=value` overrides."""
        return cls.from_dict(apply_overrides(cls, read_yaml_file(path), overrides))

    def with_overrides(self: C, overrides: Sequence[str]) -> C:
        """A copy with command-line `key=value` overrides applied (see `parse_override`)."""
        return type(self).from_dict(apply_overrides(type(self), self.to_dict(), overrides))


def _check_names(cls: type, data: Mapping[str, Any]) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {', '.join(sorted(known))}")


def _plain(value: Any) -> Any:
    if isinstance(value, ConfigMixin):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------------------- overrides


def parse_override(cls: type, item: str) -> tuple[str, str | None, Any]:
    """Split one `key=value` (or `key.sub=value` for a mapping field) of `cls`'s fields.

    The value is YAML 1.2 flow text (`5e-4`, `true`, `[64, 96]`, `{depth: 4}`, `null`); for
    a field that takes a string, text YAML would read as a number stays the text
    (`output_dir=2024`). Dashes in the key are read as underscores.

    Returns:
        `(field, sub_key or None, value)`.

    Raises:
        ValueError: Not `key=value`, an unknown field, or a sub-key of a non-mapping field.
    """
    key, sep, raw = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ValueError(f"override {item!r} must look like key=value (e.g. lr=1e-3)")
    name, _, sub = key.partition(".")
    hints = _hints(cls)
    if name not in hints or name not in {f.name for f in dataclasses.fields(cls)}:
        known = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
        raise ValueError(f"unknown {cls.__name__} field {name!r} in {item!r}; known: {known}")
    annotation = hints[name]
    if sub:
        if not _takes_mapping(annotation):
            raise ValueError(f"{cls.__name__}.{name} is not a mapping; {item!r} cannot set a sub-key")
        return name, sub, parse_yaml(raw, f"override {item!r}") if raw.strip() else None
    value = parse_yaml(raw, f"override {item!r}") if raw.strip() else None
    if _takes_string(annotation) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = raw.strip()
    return name, None, value


def apply_overrides(cls: type, data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`data` with each `key=value` of `overrides` applied, later ones winning."""
    result = dict(data)
    for item in overrides:
        name, sub, value = parse_override(cls, item)
        if sub is None:
            result[name] = value
        else:
            current = result.get(name)
            result[name] = {**(current if isinstance(current, Mapping) else {}), sub: value}
    return result


def _alternatives(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _takes_string(annotation: Any) -> bool:
    return any(a in (str, Path) for a in _alternatives(annotation))


def _takes_mapping(annotation: Any) -> bool:
    return any(
        get_origin(a) in (dict, Mapping) or a is dict or (isinstance(a, type) and issubclass(a, ConfigMixin))
        for a in _alternatives(annotation)
    )


__all__ = [
    "ConfigMixin",
    "apply_overrides",
    "at_least",
    "check_fields",
    "parse_override",
    "parse_yaml",
    "read_yaml_file",
]
