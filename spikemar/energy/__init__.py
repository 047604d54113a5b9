"""SOP energy counting for spiking and dense networks, with reports that count ternary spikes right.

    report = spikemar.energy.profile(model, x, hardware="45nm-fp32")
    print(report)                       # per-layer table: ACs, MACs, firing rates, energy
    report.to_json(); report.to_markdown(); report.save_png("energy.png")
    spikemar.energy.compare(student_report, teacher_report)

A synaptic layer fed by spikes costs Σ_t nnz(s_t) · fan-out accumulates (ACs), a ternary ±1
spike being one add or subtract; fed by real values it costs multiply-accumulates (MACs). The
counter (:class:`EnergyCounter`) attaches forward hooks to any ``nn.Module`` tree; the rule table
(:func:`register_rule`, :func:`register_neuron`) says how each module type is counted; model code
declares spike decodes (:func:`declare_spikes`, MAR's spike points) and functional work
(:func:`record_ops`). Energy constants live in :mod:`spikemar.energy.hardware`, with citations.
"""

from .counter import (
    CountContext,
    EnergyCounter,
    counting_active,
    declare_spikes,
    profile,
    record_ops,
)
from .hardware import HardwareProfile, available_profiles, get_profile, register_profile
from .report import ComparisonRow, EnergyComparison, EnergyReport, LayerRow, compare
from .rules import register_neuron, register_rule

__all__ = [
    "ComparisonRow",
    "CountContext",
    "EnergyComparison",
    "EnergyCounter",
    "EnergyReport",
    "HardwareProfile",
    "LayerRow",
    "available_profiles",
    "compare",
    "counting_active",
    "declare_spikes",
    "get_profile",
    "profile",
    "record_ops",
    "register_neuron",
    "register_profile",
    "register_rule",
]
