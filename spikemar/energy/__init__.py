"""SOP energy counting for spiking and dense networks, with reports that count ternary spikes right.

    report = spikemar.energy.profile(model, x, hardware="45nm-fp32")
    print(report)                       # per-layer table: ACs, MACs, firing rates, energy
    report.to_json(); report.to_markdown(); report.save_png("energy.png")
    spikemar.energy.compare(student_report, teacher_report)
    spikemar.energy.break_even(report.with_hardware("45nm-fp32+mem"))   # break-even firing rates
    spikemar.energy.headline(student_report, teacher_report)  # compute-only and with memory

A synaptic layer fed by spikes costs Σ_t nnz(s_t) · fan-out accumulates (ACs), a ternary ±1
spike being one add or subtract; fed by real values it costs multiply-accumulates (MACs). The
counter (:class:`EnergyCounter`) attaches forward hooks to any ``nn.Module`` tree; the rule table
(:func:`register_rule`, :func:`register_neuron`) says how each module type is counted; model code
declares spike decodes (:func:`declare_spikes`, MAR's spike points) and functional work
(:func:`record_ops`); those hooks live in the neutral :mod:`spikemar.counting` (re-exported here),
so model code calls them without importing the reports. The same hooks count memory traffic
(weights, activations, spike trains at their real width, state), which the memory profiles
(``45nm-fp32+mem`` …) price and the compute-only ones list as unpriced. Energy constants and
the memory model live in :mod:`spikemar.energy.profiles`, with citations; break-even firing
rates in :mod:`spikemar.energy.breakeven`.
"""

from ..counting import counting_active, declare_spikes, record_ops
from .breakeven import BreakEven, BreakEvenTable, break_even
from .counter import SPIKE_DETECTIONS, CountContext, EnergyCounter, profile
from .profiles import (
    HardwareProfile,
    MemoryLevel,
    available_profiles,
    get_profile,
    memory_sibling,
    register_profile,
)
from .report import (
    ComparisonRow,
    EnergyComparison,
    EnergyReport,
    LayerRow,
    compare,
    compare_profiles,
    headline,
    memory_traffic,
)
from .rules import register_neuron, register_rule

__all__ = [
    "SPIKE_DETECTIONS",
    "BreakEven",
    "BreakEvenTable",
    "ComparisonRow",
    "CountContext",
    "EnergyComparison",
    "EnergyCounter",
    "EnergyReport",
    "HardwareProfile",
    "LayerRow",
    "MemoryLevel",
    "available_profiles",
    "break_even",
    "compare",
    "compare_profiles",
    "counting_active",
    "declare_spikes",
    "get_profile",
    "headline",
    "memory_sibling",
    "memory_traffic",
    "profile",
    "record_ops",
    "register_neuron",
    "register_profile",
    "register_rule",
]
