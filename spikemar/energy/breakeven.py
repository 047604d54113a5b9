"""Break-even firing rates: the rate above which a spike point costs more than the dense form.

For one spike point P and the layers that read its spikes (its *consumers*, the rows whose
``spike_source`` is P), everything the report counted splits into what grows with the number of
spikes and what does not. At firing rate r (non-zero spikes per neuron and micro-step):

    E_spiking(r) = A + B · r
        A = P's own energy (neuron updates, reading its input, its membrane, its thresholds;
            writing its spikes when they are packed) + the rest of the consumers' energy: their
            packed spike reads and weight reads (a packed, weight-stationary layer reads its
            weights whatever fires), their bias adds and bias reads, their outputs written
        B · r = the consumers' accumulates (+ with address-events: every spike's address
            written and read, and one weight read per accumulate)
    E_dense = the consumers fed real values instead, priced as a report prices them under
              ``reference`` (the same profile, or e.g. ``45nm-int8+mem`` for an int8 dense
              model of the same weights): dense MACs, reading the real input, reading the
              weights, their bias adds, their outputs written. The weights stay where the
              report's rows place them under the reference, on both sides: a point's rate does
              not hinge on which matrices the greedy placement gives the SRAM (the dense twin's
              own report, whose weights are read at other rates, may hold them elsewhere:
              under address-events its total then differs by a few per cent)

and the break-even rate is r* = (E_dense − A) / B, from the measured point (B = the variable
energy at the measured rate / that rate): the rate at which P and its consumers cost what the
consumers fed real values cost. The work both forms share (the consumers' outputs, bias adds)
is on both sides, each priced under its own profile: it cancels under one profile and not
against another (an int8 model writes int8 outputs). For the whole model, the sums over all
spike points: the rate at which every spike point firing alike would make the spiking model
cost what its dense form costs.
A rate r* ≤ 0 means the point's fixed cost alone exceeds the dense form; r* ≥ 1 that it pays at
any rate. Terms a profile leaves unpriced are left out of both sides and named in ``note``.
A layer that reads the spikes of several points (one projection called on two points' decodes)
joins them in one entry, named ``'a+b'``, at their common rate. A point that fired no spike is
listed with its fixed cost, but its break-even (and the whole model's) is not told: what a spike
costs is measured from the spikes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from .profiles import HardwareProfile, MemoryLevel, get_profile
from .report import EnergyReport, LayerRow, _counts_of, _price_row, place_weights, text_table

__all__ = ["BreakEven", "BreakEvenTable", "break_even"]

MODEL = "model"  # the name of the whole-model entry
NO_POINTS = "no spike point feeds a counted layer in this report: nothing to break even"


@dataclass(frozen=True)
class BreakEven:
    """One spike point (or the whole model, ``name == 'model'``), per counted work."""

    name: str
    consumers: tuple[str, ...]
    firing_rate: float  # measured: non-zero spikes per neuron and micro-step
    break_even_rate: float | None  # None: cannot be told (no spikes measured, MACs unpriced)
    spiking_pj: float  # at the measured rate: A + B · rate
    fixed_pj: float  # A
    per_rate_pj: float  # B
    dense_pj: float

    @property
    def pays(self) -> bool | None:
        """Whether the spiking form costs less than the dense form at the measured rate."""
        if self.break_even_rate is None:
            return None
        return self.firing_rate < self.break_even_rate


@dataclass(frozen=True)
class BreakEvenTable:
    """Break-even rates of every spike point of a report and of the whole model."""

    hardware: str
    reference: str
    points: tuple[BreakEven, ...]
    model: BreakEven | None
    note: str = ""

    def row(self, name: str) -> BreakEven:
        for p in (*self.points, *((self.model,) if self.model else ())):
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.points)
        raise KeyError(f"name: no spike point {name!r}; spike points: {known}")

    def _lines(self) -> tuple[list[str], list[list[str]]]:
        head = ["spike point", "rate", "break-even", "pays", "spiking", "dense"]
        from .report import _fmt_energy

        def cells(p: BreakEven) -> list[str]:
            r = p.break_even_rate  # a rate in (0, 1) is reachable; outside it, say what it means
            be = ("-" if r is None else f"{r:.4f}" if 0 < r < 1
                  else f"never ({r:.2f})" if r <= 0 else f"any rate ({r:.2f})")  # fmt: skip
            pays = {True: "yes", False: "NO", None: "-"}[p.pays]
            dense = "-" if math.isnan(p.dense_pj) else _fmt_energy(p.dense_pj)
            return [p.name, f"{p.firing_rate:.4f}", be, pays,
                    _fmt_energy(p.spiking_pj), dense]  # fmt: skip

        body = [cells(p) for p in self.points]
        if self.model is not None:
            body.append(cells(self.model))
        return head, body

    def _title(self) -> str:
        vs = "its dense form" if self.reference == self.hardware else f"{self.reference!r}"
        return (
            f"Break-even firing rates under {self.hardware!r} against {vs} (the rate, non-zero "
            "spikes per neuron and micro-step, above which spiking costs more)"
        )

    def to_dict(self) -> dict[str, object]:
        """The table as plain data (a rate that cannot be told, or an unpriced dense form, is
        None), for JSON."""

        def entry(p: BreakEven) -> dict[str, object]:
            d = dataclasses.asdict(p)
            d["consumers"] = list(p.consumers)
            d["dense_pj"] = None if math.isnan(p.dense_pj) else p.dense_pj
            d["pays"] = p.pays
            return d

        return {
            "schema": "spikemar.energy.break_even/1",
            "hardware": self.hardware,
            "reference": self.reference,
            "points": [entry(p) for p in self.points],
            "model": None if self.model is None else entry(self.model),
            "note": self.note,
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_table(self) -> str:
        head, body = self._lines()
        out = [self._title(), *(text_table(head, body, left=1) if body else [NO_POINTS])]
        if self.note:
            out.append(f"note: {self.note}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.to_table()

    def to_markdown(self) -> str:
        head, body = self._lines()
        out = [self._title(), ""]
        if body:
            out.append("| " + " | ".join(head) + " |")
            out.append("| --- | ---: | ---: | :---: | ---: | ---: |")
            out += ["| " + " | ".join(r) + " |" for r in body]
        else:
            out.append(NO_POINTS)
        if self.note:
            out += ["", f"note: {self.note}"]
        return "\n".join(out) + "\n"


def _level_pj(hw: HardwareProfile, name: str | None) -> float:
    if name is None or hw.memory is None:
        return 0.0
    for level in hw.memory:
        if level.name == name:
            return level.pj_per_byte
    return 0.0


def _dense_pj(
    c: LayerRow, ref: HardwareProfile, report: EnergyReport, w_levels: dict[str, MemoryLevel]
) -> tuple[float | None, list[str]]:
    """What consumer ``c`` costs fed real values under ``ref`` (None when ref prices no MAC):
    its counts with the spike-fed work made dense, priced as a report's row."""
    notes = []
    if ref.mac_pj is None:
        return None, [f"{ref.name!r} prices no MAC"]
    counts = _counts_of(c)
    counts.update(
        acs=0,
        macs=c.macs + c.dense_macs,
        activation_reads=c.activation_reads + c.dense_inputs,
        weight_reads_event=c.weight_reads,  # real inputs: the weights read per vector
        spike_read_bits_packed=0,
        spike_read_bits_address=0,
        spike_kind="real",
        spike_elements=0,
        spike_nnz=0,
        spike_pos=0,
        spike_neg=0,
    )
    if not ref.prices_memory and not ref.memory_included:
        notes.append(f"memory unpriced under {ref.name!r} (compute only)")
    row = _price_row(counts, ref, weight_level=w_levels.get(c.name), tokens=report.tokens)
    return row.energy_pj, notes


