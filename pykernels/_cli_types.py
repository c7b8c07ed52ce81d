"""argparse types shared by the command-line tools (demo, bench): each names the rule it enforces."""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind, unparsable):
    """text as int or float, or `unparsable` (a value every rule rejects) when it is not a number."""
    try:
        return kind(text)
    except ValueError:
        return unparsable


def positive_int(text: str) -> int:
    value = _number(text, int, 0)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def seed(text: str) -> int:
    value = _number(text, int, -1)
    if not 0 <= value < 2**32:  # the range NumPy and scikit-learn accept as a seed
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, math.nan)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, math.nan)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text!r}")
    return value
