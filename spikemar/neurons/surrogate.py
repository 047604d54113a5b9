r"""Surrogate gradients for threshold neurons.

A threshold neuron fires when its membrane crosses a threshold V. The firing function is a step,
whose derivative is zero almost everywhere; training replaces that derivative by a smooth pulse
``g`` (the surrogate) while the forward pass keeps the exact step.

spikemar measures the distance to threshold in units of the threshold itself,

.. math::
    z = h / V - 1,

so a surrogate's window scales with V. This matters for ATMN, whose threshold is learned and can
end anywhere from 1e-2 to 1e1: a window of fixed width in volts (SpikingJelly's convention) would
be all-pass for a small V and almost never open for a large one. For V = 1 the two conventions
agree.

Every surrogate carries its ``primitive`` ``G`` (a smooth step with ``G' = g``). The primitive is
what the backward pass differentiates, and the tests use it: running the neuron with ``G`` in the
forward pass (``smooth=True``) must give, under ``torch.autograd.gradcheck``, exactly the
gradients the hard forward pass reports through ``g``.

The default, :class:`Rectangle`, is the straight-through estimator inside a window around ±V,
as in the closest prior work (Ternary Spike, SpikingMamba's TI-LIF): ``ds/dh = 1/V`` for
``|h ∓ V| < width·V/2`` and zero elsewhere — the slope of the staircase ``V·round(h/V)`` it
replaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .._numbers import number

__all__ = ["ATan", "Rectangle", "Sigmoid", "Surrogate", "Triangle", "get_surrogate"]


@dataclass(frozen=True)
class Surrogate:
    """Base class: a smooth step ``primitive(z)`` and its derivative ``derivative(z)``.

    A subclass's fields are its shape parameters (a window's width, a slope's sharpness), each a
    finite number > 0 (NumPy's too, kept as Python's), checked here by name."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            converted = number(value)
            if converted is None or not (math.isfinite(converted) and converted > 0):
                raise ValueError(f"{f.name}: expected a finite number > 0, got {value!r}")
            object.__setattr__(self, f.name, converted)  # frozen: the constructor's own write

    def derivative(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def primitive(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Rectangle(Surrogate):
    """Straight-through window: ``g(z) = 1/width`` for ``|z| < width/2``, else 0."""

    width: float = 1.0

    def derivative(self, z: torch.Tensor) -> torch.Tensor:
        return (z.abs() < 0.5 * self.width).to(z.dtype) / self.width

    def primitive(self, z: torch.Tensor) -> torch.Tensor:
        return (z / self.width + 0.5).clamp(0.0, 1.0)


@dataclass(frozen=True)
class Triangle(Surrogate):
    """Triangular pulse of half-width ``width/2`` and unit area."""

    width: float = 1.0

    def derivative(self, z: torch.Tensor) -> torch.Tensor:
        half = 0.5 * self.width
        return (1.0 - z.abs() / half).clamp_min(0.0) / half

    def primitive(self, z: torch.Tensor) -> torch.Tensor:
        half = 0.5 * self.width
        r = (z / half).clamp(-1.0, 1.0)
        # integral of the triangle from -half to z, normalised to rise from 0 to 1
        return torch.where(r < 0, 0.5 * (1.0 + r) ** 2, 1.0 - 0.5 * (1.0 - r) ** 2)


@dataclass(frozen=True)
class Sigmoid(Surrogate):
    """``G(z) = sigmoid(alpha·z)`` (SpikingJelly's default shape, here in units of V)."""

    alpha: float = 4.0

    def derivative(self, z: torch.Tensor) -> torch.Tensor:
        sg = torch.sigmoid(self.alpha * z)
        return self.alpha * sg * (1.0 - sg)

    def primitive(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.alpha * z)


@dataclass(frozen=True)
class ATan(Surrogate):
    """``G(z) = atan(π/2·alpha·z)/π + 1/2`` (SpikingJelly's ATan, in units of V)."""

    alpha: float = 2.0

    def derivative(self, z: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.alpha) / (1.0 + (0.5 * math.pi * self.alpha * z) ** 2)

    def primitive(self, z: torch.Tensor) -> torch.Tensor:
        return torch.atan(0.5 * math.pi * self.alpha * z) / math.pi + 0.5


_BY_NAME: dict[str, type[Surrogate]] = {
    "rectangle": Rectangle,
    "triangle": Triangle,
    "sigmoid": Sigmoid,
    "atan": ATan,
}


def get_surrogate(surrogate: str | Surrogate) -> Surrogate:
    """Return a surrogate instance from an instance or one of the names in ``_BY_NAME``."""
    if isinstance(surrogate, Surrogate):
        return surrogate
    if isinstance(surrogate, str) and surrogate.lower() in _BY_NAME:
        return _BY_NAME[surrogate.lower()]()
    raise ValueError(
        f"surrogate: expected one of {sorted(_BY_NAME)} or a spikemar.neurons.surrogate.Surrogate "
        f"instance, got {surrogate!r}"
    )
