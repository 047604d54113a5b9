"""The SOP energy counter: attach to a module tree, run inputs through it, count per layer.

For a synaptic layer (Linear, Conv, …) fed by spikes s_t the counter records

    ACs  = Σ_t nnz(s_t) · fan-out        (a ternary ±1 spike is one add or subtract)

and for one fed by real values ``MACs = input elements · fan-out``; spiking neurons add one
neuron update per output element; other modules add element-wise ops (see
:mod:`spikemar.energy.rules`). The counts are priced under a hardware profile when a report is
built (:mod:`spikemar.energy.report`).

**Forward hooks, not a dispatch mode.** Hooks fire once per module call, so the counter's Python
runs a handful of times per layer; a ``TorchDispatchMode`` (SpikingJelly's ``op_counter``) runs
Python on every aten op, including the dozens inside each neuron, which is where SpikingJelly's
+155–180% overhead comes from. Hooks also see what the counts need: the layer's kind and
geometry (fan-out with stride, padding, dilation and groups; an embedding's lookups) and the
module that produced a tensor. The price: computation done by plain functions inside a module's
``forward`` is invisible, so a module that has no rule and computes something itself is listed in
the report as *uncounted*, and code that wants to count such work calls :func:`record_ops`.

**Which inputs are spikes.** A tensor is a spike tensor when it was produced by a registered
spiking neuron (or is a view of one, or went through a spike-preserving module), or when a module
declared it the decode of a spike train with :func:`declare_spikes`. Knowing the producer costs
nothing and is right for ternary spikes and for MAR's decoded spike trains, which are real-valued
tensors. Inputs with no such tag are, in the default ``spike_detection="auto"``, checked by value
(every element in {−1, 0, +1}: four fused passes, no sync) so that spikes from neurons the counter
does not know are still counted as ACs; ``"producer"`` skips that check, ``"values"`` ignores tags
and checks every input by value (how the peers decide, but ternary-aware).

**Spike counts instead of spike trains.** A spike point that feeds only Linear projections
(``MARLM.spike_points()`` says which; their fan-out is the same for every spike) need not build
its [T, …] spike train for the counter: its fused kernel counts the +1 and −1 spikes as it runs
and the point declares the counts (:func:`spikemar.counting.declare_spike_counts`), which the
counter sums for all points in one reduction when the report is built. A point feeding anything
else (a conv, whose fan-out depends on the position) or in a model without that iterator is
asked for its spike train (:meth:`EnergyCounter.needs_spike_train`).

**Memory traffic, with the same hooks.** Every event also records what it moves, in elements
(bits for spike trains), independent of any profile: the parameters a layer reads (once per call
and once per token vector; a spike-fed layer's accumulates, each of which reads one weight when
the hardware is event-driven), the real-valued activations it reads and writes, the spike trains
it reads or writes (2 bits per ternary neuron per micro-step packed, or an address-event per
non-zero spike), and neuron or SSM state read and written (a neuron module's membrane at every
update; a δ-injected spike point's membrane lives in a register for its T micro-steps).
Functional work reports its own with :func:`record_ops`. The report turns them into bytes and
energy under a memory profile (:mod:`spikemar.energy.profiles`).

**No sync per layer.** Counts stay 0-d tensors on the device until a report is built; then they
are read back together: one transfer per device (two when spike points declared counts).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Literal, Unpack

import torch
from torch import nn

from .. import counting
from ..counting import counting_active, declare_spikes, record_ops
from . import _stats
from .profiles import HardwareProfile, get_profile
from .rules import find_rule

__all__ = [
    "SPIKE_DETECTIONS",
    "CountContext",
    "EnergyCounter",
    "counting_active",
    "declare_spikes",
    "profile",
    "record_ops",
]

SpikeDetection = Literal["auto", "producer", "values"]
SPIKE_DETECTIONS: tuple[str, ...] = ("auto", "producer", "values")

Count = counting.Count

# per-row memory counts (elements of real values, bits of spike trains), see _resolve
MEMORY_COUNT_FIELDS = (
    "weight_reads",  # parameter elements, fetched once per token vector
    "weight_reads_call",  # ... once per layer call
    "weight_reads_event",  # ... one per accumulate (and bias add) where fed spikes (event-driven)
    "activation_reads",  # real-valued input elements
    "activation_writes",  # real-valued output elements
    "spike_read_bits_packed",  # spike trains read, packed (2 bits ternary, 1 binary)
    "spike_read_bits_address",  # ... as address-events of the non-zero spikes
    "spike_write_bits_packed",  # spike trains written (neurons, spike points), packed
    "spike_write_bits_address",
    "state_reads",  # neuron membranes, SSM state: elements read
    "state_writes",
    "dense_macs",  # MACs the spike-fed work would cost fed real values (break-even rates)
    "dense_inputs",  # real input elements it would read then
    "skipped_macs",  # MACs whose input is a zero of a sparsified tensor (zero-skipping skips)
    "skipped_reads",  # ... and those zeros, not read by zero-skipping hardware
    "sparse_index_bits",  # the index of each non-zero it reads instead (⌈log2 width⌉ bits)
    # vectors (tokens, samples, micro-steps) its calls processed: without a token count, one
    # vector's working set is what per-token weight fetching holds (0: not known, one call's)
    "vectors",
)
_MEMORY_EVENT_FIELDS = (
    "weight_call",
    "weight_token",
    "activation_reads",
    "activation_writes",
    "state_reads",
    "state_writes",
)

# The fields of an event and their defaults. The spike-dependent ones (``nnz``, ``total``,
# ``acs_units``) count only when ``is_spike`` holds, ``dense_macs`` only when it does not.
_EVENT_DEFAULTS: dict[str, Any] = {
    "spike_kind": None,  # None (counts only), 'index', 'real', 'ternary', 'binary', 'values'
    "spike_elements": 0,  # elements of the spike train read or written
    "nnz": None,  # its non-zero spikes, and their signed sum (None: binary, = nnz)
    "total": None,
    "is_spike": True,
    "acs_units": None,  # ACs = acs_units · fan_out (acs_units = nnz when None)
    "fan_out": 0,
    "dense_macs": 0,
    "macs": 0,
    "elementwise_ops": 0,
    "neuron_updates": 0,
    # memory, in elements (or bits for spike trains): parameter elements read once per call /
    # once per token vector
    "weight_call": 0,
    "weight_token": 0,
    "activation_reads": 0,
    "activation_writes": 0,
    "state_reads": 0,
    "state_writes": 0,
    "dense_inputs": 0,  # a synaptic layer's real input elements (read when not spikes)
    # its bias elements read where spikes drive it event by event (one per bias add; with real
    # inputs, or spikes fetched per token, the bias is among the weights read per vector)
    "bias_reads": 0,
    # spikes read ('read': a synaptic layer's input) or written ('write': a neuron's output), at
    # packed_bits per spike element or address_bits per non-zero spike
    "spike_io": None,
    "packed_bits": 0,
    "address_bits": 0,  # (a sparsified input: the bits of one index)
    "source": None,  # the row that produced the spikes a synaptic layer reads
    "sparse_nnz": None,  # non-zeros of a sparsified real input (declare_sparse)
    "vectors": 0,  # vectors processed (see MEMORY_COUNT_FIELDS)
}


class _Event:
    """One contribution to a row (fields and defaults: ``_EVENT_DEFAULTS``). Tensor fields are
    resolved when the report is built.

    An event whose fields are all ints is shared by every call with the same geometry (built
    once, appended per call). A call whose spikes were counted appends ``(template, nnz,
    total)`` instead: the template carries what the geometry fixes, :meth:`filled` makes the
    call's event when the report is built."""

    __slots__ = tuple(_EVENT_DEFAULTS)

    def __init__(self, **fields: Any) -> None:
        unknown = fields.keys() - _EVENT_DEFAULTS.keys()
        if unknown:
            raise TypeError(f"_Event: unknown fields {sorted(unknown)}")
        for name, default in _EVENT_DEFAULTS.items():
            setattr(self, name, fields.get(name, default))

    def filled(self, nnz: Any, total: Any) -> _Event:
        """A copy with one call's spike counts."""
        ev = _Event.__new__(_Event)
        for name in _Event.__slots__:
            setattr(ev, name, getattr(self, name))
        ev.nnz, ev.total = nnz, total
        return ev


