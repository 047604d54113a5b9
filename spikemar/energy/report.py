"""Energy reports: per-layer counts priced under a hardware profile, and their renderings.

An :class:`EnergyReport` holds one :class:`LayerRow` per counted module (in the order they first
ran) and the profile that prices them; totals are sums of the rows. It renders as a terminal
table (``str(report)``), Markdown, JSON (which round-trips: ``EnergyReport.from_json``) and a PNG
of energy by layer with the AC and MAC parts stacked. :func:`compare` sets two reports side by
side (a spiking student against its dense teacher): energy ratio per layer and in total.

What a row counts (see :mod:`spikemar.energy.counter`): ``acs`` synaptic accumulates driven by
spikes (Σ_t nnz(s_t) · fan-out); ``macs`` multiply-accumulates of real-valued inputs (and MAC work
a module records itself, such as an SSM state update); ``neuron_updates`` one per neuron and
micro-step; ``elementwise_ops`` one per element produced by other element-wise modules (and bias
adds). ``spike_*`` describe the spikes the row is about: the input of a synaptic layer, the
output of a neuron or spike point. A term the profile has no figure for is *unpriced*: it is not
in ``energy_pj`` and the report lists it. Modules the counter could not count are listed in
``uncounted`` by name; they are not in the totals.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._numbers import check_count, integer
from .counter import MEMORY_COUNT_FIELDS
from .profiles import HardwareProfile, MemoryLevel, get_profile, place

__all__ = [
    "ComparisonRow",
    "EnergyComparison",
    "EnergyReport",
    "LayerRow",
    "compare",
    "compare_profiles",
    "headline",
    "memory_traffic",
    "place_weights",
]

SCHEMA = "spikemar.energy/2"
_OLD_SCHEMAS = ("spikemar.energy/1",)  # read with zero memory counts
_TERMS = (  # count field, price field, energy field
    ("acs", "ac_pj", "ac_energy_pj"),
    ("macs", "mac_pj", "mac_energy_pj"),
    ("neuron_updates", "neuron_update_pj", "neuron_energy_pj"),
    ("elementwise_ops", "elementwise_pj", "elementwise_energy_pj"),
)


def _check_tokens(tokens: object) -> int | None:
    """``tokens`` as a Python int (NumPy's ints too: the report writes it to JSON) or None."""
    if tokens is None:
        return None
    if integer(tokens) is None or tokens < 1:
        raise ValueError(f"tokens: expected an int >= 1 or None, got {tokens!r}")
    return integer(tokens)


@dataclass(frozen=True)
class LayerRow:
    """Counts and energy of one module over all counted passes."""

    name: str
    kind: str
    module_type: str
    calls: int
    spike_kind: str | None  # 'ternary', 'binary', 'real', 'index', several joined by '+', None
    spike_elements: int
    spike_nnz: int
    spike_pos: int
    spike_neg: int
    acs: int
    macs: int
    elementwise_ops: int
    neuron_updates: int
    ac_energy_pj: float
    mac_energy_pj: float
    neuron_energy_pj: float
    elementwise_energy_pj: float
    energy_pj: float
    notes: tuple[str, ...] = ()
    # memory counts (profile-independent; see spikemar.energy.counter.MEMORY_COUNT_FIELDS)
    weight_reads: int = 0
    weight_reads_call: int = 0
    weight_reads_event: int = 0
    activation_reads: int = 0
    activation_writes: int = 0
    spike_read_bits_packed: int = 0
    spike_read_bits_address: int = 0
    spike_write_bits_packed: int = 0
    spike_write_bits_address: int = 0
    state_reads: int = 0
    state_writes: int = 0
    dense_macs: int = 0
    dense_inputs: int = 0
    skipped_macs: int = 0  # MACs on zeros of a sparsified input (a zero-skipping profile skips)
    skipped_reads: int = 0  # those zeros (not read under zero-skipping)
    sparse_index_bits: int = 0  # the non-zeros' indices (read instead, under zero-skipping)
    vectors: int = 0  # tokens, samples or micro-steps processed (0: not known)
    spike_source: str | None = None  # the spike point(s) or neuron(s) whose spikes it reads
    parameters: int = 0  # parameter elements its module holds (where its weights are placed)
    # of those, elements an earlier row's module holds too (tied weights: a head that reuses the
    # embedding matrix), and that row: held once, in the level where that row's weights are
    shared_parameters: int = 0
    weights_of: str | None = None
    # memory under the profile: bytes moved, the level each class lives in, energy
    weight_bytes: float = 0.0
    activation_bytes: float = 0.0
    state_bytes: float = 0.0
    weight_level: str | None = None
    activation_level: str | None = None
    state_level: str | None = None
    weight_memory_pj: float = 0.0
    activation_memory_pj: float = 0.0
    state_memory_pj: float = 0.0
    memory_energy_pj: float = 0.0
    compute_energy_pj: float = 0.0

    @property
    def memory_bytes(self) -> float:
        """Bytes moved by this row under the report's profile (weights, activations, state)."""
        return self.weight_bytes + self.activation_bytes + self.state_bytes

    @property
    def firing_rate(self) -> float | None:
        """Fraction of spike elements that are non-zero (None when the row has no spikes)."""
        return self.spike_nnz / self.spike_elements if self.spike_elements else None

    @property
    def pos_rate(self) -> float | None:
        return self.spike_pos / self.spike_elements if self.spike_elements else None

    @property
    def neg_rate(self) -> float | None:
        return self.spike_neg / self.spike_elements if self.spike_elements else None


def priced_count(counts: LayerRow | dict[str, Any], field: str, hw: HardwareProfile) -> int:
    """The count of ``field`` that ``hw`` prices: the counted one, except that a zero-skipping
    profile leaves out the MACs whose input is a zero of a sparsified tensor."""
    get = counts.get if isinstance(counts, dict) else lambda f, d=0: getattr(counts, f, d)
    n = get(field, 0)
    if field == "macs" and hw.zero_skipping:
        n -= get("skipped_macs", 0)
    return n


def _compute_energies(counts: dict[str, Any], hw: HardwareProfile) -> dict[str, float]:
    energies: dict[str, float] = {}
    for count_f, price_f, energy_f in _TERMS:
        price = getattr(hw, price_f)
        n = priced_count(counts, count_f, hw)
        energies[energy_f] = n * price if price is not None else 0.0
    return energies


def memory_traffic(
    counts: LayerRow | dict[str, Any], hw: str | HardwareProfile
) -> tuple[float, float, float]:
    """``(weight, activation, state)`` bytes that one row (or its counts) moves under ``hw``:
    real values at ``hw.value_bytes``; spike trains packed or as address-events per
    ``hw.spike_encoding``; weights fetched per token, per call, or (address-events) one per
    accumulate of a spike-fed layer (see :mod:`spikemar.energy.profiles`)."""
    hw = get_profile(hw, name="hw")
    if isinstance(counts, LayerRow):
        counts = _counts_of(counts)
    vb = hw.value_bytes
    aer = hw.spike_encoding == "address"
    if aer:
        weights = counts.get("weight_reads_event", 0)
    elif hw.weight_reuse == "call":
        weights = counts.get("weight_reads_call", 0)
    else:
        weights = counts.get("weight_reads", 0)
    suffix = "address" if aer else "packed"
    spike_bits = counts.get(f"spike_read_bits_{suffix}", 0) + counts.get(
        f"spike_write_bits_{suffix}", 0
    )
    reals = counts.get("activation_reads", 0) + counts.get("activation_writes", 0)
    if hw.zero_skipping:  # a sparsified input's non-zeros are read with their indices
        reals -= counts.get("skipped_reads", 0)
        spike_bits += counts.get("sparse_index_bits", 0)
    state = counts.get("state_reads", 0) + counts.get("state_writes", 0)
    return weights * vb, reals * vb + spike_bits / 8, state * vb


def place_weights(
    rows: Iterable[LayerRow | dict[str, Any]], hw: HardwareProfile
) -> dict[str, MemoryLevel]:
    """Which memory level holds each row's weights under ``hw`` (a profile with memory levels):
    the levels are filled greedily, hottest weights first (bytes read per byte held), each row
    in the smallest level with room left for all of it; what fits nowhere goes to the last
    level. So small, often-read parameters (thresholds, norms, an SSM's decays) stay on chip
    while large matrices spill to DRAM first. A tensor two rows share (``weights_of``: a tied
    head and its embedding) is held once, where its first row's weights are, and is as hot as
    both rows' reads of it."""
    levels = hw.memory
    if levels is None:
        raise ValueError(f"hardware: {hw.name!r} has no memory levels")
    counts = [_counts_of(r) if isinstance(r, LayerRow) else r for r in rows]
    names = {c["name"] for c in counts}
    traffic = {c["name"]: memory_traffic(c, hw)[0] for c in counts}
    for c in counts:  # a shared tensor's reads through either row heat its one copy
        owner = c.get("weights_of")
        if owner in names:
            traffic[owner] += traffic[c["name"]]

    def held(c: dict[str, Any]) -> int:
        return c.get("parameters", 0) - (c.get("shared_parameters", 0) if
                                          c.get("weights_of") in names else 0)  # fmt: skip

    def heat(c: dict[str, Any]) -> float:
        return traffic[c["name"]] / max(1, held(c))

    free: list[float] = [math.inf if lv.capacity_bytes is None else lv.capacity_bytes
                         for lv in levels]  # fmt: skip
    out: dict[str, MemoryLevel] = {}
    sharers = [c for c in counts if c.get("weights_of") in names]
    for c in sorted((c for c in counts if c not in sharers), key=heat, reverse=True):
        size = held(c) * hw.value_bytes
        chosen = levels[-1]
        for k, level in enumerate(levels):
            if size <= free[k]:
                free[k] -= size
                chosen = level
                break
        out[c["name"]] = chosen
    for c in sharers:  # its own rest (a bias) goes with the shared tensor
        k = levels.index(out[c["weights_of"]])
        free[k] -= held(c) * hw.value_bytes
        out[c["name"]] = levels[k]
    return out


def _price_row(
    counts: dict[str, Any],
    hw: HardwareProfile,
    *,
    weight_level: MemoryLevel | None = None,
    tokens: int | None = None,
) -> LayerRow:
    energies = _compute_energies(counts, hw)
    compute = sum(energies[e] for _c, _p, e in _TERMS)
    weight_b, act_b, state_b = memory_traffic(counts, hw)
    levels: tuple[MemoryLevel | None, ...] = (None, None, None)
    mem_pj = (0.0, 0.0, 0.0)
    if hw.prices_memory:
        # activations and state: one token's working set under per-token weight fetching (one
        # vector's in a report without a token count: a sample, a micro-step), else one call's;
        # the state is read and written, one copy of it lives there
        per = int(counts["calls"])
        if hw.weight_reuse == "token":
            per = tokens or int(counts.get("vectors", 0)) or per
        per = max(1, per)
        assert hw.memory is not None and weight_level is not None
        levels = (
            weight_level,
            place(hw.memory, act_b / per),
            place(hw.memory, state_b / per / 2),
        )
        moved = (weight_b, act_b, state_b)
        mem_pj = tuple(b * lv.pj_per_byte for b, lv in zip(moved, levels, strict=True))
    kinds = counts.get("spike_kinds")
    if kinds is not None:
        spike_kind = "+".join(kinds) if kinds else None
    else:
        spike_kind = counts.get("spike_kind")
    memory_counts = {f: int(counts.get(f, 0)) for f in MEMORY_COUNT_FIELDS}
    return LayerRow(
        name=counts["name"],
        kind=counts["kind"],
        module_type=counts["module_type"],
        calls=int(counts["calls"]),
        spike_kind=spike_kind,
        spike_elements=int(counts["spike_elements"]),
        spike_nnz=int(counts["spike_nnz"]),
        spike_pos=int(counts["spike_pos"]),
        spike_neg=int(counts["spike_neg"]),
        acs=int(counts["acs"]),
        macs=int(counts["macs"]),
        elementwise_ops=int(counts["elementwise_ops"]),
        neuron_updates=int(counts["neuron_updates"]),
        notes=tuple(counts.get("notes", ())),
        energy_pj=compute + sum(mem_pj),
        **energies,
        **memory_counts,
        spike_source=counts.get("spike_source"),
        parameters=int(counts.get("parameters", 0)),
        shared_parameters=int(counts.get("shared_parameters", 0)),
        weights_of=counts.get("weights_of"),
        weight_bytes=weight_b,
        activation_bytes=act_b,
        state_bytes=state_b,
        weight_level=levels[0].name if levels[0] else None,
        activation_level=levels[1].name if levels[1] else None,
        state_level=levels[2].name if levels[2] else None,
        weight_memory_pj=mem_pj[0],
        activation_memory_pj=mem_pj[1],
        state_memory_pj=mem_pj[2],
        memory_energy_pj=sum(mem_pj),
        compute_energy_pj=compute,
    )


# the row fields a report sums: each is a ``total_<field>`` property and a key of the totals
_TOTALS = (
    "acs",
    "macs",
    "elementwise_ops",
    "neuron_updates",
    "energy_pj",
    "ac_energy_pj",
    "mac_energy_pj",
    "compute_energy_pj",
    "memory_energy_pj",
    "memory_bytes",
)


def _total(field: str) -> property:
    def total(self: EnergyReport) -> float:
        return sum(getattr(r, field) for r in self.rows)

    total.__doc__ = f"``{field}`` summed over the rows."
    return property(total)


_COUNT_FIELDS = (
    "name",
    "kind",
    "module_type",
    "calls",
    "spike_kind",
    "spike_elements",
    "spike_nnz",
    "spike_pos",
    "spike_neg",
    "acs",
    "macs",
    "elementwise_ops",
    "neuron_updates",
    "notes",
    *MEMORY_COUNT_FIELDS,
    "parameters",
    "shared_parameters",
    "weights_of",
    "spike_source",
)


@dataclass(frozen=True)
class EnergyReport:
    """Per-layer operation counts of the counted forward passes, priced under ``hardware``."""

    rows: tuple[LayerRow, ...]
    hardware: HardwareProfile
    passes: int
    tokens: int | None = None
    uncounted: tuple[tuple[str, str], ...] = ()  # (module name, type name)
    parameters: int = 0  # parameter elements of the model (where its weights are placed)

    @classmethod
    def build(
        cls,
        rows: Iterable[dict[str, Any]],
        *,
        hardware: str | HardwareProfile,
        passes: int,
        tokens: int | None = None,
        uncounted: Iterable[tuple[str, str]] = (),
        parameters: int = 0,
    ) -> EnergyReport:
        """Price raw per-row counts (dicts with the count fields of :class:`LayerRow`);
        ``parameters``: the model's parameter elements (placement of its weights)."""
        hw = get_profile(hardware)
        tokens = _check_tokens(tokens)
        parameters = check_count("parameters", parameters, 0)
        counts = list(rows)
        placed = place_weights(counts, hw) if hw.prices_memory else {}
        return cls(
            rows=tuple(
                _price_row(r, hw, weight_level=placed.get(r["name"]), tokens=tokens) for r in counts
            ),
            hardware=hw,
            passes=int(passes),
            tokens=tokens,
            uncounted=tuple((str(n), str(t)) for n, t in uncounted),
            parameters=parameters,
        )

    def with_hardware(self, hardware: str | HardwareProfile) -> EnergyReport:
        """The same counts priced under another profile (nothing is re-run)."""
        return EnergyReport.build(
            (_counts_of(r) for r in self.rows),
            hardware=hardware,
            passes=self.passes,
            tokens=self.tokens,
            uncounted=self.uncounted,
            parameters=self.parameters,
        )

    # -- totals ---------------------------------------------------------------------------

    total_acs = _total("acs")
    total_macs = _total("macs")
    total_elementwise_ops = _total("elementwise_ops")
    total_neuron_updates = _total("neuron_updates")
    total_energy_pj = _total("energy_pj")
    total_ac_energy_pj = _total("ac_energy_pj")
    total_mac_energy_pj = _total("mac_energy_pj")
    total_compute_energy_pj = _total("compute_energy_pj")
    total_memory_energy_pj = _total("memory_energy_pj")
    total_memory_bytes = _total("memory_bytes")

    @property
    def unpriced(self) -> dict[str, int]:
        """Counted terms the profile has no figure for: {count field: total count}."""
        out = {}
        for count_f, price_f, _e in _TERMS:
            n = sum(getattr(r, count_f) for r in self.rows)
            if n and getattr(self.hardware, price_f) is None:
                out[count_f] = n
        hw = self.hardware
        moved = round(self.total_memory_bytes)
        if moved and not hw.prices_memory and not hw.memory_included:
            out["memory_bytes"] = moved
        return out

    @property
    def complete(self) -> bool:
        """True when every module that computed something was counted."""
        return not self.uncounted

    def row(self, name: str) -> LayerRow:
        """The row named ``name``."""
        for r in self.rows:
            if r.name == name:
                return r
        known = ", ".join(repr(r.name) for r in self.rows)
        raise KeyError(f"name: no row {name!r}; rows: {known}")

    def _totals(self) -> dict[str, float]:
        return {field: getattr(self, f"total_{field}") for field in _TOTALS}

    def per_pass(self) -> dict[str, float]:
        """Totals divided by the number of counted forward passes."""
        if self.passes < 1:
            raise ValueError("passes: this report counted no forward pass")
        return {k: v / self.passes for k, v in self._totals().items()}

    def per_token(self) -> dict[str, float]:
        """Totals divided by the number of tokens (``tokens`` given to the counter)."""
        if self.tokens is None:
            raise ValueError(
                "tokens: this report has no token count; pass tokens= to profile() or report()"
            )
        return {k: v / self.tokens for k, v in self._totals().items()}

    # -- JSON -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            d = asdict(r)
            d["notes"] = list(r.notes)
            d["firing_rate"] = r.firing_rate
            d["pos_rate"] = r.pos_rate
            d["neg_rate"] = r.neg_rate
            rows.append(d)
        return {
            "schema": SCHEMA,
            "hardware": self.hardware.to_dict(),
            "passes": self.passes,
            "tokens": self.tokens,
            "parameters": self.parameters,
            "rows": rows,
            "totals": self._totals(),
            "per_pass": self.per_pass() if self.passes else None,
            "per_token": self.per_token() if self.tokens else None,
            "unpriced": self.unpriced,
            "uncounted": [{"name": n, "type": t} for n, t in self.uncounted],
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnergyReport:
        """Rebuild a report from :meth:`to_dict` output (energies are recomputed from the
        counts and the stored profile)."""
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema != SCHEMA and schema not in _OLD_SCHEMAS:
            got = schema if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"data: expected a {SCHEMA!r} report, got schema {got!r}")
        try:
            hw = HardwareProfile.from_dict(data["hardware"])
            # an older report has no memory counts: they read as zero
            rows = [{k: r.get(k, None if k in ("spike_source", "weights_of") else 0)
                     for k in _COUNT_FIELDS} for r in data["rows"]]  # fmt: skip
            return cls.build(
                rows,
                hardware=hw,
                passes=data["passes"],
                tokens=data["tokens"],
                uncounted=[(u["name"], u["type"]) for u in data["uncounted"]],
                parameters=int(data.get("parameters", 0)),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            what = f"no field {err}" if isinstance(err, KeyError) else str(err)
            raise ValueError(f"data: a malformed {schema!r} report ({what})") from err

    @classmethod
    def from_json(cls, text: str) -> EnergyReport:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"text: not a JSON energy report ({err})") from None
        return cls.from_dict(data)

    # -- renderings -----------------------------------------------------------------------

    def _header(self) -> list[str]:
        hw = self.hardware
        prices = ", ".join(
            f"{label} {_fmt_price(getattr(hw, f))}"
            for label, f in (
                ("AC", "ac_pj"),
                ("MAC", "mac_pj"),
                ("neuron update", "neuron_update_pj"),
                ("element-wise op", "elementwise_pj"),
            )
        )
        scope = f"{self.passes} forward pass{'es' if self.passes != 1 else ''}"
        if self.tokens is not None:
            scope += f", {self.tokens:,} tokens"
        return [f"Energy report, hardware {hw.name!r} ({prices}); {scope}"]

    def _footer(self) -> list[str]:
        lines = []
        parts = [f"total {_fmt_energy(self.total_energy_pj)}"]
        if self.passes:
            parts.append(f"per pass {_fmt_energy(self.total_energy_pj / self.passes)}")
        if self.tokens:
            parts.append(f"per token {_fmt_energy(self.total_energy_pj / self.tokens)}")
        lines.append(
            "; ".join(parts)
            + f" (AC {_fmt_energy(self.total_ac_energy_pj)}, MAC "
            + f"{_fmt_energy(self.total_mac_energy_pj)})"
        )
        lines.extend(self._memory_lines())
        if self.unpriced:
            terms = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in self.unpriced.items())
            lines.append(
                f"* not priced under {self.hardware.name!r} (counted, not in the energy): {terms}"
            )
        if self.uncounted:
            names = ", ".join(f"{n} ({t})" for n, t in self.uncounted)
            lines.append(f"UNCOUNTED modules (not in any total): {names}")
        lines.append(f"source: {self.hardware.citation}")
        if self.hardware.notes:
            lines.append(f"notes: {self.hardware.notes}")
        notes = [(r.name, n) for r in self.rows for n in r.notes]
        lines.extend(f"{name}: {note}" for name, note in notes)
        return lines

    def _memory_lines(self) -> list[str]:
        hw = self.hardware
        if hw.memory_included:
            return [
                f"memory: included in {hw.name!r}'s per-operation figures (the core's on-chip "
                "memory), not added separately"
            ]
        weights = sum(r.weight_bytes for r in self.rows)
        acts = sum(r.activation_bytes for r in self.rows)
        state = sum(r.state_bytes for r in self.rows)
        moved = (
            f"weights {_fmt_bytes(weights)}, activations and spikes {_fmt_bytes(acts)}, "
            f"state {_fmt_bytes(state)}"
        )
        how = (
            f"{hw.value_bytes:g} B per value, spikes "
            + ("as address-events" if hw.spike_encoding == "address" else "packed")
            + (
                ", weights one read per accumulate where fed by spikes"
                if hw.spike_encoding == "address"
                else f", weights fetched per {hw.weight_reuse}"
            )
        )
        if not hw.prices_memory:
            return [f"memory traffic (not priced: compute-only profile): {moved} ({how})"]
        held: dict[str, float] = {}
        for r in self.rows:
            own = r.parameters - r.shared_parameters  # a tied tensor once
            if r.weight_level is not None and own:
                held[r.weight_level] = held.get(r.weight_level, 0) + own * hw.value_bytes
        where = ", ".join(
            f"{_fmt_bytes(held[lv.name])} in {lv.name}"
            for lv in hw.memory  # type: ignore[union-attr]
            if lv.name in held
        )
        return [
            f"memory {_fmt_energy(self.total_memory_energy_pj)} + compute "
            f"{_fmt_energy(self.total_compute_energy_pj)}: {moved} ({how}); weights held: "
            f"{where or 'none'}"
        ]

    def _has_unpriced(self, row: LayerRow) -> bool:
        return any(
            getattr(row, count_f) and getattr(self.hardware, price_f) is None
            for count_f, price_f, _e in _TERMS
        )

    def _show_memory(self, memory: bool | None) -> bool:
        return self.hardware.prices_memory if memory is None else bool(memory)

    def _cells(self, memory: bool = False) -> tuple[list[str], list[list[str]]]:
        """Table cells; ``memory`` adds bytes moved and compute and memory energy per row."""
        head = ["layer", "kind", "spikes", "rate (+/-)", "ACs", "MACs", "elem-ops", "neuron upd"]
        if memory:
            head += ["bytes moved", "compute", "memory"]
        head += ["energy", "share"]
        total = self.total_energy_pj
        priced = self.hardware.prices_memory

        def mem_cells(moved: float, compute: float, mem: float) -> list[str]:
            if not memory:
                return []
            shown = _fmt_energy(mem) if priced else "unpriced" if moved else "-"
            return [_fmt_bytes(moved), _fmt_energy(compute), shown]

        body = []
        for r in self.rows:
            rate = (
                "-"
                if r.firing_rate is None
                else f"{r.firing_rate:.3f} ({r.pos_rate:.3f}/{r.neg_rate:.3f})"
            )
            share = f"{100 * r.energy_pj / total:.1f}%" if total > 0 else "-"
            mark = " *" if self._has_unpriced(r) else ""
            body.append(
                [
                    r.name,
                    r.kind,
                    r.spike_kind or "-",
                    rate,
                    f"{r.acs:,}",
                    f"{r.macs:,}",
                    f"{r.elementwise_ops:,}",
                    f"{r.neuron_updates:,}",
                    *mem_cells(r.memory_bytes, r.compute_energy_pj, r.memory_energy_pj),
                    _fmt_energy(r.energy_pj) + mark,
                    share,
                ]
            )
        body.append(
            [
                "TOTAL",
                "",
                "",
                "",
                f"{self.total_acs:,}",
                f"{self.total_macs:,}",
                f"{self.total_elementwise_ops:,}",
                f"{self.total_neuron_updates:,}",
                *mem_cells(
                    self.total_memory_bytes,
                    self.total_compute_energy_pj,
                    self.total_memory_energy_pj,
                ),
                _fmt_energy(total),
                "100.0%" if total > 0 else "-",
            ]
        )
        return head, body

    def to_table(self, *, memory: bool | None = None) -> str:
        """A plain-text table for the terminal; ``memory`` (default: when the profile prices
        memory) adds bytes moved, compute and memory energy per row."""
        head, body = self._cells(self._show_memory(memory))
        lines = text_table(head, body, left=3, total=True)
        return "\n".join([*self._header(), *lines, *self._footer()])

    def __str__(self) -> str:
        return self.to_table()

    def to_markdown(self, *, memory: bool | None = None) -> str:
        """A GitHub-flavoured Markdown table with the same content as :meth:`to_table`."""
        head, body = self._cells(self._show_memory(memory))
        esc = [[c.replace("|", "\\|") for c in row] for row in [head, *body]]
        out = [self._header()[0], ""]
        out.append("| " + " | ".join(esc[0]) + " |")
        out.append("| " + " | ".join("---" if i < 3 else "---:" for i in range(len(head))) + " |")
        out += ["| " + " | ".join(r) + " |" for r in esc[1:-1]]
        out.append("| " + " | ".join(f"**{c}**" if c else "" for c in esc[-1]) + " |")
        out.append("")
        out += [f"- {line}" for line in self._footer()]
        return "\n".join(out) + "\n"

    def figure(self, *, per_token: bool = False):
        """A matplotlib Figure: energy by layer, AC and MAC parts stacked (other priced terms,
        neuron updates and element-wise ops, then memory traffic of weights, activations and
        state when the profile prices it, stacked after them)."""
        from matplotlib.figure import Figure

        scale, unit_label = 1.0, "per forward pass" if self.passes == 1 else "total"
        if per_token:
            if self.tokens is None:
                raise ValueError("per_token: this report has no token count")
            scale, unit_label = 1.0 / self.tokens, "per token"
        elif self.passes > 1:
            scale, unit_label = 1.0 / self.passes, "per forward pass"
        # every synaptic layer (even one that received no spike), and anything with energy
        rows = [
            r
            for r in self.rows
            if r.energy_pj > 0 or r.acs or r.macs or (r.spike_kind and not r.neuron_updates)
        ]
        parts = [
            ("AC", "ac_energy_pj", "#0072B2"),
            ("MAC", "mac_energy_pj", "#E69F00"),
            ("neuron update", "neuron_energy_pj", "#009E73"),
            ("element-wise", "elementwise_energy_pj", "#999999"),
            ("memory: weights", "weight_memory_pj", "#CC79A7"),
            ("memory: activations, spikes", "activation_memory_pj", "#56B4E9"),
            ("memory: state", "state_memory_pj", "#D55E00"),
        ]
        parts = parts[:2] + [p for p in parts[2:] if any(getattr(r, p[1]) for r in rows)]
        largest = max((r.energy_pj for r in rows), default=0.0) * scale
        unit, div = _energy_unit(largest if largest > 0 else 1.0)
        height = max(2.5, 0.32 * len(rows) + 1.6)
        fig = Figure(figsize=(8.0, height), layout="constrained")
        ax = fig.add_subplot()

        def label(r: LayerRow) -> str:
            missing = [
                term
                for term, count_f, price_f in (("ACs", "acs", "ac_pj"), ("MACs", "macs", "mac_pj"))
                if getattr(r, count_f) and getattr(self.hardware, price_f) is None
            ]
            return f"{r.name} ({r.kind})" + "".join(f"\n[{m} not priced]" for m in missing)

        names = [label(r) for r in rows]
        ys = list(range(len(rows)))
        left = [0.0] * len(rows)
        for label, field, color in parts:
            vals = [getattr(r, field) * scale / div for r in rows]
            ax.barh(ys, vals, left=left, color=color, label=label, height=0.7)
            left = [a + b for a, b in zip(left, vals, strict=True)]
        ax.set_yticks(ys, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"energy {unit_label} ({unit})")
        title = f"{_fmt_energy(self.total_energy_pj * scale)} {unit_label} on {self.hardware.name}"
        if self.hardware.prices_memory:
            title += (
                f" (compute {_fmt_energy(self.total_compute_energy_pj * scale)}, memory "
                f"{_fmt_energy(self.total_memory_energy_pj * scale)})"
            )
        elif self.hardware.memory_included:
            title += " (memory included in the per-op figures)"
        if self.unpriced:
            title += "\nnot priced: " + ", ".join(k.replace("_", " ") for k in self.unpriced)
        if self.uncounted:
            title += f" — {len(self.uncounted)} uncounted module(s)"
        _finish_axes(ax, title, fontsize=10, empty=not rows)
        return fig

    def save_png(self, path: str | Path, *, per_token: bool = False, dpi: int = 150) -> Path:
        """Write :meth:`figure` to ``path`` atomically (temporary file, then ``os.replace``)."""
        return _save_png(lambda: self.figure(per_token=per_token), path, dpi)


