"""Spiking neurons: ATMN (MAR's adaptive ternary multi-step neuron) and its ablation baselines.

``from spikemar.neurons import ATMN`` is the SpikingJelly-style module; the dynamics are the pure
functions of :mod:`spikemar.neurons.functional`, one implementation per backend.
"""

from .atmn import ATMN, BinaryMultiStep, TernarySingleStep
from .backends import available_backends, register_backend
from .checks import raise_deferred_errors, set_value_checks, value_checks
from .functional import (
    ATMNParameters,
    ThresholdError,
    atmn_decode,
    atmn_multi_step,
    atmn_quantize,
    atmn_step,
    delta_inject,
    spike_counts,
)
from .surrogate import ATan, Rectangle, Sigmoid, Surrogate, Triangle

__all__ = [
    "ATMN",
    "ATMNParameters",
    "ATan",
    "BinaryMultiStep",
    "Rectangle",
    "Sigmoid",
    "Surrogate",
    "TernarySingleStep",
    "ThresholdError",
    "Triangle",
    "atmn_decode",
    "atmn_multi_step",
    "atmn_quantize",
    "atmn_step",
    "available_backends",
    "delta_inject",
    "raise_deferred_errors",
    "register_backend",
    "set_value_checks",
    "spike_counts",
    "value_checks",
]
