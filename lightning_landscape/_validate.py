"""Argument checks shared by every public constructor and function (one message style).

Each check returns the value (converted where that is safe, e.g. an ``int`` tolerance to
``float``) or raises :class:`ValueError` naming the argument, what it must be and what it got.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def is_int(value: object) -> bool:
    """Whether ``value`` is an ``int`` and not a ``bool``.

    Example:
        >>> is_int(3), is_int(True), is_int(3.0)
        (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool)


def integer(name: str, value: Any, minimum: int = 1) -> int:
    """An integer ``>= minimum`` (bools are refused).

    Args:
        name: the argument's name, for the message.
        value: what was passed.
        minimum: the smallest allowed value.

    Returns:
        ``value``.

    Raises:
        ValueError: otherwise.

    Example:
        >>> integer("top_k", 5)
        5
        >>> integer("top_k", 0)
        Traceback (most recent call last):
        ...
        ValueError: top_k must be a positive integer, got 0
    """
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be {_integer_words(minimum)}, got {value!r}")
    return int(value)


def optional_integer(name: str, value: Any, minimum: int = 1) -> int | None:
    """``None`` or an integer ``>= minimum``.

    Args:
        name: the argument's name, for the message.
        value: what was passed.
        minimum: the smallest allowed value.

    Returns:
        ``value``.

    Raises:
        ValueError: otherwise.

    Example:
        >>> optional_integer("every_n_steps", None) is None
        True
        >>> optional_integer("every_n_steps", -1)
        Traceback (most recent call last):
        ...
        ValueError: every_n_steps must be a positive integer or None, got -1
    """
    if value is None:
        return None
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be {_integer_words(minimum)} or None, got {value!r}")
    return int(value)


def _integer_words(minimum: int) -> str:
    if minimum == 1:
        return "a positive integer"
    if minimum == 0:
        return "a non-negative integer"
    return f"an integer >= {minimum}"


def real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = True,
    high_open: bool = False,
) -> float:
    """A finite real number within ``(low, high]`` (by default; see ``low_open``/``high_open``).

    Args:
        name: the argument's name, for the message.
        value: what was passed (an ``int`` or ``float``, not a ``bool``).
        low: the lower bound, or ``None`` for none.
        high: the upper bound, or ``None`` for none.
        low_open: exclude ``low`` itself.
        high_open: exclude ``high`` itself.

    Returns:
        ``float(value)``.

    Raises:
        ValueError: otherwise.

    Example:
        >>> real("tol", 1e-3, low=0, high=1, high_open=True)
        0.001
        >>> real("tol", 2, low=0, high=1, high_open=True)
        Traceback (most recent call last):
        ...
        ValueError: tol must be a finite number in (0, 1), got 2
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        where = _range_words(low, high, low_open, high_open)
        raise ValueError(f"{name} must be a finite number{where}, got {value!r}")
    return float(value)


def _range_words(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f" {'<' if high_open else '<='} {high:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def choice(name: str, value: Any, choices: Sequence[T]) -> T:
    """One of ``choices``.

    Args:
        name: the argument's name, for the message.
        value: what was passed.
        choices: the allowed values.

    Returns:
        ``value``.

    Raises:
        ValueError: otherwise.

    Example:
        >>> choice("dims", 3, (1, 2))
        Traceback (most recent call last):
        ...
        ValueError: dims must be one of (1, 2), got 3
    """
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value  # type: ignore[no-any-return]


def flag(name: str, value: Any) -> bool:
    """``True`` or ``False``.

    Args:
        name: the argument's name, for the message.
        value: what was passed.

    Returns:
        ``value``.

    Raises:
        ValueError: otherwise.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def patterns(name: str, value: Any) -> list[str] | None:
    """``None`` or a list of names / ``fnmatch`` patterns.

    Args:
        name: the argument's name, for the message.
        value: what was passed.

    Returns:
        A new list, or ``None``.

    Raises:
        ValueError: for a bare string, a non-string entry, or an empty list.
    """
    if value is None:
        return None
    names = isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value)
    if not names or not value:
        raise ValueError(
            f"{name} must be a non-empty list of parameter names or fnmatch patterns, got {value!r}"
        )
    return list(value)