def _spiking_parts(
    points: list[LayerRow], consumers: list[LayerRow], hw: HardwareProfile
) -> tuple[float, float]:
    """(fixed, variable at the measured rate) energy of spike ``points`` and their consumers."""
    address = hw.spike_encoding == "address"
    fixed = variable = 0.0
    for p in points:
        write_b = (p.spike_write_bits_address if address else p.spike_write_bits_packed) / 8
        write_pj = write_b * _level_pj(hw, p.activation_level)
        fixed += p.energy_pj - (write_pj if address else 0.0)
        variable += write_pj if address else 0.0
    for c in consumers:
        grows = c.ac_energy_pj
        if address:  # every spike moves an address and reads the weights it drives
            grows += c.spike_read_bits_address / 8 * _level_pj(hw, c.activation_level)
            grows += c.acs * hw.value_bytes * _level_pj(hw, c.weight_level)
        variable += grows
        fixed += c.energy_pj - grows
    return fixed, variable


def _groups(rows: tuple[LayerRow, ...]) -> list[tuple[list[LayerRow], list[LayerRow]]]:
    """(spike points, the rows that read their spikes) in row order: a row that reads the
    spikes of several points (``spike_source`` 'a+b') joins them in one group."""
    by_name = {r.name: r for r in rows}
    groups: list[tuple[dict[str, None], list[LayerRow]]] = []
    for c in rows:
        if not c.spike_source:
            continue
        sources = dict.fromkeys(n for n in c.spike_source.split("+") if n in by_name)
        met = [g for g in groups if not sources.keys().isdisjoint(g[0])]
        names = {n: None for g in met for n in g[0]} | sources
        readers = [r for g in met for r in g[1]] + [c]
        groups = [g for g in groups if g not in met] + [(names, readers)]
    order = {r.name: i for i, r in enumerate(rows)}
    out = []
    for names, readers in groups:
        points = sorted((by_name[n] for n in names), key=lambda r: order[r.name])
        if any(p.spike_elements for p in points):
            out.append((points, sorted(readers, key=lambda r: order[r.name])))
    return sorted(out, key=lambda g: order[g[0][0].name])


