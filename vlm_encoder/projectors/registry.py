"""The projector registry: the kinds by name, for `build_projector(kind, in_dim, out_dim, **options)`.

Kinds register a class under a name (`linear`) or a name pattern (`mlp{N}x_gelu`, matched
by a regular expression), so `mlp3x_gelu` works without a table entry per depth.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .kind import ProjectorKind

K = TypeVar("K", bound="type[ProjectorKind]")

_NAMES: dict[str, type[ProjectorKind]] = {}
_PATTERNS: list[tuple[re.Pattern[str], str, type[ProjectorKind]]] = []


def register_projector(name: str, pattern: str | None = None) -> Callable[[K], K]:
    """Class decorator registering a projector kind.

    Args:
        name: The kind's name as listed (e.g. `linear`, or `mlp{N}x_gelu` for a family).
        pattern: A regular expression matched in full against requested kinds, for a family
            of names (e.g. `mlp(\\d+)x_gelu`).
    """

    def wrap(cls: K) -> K:
        if pattern is None:
            if name in _NAMES:
                raise ValueError(f"projector kind {name!r} is already registered")
            _NAMES[name] = cls
        else:
            _PATTERNS.append((re.compile(pattern), name, cls))
        return cls

    return wrap


def projector_class(kind: str) -> type[ProjectorKind]:
    """The class registered for `kind`.

    Raises:
        ValueError: Unknown kind, listing the registered ones.
    """
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a string such as 'mlp2x_gelu', got {kind!r}")
    if kind in _NAMES:
        return _NAMES[kind]
    for regex, _, cls in _PATTERNS:
        if regex.fullmatch(kind):
            return cls
    raise ValueError(f"unknown projector kind {kind!r}; registered kinds: {', '.join(list_projectors())}")


def list_projectors() -> list[str]:
    """Registered kind names (families shown with their pattern name, e.g. `mlp{N}x_gelu`)."""
    return sorted(_NAMES) + sorted(name for _, name, _ in _PATTERNS)


def projector_table() -> list[dict[str, str]]:
    """One row per kind: name, reference, output tokens for `N` inputs, options."""
    rows = [(name, cls) for name, cls in _NAMES.items()] + [(name, cls) for _, name, cls in _PATTERNS]
    return [
        {"kind": name, "reference": cls.reference, "tokens": cls.tokens, "options": ", ".join(cls.option_names())}
        for name, cls in sorted(rows)
    ]
