"""Checks for numeric options: NaN, inf and out-of-range values are refused with a message naming the option.

>>> check_probability("alpha", 0.01)
0.01
>>> check_number("patience", float("nan"), low=1)
Traceback (most recent call last):
ValueError: patience must be a finite number, got nan
"""

from __future__ import annotations

import math
import numbers


def check_number(name: str, value, *, low=None, high=None, low_open: bool = False, high_open: bool = False,
                 integer: bool = False):
    """``value`` if it is a finite real (an integer when ``integer``) within ``[low, high]`` (open ends when
    ``low_open``/``high_open``); else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if integer and int(value) != value:
        raise ValueError(f"{name} must be a whole number, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{name} must be in {bounds}, got {value}")
    return int(value) if integer else value


def check_grid(name: str, grid):
    """``grid`` as None, an int or a tuple of 2 or 3 ints, each a whole number >= 2; else ``ValueError`` naming
    ``name``.

    >>> check_grid("grid", [64, 64, 32])
    (64, 64, 32)
    """
    if grid is None:
        return None
    if isinstance(grid, (tuple, list)):
        if len(grid) not in (2, 3):
            raise ValueError(f"{name} must be one size or 2 or 3 sizes (one per spatial axis), got {grid!r}")
        return tuple(check_number(f"{name}[{axis}]", size, low=2, integer=True) for axis, size in enumerate(grid))
    return check_number(name, grid, low=2, integer=True)


def check_probability(name: str, value, *, closed: bool = False):
    """``value`` if it is a finite number in ``(0, 1)`` (``[0, 1]`` when ``closed``)."""
    return check_number(name, value, low=0, high=1, low_open=not closed, high_open=not closed)