def _entry(
    name: str,
    consumers: tuple[str, ...],
    rate: float,
    fixed: float,
    variable: float,
    dense: float | None,
) -> BreakEven:
    per_rate = variable / rate if rate > 0 else math.nan
    if dense is None or not rate > 0 or per_rate <= 0:
        be = None
    else:
        be = (dense - fixed) / per_rate
    return BreakEven(
        name=name,
        consumers=consumers,
        firing_rate=rate,
        break_even_rate=be,
        spiking_pj=fixed + variable,
        fixed_pj=fixed,
        per_rate_pj=per_rate if math.isfinite(per_rate) else 0.0,
        dense_pj=math.nan if dense is None else dense,
    )


def break_even(
    report: EnergyReport, reference: str | HardwareProfile | None = None
) -> BreakEvenTable:
    """Break-even firing rates of every spike point in ``report`` (priced under its own
    profile) against the dense form of the layers it feeds, priced under ``reference``
    (default: the report's profile; ``'45nm-int8+mem'`` for an int8 dense model of the same
    weights), and of the whole model. See the module docstring for the model."""
    if not isinstance(report, EnergyReport):
        raise TypeError(f"report: expected an EnergyReport, got {type(report).__name__}")
    hw = report.hardware
    ref = hw if reference is None else get_profile(reference, name="reference")
    notes: dict[str, None] = {}
    if hw.neuron_update_pj is None and any(r.neuron_updates for r in report.rows):
        notes[f"neuron updates unpriced under {hw.name!r} (not in the spiking side)"] = None
    if not hw.prices_memory and not hw.memory_included:
        notes[f"memory unpriced under {hw.name!r} (compute only)"] = None
    # where the weights live under the reference (the same placement rule, its value width)
    w_levels = place_weights(report.rows, ref) if ref.prices_memory else {}
    points: list[BreakEven] = []
    sums = [0.0, 0.0, 0.0, 0, 0]  # fixed, variable, dense, nnz, elements
    dense_known = True
    for group, consumers in _groups(report.rows):
        nnz = sum(p.spike_nnz for p in group)
        elements = sum(p.spike_elements for p in group)
        fixed, variable = _spiking_parts(group, consumers, hw)
        dense: float | None = 0.0
        for c in consumers:
            d, why = _dense_pj(c, ref, report, w_levels)
            notes.update(dict.fromkeys(why))
            dense = None if d is None or dense is None else dense + d
        name = "+".join(p.name for p in group)
        if not nnz:  # what a spike costs is measured from the spikes
            notes[f"{name} fired no spike: its cost per spike is not measured"] = None
        names = tuple(c.name for c in consumers)
        points.append(_entry(name, names, nnz / elements, fixed, variable, dense))
        sums[0] += fixed
        sums[1] += variable
        sums[3] += nnz
        sums[4] += elements
        if dense is None:
            dense_known = False
        else:
            sums[2] += dense
    model = None
    if points:
        # a common rate r for every point: Σ A + r · Σ B_i, with Σ B_i = Σ variable_i / rate_i
        fixed = sum(p.fixed_pj for p in points)
        per_rate = sum(p.per_rate_pj for p in points)
        rate = sums[3] / sums[4] if sums[4] else 0.0
        dense = sums[2] if dense_known else None
        measured = all(p.firing_rate > 0 for p in points)
        be = None if dense is None or per_rate <= 0 or not measured else (dense - fixed) / per_rate
        model = BreakEven(
            name=MODEL,
            consumers=tuple(c for p in points for c in p.consumers),
            firing_rate=rate,
            break_even_rate=be,
            spiking_pj=sums[0] + sums[1],
            fixed_pj=fixed,
            per_rate_pj=per_rate,
            dense_pj=math.nan if dense is None else dense,
        )
    return BreakEvenTable(hw.name, ref.name, tuple(points), model, "; ".join(notes))
