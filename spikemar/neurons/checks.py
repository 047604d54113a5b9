"""When the neurons scan values on CUDA: the value-check mode.

The neurons refuse NaN / ±inf in their input and a threshold that is not finite and positive.
On the CPU the scan is cheap and the fused kernel does it on data already in cache. On CUDA,
reporting a value the moment it is found means copying a flag to the host, which waits for the
device on every call: a training step with dozens of spike points would stall dozens of times.
So on CUDA the check has three modes (CPU tensors are always checked at once):

* ``'eager'`` (default): raise at once, as on the CPU (one wait for the device per call);
* ``'deferred'``: fold the check into a flag on the device (no wait) and raise when
  :func:`raise_deferred_errors` reads it, once per training step or evaluation;
* ``'off'``: no value checks on CUDA tensors (shapes, types and devices are still checked).

    with value_checks("deferred"):
        loss = model(batch).loss
        loss.backward()
        raise_deferred_errors()       # one wait per step; raises if any spike point saw NaN/inf
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

__all__ = [
    "defer_error",
    "get_value_checks",
    "raise_deferred_errors",
    "set_value_checks",
    "value_checks",
]

MODES = ("eager", "deferred", "off")
_state = threading.local()
# device → bool flags on that device: [a bad threshold was seen, a non-finite membrane was seen]
_flags: dict[torch.device, torch.Tensor] = {}
_flags_lock = threading.Lock()
# (device, message) → a 0-d bool flag on that device: the deferred checks of other packages
# (token ids, SSM decays), each raising its own message
_named: dict[tuple[torch.device, str], torch.Tensor] = {}


def get_value_checks() -> str:
    """The mode of this thread: 'eager', 'deferred' or 'off'."""
    return getattr(_state, "mode", "eager")


def set_value_checks(mode: str) -> None:
    """Set this thread's mode for CUDA tensors (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    _state.mode = mode


@contextlib.contextmanager
def value_checks(mode: str) -> Iterator[None]:
    """Run the block with value-check ``mode`` on CUDA tensors, then restore the previous one.
    Leaving a 'deferred' block does not read the flags: call :func:`raise_deferred_errors`."""
    before = get_value_checks()
    set_value_checks(mode)
    try:
        yield
    finally:
        set_value_checks(before)


def deferred_cuda_check(probe: torch.Tensor, extremes: list[torch.Tensor]) -> bool:
    """For ``functional.check_values``: True when the check of a CUDA ``probe`` is done here
    (deferred into the device flags, or off), False when the caller must check at once.
    ``extremes`` are V's minimum and maximum, then the probe's (when it has values)."""
    if probe.device.type != "cuda":
        return False
    mode = get_value_checks()
    if mode == "eager":
        return False
    if mode == "off":
        return True
    v_lo, v_hi, *u_range = extremes
    bad_u = ~torch.isfinite(torch.stack(u_range)).all() if u_range else None
    defer(threshold_is_bad(v_lo, v_hi), bad_u, probe)
    return True


def threshold_is_bad(v_lo: torch.Tensor, v_hi: torch.Tensor) -> torch.Tensor:
    """A 0-d bool on V's device: V's extremes are not both finite and > 0 (nothing waits)."""
    return ~(torch.isfinite(v_lo) & torch.isfinite(v_hi) & (v_lo > 0))


def defer(bad_v: torch.Tensor, bad_u: torch.Tensor | None, like: torch.Tensor) -> None:
    """Fold a check's outcome (0-d bools on ``like``'s device; ``bad_u`` None: no membrane
    checked) into that device's flags, without waiting, for :func:`raise_deferred_errors`."""
    bad_u = bad_v & False if bad_u is None else bad_u
    _device_flags(like).logical_or_(torch.stack([bad_v, bad_u]))


def _device_flags(like: torch.Tensor) -> torch.Tensor:
    with _flags_lock:
        flags = _flags.get(like.device)
        if flags is None:
            flags = _flags[like.device] = like.new_zeros(2, dtype=torch.bool)
        return flags


def defer_error(bad: torch.Tensor, message: str) -> None:
    """For checks outside the neurons under 'deferred': fold the 0-d bool ``bad`` (on its
    device; nothing waits) into a flag that :func:`raise_deferred_errors` reads, raising
    ``ValueError(message)`` if any call since the last read set it."""
    key = (bad.device, message)
    with _flags_lock:
        flag = _named.get(key)
        if flag is None:
            flag = _named[key] = bad.new_zeros((), dtype=torch.bool)
    flag.logical_or_(bad)


def raise_deferred_errors() -> None:
    """Read the flags of deferred checks (one wait per device that has them: the neurons' and
    the named checks' flags in one transfer), clear them and raise ValueError if any check
    since the last call failed."""
    with _flags_lock:
        neuron = dict(_flags)
        named = list(_named.items())
    devices = list(dict.fromkeys([*neuron, *(device for (device, _), _ in named)]))
    for device in devices:
        flags = neuron.get(device)
        items = [(message, flag) for (d, message), flag in named if d == device]
        parts = ([] if flags is None else [flags]) + [flag.reshape(1) for _, flag in items]
        seen = torch.cat(parts).tolist()  # the one wait for this device
        if flags is not None:
            bad_v, bad_u = seen[:2]
            seen = seen[2:]
            flags.zero_()  # the named checks' flags stay set until they are reported
            if bad_v:
                raise ValueError(
                    f"v_threshold: a spiking neuron on {device} saw a threshold that is not "
                    "finite and positive since the last raise_deferred_errors() (a diverged "
                    "update?)"
                )
            if bad_u:
                raise ValueError(
                    f"x_seq: a spiking neuron on {device} saw NaN or inf in its input or "
                    "membrane since the last raise_deferred_errors()"
                )
        for _, flag in items:
            flag.zero_()
        for (message, _), bad in zip(items, seen, strict=True):
            if bad:
                raise ValueError(message)
