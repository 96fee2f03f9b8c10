"""Checks of plain function arguments, with messages that name the argument, the value and what
is allowed. A config's fields are checked by their types instead (`specs.options.check_fields`)."""

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


def repeat_number(value: Any, times: int) -> Any:
    """One number standing for every entry (`224` for a square `(224, 224)`, `0` for black
    `(0, 0, 0)`) as a `times`-tuple; anything else unchanged, for `check_fields` to judge."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (value,) * times
    return value


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


def optional_positive_pair(value: Any, name: str) -> tuple[int, int] | None:
    """`None`, a positive int (square) or a 2-sequence of positive ints as `(h, w)`."""
    if value is None:
        return None
    pair = _as_positive_pair(value)
    if pair is None:
        raise ValueError(f"{name} must be None, a positive int or a pair of positive ints (h, w), got {value!r}")
    return pair