def text_table(
    head: list[str], body: list[list[str]], *, left: int = 1, total: bool = False
) -> list[str]:
    """Aligned plain-text lines of a table: the head, a rule, the body (its last row, a total,
    after a second rule when ``total``); the first ``left`` columns aligned left."""
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    if total and body:
        return [line(head), rule, *(line(r) for r in body[:-1]), rule, line(body[-1])]
    return [line(head), rule, *(line(r) for r in body)]


def _finish_axes(ax: Any, title: str, *, fontsize: float, empty: bool) -> None:
    """The energy figures' common frame: title, legend outside on the right, light grid."""
    ax.set_title(title, fontsize=fontsize)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="x", alpha=0.3)
    if empty:
        ax.text(0.5, 0.5, "nothing counted", ha="center", va="center", transform=ax.transAxes)


def _save_png(draw: Callable[[], Any], path: str | Path, dpi: int) -> Path:
    """Check that ``path`` names a .png, then write ``draw()``'s figure there atomically
    (temporary file, then ``os.replace``)."""
    from spikemar.viz.plots import save_figure

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path: expected a .png file name, got {str(path)!r}")
    return save_figure(draw(), path, dpi=dpi)


def _counts_of(row: LayerRow) -> dict[str, Any]:
    return {f: getattr(row, f) for f in _COUNT_FIELDS}


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.4g} {unit}"
    return f"{n:.4g} B"