def _spikes_written(
    n: int,
    ternary: bool,
    width: int,
    weight_call: int,
    inputs: int,
    state: int,
    vectors: int,
) -> _Event:
    """The template of a neuron or spike point (:meth:`_Event.filled` adds the counts): one
    update per element of its ``n``-element spike train of ``vectors`` vectors, ``inputs`` real
    values and its ``weight_call`` thresholds read (once per call, or once per vector), ``state``
    membrane elements read and written, the spike train written (addresses among ``width``
    neurons)."""
    packed, address = _spike_bits(ternary, width)
    return _Event(
        spike_kind="ternary" if ternary else "binary",
        spike_elements=n,
        neuron_updates=n,
        weight_call=weight_call,
        weight_token=weight_call * vectors,
        activation_reads=inputs,
        state_reads=state,
        state_writes=state,
        spike_io="write",
        packed_bits=packed,
        address_bits=address,
        vectors=vectors,
    )


@functools.lru_cache(maxsize=1024)
def _spike_bits(ternary: bool, neurons: int) -> tuple[int, int]:
    """(packed bits per spike element, address-event bits per non-zero spike) for spikes of one
    vector of ``neurons`` neurons: 2 or 1 bits packed; ⌈log2 n⌉ address bits plus a sign bit
    for ternary spikes."""
    address = max(1, math.ceil(math.log2(max(2, neurons))))
    return (2, address + 1) if ternary else (1, address)


class _Row:
    __slots__ = (
        "calls", "events", "kind", "module_type", "name", "notes", "parameters", "reporting",
    )  # fmt: skip

    def __init__(self, name: str, kind: str, module_type: str, parameters: int = 0) -> None:
        self.name = name
        self.kind = kind
        self.module_type = module_type
        self.parameters = parameters  # parameter elements the row's module holds (placement)
        self.empty()

    def empty(self) -> None:
        """Forget the counts (EnergyCounter.reset keeps the row object for the next pass)."""
        self.calls = 0
        self.events: list[_Event | tuple[_Event, Any, Any]] = []
        self.notes: dict[str, None] = {}
        self.reporting = False  # its module reported its own work (never listed as uncounted)


class _Tag:
    """What the counter knows about a tensor (by the identity of its storage's root tensor)."""

    __slots__ = (
        "decode",
        "decode_elements",
        "nnz",
        "numel",
        "ref",
        "source",
        "sparse",
        "ternary",
        "total",
        "unit",
    )

    def __init__(
        self,
        root: torch.Tensor,
        ternary: bool,
        unit: bool = True,
        nnz: Count | None = None,
        total: Count | None = None,
        decode: torch.Tensor | None = None,
        source: str | None = None,
        decode_elements: int = 0,
        sparse: bool = False,
    ) -> None:
        self.ref = weakref.ref(root)
        self.sparse = sparse  # a sparsified real tensor (declare_sparse), not spikes
        self.numel = root.numel()
        self.ternary = ternary
        self.unit = unit
        self.nnz = nnz
        self.total = total
        self.decode = decode  # the spike train [T, ...] this tensor decodes, when it was kept
        # elements of the spike train this tensor decodes (0: not a decode); a decode declared
        # with counts only (declare_spike_counts) has no ``decode`` tensor
        self.decode_elements = decode.numel() if decode is not None else decode_elements
        self.source = source  # the row (neuron or spike point) that produced the spikes


class _SpikePair(tuple):
    """A spike count still held as a kernel's (+1, −1) counts ``[..., 2]`` (``pair[0]``): in an
    event's ``nnz`` it stands for the number of non-zero spikes, in its ``total`` for their
    signed sum. :func:`_resolve_pairs` sums every pair of a report in one reduction per device.
    (A tuple: made per spike-point call without a Python-level constructor.)"""

    __slots__ = ()


