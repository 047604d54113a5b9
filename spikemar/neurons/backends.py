"""The backend seam of the neuron dynamics.

A backend is a :class:`Backend` record: an implementation with the signature of the PyTorch
reference,

    impl(x_seq, v, p, return_v_seq) -> (spikes, v_last, v_seq | None)

and what it can do, as fields of the record (not attributes of the function): the device it
accelerates, the 16-bit dtypes its kernels read and write themselves (``native_dtypes``; other
inputs arrive widened to the compute dtype, see ``functional.compute_dtype``), whether its
kernels check the values as they go (``checks_values``: then no separate scan runs), its place
in 'auto', and a function saying why it cannot run an input. ``v`` is ``None`` for a zero
membrane; ``p`` is the neuron's validated parameters (for ATMN, an
:class:`~spikemar.neurons.functional.ATMNParameters`; the seam itself reads nothing of it).
An implementation must be differentiable with respect to ``x_seq``, ``v`` and the threshold and
agree with the reference: spikes exactly, gradients to rounding. Fused backends register here
with :func:`register_backend`; ``'auto'`` picks the available backend of lowest
``auto_priority`` that supports the call, and a backend the user named never falls back
silently: it raises, saying why it cannot run the input.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .functional import _atmn_multi_step_torch

__all__ = [
    "Backend",
    "available_backends",
    "get_backend",
    "register_backend",
    "resolve_backend",
    "select_backend",
    "unregister_backend",
]

BackendImpl = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
# why a backend cannot run this input with these parameters, or None when it can
UnusableReason = Callable[[torch.Tensor, Any], str | None]


def _always_usable(x: torch.Tensor, p: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of a neuron's dynamics and its capabilities."""

    name: str
    impl: BackendImpl
    device_type: str | None = None  # the device it accelerates ('cpu', 'cuda'); None: any
    unusable_reason: UnusableReason = _always_usable
    # 16-bit x dtypes the kernels read (and spikes they write) as they are, computing in float32
    native_dtypes: tuple[torch.dtype, ...] = ()
    # the kernels raise on NaN / ±inf and a bad threshold themselves (no separate value scan)
    checks_values: bool = False
    auto_priority: int | None = None  # lower first in 'auto'; None: only when named


_BACKENDS: dict[str, Backend] = {}
_WARNED: set[str] = set()


def register_backend(
    name: str,
    impl: BackendImpl,
    unusable_reason: UnusableReason = _always_usable,
    auto_priority: int | None = None,
    device_type: str | None = None,
    *,
    native_dtypes: tuple[torch.dtype, ...] = (),
    checks_values: bool = False,
) -> Backend:
    """Register ``impl`` under ``name``; ``auto_priority`` (lower first) enrols it in 'auto'.
    Returns the record."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"name: expected a non-empty backend name other than 'auto', got {name!r}")
    if not callable(impl):
        raise TypeError(f"impl: expected a callable, got {type(impl).__name__}")
    if name == "torch" and "torch" in _BACKENDS:
        # the reference defines what is right and is what 'auto' falls back to; it cannot be
        # unregistered, so a replacement could never be undone
        raise ValueError("name: 'torch' is the reference backend; register under another name")
    record = Backend(
        name, impl, device_type, unusable_reason, tuple(native_dtypes), bool(checks_values),
        auto_priority,
    )  # fmt: skip
    _BACKENDS[name] = record
    return record


def unregister_backend(name: str) -> Backend:
    """Remove a backend registered with :func:`register_backend` (not the reference 'torch');
    returns its record."""
    if name == "torch" or name not in _BACKENDS:
        raise ValueError(f"name: expected a registered backend other than 'torch', got {name!r}")
    return _BACKENDS.pop(name)


def available_backends() -> list[str]:
    """Names accepted by ``backend=`` (besides 'auto')."""
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    """The registered record of ``name`` (its implementation and capabilities)."""
    check_backend_name(name)
    if name == "auto":
        raise ValueError(
            "backend: 'auto' is a choice made per input (select_backend), not a record"
        )
    return _BACKENDS[name]


def check_backend_name(name: str) -> None:
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {available_backends()}, got {name!r}")


def select_backend(name: str, x: torch.Tensor, p: Any) -> Backend:
    """The backend record for ``name`` on input ``x``; a clear error when it cannot run it."""
    check_backend_name(name)
    if name == "auto":
        skipped = []
        auto = [b for b in _BACKENDS.values() if b.auto_priority is not None]
        for backend in sorted(auto, key=lambda b: b.auto_priority):
            reason = backend.unusable_reason(x, p)
            if reason is None:
                _warn_once_about_fallback(backend.name, skipped)
                return backend
            if backend.device_type == x.device.type:
                skipped.append(f"{backend.name!r}: {reason}")
        return _BACKENDS["torch"]
    backend = _BACKENDS[name]
    reason = backend.unusable_reason(x, p)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} cannot run this input: {reason}")
    return backend


def resolve_backend(name: str, x: torch.Tensor, p: Any) -> BackendImpl:
    """The implementation (``select_backend(...).impl``) for ``name`` on input ``x``."""
    return select_backend(name, x, p).impl


def _warn_once_about_fallback(chosen: str, skipped: list[str]) -> None:
    """'auto' never slows down silently: say once why a fused backend for this device was passed
    over for the reference."""
    if chosen != "torch" or not skipped:
        return
    message = "backend='auto' runs the slower torch reference because " + "; ".join(skipped)
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


register_backend("torch", _atmn_multi_step_torch, auto_priority=100)


def _register_builtin_backends() -> None:
    from . import cpu_backend, cupy_backend

    # the C kernels check the values in the forward pass, on data already in cache
    register_backend(
        "cpu", cpu_backend.atmn_multi_step_cpu, cpu_backend.unusable_reason, 10, "cpu",
        checks_values=True,
    )  # fmt: skip
    # the CUDA forward probes the values in the kernel and reports them per value_checks
    register_backend(
        "cupy", cupy_backend.atmn_multi_step_cupy, cupy_backend.unusable_reason, 5, "cuda",
        native_dtypes=(torch.float16, torch.bfloat16), checks_values=True,
    )  # fmt: skip


_register_builtin_backends()
