"""Hardware energy profiles: what one operation costs, in picojoules, with its citation.

An energy report prices the counted operations of a forward pass under one named profile:

    E = E_AC · ACs + E_MAC · MACs (+ E_neuron · neuron updates, + E_ew · element-wise ops)

The first two terms are the field's convention (DESIGN.md §1). A profile that has no figure for a
term leaves it ``None``; the report then lists that term as *unpriced* instead of pricing it at
zero. The constants below exist nowhere else in spikemar.

Built-in profiles:

* ``45nm-fp32``, ``45nm-fp16``, ``45nm-int8``: M. Horowitz, "1.1 Computing's energy problem (and
  what we can do about it)", ISSCC 2014, Digest of Technical Papers, pp. 10–14. A MAC is priced
  as one multiply plus one add (fp32: 3.7 + 0.9 = 4.6 pJ; fp16: 1.1 + 0.4 = 1.5 pJ; int8:
  0.2 + 0.03 = 0.23 pJ) and an AC as one add of the same type.
* ``loihi``: M. Davies et al., "Loihi: A Neuromorphic Manycore Processor with On-Chip Learning",
  IEEE Micro 38(1):82–99, 2018, Table 2 (p. 96): 23.6 pJ per synaptic spike op and 81 pJ per
  (active) neuron update. Loihi performs no multiply-accumulate on real-valued inputs, so MACs
  stay unpriced under it.

Users add their own with :func:`register_profile`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = [
    "HardwareProfile",
    "available_profiles",
    "get_profile",
    "register_profile",
]


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
    """

    name: str
    ac_pj: float | None
    mac_pj: float | None
    neuron_update_pj: float | None = None
    elementwise_pj: float | None = None
    citation: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name: expected a non-empty string, got {self.name!r}")
        for field in ("ac_pj", "mac_pj", "neuron_update_pj", "elementwise_pj"):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{field}: expected a number or None, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{field}: expected a finite number >= 0, got {value!r}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> HardwareProfile:
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


def _builtin() -> tuple[HardwareProfile, ...]:
    return (
        HardwareProfile(
            "45nm-fp32",
            ac_pj=0.9,
            mac_pj=4.6,
            citation=_HOROWITZ,
            notes="fp32 add 0.9 pJ; MAC = mult 3.7 + add 0.9 pJ; arithmetic only (no memory)",
        ),
        HardwareProfile(
            "45nm-fp16",
            ac_pj=0.4,
            mac_pj=1.5,
            citation=_HOROWITZ,
            notes="fp16 add 0.4 pJ; MAC = mult 1.1 + add 0.4 pJ; arithmetic only (no memory)",
        ),
        HardwareProfile(
            "45nm-int8",
            ac_pj=0.03,
            mac_pj=0.23,
            citation=_HOROWITZ,
            notes="int8 add 0.03 pJ; MAC = mult 0.2 + add 0.03 pJ; arithmetic only (no memory)",
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
                "not counted"
            ),
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


def get_profile(hardware: str | HardwareProfile) -> HardwareProfile:
    """The profile named ``hardware`` (a :class:`HardwareProfile` is returned as it is)."""
    if isinstance(hardware, HardwareProfile):
        return hardware
    if not isinstance(hardware, str):
        raise TypeError(
            f"hardware: expected a profile name or a HardwareProfile, got {type(hardware).__name__}"
        )
    try:
        return _PROFILES[hardware]
    except KeyError:
        known = ", ".join(repr(n) for n in _PROFILES)
        raise ValueError(
            f"hardware: unknown profile {hardware!r}; known profiles: {known}"
        ) from None


for _p in _builtin():
    register_profile(_p)
del _p