def _resolve_pairs(events: list[_Event]) -> None:
    """Replace every :class:`_SpikePair` in the events' ``nnz``/``total`` by its value: the
    counts of all pairs on one device concatenated, summed per pair by one ``index_add_``."""
    groups: dict[torch.device, dict[int, torch.Tensor]] = {}
    found: list[tuple[_Event, str, _SpikePair]] = []
    for ev in events:
        for f in ("nnz", "total"):
            v = getattr(ev, f)
            if isinstance(v, _SpikePair):
                found.append((ev, f, v))
                groups.setdefault(v[0].device, {})[id(v[0])] = v[0]
    if not found:
        return
    sums: dict[int, tuple[int, int]] = {}
    for device, tensors in groups.items():
        keys = list(tensors)
        flat = [tensors[k].reshape(-1, 2) for k in keys]
        sizes = torch.tensor([t.shape[0] for t in flat], device=device)
        segment = torch.repeat_interleave(torch.arange(len(flat), device=device), sizes)
        total = torch.zeros(len(flat), 2, dtype=torch.int64, device=device)
        total.index_add_(0, segment, torch.cat(flat).to(torch.int64))
        for k, (pos, neg) in zip(keys, total.tolist(), strict=True):
            sums[k] = (pos, neg)
    for ev, f, v in found:
        pos, neg = sums[id(v[0])]
        setattr(ev, f, pos + neg if f == "nnz" else pos - neg)


def _counts_event(
    counts: dict[str, Count], weight_reads_call: Count | None = None, *, where: str
) -> _Event:
    """The event of :class:`spikemar.counting.OpCounts` whose names are checked (``weight_reads``
    fetched per token vector; ``weight_reads_call`` per call, by default the same); their values
    are checked here, errors naming ``where``."""
    counting.check_count_values(where, counts)
    if weight_reads_call is not None:
        counting.check_count_values(where, {"weight_reads_call": weight_reads_call})
    counts = dict(counts)
    acs = counts.pop("acs", 0)
    weights = counts.pop("weight_reads", 0)
    call = weights if weight_reads_call is None else weight_reads_call
    return _Event(acs_units=acs, fan_out=1, weight_token=weights, weight_call=call, **counts)


# entries of a context's static cache before it starts over (see CountContext.keep)
_STATIC_LIMIT = 256


def _root(x: torch.Tensor) -> torch.Tensor:
    base = x._base
    return x if base is None else base


class _Synapse:
    """What every call of a synaptic layer with one geometry shares (see
    :meth:`CountContext.synaptic`): its memory counts, the event of a real-valued input (all
    ints, so one object serves every call) and the templates of spike inputs."""

    __slots__ = ("features", "memory", "mult", "real", "templates")

    def __init__(
        self,
        fan_out: int | None,
        dense_macs: int,
        weights: int,
        vectors: int,
        features: int,
        elements: int,
        elementwise_ops: Count,
        activation_writes: Count,
        bias_reads: int = 0,
    ) -> None:
        self.mult = 1 if fan_out is None else int(fan_out)
        self.features = features
        self.memory = {
            "weight_call": weights,
            "weight_token": weights * vectors,
            "dense_inputs": elements,
            "dense_macs": dense_macs,
            "spike_io": "read",
            "elementwise_ops": elementwise_ops,
            "activation_writes": activation_writes,
            "bias_reads": bias_reads,
            "vectors": vectors,
        }
        self.real = _Event(spike_kind="real", is_spike=False, fan_out=self.mult, **self.memory)
        self.templates: dict[tuple, _Event] = {}

    def template(self, key: tuple[str, bool, int, str | None]) -> _Event:
        """The template of a spike input, kept in ``templates`` under ``key`` = (kind, ternary,
        spike elements, source): kind 'ternary'/'binary', or 'values' (detected by value,
        counted as ternary until resolved)."""
        kind, ternary, elements, source = key
        packed, address = _spike_bits(ternary, self.features)
        template = self.templates[key] = _Event(
            spike_kind=kind, spike_elements=elements, fan_out=self.mult, packed_bits=packed,
            address_bits=address, source=source, **self.memory,
        )  # fmt: skip
        return template


