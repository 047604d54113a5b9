r"""A current-based LIF neuron (CUBA) in the form Loihi and Lava compute it, in floating point.

Per time step, with synaptic input x_t (as Lava's ``LIF`` process, ``lava.proc.lif``):

.. math::
    u_t &= (1 - \delta_u)\, u_{t-1} + x_t            \qquad\text{(current)} \\
    v_t &= (1 - \delta_v)\, v_{t-1} + u_t            \qquad\text{(voltage)} \\
    s_t &= [v_t > \vartheta], \qquad v_t \leftarrow 0 \text{ where } s_t = 1

``δ_u`` and ``δ_v`` are the fractions of current and voltage lost per step (Loihi stores them as
12-bit integers, 4096 = 1.0: ``iDecay``/``vDecay`` in netx files). δ_u = 1 makes the current the
input itself, which is NIR's ``LIF``; otherwise it is NIR's ``CubaLIF``.
The fixed-point form lives in :mod:`spikemar.hardware.fixed_point`.
"""

from __future__ import annotations

import math

import torch

from .._numbers import real
from ..neurons.atmn import MemoryModule

__all__ = ["CUBALIF"]


class CUBALIF(MemoryModule):
    """CUBA LIF neuron (binary spikes, reset to 0) speaking SpikingJelly's protocol.

    Args:
        current_decay: δ_u in [0, 1].
        voltage_decay: δ_v in [0, 1).
        v_threshold: ϑ > 0.
        step_mode: 's' (``x`` [N, …]) or 'm' (``x_seq`` [T, N, …]).
    """

    def __init__(
        self,
        current_decay: float = 1.0,
        voltage_decay: float = 0.0,
        v_threshold: float = 1.0,
        *,
        step_mode: str = "s",
    ) -> None:
        super().__init__()
        self.current_decay = _fraction(current_decay, "current_decay", upper_inclusive=True)
        self.voltage_decay = _fraction(voltage_decay, "voltage_decay", upper_inclusive=False)
        threshold = real(v_threshold)
        if threshold is None or not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"v_threshold: expected a finite number > 0, got {v_threshold!r}")
        self.v_threshold = threshold
        self.step_mode = step_mode
        self.register_memory("u", 0.0)
        self.register_memory("v", 0.0)

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {type(x).__name__}")
        self.u = self.u * (1.0 - self.current_decay) + x
        self.v = self.v * (1.0 - self.voltage_decay) + self.u
        spikes = (self.v > self.v_threshold).to(x.dtype)
        self.v = self.v * (1.0 - spikes)
        return spikes

    def extra_repr(self) -> str:
        return (
            f"current_decay={self.current_decay}, voltage_decay={self.voltage_decay}, "
            f"v_threshold={self.v_threshold}, {super().extra_repr()}"
        )


def _fraction(value: float, name: str, *, upper_inclusive: bool) -> float:
    fraction = real(value)
    ok = fraction is not None and math.isfinite(fraction)
    if ok:
        ok = 0.0 <= fraction <= 1.0 if upper_inclusive else 0.0 <= fraction < 1.0
    if not ok:
        bound = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"{name}: expected a number in {bound}, got {value!r}")
    return fraction
