"""The numbers spikemar's hyperparameters accept, and what they are stored as.

A hyperparameter given as a number may be any real number (:class:`numbers.Real`), and a count
any integral one (:class:`numbers.Integral`): Python's own, and equally NumPy's scalars, which
sweeps and files hand over (``np.linspace`` gives ``np.float64``, ``np.arange`` ``np.int64``, a
value read from a .npy or HDF5 file ``np.float32``), as SpikingJelly, norse and snnTorch take
them. Two things are not numbers here: ``bool``, although Python counts it as an int
(``T=True`` is a slip, not one micro-step), and a tensor, which the functions that want one (a
threshold per channel) take on a path of its own.

The boundary that accepts a value stores it as Python's int or float, so configs built from
NumPy values still write to JSON and load with ``torch.load(weights_only=True)``. The value
kept is the NumPy scalar's own: an ``np.int64(4)`` becomes 4 and an ``np.float64`` the same
float, but an ``np.float32(0.1)`` becomes 0.10000000149011612, the number that float32 holds,
not the 0.1 that was typed into whatever made it.

A few boundaries took a 0-d tensor before they took NumPy's numbers (generation's and the KL
loss's temperature, a bound of ``dt_limit``), because they only compared or divided by it:
:func:`item` gives those the number such a tensor or array holds. Elsewhere a tensor stays
refused, as it always was.

``real``, ``integer`` and ``number`` return ``None`` for a value they do not accept; the caller
raises, naming its argument and the range it wants, so every boundary keeps one message for
every bad value. :func:`check_count` and :func:`check_seed` are the two such checks that many
boundaries share word for word.
"""

from __future__ import annotations

import math
import numbers

__all__ = [
    "check_count",
    "check_seed",
    "integer",
    "item",
    "number",
    "plain",
    "plain_data",
    "real",
]


def real(value: object) -> float | None:
    """``value`` as a Python float if it is a real number other than a bool, else ``None``.

    An int too large for a float becomes ±inf (its nearest float), for the caller's range
    check to refuse or accept, rather than float()'s OverflowError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf  # type: ignore[operator]


def integer(value: object) -> int | None:
    """``value`` as a Python int if it is an integral number other than a bool, else ``None``.
    A float, even 4.0, is not one: a count given as a float is most often a computed value
    that was meant to be rounded some particular way."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def number(value: object) -> int | float | None:
    """``value`` as a Python int (integral numbers) or float (other reals), else ``None``:
    for a setting that keeps the kind of number it was given (``ffn_mult=3`` stays 3 in a
    saved config)."""
    whole = integer(value)
    return whole if whole is not None else real(value)


def plain(value: object) -> object:
    """``number(value)`` for a number, anything else as given: for a setting whose value the
    code that uses it checks later, stored meanwhile as the number it would be in Python."""
    converted = number(value)
    return value if converted is None else converted


def plain_data(value: object) -> object:
    """:func:`plain` through dicts, lists and tuples: a nested setting (a model's config
    overrides, ``{"spikes": {"T": np.int64(4)}}``) stored as the Python numbers it would hold
    had the user typed them, for the code that builds from it to check later."""
    if isinstance(value, dict):
        return {key: plain_data(item) for key, item in value.items()}
    if type(value) in (list, tuple):  # a named tuple is a structure of its own: kept as given
        return type(value)(plain_data(item) for item in value)
    return plain(value)


def item(value: object, *, any_shape: bool = False) -> object:
    """The number a 0-d tensor or 0-d NumPy array holds (``.item()``), anything else as given:
    for the few boundaries that took such a value before (see the module docstring), ahead
    of :func:`real`. A tensor of one element but one dimension or more is a number only with
    ``any_shape`` (sampling settings and token ids, which int() and comparisons took so)."""
    ndim = getattr(value, "ndim", None)
    if ndim is None or not callable(getattr(value, "item", None)):
        return value
    one = ndim == 0 or (any_shape and math.prod(value.shape) == 1)  # type: ignore[union-attr]
    return value.item() if one else value  # type: ignore[union-attr]


def check_count(name: str, value: object, low: int = 1) -> int:
    """``value`` as a Python int if it is an integral number >= ``low`` (NumPy's too, a bool
    refused), else one ValueError naming ``name``."""
    whole = integer(value)
    if whole is None or whole < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return whole


def check_seed(value: object, name: str = "seed") -> int:
    """``value`` as a Python int if ``torch.Generator.manual_seed`` takes it (an integral
    number in [-2**63, 2**64), NumPy's too, a bool refused), else one ValueError naming
    ``name``: outside that range torch's own error ("Overflow when unpacking long long")
    names no argument."""
    whole = integer(value)
    if whole is None or not -(2**63) <= whole < 2**64:
        raise ValueError(f"{name}: expected an int in [-2**63, 2**64), got {value!r}")
    return whole