class CountContext:
    """What a counting rule (:func:`spikemar.energy.register_rule`) records through: one per
    counted module, handed to the rule on every call.

    Counting runs on every forward pass, so the built-in rules keep what a module's geometry
    fixes (sizes, fan-outs, memory counts, whole events where no count depends on the values)
    per input shape in :attr:`static` and do per call only what depends on the values."""

    __slots__ = (
        "_counter",
        "_parameters",
        "_row",
        "kind",
        "module_type",
        "name",
        "static",
    )

    def __init__(
        self,
        counter: EnergyCounter,
        name: str,
        kind: str,
        module_type: str,
        parameters: int = 0,
    ) -> None:
        self._counter = counter
        self.name = name
        self.kind = kind
        self.module_type = module_type
        self._parameters = parameters
        self._row: _Row | None = None
        # a rule's values fixed by its module's geometry, by a key of the rule's choosing (the
        # input's shape, say); kept for the counter's life, like the parameter counts
        self.static: dict[Hashable, Any] = {}

    def keep(self, key: Hashable, value: Any) -> Any:
        """Store ``value`` in :attr:`static` under ``key`` and return it (the idiom:
        ``ctx.static.get(key) or ctx.keep(key, make())``). Bounded: a counter that sees many
        input shapes (prefill at every length) starts over rather than growing without end."""
        if len(self.static) >= _STATIC_LIMIT:
            self.static.clear()
        self.static[key] = value
        return value

    def row(self) -> _Row:
        row = self._row
        if row is None:
            row = self._counter._row(self.name, self.kind, self.module_type, self._parameters)
            self._row = row
        return row

    # -- what rules call ----------------------------------------------------------------------

    def record(
        self,
        *,
        weight_reads_call: Count | None = None,
        note: str | None = None,
        **counts: Unpack[counting.OpCounts],
    ) -> None:
        """Add counts that do not depend on whether an input is spikes: the
        :class:`spikemar.counting.OpCounts` given (memory in elements; ``weight_reads``
        parameter elements read with per-token fetching, ``weight_reads_call`` with one fetch
        per call, by default the same)."""
        counting.check_op_counts("CountContext.record", counts)
        self.add(_counts_event(counts, weight_reads_call, where="CountContext.record"), note=note)

    def event(
        self, *, weight_reads_call: Count | None = None, **counts: Unpack[counting.OpCounts]
    ) -> _Event:
        """The event :meth:`record` adds for these counts, to keep (in :attr:`static`) and
        :meth:`add` on every call with the same geometry when all counts are ints."""
        counting.check_op_counts("CountContext.event", counts)
        return _counts_event(counts, weight_reads_call, where="CountContext.event")

    def add(self, event: _Event, *, note: str | None = None) -> None:
        """Add an event made by :meth:`event` to this module's row."""
        row = self._row or self.row()
        row.events.append(event)
        if note:
            row.notes[note] = None

    def synaptic(
        self,
        x: torch.Tensor,
        *,
        weighted_acs: Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]
        | None = None,
        **geometry: Count | None,
    ) -> None:
        """A layer whose every input element drives ``fan_out`` synaptic operations: ACs when
        ``x`` is spikes (Σ nnz · fan_out), else ``dense_macs`` MACs; plus ``elementwise_ops``
        (a bias) and the ``activation_writes`` of its output, whatever the input. ``geometry``:
        the keyword arguments of :meth:`synapse`, which says what each one means.

        ``weighted_acs(spikes, ternary) -> (acs, nnz)`` replaces ``nnz · fan_out`` where the
        fan-out depends on the position (a padded or strided conv); its ``acs`` is multiplied by
        ``fan_out`` (``None``: 1).
        """
        if not any(isinstance(v, torch.Tensor) for v in geometry.values()):
            key = (*geometry.items(), x.shape)
            synapse = self.static.get(key) or self.keep(key, self.synapse(x, **geometry))
        else:  # counts that are tensors: this call's own
            synapse = self.synapse(x, **geometry)
        self.synaptic_call(x, synapse, weighted_acs)

    def synapse(
        self,
        x: torch.Tensor,
        *,
        fan_out: int | None,
        dense_macs: int,
        weights: int = 0,
        vectors: int = 1,
        features: int | None = None,
        elementwise_ops: Count = 0,
        activation_writes: Count = 0,
        bias_reads: int = 0,
    ) -> _Synapse:
        """What :meth:`synaptic` counts for every call with ``x``'s geometry, to keep (in
        :attr:`static`) and hand to :meth:`synaptic_call` on each call: ``fan_out`` synaptic
        operations per input element (None: 1, with a ``weighted_acs``), ``dense_macs`` when
        fed real values, ``elementwise_ops`` and ``activation_writes`` whatever the input.
        Memory: the layer reads its ``weights`` (parameter elements) once per call or once for
        each of the call's ``vectors`` (tokens, samples), and its input: ``x``'s real values, or
        its spikes, addressed among ``features`` neurons per vector (default ``x.shape[-1]``).
        Fed spikes by event-driven hardware (address-events) it reads one weight per accumulate
        and ``bias_reads`` bias elements (one per bias add: its output elements, with a bias).
        """
        n_features = int(features) if features is not None else (x.shape[-1] if x.dim() else 1)
        return _Synapse(fan_out, dense_macs, weights, vectors, n_features, x.numel(),
                        elementwise_ops, activation_writes, bias_reads)  # fmt: skip

    def synaptic_call(
        self,
        x: torch.Tensor,
        synapse: _Synapse,
        weighted_acs: Callable[[torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]
        | None = None,
    ) -> None:
        """:meth:`synaptic` for a call whose geometry :meth:`synapse` has counted: only what
        depends on ``x``'s values (or on the spikes it stands for) is done here."""
        # flat on purpose: this runs for every call of every synaptic layer, between tensor
        # operations that have evicted it from the caches, where each Python call costs µs
        counter = self._counter
        row = self._row or self.row()
        tag = None
        if counter.spike_detection != "values":
            base = x._base
            root = x if base is None else base
            tag = counter._tags.get(id(root))
            if tag is not None and tag.ref() is not root:
                tag = None
        if tag is not None and (tag.sparse or tag.decode_elements) and x.numel() != tag.numel:
            if tag.decode_elements:
                note = "input is part of a declared spike decode; counted as a real-valued input"
                row.notes[note] = None
            tag = None  # a part of a sparsified tensor or of a decode: a real-valued input
        if tag is not None and tag.sparse:  # its zeros are what zero-skipping hardware skips
            index_bits = max(1, math.ceil(math.log2(max(2, synapse.features))))
            row.events.append(
                _Event(spike_kind="real", is_spike=False, fan_out=synapse.mult,
                       sparse_nnz=tag.nnz, address_bits=index_bits, **synapse.memory)
            )  # fmt: skip
            return
        if tag is not None:
            if tag.decode_elements:  # a declared decode: the spike train it stands for
                src, elements, full = tag.decode, tag.decode_elements, True
                if src is None and weighted_acs is not None:
                    # the counter asks for the spike train wherever a point feeds such a layer
                    # (needs_spike_train); reaching this means a point was not declared by
                    # MARLM.spike_points() yet sent counts only
                    raise RuntimeError(
                        f"energy counter: {self.name} needs the spike train of "
                        f"{tag.source} (its fan-out depends on the position), but only spike "
                        "counts were declared; declare_spikes() must be used for it"
                    )
            else:  # a neuron's output (or a view, or a scaled copy of one)
                src = x if tag.unit else torch.sign(x)
                elements, full = x.numel(), x.numel() == tag.numel and tag.nnz is not None
            key = ("ternary" if tag.ternary else "binary", tag.ternary, elements, tag.source)
            template = synapse.templates.get(key) or synapse.template(key)
            if weighted_acs is None and full:  # counted once where the spikes were made
                row.events.append((template, tag.nnz, tag.total))
                return
            if weighted_acs is not None:
                units, nnz = weighted_acs(src, tag.ternary)
                total = tag.total if full else src.sum() if tag.ternary else None
            else:
                units = None
                nnz, total = _stats.unit_spike_counts(src, tag.ternary)
            event = template.filled(nnz, total)
            event.acs_units = units
            row.events.append(event)
            return
        if (
            counter.spike_detection == "producer"
            or (not x.is_floating_point() and x.dtype != torch.bool)
            or _stats.surely_not_spikes(x)
        ):
            row.events.append(synapse.real)
            return
        if weighted_acs is not None:
            units, nnz = weighted_acs(x, True)
            total = x.sum()
        else:
            units = None
            nnz, total = _stats.unit_spike_counts(x, True)
        key = ("values", True, x.numel(), None)
        template = synapse.templates.get(key) or synapse.template(key)
        event = template.filled(nnz, total)
        event.is_spike, event.acs_units = _stats.value_test(x), units
        row.events.append(event)

    def lookup(self, idx: torch.Tensor, *, acs: int, weight_reads: int | None = None) -> None:
        """An embedding-style lookup of integer indices ``idx`` worth ``acs`` ACs, reading
        ``weight_reads`` table elements (default ``acs``: one per accumulate)."""
        reads = acs if weight_reads is None else weight_reads
        self.add(_Event(spike_kind="index", acs_units=acs, fan_out=1, weight_call=reads,
                        weight_token=reads, vectors=idx.numel()))  # fmt: skip

    def spikes_out(
        self,
        spikes: torch.Tensor,
        *,
        ternary: bool,
        inputs: int = 0,
        weights: int = 0,
        vectors: int = 1,
        state: int | None = None,
    ) -> None:
        """A neuron produced ``spikes``: count its updates and firing, tag them as spikes.

        Memory: it reads ``inputs`` real input elements and its ``weights`` (thresholds; once
        per call or per vector), reads and writes its ``state`` elements (default: a membrane
        per update, one per spike element), and writes the spikes."""
        n = spikes.numel()
        width = spikes.shape[-1] if spikes.dim() else 1
        state = n if state is None else state
        key = ("spikes_out", n, width, ternary, inputs, weights, vectors, state)
        template = self.static.get(key) or self.keep(
            key,
            _spikes_written(n, ternary, width, weights, inputs, state, vectors),
        )
        nnz, total = _stats.unit_spike_counts(spikes, ternary)
        (self._row or self.row()).events.append((template, nnz, total))
        root = _root(spikes)
        full = root.numel() == n
        tag = _Tag(root, ternary, True, nnz if full else None, total if full else None,
                   source=self.name)  # fmt: skip
        self._counter._tags[id(root)] = tag

    def propagate(self, x: torch.Tensor, y: torch.Tensor, *, unit: bool = True) -> None:
        """A spike-preserving module turned ``x`` into ``y``: if ``x`` is spikes, so is ``y``."""
        counter = self._counter
        tag = counter._tag_of(x)
        if tag is None or tag.decode_elements or tag.sparse:
            return
        root = _root(y)
        if root is _root(x):
            return
        counter._set_tag(root, _Tag(root, tag.ternary, tag.unit and unit, source=tag.source))

    def parameters(self, module: nn.Module, *, recurse: bool = True) -> int:
        """Parameter elements of ``module`` (with its children's when ``recurse``), cached."""
        return self._counter._parameter_count(module, recurse=recurse)

    def cached(self, key: Hashable, factory: Callable[[], Any]) -> Any:
        """A value computed once per counter (e.g. a conv's fan-out map for one input size)."""
        cache = self._counter._cache
        full_key = (self.name, key)
        value = cache.get(full_key)
        if value is None:
            value = factory()
            cache[full_key] = value
        return value


class EnergyCounter(counting.CountsSink):
    """Counts synaptic operations, neuron updates and element-wise work of ``model`` per layer.

    Use as a context manager around the forward passes to count, then build a report::

        with EnergyCounter(model) as counter:
            model(x)
        report = counter.report(hardware="45nm-fp32")

    Args:
        model: the module tree to count (every submodule is looked up in the rule table).
        spike_detection: 'auto' (default), 'producer' or 'values' (see the module docstring).
    """

    def __init__(self, model: nn.Module, *, spike_detection: SpikeDetection = "auto") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if spike_detection not in SPIKE_DETECTIONS:
            raise ValueError(
                f"spike_detection: expected one of {SPIKE_DETECTIONS}, got {spike_detection!r}"
            )
        self.model = model
        self.spike_detection: SpikeDetection = spike_detection
        self._names: dict[int, str] = {}
        self._contexts: dict[int, CountContext] = {}  # by id(module): rows survive re-entry
        self._handles: list[Any] = []
        self._token: Any = None
        self._cache: dict[Hashable, Any] = {}
        self._counts_suffice: frozenset[int] = frozenset()
        self._param_counts: tuple[dict[int, int], dict[int, int]] = ({}, {})
        # what the hooks of spikemar.counting count the same on every call with one geometry,
        # by id of the calling module (and the geometry): kept while the module tree is the same
        self._points: dict[tuple, tuple[str, int, _Event]] = {}
        self._sites: dict[tuple, tuple[str, str, str, int, dict]] = {}
        self._rows: dict[str, _Row] = {}
        self.reset()

    # -- lifecycle --------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget everything counted so far (hooks stay attached). The row objects stay, emptied
        (building ~60 of them again cost the next pass of a small LM 3-5 %); a report lists the
        rows that counted something since."""
        for row in self._rows.values():
            row.empty()
        self._uncounted: dict[str, str] = {}
        self._tags: dict[int, _Tag] = {}
        self.passes = 0

    def __enter__(self) -> EnergyCounter:
        if self._handles:
            raise RuntimeError("EnergyCounter: already attached (nested `with` on one counter)")
        root_name = type(self.model).__name__
        names = dict(self._names)
        self._names.clear()
        try:
            for name, module in self.model.named_modules():
                shown = name or root_name
                self._names[id(module)] = shown
                rule = find_rule(module)
                if rule is not None:
                    ctx = self._contexts.get(id(module))
                    if ctx is None or ctx.name != shown or ctx.kind != rule.kind:
                        params = self._parameter_count(module, recurse=True)
                        ctx = CountContext(self, shown, rule.kind, type(module).__name__, params)
                        self._contexts[id(module)] = ctx
                    self._handles.append(module.register_forward_hook(_rule_hook(ctx, rule.fn)))
                elif _computes_itself(module):
                    self._handles.append(
                        module.register_forward_hook(_uncounted_hook(self, shown, module))
                    )
            self._counts_suffice = _linear_fed_points(self.model)
            if self._names != names:  # modules renamed, added or replaced: ids may be reused
                self._points.clear()
                self._sites.clear()
            self._handles.append(self.model.register_forward_pre_hook(self._on_pass_start))
            self._handles.append(self.model.register_forward_hook(self._on_pass_end))
        except BaseException:
            self._detach()
            raise
        self._token = counting.activate(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._detach()

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._tags.clear()
        if self._token is not None:
            counting.deactivate(self._token)
            self._token = None

    def _on_pass_start(self, module: nn.Module, args: Any) -> None:
        self.passes += 1

    def _on_pass_end(self, module: nn.Module, args: Any, output: Any) -> None:
        # Tags (and the spike trains held by decode tags) live for one forward pass.
        self._tags.clear()

    def on_pass_start(self, model: nn.Module) -> None:
        """A pass of the counted model outside its ``__call__`` begins (``step``, ``prefill``:
        see :func:`spikemar.counting.recurrent_pass`); other modules' are not passes of it."""
        if model is self.model:
            self._on_pass_start(model, ())

    def on_pass_end(self, model: nn.Module) -> None:
        if model is self.model:
            self._on_pass_end(model, (), None)

    # -- bookkeeping used by the contexts ---------------------------------------------------

    def _row(self, name: str, kind: str, module_type: str, parameters: int = 0) -> _Row:
        row = self._rows.get(name)
        if row is None:
            row = _Row(name, kind, module_type, parameters)
            self._rows[name] = row
        return row

    def _tag_of(self, x: torch.Tensor) -> _Tag | None:
        root = _root(x)
        tag = self._tags.get(id(root))
        if tag is None or tag.ref() is not root:
            return None
        return tag

    def _set_tag(self, root: torch.Tensor, tag: _Tag) -> None:
        self._tags[id(root)] = tag

    def _name_of(self, module: nn.Module | None) -> str:
        if module is None:
            return "<functional>"
        return self._names.get(id(module)) or f"<{type(module).__name__}>"

    # -- what the counting hooks (spikemar.counting) call while this counter is active -------

    # CountsSink's methods: their arguments' types and meaning are declared once, there
    def on_declare_spikes(self, module, decoded, spikes, ternary) -> None:
        """:func:`spikemar.counting.declare_spikes` landed here. The spike point reads its real
        input (the shape of ``decoded``) and its thresholds once per vector and writes the spike
        train. Its membrane moves no memory: δ-injection starts it at 0 for every token and it
        lives only through that token's T micro-steps, in a register (a neuron module's
        membrane, kept across calls, is read and written at every update instead)."""
        with torch.no_grad():
            nnz, total = _stats.unit_spike_counts(spikes, ternary)
        self._spike_point(module, decoded, spikes.numel(), nnz, total, ternary, spikes.detach())

    def needs_spike_train(self, module: nn.Module | None) -> bool:
        """Whether ``module`` (a spike point) must hand over its spike train rather than its
        spike counts (:func:`spikemar.counting.spike_train_needed`). Counts suffice for the
        spike points that the model's ``spike_points()`` (``MARLM.spike_points()``) lists as
        feeding only ``nn.Linear`` projections, whose fan-out is the same for every spike; any
        other point (a model without that iterator, a point feeding a conv) sends the train."""
        return id(module) not in self._counts_suffice

    def on_declare_spike_counts(self, module, decoded, counts, T, ternary) -> None:
        """:func:`spikemar.counting.declare_spike_counts` landed here: counted as
        :meth:`on_declare_spikes` counts the spike train the counts were taken from."""
        # summed when the report is built, all spike points' counts in one reduction: no
        # tensor operation per call here (int64 counts never carry autograd history)
        pair = _SpikePair((counts,))
        self._spike_point(module, decoded, T * decoded.numel(), pair, pair if ternary else None,
                          ternary, None)  # fmt: skip

    def _spike_point(
        self,
        module: nn.Module | None,
        decoded: torch.Tensor,
        elements: int,
        nnz: Any,
        total: Any,
        ternary: bool,
        spikes: torch.Tensor | None,
    ) -> None:
        """A spike point's row (``elements`` spike-train elements) and the tag on its decode."""
        key = (id(module), decoded.shape, elements, ternary)
        point = self._points.get(key)
        if point is None:
            point = self._points[key] = self._new_point(module, decoded, elements, ternary)
        name, thresholds, template = point
        row = self._rows.get(name) or self._row(
            name, "spike_point", type(module).__name__ if module else "function", thresholds
        )
        row.calls += 1
        row.reporting = True
        row.events.append((template, nnz, total))
        base = decoded._base
        root = decoded if base is None else base
        tag = _Tag(root, ternary, True, nnz, total, spikes, name, decode_elements=elements)
        self._tags[id(root)] = tag

    def _new_point(
        self, module: nn.Module | None, decoded: torch.Tensor, elements: int, ternary: bool
    ) -> tuple[str, int, _Event]:
        """(row name, thresholds, event template) of a spike point's calls with this geometry."""
        thresholds = self._parameter_count(module, recurse=True)
        channels = decoded.shape[-1] if decoded.dim() else 1
        vectors = decoded.numel() // max(1, channels)
        template = _spikes_written(elements, ternary, channels, thresholds, decoded.numel(),
                                   state=0, vectors=vectors)  # fmt: skip
        return self._name_of(module), thresholds, template

    def on_declare_sparse(self, module: nn.Module | None, x: torch.Tensor) -> None:
        """:func:`spikemar.counting.declare_sparse` landed here: tag ``x`` with its non-zero
        count (a 0-d tensor, read back with the report) for the layers it feeds."""
        root = _root(x)
        if root.numel() != x.numel():  # a view of part of a tensor: nothing to tag
            return
        nnz = torch.count_nonzero(x.detach())
        self._set_tag(root, _Tag(root, False, False, nnz, source=self._name_of(module),
                                 sparse=True))  # fmt: skip

    def on_record_ops(
        self, module: nn.Module | None, kind: str | None, counts: dict[str, Count]
    ) -> None:
        """:func:`spikemar.counting.record_ops` landed here. Counts that are all ints make one
        event per call site and values, shared by its calls."""
        site = self._sites.get((id(module), kind))
        if site is None:
            own = self._parameter_count(module, recurse=False)  # its children count their own
            where = type(module).__name__ if module else "function"
            site = self._sites[(id(module), kind)] = (self._name_of(module), kind or "ops", where,
                                                      own, {})  # fmt: skip
        name, row_kind, where, own, events = site
        row = self._rows.get(name) or self._row(name, row_kind, where, own)
        row.calls += 1
        row.reporting = True
        values = tuple(counts.items())
        event = events.get(values)  # (a tensor count hashes by identity: never found)
        if event is None:
            event = _counts_event(counts, where="record_ops")
            if all(type(v) is int for v in counts.values()):
                if len(events) >= _STATIC_LIMIT:
                    events.clear()
                events[values] = event
        row.events.append(event)

    def _parameter_count(self, module: nn.Module | None, *, recurse: bool = False) -> int:
        """Parameter elements of ``module`` (its own, or with its children's), cached."""
        if module is None:
            return 0
        # one dict per kind, keyed by id: this runs several times per counted module call
        cache = self._param_counts[recurse]
        n = cache.get(id(module))
        if n is None:
            n = cache[id(module)] = sum(p.numel() for p in module.parameters(recurse=recurse))
        return n

    # -- results ----------------------------------------------------------------------------

    def report(self, hardware: str | HardwareProfile = "45nm-fp32", *, tokens: int | None = None):
        """Read the counts back (one or two device syncs) and price them under ``hardware``.

        ``tokens``: how many tokens the counted passes processed (for per-token figures).
        """
        from .report import EnergyReport, _check_tokens

        profile_ = get_profile(hardware)
        _check_tokens(tokens)
        active = [row for row in self._rows.values() if row.events]
        rows = _resolve(active)
        _mark_shared_weights(self.model, rows)
        reporting = {row.name for row in active if row.reporting}
        uncounted = tuple(
            (name, type_name)
            for name, type_name in self._uncounted.items()
            if name not in reporting
        )
        return EnergyReport.build(
            rows,
            hardware=profile_,
            passes=self.passes,
            tokens=tokens,
            uncounted=uncounted,
            parameters=self._parameter_count(self.model, recurse=True),
        )


def _mark_shared_weights(model: nn.Module, rows: list[dict[str, Any]]) -> None:
    """Give each row whose module holds a parameter tensor that an earlier row's module holds
    too (a head tied to the embedding) ``shared_parameters`` (those elements) and
    ``weights_of`` (that row), so that placement holds the tensor once."""
    modules = dict(model.named_modules())
    owner: dict[int, str] = {}
    for row in rows:
        module = modules.get(row["name"])
        if module is None or not row.get("parameters"):
            continue
        own = list(module.parameters(recurse=False))
        # the row counts its module's own parameters, or (a spike point) its children's too
        params = own if sum(p.numel() for p in own) == row["parameters"] else list(
            module.parameters()
        )  # fmt: skip
        for param in params:
            first = owner.setdefault(id(param), row["name"])
            if first != row["name"]:
                row["shared_parameters"] = row.get("shared_parameters", 0) + param.numel()
                row.setdefault("weights_of", first)


def _linear_fed_points(model: nn.Module) -> frozenset[int]:
    """The ids of the spike points that ``model.spike_points()`` (the public iterator of
    :class:`spikemar.models.MARLM`) lists as feeding nothing but ``nn.Linear`` projections:
    their spike counts are all the counter needs. Empty for a model without the iterator."""
    from spikemar.ssm.mixer import SpikePointSite

    points = getattr(model, "spike_points", None)
    if not callable(points):
        return frozenset()
    return frozenset(
        id(site.module)
        for site in points()
        if isinstance(site, SpikePointSite)
        and site.projections
        and all(isinstance(p, nn.Linear) for p in site.projections.values())
    )


def _computes_itself(module: nn.Module) -> bool:
    """A module with no rule that may compute something the counter cannot see."""
    has_children = next(module.children(), None) is not None
    has_own_state = (
        next(module.parameters(recurse=False), None) is not None
        or next(module.buffers(recurse=False), None) is not None
    )
    return has_own_state or not has_children


def _rule_hook(ctx: CountContext, fn: Callable[..., None]):
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.is_grad_enabled():  # entering no_grad costs more than most rules
            with torch.no_grad():
                fn(ctx, module, args, output)
        else:
            fn(ctx, module, args, output)
        # a rule that records nothing (a pass-through module) leaves no row
        row = ctx._row
        if row is not None:
            row.calls += 1

    return hook


def _uncounted_hook(counter: EnergyCounter, name: str, module: nn.Module):
    type_name = type(module).__name__

    def hook(_module: nn.Module, _args: Any, _output: Any) -> None:
        counter._uncounted.setdefault(name, type_name)

    return hook


def _resolve(rows) -> list[dict[str, Any]]:
    """Read every pending tensor back in one transfer per device (after the spike points'
    counts, :func:`_resolve_pairs`) and sum the events per row."""
    pending: dict[torch.device, list[torch.Tensor]] = {}
    slots: list[tuple[_Event, str, torch.device, int]] = []
    fields = (
        "nnz",
        "total",
        "is_spike",
        "acs_units",
        "macs",
        "elementwise_ops",
        "neuron_updates",
        "sparse_nnz",
        *_MEMORY_EVENT_FIELDS,
    )
    rows = list(rows)
    # a call's spike counts on a shared template become that call's event (for this report)
    events = [
        [ev if type(ev) is _Event else ev[0].filled(ev[1], ev[2]) for ev in row.events]
        for row in rows
    ]
    _resolve_pairs([ev for evs in events for ev in evs])
    for evs in events:
        for ev in evs:
            for f in fields:
                v = getattr(ev, f)
                if isinstance(v, torch.Tensor):
                    lst = pending.setdefault(v.device, [])
                    slots.append((ev, f, v.device, len(lst)))
                    lst.append(v.detach().reshape(()).to(torch.float64))
    values = {dev: torch.stack(ts).tolist() for dev, ts in pending.items()}
    for ev, f, dev, i in slots:
        v = values[dev][i]
        setattr(ev, f, bool(v) if f == "is_spike" else round(v))

    out: list[dict[str, Any]] = []
    for row, evs in zip(rows, events, strict=True):
        acc: dict[str, Any] = {
            "name": row.name,
            "kind": row.kind,
            "module_type": row.module_type,
            "calls": row.calls,
            "spike_kinds": [],
            "spike_elements": 0,
            "spike_nnz": 0,
            "spike_pos": 0,
            "spike_neg": 0,
            "acs": 0,
            "macs": 0,
            "elementwise_ops": 0,
            "neuron_updates": 0,
            "notes": list(row.notes),
            **dict.fromkeys(MEMORY_COUNT_FIELDS, 0),
            "parameters": row.parameters,
            "spike_source": None,
        }
        kinds: dict[str, None] = {}
        sources: dict[str, None] = {}
        for ev in evs:
            acc["vectors"] += ev.vectors
            acc["macs"] += ev.macs
            acc["elementwise_ops"] += ev.elementwise_ops
            acc["neuron_updates"] += ev.neuron_updates
            acc["weight_reads"] += ev.weight_token
            acc["weight_reads_call"] += ev.weight_call
            acc["activation_reads"] += ev.activation_reads
            acc["activation_writes"] += ev.activation_writes
            acc["state_reads"] += ev.state_reads
            acc["state_writes"] += ev.state_writes
            if ev.spike_kind is None or ev.spike_kind == "index":
                if ev.spike_kind == "index":
                    kinds["index"] = None
                acc["acs"] += ev.acs_units * ev.fan_out
                acc["weight_reads_event"] += ev.weight_token
                continue
            if not ev.is_spike:
                kinds["real"] = None
                acc["macs"] += ev.dense_macs
                acc["activation_reads"] += ev.dense_inputs
                acc["weight_reads_event"] += ev.weight_token
                if ev.sparse_nnz is not None:
                    zeros = ev.dense_inputs - ev.sparse_nnz
                    acc["skipped_macs"] += zeros * ev.fan_out
                    acc["skipped_reads"] += zeros
                    acc["sparse_index_bits"] += ev.sparse_nnz * ev.address_bits
                continue
            nnz = ev.nnz or 0
            units = nnz if ev.acs_units is None else ev.acs_units
            acs = units * ev.fan_out
            acc["acs"] += acs
            signed = nnz if ev.total is None else ev.total
            pos = (nnz + signed) // 2
            neg = nnz - pos
            kind = ev.spike_kind
            packed, address = ev.packed_bits, ev.address_bits
            if kind == "values":  # detected by value: say what was seen
                kind = "ternary" if neg else "binary"
                if not neg:
                    packed, address = 1, address - 1
            kinds[kind] = None
            acc["spike_elements"] += ev.spike_elements
            acc["spike_nnz"] += nnz
            acc["spike_pos"] += pos
            acc["spike_neg"] += neg
            io = "write" if ev.spike_io == "write" else "read"
            acc[f"spike_{io}_bits_packed"] += ev.spike_elements * packed
            acc[f"spike_{io}_bits_address"] += nnz * address
            if io == "read":
                # event-driven: every accumulate reads its synapse's weight, every bias add
                # its bias
                acc["weight_reads_event"] += acs + ev.bias_reads
                acc["dense_macs"] += ev.dense_macs
                acc["dense_inputs"] += ev.dense_inputs
                if ev.source is not None:
                    sources[ev.source] = None
            else:
                acc["weight_reads_event"] += ev.weight_token
        acc["spike_kinds"] = list(kinds)
        acc["spike_source"] = "+".join(sources) or None
        out.append(acc)
    return out


def profile(
    model: nn.Module,
    *inputs: Any,
    hardware: str | HardwareProfile = "45nm-fp32",
    tokens: int | None = None,
    spike_detection: SpikeDetection = "auto",
    reset_state: bool = True,
    forward_kwargs: dict[str, Any] | None = None,
):
    """Run ``model(*inputs)`` once under ``torch.no_grad()`` with a counter attached and return
    its :class:`~spikemar.energy.EnergyReport` under ``hardware``.

    Args:
        model: any ``nn.Module``.
        inputs: the positional arguments of ``model``.
        hardware: a profile name (:func:`spikemar.energy.available_profiles`) or a profile.
        tokens: tokens in this pass, for per-token figures (default: the element count of the
            first integer tensor among ``inputs``, if any: token ids).
        spike_detection: 'auto', 'producer' or 'values' (see :class:`EnergyCounter`).
        reset_state: reset SpikingJelly memories (membranes) before the pass.
        forward_kwargs: keyword arguments of ``model``.
    """
    counter = EnergyCounter(model, spike_detection=spike_detection)  # checks both arguments
    hw = get_profile(hardware)  # fail on a bad name before running anything
    from .report import _check_tokens

    if tokens is None:
        tokens = next(
            (
                x.numel()
                for x in inputs
                if isinstance(x, torch.Tensor)
                and not x.is_floating_point()
                and not x.is_complex()
                and x.dtype != torch.bool
                and x.numel() > 0
            ),
            None,
        )
    _check_tokens(tokens)
    if forward_kwargs is not None and not isinstance(forward_kwargs, dict):
        raise TypeError(f"forward_kwargs: expected a dict, got {type(forward_kwargs).__name__}")
    if reset_state:
        from spikingjelly.activation_based import functional as sj_functional

        sj_functional.reset_net(model)
    with torch.no_grad(), counter:
        model(*inputs, **(forward_kwargs or {}))
    return counter.report(hw, tokens=tokens)
