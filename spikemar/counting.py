"""Counting hooks: how model code tells an active energy counter what it does.

Models and mixers call these functions; :mod:`spikemar.energy` (the counter and its
reports) listens. This module imports only torch, so ``spikemar.ssm`` and ``spikemar.models``
can call the hooks without loading the reports or SpikingJelly:

* :func:`declare_spikes` — "this real-valued tensor is the decode of that spike train" (MAR's
  spike points), so the layer it feeds counts accumulates, not multiply-accumulates;
* :func:`declare_spike_counts` — the same for a spike point whose fused kernel counted its +1
  and −1 spikes instead of materialising the spike train (:func:`spike_train_needed` says
  whether the active counter can do with those counts);
* :func:`declare_sparse` — "this real-valued tensor was sparsified" (top-k / threshold), so
  that a zero-skipping hardware profile prices only the multiply-accumulates of its non-zeros;
* :func:`record_ops` — work done by plain functions inside a module's ``forward`` (an SSM's state
  update, attention's matmuls) and the memory it touches (state read and written, parameters
  and activations read outside any counted submodule);
* :func:`counting_active` — whether a counter is listening (fused inference paths that bypass
  the submodules' hooks must then step aside).

With no counter active each hook is one context-variable read. A counter (anything with the two
methods of :class:`CountingSink`) becomes the listener for a block of code with
:func:`activate` / :func:`deactivate`; :class:`spikemar.energy.EnergyCounter` is the one built in.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypedDict, Unpack

import torch
from torch import nn

from ._numbers import integer

__all__ = [
    "MEMORY_TERMS",
    "OP_COUNTS",
    "Count",
    "CountingSink",
    "CountsSink",
    "OpCounts",
    "activate",
    "active_sink",
    "check_count_values",
    "check_op_counts",
    "counted_pass",
    "counting_active",
    "deactivate",
    "declare_sparse",
    "declare_spike_counts",
    "declare_spikes",
    "record_ops",
    "recurrent_pass",
    "spike_train_needed",
]

Count = int | torch.Tensor  # a count, or a 0-d tensor the counter reads back later


class OpCounts(TypedDict, total=False):
    """The counts that :func:`record_ops` (and a counting rule's ``CountContext.record``) take,
    each an int or a 0-d tensor; absent ones are 0. Compute: ``acs``, ``macs``,
    ``elementwise_ops``, ``neuron_updates``. Memory, in elements (values of the model's data
    type; the profile prices an element's bytes): ``weight_reads`` (parameters of the module
    itself read by that work), ``activation_reads``/``activation_writes`` (intermediate
    tensors, a KV cache), ``state_reads``/``state_writes`` (recurrent state such as an SSM's h,
    per token as the recurrent form touches it)."""

    acs: Count
    macs: Count
    elementwise_ops: Count
    neuron_updates: Count
    weight_reads: Count
    activation_reads: Count
    activation_writes: Count
    state_reads: Count
    state_writes: Count


OP_COUNTS: tuple[str, ...] = tuple(OpCounts.__annotations__)
# the memory terms among them
MEMORY_TERMS = OP_COUNTS[4:]
_OP_COUNTS = frozenset(OP_COUNTS)


def check_op_counts(where: str, counts: dict) -> None:
    """Raise TypeError naming the first of ``counts``' names that is not one of
    :data:`OP_COUNTS` (``where``: the function it was passed to)."""
    if not _OP_COUNTS.issuperset(counts):
        bad = next(k for k in counts if k not in _OP_COUNTS)
        raise TypeError(f"{where}: unknown count {bad!r}; expected some of {', '.join(OP_COUNTS)}")


def check_count_values(where: str, counts: dict) -> None:
    """Raise naming the first of ``counts`` that is not a count: an int >= 0, or a 0-d real
    tensor (read back when the report is built; its value is not checked here, which would
    cost a device sync)."""
    for name, value in counts.items():
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            if value < 0:
                raise ValueError(f"{where}: {name}: expected a count >= 0, got {value}")
        elif not (
            isinstance(value, torch.Tensor)
            and value.dim() == 0
            and not value.is_complex()
            and value.dtype != torch.bool
        ):
            what = repr(value)
            if isinstance(value, torch.Tensor):
                what = f"a tensor of shape {tuple(value.shape)}"
            raise TypeError(f"{where}: {name}: expected an int >= 0 or a 0-d tensor, got {what}")


class CountingSink(Protocol):
    """What listens to the hooks while it is active."""

    def on_declare_spikes(
        self, module: nn.Module | None, decoded: torch.Tensor, spikes: torch.Tensor, ternary: bool
    ) -> None: ...

    # counts: the OpCounts that record_ops was given (checked), by name
    def on_record_ops(self, module: nn.Module | None, kind: str | None, counts: dict) -> None: ...


class CountsSink(CountingSink, Protocol):
    """A listener that can also take a spike point's spike counts in place of its spike train
    (optional: a sink without these two methods is always given the spike train)."""

    def needs_spike_train(self, module: nn.Module | None) -> bool: ...

    def on_declare_spike_counts(
        self,
        module: nn.Module | None,
        decoded: torch.Tensor,
        counts: torch.Tensor,
        T: int,
        ternary: bool,
    ) -> None: ...


_ACTIVE: contextvars.ContextVar[CountingSink | None] = contextvars.ContextVar(
    "spikemar_counting_sink", default=None
)


def activate(sink: CountingSink) -> contextvars.Token:
    """Make ``sink`` the listener in this context; returns the token for :func:`deactivate`."""
    return _ACTIVE.set(sink)


def deactivate(token: contextvars.Token) -> None:
    """Restore the listener that was active before the matching :func:`activate`."""
    _ACTIVE.reset(token)


def active_sink() -> CountingSink | None:
    """The listener active in this context, or ``None``."""
    return _ACTIVE.get()


@contextlib.contextmanager
def recurrent_pass(model: nn.Module) -> Iterator[None]:
    """Mark a pass of ``model`` that does not go through its ``__call__`` (``step``,
    ``prefill``: generation's forms), so that a listener that counts passes (one with
    ``on_pass_start(model)`` and ``on_pass_end(model)``, as the energy counter) counts it as one
    and drops what it keeps per pass."""
    sink = _ACTIVE.get()
    start = getattr(sink, "on_pass_start", None)
    if start is None:
        yield
        return
    start(model)
    try:
        yield
    finally:
        sink.on_pass_end(model)


def counted_pass(method: Callable) -> Callable:
    """Decorate a model's ``step``/``prefill`` body so that it runs inside
    :func:`recurrent_pass` while something counts, and bare otherwise (generation calls it per
    token: no context manager when nothing listens)."""

    @functools.wraps(method)
    def run(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if _ACTIVE.get() is None:
            return method(model, *args, **kwargs)
        with recurrent_pass(model):
            return method(model, *args, **kwargs)

    return run


def counting_active() -> bool:
    """Whether a counter is listening in this context. Models take their fused inference paths
    only when none is (a counter must see every module's work)."""
    return _ACTIVE.get() is not None


def declare_spikes(
    module: nn.Module | None,
    decoded: torch.Tensor,
    spikes: torch.Tensor,
    *,
    ternary: bool = True,
) -> torch.Tensor:
    """Tell an active counter that ``decoded`` is the decode of the spike train ``spikes``
    ([T, …] micro-steps first), produced by ``module`` (a spike point). Returns ``decoded``.

    A layer fed by ``decoded`` then counts Σ_t nnz(s_t) · fan-out ACs, not MACs, although the
    tensor it multiplies is real-valued: the hardware would accumulate the spikes. The spike
    point gets a row of its own (kind ``spike_point``: one neuron update per spike element, its
    firing rate). With no counter active this is a no-op::

        decoded, spikes = self.atmn.quantize(x, self.T)
        return declare_spikes(self, decoded, spikes)
    """
    sink = _ACTIVE.get()
    if sink is not None:
        if not isinstance(decoded, torch.Tensor) or not isinstance(spikes, torch.Tensor):
            raise TypeError(
                "declare_spikes: decoded and spikes must be tensors, got "
                f"{type(decoded).__name__} and {type(spikes).__name__}"
            )
        if spikes.dim() != decoded.dim() + 1 or spikes.shape[1:] != decoded.shape:
            bad = True
        else:
            bad = spikes.shape[0] < 1
        if bad:
            raise ValueError(
                f"declare_spikes: spikes: expected [T, *decoded.shape] = [T, "
                f"{', '.join(map(str, decoded.shape))}] with T >= 1 (micro-steps first), got "
                f"{tuple(spikes.shape)}"
            )
        sink.on_declare_spikes(module, decoded, spikes, bool(ternary))
    return decoded


def spike_train_needed(module: nn.Module | None) -> bool:
    """Whether the active counter needs ``module``'s spike train itself (then the spike point
    materialises it and calls :func:`declare_spikes`). False with no counter active, and when
    the counter can do with the spike counts of :func:`declare_spike_counts` (it can when the
    point feeds only layers whose fan-out is the same for every input element, e.g. Linear)."""
    sink = _ACTIVE.get()
    if sink is None:
        return False
    needs = getattr(sink, "needs_spike_train", None)
    return True if needs is None else bool(needs(module))


def declare_spike_counts(
    module: nn.Module | None,
    decoded: torch.Tensor,
    counts: torch.Tensor,
    T: int,
    *,
    ternary: bool = True,
) -> torch.Tensor:
    """Tell an active counter that ``decoded`` is the decode of a ``T``-micro-step spike train
    whose spikes were counted instead of kept: ``counts`` int64 ``[..., 2]`` (the +1 spikes in
    ``[..., 0]``, the −1 spikes in ``[..., 1]``; per channel or not, as the fused kernels of
    :mod:`spikemar.neurons` return them with ``counts=True``). Counts as :func:`declare_spikes`
    does; the spike train has ``T · decoded.numel()`` elements. Returns ``decoded``. Call it
    only when :func:`spike_train_needed` is False; with no counter active it is a no-op::

        if counting_active() and not spike_train_needed(self):
            decoded, counts = atmn_quantize_decode_cpu(x, T, p, counts=True)
            return declare_spike_counts(self, decoded, counts, T)
    """
    sink = _ACTIVE.get()
    if sink is not None:
        if not isinstance(counts, torch.Tensor) or counts.dim() < 1 or counts.shape[-1] != 2:
            shape = tuple(counts.shape) if isinstance(counts, torch.Tensor) else counts
            raise ValueError(f"declare_spike_counts: counts: expected a tensor [..., 2] of "
                             f"(+1, -1) spike counts, got {shape!r}")  # fmt: skip
        steps = integer(T)
        if steps is None or steps < 1:
            raise ValueError(f"declare_spike_counts: T: expected an int >= 1, got {T!r}")
        on_counts = getattr(sink, "on_declare_spike_counts", None)
        if on_counts is None:
            raise RuntimeError(
                f"declare_spike_counts: the active counter ({type(sink).__name__}) takes spike "
                "trains only; ask spike_train_needed() first"
            )
        on_counts(module, decoded, counts, steps, bool(ternary))
    return decoded


def declare_sparse(module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """Tell an active counter that ``x`` is a sparsified activation made by ``module`` (top-k or
    threshold sparsification): the layer it feeds counts its multiply-accumulates as usual and,
    beside them, those whose input is zero, which hardware that skips zeros does not do (a
    zero-skipping profile prices the rest, plus an index per non-zero). Returns ``x``; a
    no-op with no counter active, or for a listener without ``on_declare_sparse``."""
    sink = _ACTIVE.get()
    if sink is not None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"declare_sparse: x must be a tensor, got {type(x).__name__}")
        on_sparse = getattr(sink, "on_declare_sparse", None)
        if on_sparse is not None:
            on_sparse(module, x)
    return x


def record_ops(
    module: nn.Module | None, *, kind: str | None = None, **counts: Unpack[OpCounts]
) -> None:
    """Count work done by plain functions inside ``module``'s forward in ``module``'s row:
    the :class:`OpCounts` given (compute, and the memory that work touches, in elements; absent
    ones are 0). No-op with no counter active. A module that records its own work is no longer
    listed as uncounted::

        record_ops(self, kind="ssm", macs=tokens * per_token, state_reads=tokens * state)
    """
    if not _OP_COUNTS.issuperset(counts):  # a misspelt count fails with or without a counter
        check_op_counts("record_ops", counts)
    sink = _ACTIVE.get()
    if sink is not None:
        sink.on_record_ops(module, kind, counts)
