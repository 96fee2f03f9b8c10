"""Checks shared by the package's frozen config dataclasses, with messages that name the field,
the value and what is allowed."""

from __future__ import annotations

from typing import Any


def check_positive_int(value: Any, name: str) -> None:
    """Raise `ValueError` unless `value` is an int > 0 (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_choice(value: Any, allowed: tuple[str, ...], name: str) -> None:
    """Raise `ValueError` unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(allowed)}")


def _as_positive_pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        return (int(value[0]), int(value[1]))
    return None


def positive_pair(value: Any, name: str) -> tuple[int, int]:
    """An int (square) or a 2-sequence of positive ints (JSON gives lists) as `(h, w)`."""
    pair = _as_positive_pair(value)
    if pair is None:
        raise ValueError(f"{name} must be a positive int or a pair of positive ints (h, w), got {value!r}")
    return pair


def optional_positive_pair(value: Any, name: str) -> tuple[int, int] | None:
    """`None`, or what `positive_pair` accepts."""
    if value is None:
        return None
    pair = _as_positive_pair(value)
    if pair is None:
        raise ValueError(f"{name} must be None, a positive int or a pair of positive ints (h, w), got {value!r}")
    return pair
