"""What of a model can run on Loihi and what stays on the host, with counts, and the fixed-point
copy of a model.

:func:`chip_report` applies the placement rule (:mod:`spikemar.hardware.placement`) to a MAR LM
(module by module, reading its spike points from ``MARLM.spike_points()``) or to an
``nn.Sequential`` of blocks (all on chip, see :mod:`spikemar.hardware.fixed_point`).
:func:`quantize` is the public entry for Loihi's fixed point of either kind of model.

On a MAR LM every on-chip segment hands its result back to the host (the residual stream and the
norms live there), so the report is a map of where work can move, not a single chip program.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..models.mar import MARLM
from .fixed_point import (
    FixedPointNetwork,
    UnsupportedModuleError,
    lower,
    quantize_network,
    quantize_weight,
    synaptic_input,
)
from .placement import CHIP_REASONS, HOST_REASONS, ChipEntry, ChipReport, mar_placement

__all__ = ["HOST_REASONS", "ChipEntry", "ChipReport", "chip_report", "quantize", "quantize_mar"]


def chip_report(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> ChipReport:
    """Which modules of ``model`` run on chip and which stay on the host, and why.

    For an ``nn.Sequential`` of blocks, ``input_shape`` (one sample's) lets the report count the
    neurons of conv blocks; dense blocks are counted without it."""
    if isinstance(model, MARLM):
        return mar_placement(model)
    if isinstance(model, nn.Sequential):
        report = ChipReport()
        x = None if input_shape is None else torch.zeros(1, *input_shape, dtype=torch.float64)
        for b in lower(model):
            neurons = b.weight.shape[0] if b.synapse == "dense" else 0
            if x is not None:
                x = synaptic_input(x, b, b.weight.double(), None)
                neurons = x[0].numel()
            for path, m in b.modules.items():
                report.add(path, m, True, CHIP_REASONS["block"],
                           neurons=neurons if path == b.path else 0)  # fmt: skip
        return report
    raise UnsupportedModuleError(
        f"model: {type(model).__name__} is neither a MAR LM nor an nn.Sequential of blocks"
    )


def quantize(model: nn.Module) -> FixedPointNetwork | nn.Module:
    """The Loihi fixed-point version of ``model``.

    For an ``nn.Sequential`` of blocks: a :class:`~spikemar.hardware.FixedPointNetwork`; run it
    like the float model on integer spike inputs [T, N, …] to see what quantisation costs before
    going to hardware (``export_lava`` writes the same integers). For a MAR LM: a copy whose
    on-chip projections hold Loihi's 8-bit weights (:func:`quantize_mar`), to measure the
    language-model loss that costs.
    """
    if isinstance(model, MARLM):
        return quantize_mar(model)
    return quantize_network(model)


def quantize_mar(model: MARLM) -> MARLM:
    """A copy of a MAR LM whose on-chip projections (the Linear layers fed by spike points, see
    :func:`chip_report`) hold Loihi's weights: per layer, ``W ≈ w / S`` with ``w`` even integers
    in [−256, 254] and ``S = 254 / max|W|``, as :mod:`spikemar.hardware.fixed_point` quantises a
    block. Everything that stays on the host keeps its float weights. The copy's
    ``loihi_weight_scales`` maps each quantised module's path to S.

    Under δ-injection with τ = 1 (MAR's default) the spike points' carry is exact in fixed point;
    their thresholds' 17-bit mantissas are left float here (finer than the 8-bit weights).
    """
    if not isinstance(model, MARLM):
        raise TypeError(f"model: expected a MARLM, got {type(model).__name__}")
    quantised = copy.deepcopy(model)
    modules = dict(quantised.named_modules())
    scales = {}
    for entry in chip_report(model).entries:
        if not (entry.on_chip and entry.kind == "Linear"):
            continue
        weight = modules[entry.path].weight
        integers, scale = quantize_weight(weight.detach(), entry.path)
        with torch.no_grad():
            weight.copy_(integers.to(weight.dtype) / scale)
        scales[entry.path] = scale
    quantised.loihi_weight_scales = scales
    return quantised
