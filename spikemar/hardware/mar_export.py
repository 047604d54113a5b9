r"""Export the on-chip parts of a MAR LM to Lava: one netx file per spike point and the
projections it feeds.

A MAR spike point δ-injects a real activation I (from the host) into ATMN neurons for T
micro-steps, and the projections after it compute ``W·decode`` with ``decode = V·Σ_t τ^t s_t``.
With τ = 1 (MAR's default) or τ = ∞ the decode weights do not change between micro-steps, so
``W·decode = Σ_t (W·diag(V))·s_t`` is what a synapse accumulates. On chip, per token::

    host ── payload p = round(k·I), a graded spike at micro-step 0 ──▶ identity synapse (w = 254)
        ──▶ ATMN (the spike point's V and τ) ──▶ Dense W·diag(V) (8-bit, all projections fed by
        this spike point stacked) ──▶ CUBA integrator (no current or voltage decay, threshold at
        the 17-bit maximum) ──▶ the host reads its voltage v after the T micro-steps

and ``W·decode ≈ v / (64·S)`` with S the Dense's weight scale. This is an ``nn.Sequential`` of
blocks (:func:`segment_network`), so it goes through :func:`spikemar.hardware.quantize` and
:func:`spikemar.hardware.export_lava` like any other network. ``k`` is chosen from activations
seen on calibration tokens so that the payload (|p| ≤ 515) and the threshold mantissa fit.

:func:`export_mar_lava` writes the files and ``manifest.json`` (segments, scales, the projections'
rows in the stacked output, and what stays on the host). Not exported: LTI cells and attention
(their inputs come from a spike point but they are not a projection), and everything
:func:`spikemar.hardware.chip_report` puts on the host.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_write
from ..models.common import SpikePoint
from ..models.mar import MARLM
from .chip import chip_report
from .fixed_point import (
    ACT_SHIFT,
    VTH_MANT_MAX,
    WEIGHT_MAX,
    UnsupportedModuleError,
    quantize_network,
)
from .lava_export import export_lava
from .lif import CUBALIF

__all__ = [
    "MARSegment",
    "export_mar_lava",
    "injection",
    "mar_segments",
    "segment_network",
    "segment_reference",
]

PAYLOAD_MAX = 515  # 254 · 515 · 2^6 < 2^23: the injected input fits Loihi's 24-bit state


@dataclass
class MARSegment:
    """A spike point and the projections it feeds: the unit that runs on chip."""

    spike_point: str
    projections: list[str]
    rows: list[tuple[int, int]]  # each projection's rows in the stacked output
    T: int
    k: float = 0.0  # host payload scale: p = round(k·I)
    weight_scale: float = 0.0  # S of the stacked Dense: W·decode ≈ v / (64·S)
    file: str = ""
    modules: dict = field(default_factory=dict, repr=False)  # path → module (not written)


def mar_segments(model: MARLM) -> list[MARSegment]:
    """The on-chip segments of ``model``: every spike point that feeds Linear projections, in
    the order of ``model.spike_points()``."""
    if not isinstance(model, MARLM):
        raise TypeError(f"model: expected a MARLM, got {type(model).__name__}")
    segments = []
    for site in model.spike_points():
        linears = {p: m for p, m in site.projections.items() if isinstance(m, nn.Linear)}
        if not linears:  # e.g. the spike point before an LTI cell: no projection to stack
            continue
        rows, start = [], 0
        for lin in linears.values():
            rows.append((start, start + lin.out_features))
            start += lin.out_features
        segment = MARSegment(site.name, list(linears), rows, site.module.T)
        segment.modules = {site.name: site.module, **linears}
        segments.append(segment)
    return segments


def segment_network(segment: MARSegment, k: float) -> nn.Sequential:
    """The segment as an ``nn.Sequential`` of blocks (see the module docstring)."""
    sp: SpikePoint = segment.modules[segment.spike_point]
    tau = sp.neuron.tau
    if not (tau == 1.0 or math.isinf(tau)):
        raise UnsupportedModuleError(
            f"{segment.spike_point}: τ = {tau}: the decode weight τ^t changes with the "
            "micro-step, which a synapse cannot (MAR's default τ = 1 maps)"
        )
    linears = [segment.modules[p] for p in segment.projections]
    for path, lin in zip(segment.projections, linears, strict=True):
        if lin.bias is not None:
            raise UnsupportedModuleError(f"{path}: a projection with a bias has no mapping here")
    channels = linears[0].in_features
    v = sp.neuron.v_threshold.detach().float().expand(channels)
    identity = nn.Linear(channels, channels, bias=False)
    neuron = copy.deepcopy(sp.neuron)
    projection = nn.Linear(channels, sum(lin.out_features for lin in linears), bias=False)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(channels) / k)
        projection.weight.copy_(torch.cat([lin.weight for lin in linears]) * v)
    w_max = float(projection.weight.detach().abs().max())
    if not (w_max > 0 and math.isfinite(w_max)):
        largest = float(torch.cat([lin.weight.detach() for lin in linears]).abs().max())
        raise ValueError(
            f"{', '.join(segment.projections)}: the weights are all zero or not finite (max |w| "
            f"= {largest}); nothing to put on chip"
        )
    # threshold at the 17-bit maximum after quantisation: the integrator never fires
    integrator = CUBALIF(1.0, 0.0, VTH_MANT_MAX * w_max / WEIGHT_MAX)
    return nn.Sequential(identity, neuron, projection, integrator)


def injection(activations: torch.Tensor, k: float, T: int) -> tuple[torch.Tensor, int]:
    """Host payloads [T, N, C]: ``round(k·I)`` at micro-step 0, zero after, and how many were
    clamped to ±515 (activations beyond the calibrated range)."""
    x = torch.zeros(T, *activations.shape)
    p = (activations.detach().float() * k).round()
    clamps = int((p.abs() > PAYLOAD_MAX).sum())
    x[0] = p.clamp(-PAYLOAD_MAX, PAYLOAD_MAX)
    return x, clamps


def capture_activations(model: MARLM, tokens: torch.Tensor, paths: list[str]) -> dict:
    """The inputs [N, C] of the spike points at ``paths`` on a forward pass over ``tokens``."""
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        modules[p].register_forward_pre_hook(
            lambda m, args, p=p: seen.__setitem__(p, args[0].detach().flatten(0, -2))
        )
        for p in paths
    ]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return seen


def choose_k(activations: torch.Tensor, v_threshold: torch.Tensor) -> float:
    """The largest payload scale with |round(k·I)| ≤ 515 and a threshold mantissa that fits."""
    i_max = float(activations.abs().max())
    v_max = float(v_threshold.detach().max())
    return min(PAYLOAD_MAX / max(i_max, 1e-12), (VTH_MANT_MAX / WEIGHT_MAX) / v_max)


def export_mar_lava(model: MARLM, directory: str | os.PathLike, tokens: torch.Tensor) -> dict:
    """Write every on-chip segment of ``model`` to ``directory`` (one netx HDF5 file each) and
    ``manifest.json``; ``tokens`` [batch, L] calibrate the host's payload scales. Returns the
    manifest. A segment that cannot go on chip is refused before anything is written."""
    segments = mar_segments(model)
    if not segments:
        raise UnsupportedModuleError("model: no spike points feed projections (a dense model)")
    directory = Path(directory)
    seen = capture_activations(model, tokens, [s.spike_point for s in segments])
    quantized = []  # (network, its fixed-point form)
    for s in segments:  # every refusal before the folder or any file is written
        sp = s.modules[s.spike_point]
        s.k = choose_k(seen[s.spike_point], sp.neuron.v_threshold)
        net = segment_network(s, s.k)
        quantized.append((net, quantize_network(net)))
    directory.mkdir(parents=True, exist_ok=True)
    for s, (net, fixed) in zip(segments, quantized, strict=True):
        s.file = f"{s.spike_point}.h5"
        export_lava(fixed, directory / s.file, (net[0].in_features,))
        s.weight_scale = fixed.blocks[1].scale
    counts = chip_report(model).counts()
    manifest = {
        "format": "spikemar-mar-lava",
        "version": 1,
        "readout": f"W·decode ≈ v / (2^{ACT_SHIFT} · weight_scale), v the integrator's voltage "
        "after T micro-steps; payload p = round(k·I) injected at micro-step 0",
        "segments": [{k: v for k, v in asdict(s).items() if k != "modules"} for s in segments],
        "host": [e.path for e in chip_report(model).entries if not e.on_chip],
        "counts": counts,
    }
    with atomic_write(directory / "manifest.json", name="path") as tmp:  # named as a segment
        tmp.write_text(json.dumps(manifest, indent=1))
    return manifest


@torch.no_grad()
def segment_reference(segment: MARSegment, activations: torch.Tensor) -> dict[str, torch.Tensor]:
    """For activations I [N, C] of a segment's spike point: the float ``W·decode`` [N, out]
    (what the model computes), the fixed-point integrator voltage ``v`` [N, out] (what Lava must
    read bit for bit), its float readout ``v / (64·S)``, the payloads [T, N, C], how many of
    them were clamped, and the spikes of the on-chip spike point [T, N, C]."""
    sp = segment.modules[segment.spike_point]
    decoded, _ = sp.neuron.quantize(activations, segment.T)
    w = torch.cat([segment.modules[p].weight for p in segment.projections])
    net = segment_network(segment, segment.k)
    fixed = quantize_network(net)
    payloads, clamps = injection(activations, segment.k, segment.T)
    spikes, per_block = fixed(payloads, record=True)
    if spikes.abs().sum() > 0:
        raise OverflowError(f"{segment.spike_point}: the integrator fired: the readout saturated")
    v = fixed.last_states[-1]["v"]
    return {
        "float": decoded @ w.T,
        "v": v,
        "readout": v.double() / (2**ACT_SHIFT * fixed.blocks[1].scale),
        "payloads": payloads,
        "clamps": torch.tensor(clamps),
        "spikes": per_block[0],  # the spike point's spikes on chip [T, N, C]
    }
