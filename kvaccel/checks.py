"""The argument checks every config and kernel shares: a ``ValueError`` that names the field, the value and the rule.

A bool is never taken for a number (``True`` is an ``int`` in Python), and NaN is in no interval.
"""

from __future__ import annotations

import math


def is_int(value) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real ``int`` or ``float``, not a ``bool``, not NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_int(field: str, value, low: int, high: int | None = None, why: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is an int in ``[low, high]`` (``high=None``: no upper bound)."""
    if not is_int(value) or value < low or (high is not None and value > high):
        rule = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{field} ({value!r}) must be {rule}" + (f" ({why})" if why else ""))


def check_number(field: str, value, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False, why: str = "") -> None:
    """Raise ``ValueError`` unless ``value`` is a real number in the interval from ``low`` to ``high`` (either may
    be ``None``: unbounded), each end closed unless ``low_open`` / ``high_open``."""
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            rule = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            rule = f"a number {'>' if low_open else '>='} {low}"
        elif high is not None:
            rule = f"a number {'<' if high_open else '<='} {high}"
        else:
            rule = "a number"
        raise ValueError(f"{field} ({value!r}) must be {rule}" + (f" ({why})" if why else ""))


def check_ratio(field: str, value) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number in [0, 1]."""
    check_number(field, value, 0, 1)
