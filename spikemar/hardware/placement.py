"""Where each module of a MAR LM runs: on a neuromorphic chip or on the host, and why.

The rule: a synaptic layer goes on chip when its input is a spike train (a spike point feeds it),
because Loihi's synapses accumulate spikes; ATMN spike points and mixers whose own arithmetic is a
fixed per-channel decay (the LTI cell) go on chip; everything that needs real-valued arithmetic
across a token (norms, SiLU gates, softmax attention, the embedding lookup, the selective SSM
whose decay and input matrices depend on the input) stays on the host. The spike points and the
projections they feed come from ``MARLM.spike_points()``, a mixer's own arithmetic from its
``chip_reason`` / ``host_reason``: a new mixer kind needs nothing here.
:func:`spikemar.hardware.chip_report` is the public entry (it also reports block networks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..models.common import SpikePoint
from ..models.mar import MARLM, ActivationSparsifier
from ..ssm.mixer import Mixer

__all__ = ["CHIP_REASONS", "HOST_REASONS", "ChipEntry", "ChipReport", "mar_placement"]

HOST_REASONS = {
    "embed": "a lookup of token ids, not a synaptic layer",
    "norm": "RMSNorm divides by a per-token root-mean-square: no Loihi primitive",
    "head": "fed by the real-valued, normalised residual stream (no spikes)",
    "dense_linear": "fed by real values, not spikes: multiply-accumulates",
    "conv": "the selective SSM's depthwise convolution over tokens feeds input-dependent gates",
    "gate": "SiLU(gate)·up multiplies two real-valued activations",
    "sparsifier": "top-k / magnitude sparsification of real values",
    "biased_linear": "fed by ATMN spikes, but its bias (added once per token, not per micro-step) "
    "has no mapping in export_mar_lava",
}
CHIP_REASONS = {
    "spike_point": "ATMN neurons (δ-injected, ternary graded spikes)",
    "spiking_linear": "fed by ATMN spikes: accumulates with 8-bit weights",
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
    _counted: set[int] = field(default_factory=set, repr=False, compare=False)

    def add(self, path: str, module: nn.Module | None, on_chip: bool, why: str,
            params: int | None = None, neurons: int = 0) -> None:  # fmt: skip
        """Add a row; ``params`` defaults to ``module``'s parameters that no earlier row
        counted (a head tied to the embedding shares its weight: counted once, with the
        embedding, and its row says so)."""
        if params is None and module is not None:
            own = list(module.parameters())
            fresh = [p for p in own if id(p) not in self._counted]
            self._counted.update(id(p) for p in own)
            params = sum(p.numel() for p in fresh)
            if len(fresh) < len(own):
                why += " (shares its weight with a module above, counted there)"
        params = params or 0
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


def mar_placement(model: MARLM) -> ChipReport:
    """The chip report of a MAR LM, module by module in the model's order."""
    fed = {}
    for site in model.spike_points(include_dense=True):
        for path in site.projections:
            fed[path] = isinstance(site.module, SpikePoint)
    r = ChipReport()
    _place(r, model, "", fed)
    return r


def _place(r: ChipReport, module: nn.Module, path: str, fed: dict[str, bool]) -> None:
    for name, m in module.named_children():
        p = f"{path}{name}"
        if isinstance(m, SpikePoint):
            channels = m.neuron.log_threshold.numel() if m.neuron.log_threshold.dim() else 0
            r.add(p, m, True, CHIP_REASONS["spike_point"], neurons=channels)
        elif isinstance(m, nn.Identity):
            continue
        elif isinstance(m, ActivationSparsifier):
            r.add(p, m, False, HOST_REASONS["sparsifier"])
        elif isinstance(m, nn.Linear):
            if p == "head":
                r.add(p, m, False, HOST_REASONS["head"])
            else:
                spiking = fed.get(p, False)
                why = CHIP_REASONS["spiking_linear"] if spiking else HOST_REASONS["dense_linear"]
                if spiking and m.bias is not None:  # as export_mar_lava places it: refused
                    spiking, why = False, HOST_REASONS["biased_linear"]
                r.add(p, m, spiking, why)
        elif isinstance(m, nn.Embedding):
            r.add(p, m, False, HOST_REASONS["embed"])
        elif isinstance(m, nn.RMSNorm):
            r.add(p, m, False, HOST_REASONS["norm"])
        elif isinstance(m, nn.Conv1d):
            r.add(p, m, False, HOST_REASONS["conv"])
        elif isinstance(m, Mixer):
            _place_mixer(r, m, p, fed)
        else:
            _place(r, m, f"{p}.", fed)
            if hasattr(m, "spike_inputs") and not isinstance(m, nn.ModuleList):  # an FFN
                r.add(f"{p}.(silu·mul)", None, False, HOST_REASONS["gate"], params=0)


def _place_mixer(r: ChipReport, m: Mixer, path: str, fed: dict[str, bool]) -> None:
    """A mixer's own arithmetic (its direct parameters and what is not a submodule), then its
    submodules."""
    own = dict(m.named_parameters(recurse=False))
    params = sum(t.numel() for t in own.values())
    if m.chip_reason is not None:
        why = m.chip_reason
        spiking = isinstance(getattr(m, "spike_in", None), SpikePoint)
        if not spiking:
            why += " (its input arrives as real values from the host)"
        r.add(path, None, True, why, params=params, neurons=m.chip_neurons)
        r.entries[-1].kind = type(m).__name__
    else:
        name = f"({', '.join(own)})" if own else f"({type(m).__name__})"
        r.add(f"{path}.{name}", None, False, m.host_reason, params=params)
    _place(r, m, f"{path}.", fed)
