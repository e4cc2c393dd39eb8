"""Checks for values that enter the library (settings, policy parameters, hyperparameters), with one message format.

Every refusal reads ``<name>=<value>: expected <what is allowed>[; <what to do>]``; a value of the wrong kind
(a string for a number, a float for a count, anything but True/False for a switch) raises `TypeError`, a value
of the right kind outside its range raises `ValueError`.
"""

from __future__ import annotations

import math
from numbers import Integral, Real


def invalid(name: str, value, allowed: str, hint: str = "", kind: type[Exception] = ValueError) -> Exception:
    """The error for ``name=value`` that is not ``allowed`` (``hint``: what to do instead)."""
    return kind(f"{name}={value!r}: expected {allowed}" + (f"; {hint}" if hint else "") + ".")


def check_integer(name: str, value, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    """``value`` is an int (not a bool) in [low, high] (either bound may be open: None)."""
    allowed = _range_text("an integer", low, high)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise invalid(name, value, allowed, hint, TypeError)
    if (low is not None and value < low) or (high is not None and value > high):
        raise invalid(name, value, allowed, hint)
    return int(value)


def check_number(
    name: str, value, low: float | None = None, high: float | None = None, *, low_open: bool = False, hint: str = ""
) -> float:
    """``value`` is a finite real number (not a bool or a string) in [low, high], or (low, high] with ``low_open``."""
    if low is not None and high is not None:
        allowed = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
    elif low is not None:
        allowed = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        allowed = "a finite number" + (f" <= {high:g}" if high is not None else "")
    if isinstance(value, bool) or not isinstance(value, Real):
        raise invalid(name, value, allowed, hint, TypeError)
    if not math.isfinite(value):
        raise invalid(name, value, allowed, hint)
    if low is not None and (value <= low if low_open else value < low):
        raise invalid(name, value, allowed, hint)
    if high is not None and value > high:
        raise invalid(name, value, allowed, hint)
    return float(value)


def check_rate(name: str, value, hint: str = "1.0 keeps every token") -> float:
    """A keep rate: a finite number in (0, 1]."""
    return check_number(name, value, 0.0, 1.0, low_open=True, hint=hint)


def check_rate_range(name: str, value, hint: str = "") -> tuple[float, float]:
    """A span of keep rates: a pair (low, high) of numbers with 0 < low <= high <= 1."""
    allowed = "(low, high) with 0 < low <= high <= 1"
    if not isinstance(value, (tuple, list)) or len(value) != 2 or any(
            isinstance(v, bool) or not isinstance(v, Real) for v in value):
        raise invalid(name, value, allowed, hint, TypeError)
    low, high = float(value[0]), float(value[1])
    if not 0.0 < low <= high <= 1.0:  # NaN fails too
        raise invalid(name, value, allowed, hint)
    return low, high


def check_bool(name: str, value, hint: str = "") -> bool:
    """``value`` is True or False (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise invalid(name, value, "True or False", hint, TypeError)
    return value


def check_integer_list(name: str, value, low: int = 1, hint: str = "") -> list[int]:
    """``value`` is a list (or tuple) of ints >= ``low``."""
    allowed = f"a list of integers >= {low}"
    if not isinstance(value, (list, tuple)):
        raise invalid(name, value, allowed, hint, TypeError)
    for item in value:
        if isinstance(item, bool) or not isinstance(item, Integral):
            raise invalid(name, value, allowed, hint, TypeError)
        if item < low:
            raise invalid(name, value, allowed, hint)
    return list(value)


def _range_text(what: str, low, high) -> str:
    if low is not None and high is not None:
        return f"{what} in [{low}, {high}]"
    if low is not None:
        return f"{what} >= {low}"
    if high is not None:
        return f"{what} <= {high}"
    return what


__all__ = ["check_bool", "check_integer", "check_integer_list", "check_number", "check_rate", "invalid"]