def _fmt_price(v: float | None) -> str:
    return "unpriced" if v is None else f"{v:g} pJ"


SMALL_ROW = 0.005  # a comparison figure's rows under this share of its largest are not drawn
_UNITS = (("J", 1e12), ("mJ", 1e9), ("µJ", 1e6), ("nJ", 1e3), ("pJ", 1.0))


def _energy_unit(pj: float) -> tuple[str, float]:
    for unit, div in _UNITS:
        if abs(pj) >= div:
            return unit, div
    return "pJ", 1.0


def _fmt_energy(pj: float) -> str:
    if pj == 0:
        return "0 pJ"
    unit, div = _energy_unit(pj)
    return f"{pj / div:.4g} {unit}"


# -- comparison -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ComparisonRow:
    """One layer name in either report (energy per the comparison's basis; None if absent).
    Layers with no energy and no synaptic work on either side are left out."""

    name: str
    student_pj: float | None
    teacher_pj: float | None

    @property
    def ratio(self) -> float | None:
        """student / teacher energy (None where either side is missing or the teacher's is 0)."""
        if self.student_pj is None or not self.teacher_pj:
            return None
        return self.student_pj / self.teacher_pj


@dataclass(frozen=True)
class EnergyComparison:
    """Two reports side by side, normalised per token when both know their tokens, else per
    forward pass. ``ratio`` is student / teacher energy; ``savings`` its inverse."""

    student: EnergyReport
    teacher: EnergyReport
    labels: tuple[str, str] = ("student", "teacher")

    @property
    def basis(self) -> str:
        return "token" if self.student.tokens and self.teacher.tokens else "pass"

    def _norm(self, report: EnergyReport) -> float:
        n = report.tokens if self.basis == "token" else report.passes
        return 1.0 / n if n else math.nan

    @property
    def rows(self) -> tuple[ComparisonRow, ...]:
        s_scale, t_scale = self._norm(self.student), self._norm(self.teacher)
        teacher = {r.name: r.energy_pj * t_scale for r in self.teacher.rows}
        out = [
            ComparisonRow(r.name, r.energy_pj * s_scale, teacher.pop(r.name, None))
            for r in self.student.rows
        ]
        out += [ComparisonRow(name, None, e) for name, e in teacher.items()]
        # synaptic work stays listed even where the profile prices it at nothing (Loihi's MACs)
        synaptic = {r.name for rep in (self.student, self.teacher) for r in rep.rows
                    if r.acs or r.macs}  # fmt: skip
        return tuple(r for r in out if r.student_pj or r.teacher_pj or r.name in synaptic)

    @property
    def student_pj(self) -> float:
        return self.student.total_energy_pj * self._norm(self.student)

    @property
    def teacher_pj(self) -> float:
        return self.teacher.total_energy_pj * self._norm(self.teacher)

    @property
    def unpriced(self) -> dict[str, tuple[float, float]]:
        """Work the profile leaves unpriced on either side: {term: (student, teacher)} per the
        basis (a term counted as nothing in both totals)."""
        s_un, t_un = self.student.unpriced, self.teacher.unpriced
        s_scale, t_scale = self._norm(self.student), self._norm(self.teacher)
        return {
            term: (s_un.get(term, 0) * s_scale, t_un.get(term, 0) * t_scale)
            for term in (*s_un, *(k for k in t_un if k not in s_un))
        }

    @property
    def refusal(self) -> str | None:
        """Why there is no ratio, or None. The synaptic work (ACs, MACs) is what the two sides
        trade against each other; when the profile leaves it unpriced, one side's work would
        count as nothing and the ratio would be meaningless (Loihi prices no MAC)."""
        s, t = self.labels
        for term in ("macs", "acs"):
            counts = self.unpriced.get(term)
            if counts is None:
                continue
            what = {"macs": "MACs", "acs": "ACs"}[term]
            sides = f"{s} {counts[0]:,.0f}, {t} {counts[1]:,.0f} per {self.basis}"
            return (
                f"{self.student.hardware.name!r} prices no {what}, and {sides} would count "
                "as nothing; compare under a profile that prices both sides' work"
            )
        return None

    @property
    def ratio(self) -> float | None:
        """Total student energy / total teacher energy (per the basis); None when the profile
        leaves the synaptic work of either side unpriced (:attr:`refusal` says why)."""
        if self.refusal is not None:
            return None
        return self.student_pj / self.teacher_pj if self.teacher_pj else math.inf

    @property
    def savings(self) -> float | None:
        """Total teacher energy / total student energy: how many times less the student uses
        (None with :attr:`ratio`)."""
        if self.refusal is not None:
            return None
        return self.teacher_pj / self.student_pj if self.student_pj else math.inf

    def to_dict(self) -> dict[str, Any]:
        s, t = self.labels
        return {
            "schema": "spikemar.energy.comparison/1",
            "hardware": self.student.hardware.name,
            "basis": self.basis,
            "labels": list(self.labels),
            "rows": [
                {"name": r.name, f"{s}_pj": r.student_pj, f"{t}_pj": r.teacher_pj, "ratio": r.ratio}
                for r in self.rows
            ],
            f"{s}_pj": self.student_pj,
            f"{t}_pj": self.teacher_pj,
            "ratio": _finite_or_none(self.ratio),
            "savings": _finite_or_none(self.savings),
            "refusal": self.refusal,
            "unpriced": {k: list(v) for k, v in self.unpriced.items()},
            f"{s}": self.student.to_dict(),
            f"{t}": self.teacher.to_dict(),
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        s, t = self.labels
        head = ["layer", f"{s} / {self.basis}", f"{t} / {self.basis}", f"{s}/{t}"]

        def e(v: float | None) -> str:
            return "-" if v is None else _fmt_energy(v)

        body = [
            [r.name, e(r.student_pj), e(r.teacher_pj), "-" if r.ratio is None else f"{r.ratio:.4g}"]
            for r in self.rows
        ]
        total = "-" if self.ratio is None else f"{self.ratio:.4g}"
        body.append(["TOTAL", e(self.student_pj), e(self.teacher_pj), total])
        return head, body

    def _summary(self) -> str:
        s, t = self.labels
        head = f"{s} vs {t} on {self.student.hardware.name!r}, per {self.basis}: "
        if self.refusal is not None:
            return head + f"no ratio: {self.refusal}"
        line = head + f"ratio {self.ratio:.4g} ({t} uses {self.savings:.3g}x the energy of {s})"
        others = [
            f"{term.replace('_', ' ')} ({s} {a:,.0f}, {t} {b:,.0f})"
            for term, (a, b) in self.unpriced.items()
        ]
        if others:
            line += "; not priced on either side, so not in the ratio: " + ", ".join(others)
        return line

    def to_table(self) -> str:
        head, body = self._cells()
        return "\n".join([self._summary(), *text_table(head, body, left=1, total=True)])

    def __str__(self) -> str:
        return self.to_table()

    def figure(self):
        """A matplotlib Figure: each layer's energy per the basis, the two sides side by side,
        compute and memory stacked; the title is the comparison's ratio line."""
        from matplotlib.figure import Figure

        s_label, t_label = self.labels
        s_rows = {r.name: r for r in self.student.rows}
        t_rows = {r.name: r for r in self.teacher.rows}
        names = [r.name for r in self.rows]
        s_scale, t_scale = self._norm(self.student), self._norm(self.teacher)

        def parts(row: LayerRow | None, scale: float) -> tuple[float, float]:
            if row is None:
                return 0.0, 0.0
            return row.compute_energy_pj * scale, row.memory_energy_pj * scale

        s_parts = [parts(s_rows.get(n), s_scale) for n in names]
        t_parts = [parts(t_rows.get(n), t_scale) for n in names]
        largest = max((a + b for a, b in (*s_parts, *t_parts)), default=0.0)
        hw = self.student.hardware

        def tick(name: str) -> str:
            # name the work drawn as nothing because the profile has no price for it
            missing = [
                f"{side}'s {term} not priced"
                for side, rows in ((s_label, s_rows), (t_label, t_rows))
                for term, count_f, price_f in (("ACs", "acs", "ac_pj"), ("MACs", "macs", "mac_pj"))
                if name in rows and getattr(rows[name], count_f) and getattr(hw, price_f) is None
            ]
            return name + "".join(f"\n[{m}]" for m in missing)

        # rows too small to see on this axis (norms, spike points, element-wise modules) are
        # left out of the picture and counted in its axis label; the tables list every row
        ticks = [tick(n) for n in names]
        keep = [i for i in range(len(names))
                if max(sum(s_parts[i]), sum(t_parts[i])) >= SMALL_ROW * largest
                or ticks[i] != names[i]]  # fmt: skip
        hidden = len(names) - len(keep)
        ticks = [ticks[i] for i in keep]
        s_parts, t_parts = [s_parts[i] for i in keep], [t_parts[i] for i in keep]
        unit, div = _energy_unit(largest if largest > 0 else 1.0)
        height = max(3.0, 0.42 * len(ticks) + 2.0)
        fig = Figure(figsize=(9.0, height), layout="constrained")
        ax = fig.add_subplot()
        ys = list(range(len(ticks)))

        bars = (
            (s_parts, -0.2, ("#0072B2", "#56B4E9"), s_label),
            (t_parts, 0.2, ("#D55E00", "#E69F00"), t_label),
        )
        for side, offset, (c_compute, c_memory), label in bars:
            y = [v + offset for v in ys]
            compute = [a / div for a, _ in side]
            memory = [b / div for _, b in side]
            ax.barh(y, compute, height=0.38, color=c_compute, label=f"{label}: compute")
            if any(memory):
                ax.barh(y, memory, left=compute, height=0.38, color=c_memory,
                        label=f"{label}: memory", hatch="//", edgecolor="white")  # fmt: skip
        ax.set_yticks(ys, ticks, fontsize=8)
        ax.invert_yaxis()
        xlabel = f"energy per {self.basis} ({unit})"
        if hidden:
            xlabel += (
                f"\n{hidden} module{'s' if hidden > 1 else ''} under {SMALL_ROW:.1%} of the "
                "largest bar not drawn (the tables list them)"
            )
        ax.set_xlabel(xlabel)
        _finish_axes(ax, "\n".join(_wrap(self._summary(), 110)), fontsize=9, empty=not ticks)
        return fig

    def save_png(self, path: str | Path, *, dpi: int = 150) -> Path:
        """Write :meth:`figure` to ``path`` atomically."""
        return _save_png(self.figure, path, dpi)

    def to_markdown(self) -> str:
        head, body = self._cells()
        out = [self._summary(), "", "| " + " | ".join(head) + " |"]
        out.append("| --- | ---: | ---: | ---: |")
        out += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(out) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def _finite_or_none(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def compare(
    student: EnergyReport,
    teacher: EnergyReport,
    *,
    labels: tuple[str, str] = ("student", "teacher"),
) -> EnergyComparison:
    """Energy of ``student`` against ``teacher``, per layer (matched by name) and in total.

    Both must be priced under the same profile (re-price one with
    :meth:`EnergyReport.with_hardware`).
    """
    for arg, rep in (("student", student), ("teacher", teacher)):
        if not isinstance(rep, EnergyReport):
            raise TypeError(f"{arg}: expected an EnergyReport, got {type(rep).__name__}")
    if student.hardware != teacher.hardware:
        raise ValueError(
            f"teacher: priced under {teacher.hardware.name!r} but student under "
            f"{student.hardware.name!r}; use teacher.with_hardware({student.hardware.name!r})"
        )
    if not (
        isinstance(labels, tuple) and len(labels) == 2 and all(isinstance(x, str) for x in labels)
    ):
        raise ValueError(f"labels: expected a pair of strings, got {labels!r}")
    # the labels name keys of to_dict() beside its own: two sides' keys must not meet
    keys = [*labels, *(f"{x}_pj" for x in labels)]
    if not all(labels) or len(set(keys)) < 4 or _COMPARISON_KEYS.intersection(keys):
        raise ValueError(
            f"labels: expected two different non-empty names, neither of them (nor with '_pj') "
            f"one of the comparison's own fields {sorted(_COMPARISON_KEYS)}, got {labels!r}"
        )
    return EnergyComparison(student, teacher, labels)


# the keys of EnergyComparison.to_dict() that are not named after its labels
_COMPARISON_KEYS = frozenset(
    ("schema", "hardware", "basis", "labels", "rows", "ratio", "savings", "refusal", "unpriced")
)


def compare_profiles(
    student: EnergyReport,
    teacher: EnergyReport,
    profiles: Iterable[str | HardwareProfile] | None = None,
    *,
    labels: tuple[str, str] = ("student", "teacher"),
) -> tuple[EnergyComparison, ...]:
    """The comparison of ``student`` against ``teacher`` under each of ``profiles`` (default:
    the student's own, every registered profile, in registration order); the counts are
    re-priced, nothing is re-run. A comparison that cannot give a ratio says why
    (:attr:`EnergyComparison.refusal`)."""
    from .profiles import available_profiles

    if profiles is None:
        profiles = (student.hardware, *available_profiles())
    elif isinstance(profiles, str | HardwareProfile):
        raise TypeError(
            f"profiles: expected an iterable of profile names or profiles, got {profiles!r} "
            f"(one profile: [{profiles!r}])"
        )
    seen: dict[str, EnergyComparison] = {}
    for p in profiles:
        hw = get_profile(p, name="profiles")
        if hw.name not in seen:
            seen[hw.name] = compare(
                student.with_hardware(hw), teacher.with_hardware(hw), labels=labels
            )
    return tuple(seen.values())


def headline(
    student: EnergyReport,
    teacher: EnergyReport,
    *,
    compute: str | HardwareProfile = "45nm-fp32",
    memory: str | HardwareProfile | None = None,
    labels: tuple[str, str] = ("spiking", "dense"),
) -> str:
    """One line with both honest figures: the energy ratio of ``student`` against ``teacher``
    compute-only (under ``compute``) and memory-inclusive (under ``memory``, default the
    memory profile beside ``compute``, e.g. ``45nm-fp32+mem``), each with its profile's name;
    a ``compute`` profile that prices memory itself (or includes it, as Loihi's) is one figure,
    named so. The counts are re-priced, nothing is re-run. A profile that gives no ratio
    (:attr:`EnergyComparison.refusal`) says so instead."""
    from .profiles import get_profile, memory_sibling

    parts = []
    hw = get_profile(compute, name="compute")
    if memory is not None:
        memory = get_profile(memory, name="memory")
        if not (memory.prices_memory or memory.memory_included):
            raise ValueError(
                f"memory: {memory.name!r} prices no memory traffic; give a memory profile "
                f"(one with memory levels, e.g. {memory.name + '+mem'!r})"
            )
    if hw.prices_memory or hw.memory_included:  # a memory profile given as compute: one figure
        profiles = [("with memory traffic" if hw.prices_memory else "memory included", hw)]
        if memory is not None and memory is not hw:
            what = "with memory traffic" if memory.prices_memory else "memory included"
            profiles.append((what, memory))
    else:
        if memory is None:
            try:
                memory = memory_sibling(hw)
            except ValueError:  # a user profile with no memory sibling: say so, price the rest
                parts.append(f"with memory traffic: no memory profile beside {hw.name!r}")
        profiles = [("compute only", hw)]
        if memory is not None:
            what = "with memory traffic" if memory.prices_memory else "memory included"
            profiles.append((what, memory))
    for what, hw in profiles:
        cmp = compare(student.with_hardware(hw), teacher.with_hardware(hw), labels=labels)
        s, t = labels
        name = cmp.student.hardware.name
        if cmp.ratio is None:
            parts.append(f"{what} ({name}): no ratio, {cmp.refusal}")
            continue
        parts.append(
            f"{what} ({name}): {s} {_fmt_energy(cmp.student_pj)}, {t} "
            f"{_fmt_energy(cmp.teacher_pj)}, {_fmt_times(cmp.savings)}"
        )
    basis = compare(student, teacher, labels=labels).basis
    return f"energy per {basis}, {labels[0]} vs {labels[1]}: " + "; ".join(parts)


def _fmt_times(savings: float | None) -> str:
    """'5.9x less' / '1.3x more' (savings = teacher / student)."""
    if savings is None or not math.isfinite(savings):
        return "no ratio"
    if f"{savings:.3g}" == "1":  # not '1x less'
        return "the same to 3 digits"
    if savings >= 1:
        return f"{savings:.3g}x less"
    return f"{1 / savings:.3g}x more"
