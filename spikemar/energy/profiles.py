"""Hardware energy profiles: what one operation and one byte moved cost, with citations.

An energy report prices the counted work of a forward pass under one named profile:

    E = E_AC · ACs + E_MAC · MACs (+ E_neuron · neuron updates, + E_ew · element-wise ops)
        + Σ bytes moved · E_byte(level where they live)                  (memory profiles)

The first two terms are the field's convention (DESIGN.md §1); the memory term is what that
convention leaves out (Dampfhoffer et al. 2023; arXiv 2409.08290). A profile that has no figure
for a term leaves it ``None``; the report then lists that term as *unpriced* instead of pricing
it at zero (a compute-only profile lists its memory traffic, in bytes, as unpriced). The
constants below exist nowhere else in spikemar.

**Memory model** (profiles with ``memory`` levels; :func:`place` is the placement rule):

* *Bytes.* Real values (weights, activations, neuron and SSM state) take ``value_bytes`` each.
  Spike trains take their real width, in one of two encodings, named by ``spike_encoding``:
  ``'packed'``, 2 bits per neuron per micro-step for ternary spikes (1 for binary) whether the
  neuron fired or not; ``'address'``, one address-event per non-zero spike, ⌈log2 n⌉ bits for a
  vector of n neurons plus a sign bit for ternary spikes.
* *Weights.* ``weight_reuse='token'`` (the built-in profiles): every token's vector re-reads the
  layer's weights once, reused across the T micro-steps of its spike trains but not across
  tokens (autoregressive generation at batch 1); ``'call'``: once per layer call, reused across
  the batch and the sequence (prefill, training). Under ``'address'`` a spike-fed layer is
  event-driven instead: each accumulate reads its own weight (weight reads = ACs) and each
  bias add its bias (one per output element of a layer with a bias).
* *Placement.* Levels are ordered from small to large and exist side by side (an 8 KB, a
  32 KB and a 1 MB SRAM beside DRAM). Weights stay resident: the levels are filled greedily,
  hottest weights first (bytes read per byte held), each layer's weights in the smallest level
  with room left for all of them, so thresholds, norms and an SSM's decays stay on chip while
  large matrices spill to DRAM first (:func:`spikemar.energy.report.place_weights`). A layer's
  activations (one token's inputs and outputs under per-token weight fetching, or one vector's,
  a sample's or micro-step's, in a report without a token count; one call's otherwise) and its
  state live in the smallest level that holds them. The last level has no
  capacity limit (off-chip DRAM).

Built-in profiles:

* ``45nm-fp32``, ``45nm-fp16``, ``45nm-int8``: M. Horowitz, "1.1 Computing's energy problem (and
  what we can do about it)", ISSCC 2014, Digest of Technical Papers, pp. 10–14. A MAC is priced
  as one multiply plus one add (fp32: 3.7 + 0.9 = 4.6 pJ; fp16: 1.1 + 0.4 = 1.5 pJ; int8:
  0.2 + 0.03 = 0.23 pJ) and an AC as one add of the same type. Compute only: memory unpriced.
* ``45nm-fp32+mem``, ``45nm-fp16+mem``, ``45nm-int8+mem``: the same arithmetic plus Horowitz's
  memory figures per 64-bit access (same paper, same 45 nm node): SRAM cache 8 KB 10 pJ, 32 KB
  20 pJ, 1 MB 100 pJ; DRAM 1.3–2.6 nJ (the lower end is used), i.e. 1.25, 2.5, 12.5 and
  162.5 pJ per byte. Packed spikes, weights re-read per token. ``…+mem+aer``: the same with
  address-event spikes and event-driven weight reads (the neuromorphic style).
* ``loihi``: M. Davies et al., "Loihi: A Neuromorphic Manycore Processor with On-Chip Learning",
  IEEE Micro 38(1):82–99, 2018, Table 2 (p. 96): 23.6 pJ per synaptic spike op and 81 pJ per
  (active) neuron update. Loihi performs no multiply-accumulate on real-valued inputs, so MACs
  stay unpriced under it. Its figures are whole-core energies that already include reading the
  synaptic weights and neuron state from the core's on-chip SRAM, so its memory term is
  *included*, not unpriced and not added again.

**Zero-skipping** (``zero_skipping=True``; the built-in ``…+zs`` twins of the 45 nm profiles,
e.g. ``45nm-fp32+zs`` and ``45nm-fp32+mem+zs``): hardware that skips zero operands (sparse
accelerators in the style of Cnvlutin or EIE). A layer fed by a *sparsified* activation (a
top-k or threshold spike point, declared with :func:`spikemar.counting.declare_sparse`) is
counted as usual and, beside it, the MACs whose input is zero (``skipped_macs``); a
zero-skipping profile prices only the rest, the MACs of the non-zeros, and, when it prices
memory, reads the non-zero values plus one index of ⌈log2 width⌉ bits each (the metadata)
instead of the dense vector. Zeros of tensors nobody declared sparse (a ReLU's, a spike
train's decode) are not skipped: the counter does not scan every input for zeros. The
dense-hardware profiles (all others) price every MAC, as the hardware does.

A modern-node source (Jouppi et al., "Ten Lessons From Three Generations Shaped Google's
TPUv4i", ISCA 2021, which tabulates 45 nm against 7 nm energies) was looked for: only two of its
figures (fp32 add ≈ 0.4 pJ, fp32 multiply ≈ 1.3 pJ at 7 nm) could be read here, from a
third-party transcription, not the SRAM and DRAM rows a memory profile needs; so no 7 nm profile
is built in. Register one with :func:`register_profile` (:class:`MemoryLevel` for its levels).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

from .._numbers import integer, number

__all__ = [
    "SPIKE_ENCODINGS",
    "WEIGHT_REUSE",
    "HardwareProfile",
    "MemoryLevel",
    "available_profiles",
    "get_profile",
    "memory_sibling",
    "place",
    "register_profile",
]

SPIKE_ENCODINGS = ("packed", "address")
WEIGHT_REUSE = ("token", "call")


@dataclass(frozen=True)
class MemoryLevel:
    """One level of a memory hierarchy: ``capacity_bytes`` (None: unbounded, off-chip) and the
    energy of moving one byte to or from it."""

    name: str
    capacity_bytes: int | None
    pj_per_byte: float

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")
        cap = self.capacity_bytes
        if cap is not None and (integer(cap) is None or cap < 1):
            raise ValueError(f"capacity_bytes: expected an int >= 1 or None, got {cap!r}")
        # NumPy numbers kept as Python's: a profile's to_dict goes into JSON reports
        object.__setattr__(self, "capacity_bytes", None if cap is None else integer(cap))
        _check_price(self, "pj_per_byte")


def _check_price(profile: object, field: str) -> None:
    """Refuse ``profile.field`` unless it is a finite number >= 0, and store it as Python's
    (the dataclasses are frozen: this is their constructor's own write)."""
    value = getattr(profile, field)
    converted = number(value)
    if converted is None:
        raise TypeError(f"{field}: expected a number or None, got {value!r}")
    if not math.isfinite(converted) or converted < 0:
        raise ValueError(f"{field}: expected a finite number >= 0, got {value!r}")
    object.__setattr__(profile, field, converted)


def place(levels: tuple[MemoryLevel, ...], size_bytes: float) -> MemoryLevel:
    """The smallest level of ``levels`` (ordered small to large) that holds ``size_bytes``; the
    last level when none does."""
    for level in levels:
        if level.capacity_bytes is None or size_bytes <= level.capacity_bytes:
            return level
    return levels[-1]


@dataclass(frozen=True)
class HardwareProfile:
    """Energy per operation of one hardware target.

    Args:
        name: the key under which :func:`get_profile` finds it (e.g. ``"45nm-fp32"``).
        ac_pj: energy of one accumulate (a synaptic operation driven by a spike), pJ.
        mac_pj: energy of one multiply-accumulate, pJ; ``None`` if the target has no figure.
        neuron_update_pj: energy of one neuron state update (one neuron, one micro-step), pJ.
        elementwise_pj: energy of one other element-wise op, pJ.
        citation: where the figures come from (shown in every report).
        notes: caveats (operating point, what the figure includes).
        value_bytes: bytes of one real value (weight, activation, state) on this target.
        memory: the memory hierarchy, small to large (the last level unbounded or the
            largest); ``None``: memory traffic is unpriced (compute only).
        spike_encoding: how spike trains move: 'packed' (2 bits per ternary neuron per
            micro-step) or 'address' (one address-event per non-zero spike; spike-fed layers
            then read one weight per accumulate).
        weight_reuse: 'token' (weights re-read for every token's vector) or 'call' (once per
            layer call: reused across the batch and the sequence).
        memory_included: the per-operation figures already include the memory they touch
            (Loihi's core energies): the memory term is neither priced nor unpriced.
        zero_skipping: the target skips zero operands of sparsified activations: their MACs
            are not priced, and the non-zeros are read with an index each (see above).
    """

    name: str
    ac_pj: float | None
    mac_pj: float | None
    neuron_update_pj: float | None = None
    elementwise_pj: float | None = None
    citation: str = ""
    notes: str = ""
    value_bytes: float = 4
    memory: tuple[MemoryLevel, ...] | None = None
    spike_encoding: str = "packed"
    weight_reuse: str = "token"
    memory_included: bool = False
    zero_skipping: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")
        for field in ("ac_pj", "mac_pj", "neuron_update_pj", "elementwise_pj"):
            value = getattr(self, field)
            if value is not None:
                _check_price(self, field)
        _check_price(self, "value_bytes")
        if self.value_bytes <= 0:
            raise ValueError(f"value_bytes: expected a number > 0, got {self.value_bytes!r}")
        if self.spike_encoding not in SPIKE_ENCODINGS:
            raise ValueError(
                f"spike_encoding: expected one of {SPIKE_ENCODINGS}, got {self.spike_encoding!r}"
            )
        for flag in ("zero_skipping", "memory_included"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag}: expected a bool, got {getattr(self, flag)!r}")
        if self.weight_reuse not in WEIGHT_REUSE:
            raise ValueError(
                f"weight_reuse: expected one of {WEIGHT_REUSE}, got {self.weight_reuse!r}"
            )
        if self.memory is not None:
            levels = tuple(self.memory)
            if not levels or not all(isinstance(lv, MemoryLevel) for lv in levels):
                raise TypeError(
                    f"memory: expected a non-empty sequence of MemoryLevel or None, got "
                    f"{self.memory!r}"
                )
            caps = [lv.capacity_bytes for lv in levels]
            bounded = caps if caps[-1] is not None else caps[:-1]
            if None in bounded or bounded != sorted(bounded):
                raise ValueError(
                    "memory: expected levels ordered by capacity, small to large, only the "
                    f"last unbounded; got capacities {caps}"
                )
            names = [lv.name for lv in levels]
            if len(set(names)) < len(names):  # reports name the level each byte lives in
                raise ValueError(f"memory: expected levels with different names, got {names}")
            object.__setattr__(self, "memory", levels)
            if self.memory_included:
                raise ValueError("memory_included: a profile with memory levels prices memory")

    @property
    def prices_memory(self) -> bool:
        """Whether this profile prices memory traffic (it has memory levels)."""
        return self.memory is not None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> HardwareProfile:
        data = dict(data)
        memory = data.get("memory")
        if memory is not None:
            data["memory"] = tuple(
                lv if isinstance(lv, MemoryLevel) else MemoryLevel(**lv)  # type: ignore[arg-type]
                for lv in memory  # type: ignore[union-attr]
            )
        return cls(**data)  # type: ignore[arg-type]


_HOROWITZ = (
    'M. Horowitz, "1.1 Computing\'s energy problem (and what we can do about it)", '
    "ISSCC 2014, pp. 10-14 (45 nm, 0.9 V)"
)
_DAVIES = (
    'M. Davies et al., "Loihi: A Neuromorphic Manycore Processor with On-Chip Learning", '
    "IEEE Micro 38(1):82-99, 2018, Table 2"
)

_PROFILES: dict[str, HardwareProfile] = {}

# Horowitz 2014, memory per 64-bit access at 45 nm: SRAM cache 8 KB 10 pJ, 32 KB 20 pJ, 1 MB
# 100 pJ; DRAM 1.3-2.6 nJ (the lower end: it understates off-chip traffic, for both sides of a
# comparison). Per byte: / 8.
_HOROWITZ_MEMORY = (
    MemoryLevel("SRAM 8 KB", 8 * 1024, 10.0 / 8),
    MemoryLevel("SRAM 32 KB", 32 * 1024, 20.0 / 8),
    MemoryLevel("SRAM 1 MB", 1024 * 1024, 100.0 / 8),
    MemoryLevel("DRAM", None, 1300.0 / 8),
)
_MEMORY_NOTE = (
    "memory per Horowitz's 64-bit accesses: SRAM 8 KB / 32 KB / 1 MB 1.25 / 2.5 / 12.5 pJ/B, "
    "DRAM 162.5 pJ/B (1.3 nJ, the low end of 1.3-2.6); "
)


def _with_memory(base: HardwareProfile, encoding: str) -> HardwareProfile:
    aer = encoding == "address"
    how = (
        "address-event spikes (sign + log2 n bits per non-zero), each accumulate reads its weight"
        if aer
        else "spikes packed at 2 bits per ternary neuron per micro-step, weights re-read per token"
    )
    return HardwareProfile(
        base.name + ("+mem+aer" if aer else "+mem"),
        ac_pj=base.ac_pj,
        mac_pj=base.mac_pj,
        neuron_update_pj=base.neuron_update_pj,
        elementwise_pj=base.elementwise_pj,
        citation=base.citation,
        notes=f"{base.notes.replace('; arithmetic only (no memory)', '')}; {_MEMORY_NOTE}{how}",
        value_bytes=base.value_bytes,
        memory=_HOROWITZ_MEMORY,
        spike_encoding=encoding,
    )


def _zero_skipping(base: HardwareProfile) -> HardwareProfile:
    return dataclasses.replace(
        base,
        name=base.name + "+zs",
        notes=base.notes + "; zero-skipping: MACs on zeros of sparsified activations are "
        "skipped"
        + (
            "; their non-zeros read with a log2(width)-bit index each" if base.prices_memory else ""
        ),
        zero_skipping=True,
    )


def _builtin() -> tuple[HardwareProfile, ...]:
    compute = _builtin_compute()
    memory = tuple(
        _with_memory(p, enc)
        for p in compute
        if p.name.startswith("45nm")
        for enc in SPIKE_ENCODINGS
    )
    skipping = tuple(
        _zero_skipping(p)
        for p in compute + memory
        if p.name.startswith("45nm") and p.spike_encoding == "packed"
    )
    return compute + memory + skipping


def _builtin_compute() -> tuple[HardwareProfile, ...]:
    return (
        HardwareProfile(
            "45nm-fp32",
            ac_pj=0.9,
            mac_pj=4.6,
            citation=_HOROWITZ,
            notes="fp32 add 0.9 pJ; MAC = mult 3.7 + add 0.9 pJ; arithmetic only (no memory)",
            value_bytes=4,
        ),
        HardwareProfile(
            "45nm-fp16",
            ac_pj=0.4,
            mac_pj=1.5,
            citation=_HOROWITZ,
            notes="fp16 add 0.4 pJ; MAC = mult 1.1 + add 0.4 pJ; arithmetic only (no memory)",
            value_bytes=2,
        ),
        HardwareProfile(
            "45nm-int8",
            ac_pj=0.03,
            mac_pj=0.23,
            citation=_HOROWITZ,
            notes="int8 add 0.03 pJ; MAC = mult 0.2 + add 0.03 pJ; arithmetic only (no memory)",
            value_bytes=1,
        ),
        # Loihi, Table 2 of Davies et al. 2018 ("Loihi pre-silicon performance and energy
        # measurements", p. 96), whose rows read:
        #   Energy per synaptic spike op (min)            23.6 pJ
        #   Energy per synaptic update (pairwise STDP)    120 pJ
        #   Energy per neuron update (active / inactive)  81 pJ / 52 pJ
        #   Within-tile spike energy                      1.7 pJ
        #   Energy per tile hop (E-W / N-S)               3.0 pJ / 4.0 pJ
        # All are SDF/SPICE simulations ("consistent with early post-silicon characterization",
        # p. 95), and the synaptic op is a minimum. Checked against verbatim transcriptions of
        # the table (the PDF itself was not reachable from this machine); every source agrees.
        # A spike point updates every neuron at every micro-step, so the active figure is used:
        # it overstates a spiking model's energy rather than understating it. Spike routing
        # (tile hops) and learning are not counted.
        HardwareProfile(
            "loihi",
            ac_pj=23.6,
            mac_pj=None,
            neuron_update_pj=81.0,
            citation=_DAVIES + " (p. 96)",
            notes=(
                "23.6 pJ per synaptic spike op (the table's minimum) and 81 pJ per active neuron "
                "update (52 pJ inactive), pre-silicon simulation; no MAC on Loihi; spike routing "
                "not counted; the figures include the core's on-chip memory (weights and neuron "
                "state in SRAM), so memory traffic is included, not added"
            ),
            value_bytes=1,  # 8-bit synaptic weights
            spike_encoding="address",
            memory_included=True,
        ),
    )


def register_profile(profile: HardwareProfile, *, overwrite: bool = False) -> HardwareProfile:
    """Make ``profile`` available by its name to :func:`get_profile` and every report."""
    if not isinstance(profile, HardwareProfile):
        raise TypeError(f"profile: expected a HardwareProfile, got {type(profile).__name__}")
    if profile.name in _PROFILES and not overwrite:
        raise ValueError(
            f"profile: a profile named {profile.name!r} exists; pass overwrite=True to replace it"
        )
    _PROFILES[profile.name] = profile
    return profile


def available_profiles() -> tuple[str, ...]:
    """The names :func:`get_profile` accepts."""
    return tuple(_PROFILES)


def get_profile(hardware: str | HardwareProfile, *, name: str = "hardware") -> HardwareProfile:
    """The profile named ``hardware`` (a :class:`HardwareProfile` is returned as it is); errors
    name the argument ``name`` it was given as."""
    if isinstance(hardware, HardwareProfile):
        return hardware
    if not isinstance(hardware, str):
        raise TypeError(
            f"{name}: expected a profile name or a HardwareProfile, got {type(hardware).__name__}"
        )
    try:
        return _PROFILES[hardware]
    except KeyError:
        known = ", ".join(repr(n) for n in _PROFILES)
        raise ValueError(f"{name}: unknown profile {hardware!r}; known profiles: {known}") from None


def memory_sibling(hardware: str | HardwareProfile) -> HardwareProfile:
    """The memory-inclusive profile beside ``hardware``: itself when it prices memory or
    includes it (Loihi), else the registered profile named ``NAME+mem``."""
    hw = get_profile(hardware)
    if hw.prices_memory or hw.memory_included:
        return hw
    name = hw.name + "+mem"
    if hw.zero_skipping and hw.name.endswith("+zs"):  # 45nm-fp32+zs → 45nm-fp32+mem+zs
        name = hw.name[: -len("+zs")] + "+mem+zs"
    if name not in _PROFILES:
        raise ValueError(
            f"hardware: {hw.name!r} prices no memory and no profile {name!r} is registered; "
            "give a memory profile (one with memory levels)"
        )
    return _PROFILES[name]


for _p in _builtin():
    register_profile(_p)
del _p
