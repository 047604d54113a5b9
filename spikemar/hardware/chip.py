"""What of a model can run on Loihi and what stays on the host, with counts.

The rule: a synaptic layer goes on chip when its input is a spike train (an ATMN spike point or a
neuron before it), because Loihi's synapses accumulate spikes; ATMN neurons and the LTI cell
(a fixed per-channel decay: one compartment per channel) go on chip; everything that needs
real-valued arithmetic across a token (norms, SiLU gates, softmax attention, the embedding
lookup, the selective SSM whose decay and input matrices depend on the input) stays on the
host. :func:`chip_report` applies it to a MAR LM (module by module) or to an ``nn.Sequential``
of blocks (all on chip, see :mod:`spikemar.hardware.fixed_point`).

On a MAR LM every on-chip segment hands its result back to the host (the residual stream and the
norms live there), so the report is a map of where work can move, not a single chip program.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.common import FeedForward, SpikePoint
from ..models.mar import MARLM
from ..ssm.mixer import LTICell, SelectiveMixer
from .fixed_point import UnsupportedModuleError, lower, synaptic_input

__all__ = ["ChipEntry", "ChipReport", "chip_report", "quantize_mar"]

HOST_REASONS = {
    "embed": "a lookup of token ids, not a synaptic layer",
    "norm": "RMSNorm divides by a per-token root-mean-square: no Loihi primitive",
    "head": "fed by the real-valued, normalised residual stream (no spikes)",
    "dense_linear": "fed by real values, not spikes: multiply-accumulates",
    "conv": "the selective SSM's depthwise convolution over tokens feeds input-dependent gates",
    "selective": "the selective scan: its decay exp(-exp(A_log)·Δ_t) and B_t, C_t depend on the "
    "input; a Loihi compartment's decay is fixed",
    "attention": "softmax attention over the KV cache",
    "gate": "SiLU(gate)·up multiplies two real-valued activations",
    "sparsifier": "top-k / magnitude sparsification of real values",
}
CHIP_REASONS = {
    "spike_point": "ATMN neurons (δ-injected, ternary graded spikes)",
    "spiking_linear": "fed by ATMN spikes: accumulates with 8-bit weights",
    "lti": "a fixed per-channel decay: one compartment per channel",
    "block": "a Linear/Conv2d + neuron block",
}


@dataclass
class ChipEntry:
    path: str
    kind: str  # the module's class name
    on_chip: bool
    params: int
    neurons: int
    why: str


@dataclass
class ChipReport:
    entries: list[ChipEntry] = field(default_factory=list)

    def add(self, path: str, module: nn.Module | None, on_chip: bool, why: str,
            params: int | None = None, neurons: int = 0) -> None:  # fmt: skip
        if params is None:
            params = sum(p.numel() for p in module.parameters()) if module is not None else 0
        kind = type(module).__name__ if module is not None else "-"
        self.entries.append(ChipEntry(path, kind, on_chip, params, neurons, why))

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for side, flag in (("chip", True), ("host", False)):
            rows = [e for e in self.entries if e.on_chip == flag]
            out[side] = {
                "modules": len(rows),
                "params": sum(e.params for e in rows),
                "neurons": sum(e.neurons for e in rows),
            }
        return out

    def first_host(self) -> ChipEntry | None:
        return next((e for e in self.entries if not e.on_chip), None)

    def to_table(self) -> str:
        width = max(len(e.path) for e in self.entries)
        lines = [f"{'module':<{width}}  {'type':<16} {'where':<5} {'params':>10}  why"]
        for e in self.entries:
            where = "chip" if e.on_chip else "host"
            lines.append(f"{e.path:<{width}}  {e.kind:<16} {where:<5} {e.params:>10,}  {e.why}")
        c = self.counts()
        total = c["chip"]["params"] + c["host"]["params"]
        for side in ("chip", "host"):
            share = c[side]["params"] / total if total else 0.0
            lines.append(
                f"{side}: {c[side]['modules']} modules, {c[side]['params']:,} parameters "
                f"({share:.1%}), {c[side]['neurons']:,} neurons"
            )
        return "\n".join(lines)


def chip_report(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> ChipReport:
    """Which modules of ``model`` run on chip and which stay on the host, and why.

    For an ``nn.Sequential`` of blocks, ``input_shape`` (one sample's) lets the report count the
    neurons of conv blocks; dense blocks are counted without it."""
    if isinstance(model, MARLM):
        return _mar_report(model)
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


def _spike(report: ChipReport, path: str, m: nn.Module) -> bool:
    """Add a spike point (or its absence); True when ``m`` is one."""
    if isinstance(m, SpikePoint):
        a = m.neuron.a
        channels = a.numel() if a.dim() else 0
        report.add(path, m, True, CHIP_REASONS["spike_point"], neurons=channels)
        return True
    if not isinstance(m, nn.Identity):
        report.add(path, m, False, HOST_REASONS["sparsifier"])
    return False


def _linear(report: ChipReport, path: str, m: nn.Module, spiking: bool) -> None:
    report.add(path, m, spiking, CHIP_REASONS["spiking_linear"] if spiking
               else HOST_REASONS["dense_linear"])  # fmt: skip


def _mar_report(model: MARLM) -> ChipReport:
    r = ChipReport()
    r.add("embed", model.embed, False, HOST_REASONS["embed"])
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}"
        r.add(f"{p}.norm1", layer.norm1, False, HOST_REASONS["norm"])
        mixer = layer.mixer
        if isinstance(mixer, SelectiveMixer):
            spiking_in = _spike(r, f"{p}.mixer.spike_in", mixer.spike_in)
            _linear(r, f"{p}.mixer.in_proj", mixer.in_proj, spiking_in)
            r.add(f"{p}.mixer.conv", mixer.conv, False, HOST_REASONS["conv"])
            params = sum(t.numel() for t in (mixer.dt_bias, mixer.A_log, mixer.D))
            r.add(f"{p}.mixer.(dt_bias, A_log, D)", None, False, HOST_REASONS["selective"],
                  params=params)  # fmt: skip
            r.add(f"{p}.mixer.norm", mixer.norm, False, HOST_REASONS["norm"])
            spiking_out = _spike(r, f"{p}.mixer.spike_out", mixer.spike_out)
            _linear(r, f"{p}.mixer.out_proj", mixer.out_proj, spiking_out)
        elif isinstance(mixer, LTICell):
            spiking = _spike(r, f"{p}.spike_attn", layer.spike_attn)
            r.add(f"{p}.mixer", mixer, True, CHIP_REASONS["lti"], neurons=mixer.b.numel())
            if not spiking:
                r.entries[-1].why += " (its input arrives as real values from the host)"
        else:
            spiking = _spike(r, f"{p}.spike_attn", layer.spike_attn)
            _linear(r, f"{p}.mixer.qkv", mixer.qkv, spiking)
            r.add(f"{p}.mixer.(attention)", None, False, HOST_REASONS["attention"], params=0)
            _linear(r, f"{p}.mixer.out", mixer.out, False)
        r.add(f"{p}.norm2", layer.norm2, False, HOST_REASONS["norm"])
        ffn: FeedForward = layer.ffn
        spiking_in = _spike(r, f"{p}.ffn.spike_in", ffn.spike_in)
        _linear(r, f"{p}.ffn.gate", ffn.gate, spiking_in)
        _linear(r, f"{p}.ffn.up", ffn.up, spiking_in)
        r.add(f"{p}.ffn.(silu·mul)", None, False, HOST_REASONS["gate"], params=0)
        spiking_hidden = _spike(r, f"{p}.ffn.spike_hidden", ffn.spike_hidden)
        _linear(r, f"{p}.ffn.down", ffn.down, spiking_hidden)
    r.add("norm", model.norm, False, HOST_REASONS["norm"])
    r.add("head", model.head, False, HOST_REASONS["head"])
    return r


def quantize_mar(model: MARLM) -> MARLM:
    """A copy of a MAR LM whose on-chip projections (the Linear layers fed by spike points, see
    :func:`chip_report`) hold Loihi's weights: per layer, ``W ≈ w / S`` with ``w`` even integers
    in [−256, 254] and ``S = 254 / max|W|``, as :mod:`spikemar.hardware.fixed_point` quantises a
    block. Everything that stays on the host keeps its float weights. The copy's
    ``loihi_weight_scales`` maps each quantised module's path to S.

    Under δ-injection with τ = 1 (MAR's default) the spike points' carry is exact in fixed point;
    their thresholds' 17-bit mantissas are left float here (finer than the 8-bit weights).
    """
    import copy

    import torch

    from .fixed_point import WEIGHT_MAX

    if not isinstance(model, MARLM):
        raise TypeError(f"model: expected a MARLM, got {type(model).__name__}")
    quantised = copy.deepcopy(model)
    modules = dict(quantised.named_modules())
    scales = {}
    for entry in chip_report(model).entries:
        if not (entry.on_chip and entry.kind == "Linear"):
            continue
        weight = modules[entry.path].weight
        scale = WEIGHT_MAX / float(weight.detach().abs().max())
        with torch.no_grad():
            weight.copy_((weight * scale / 2).round() * 2 / scale)
        scales[entry.path] = scale
    quantised.loihi_weight_scales = scales
    return quantised
