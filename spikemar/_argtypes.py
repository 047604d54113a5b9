"""argparse types shared by the ``spikemar`` commands: argparse turns their ArgumentTypeError
into "argument --X: <message>", naming the argument and what was expected."""

from __future__ import annotations

import argparse
import math

__all__ = ["finite_positive_float", "int_at_least_1", "non_negative_float", "positive_float"]


def int_at_least_1(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def _float(text: str, accept, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # fails every test below
    if not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return _float(text, lambda v: v > 0, "a number > 0")  # NaN fails v > 0


def finite_positive_float(text: str) -> float:
    return _float(text, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    return _float(text, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
