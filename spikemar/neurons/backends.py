"""The backend seam of the neuron dynamics.

A backend is a function with the signature of the PyTorch reference,

    impl(x_seq, v, p, return_v_seq) -> (spikes, v_last, v_seq | None)

receiving ``x_seq`` and ``v`` (``None`` for a zero membrane) already in the compute dtype
(see ``functional.compute_dtype``; a backend that lists 16-bit types in ``impl.native_dtypes``
receives such an ``x_seq`` as it is and returns spikes of its dtype, the membranes in the compute
dtype) and a validated
:class:`~spikemar.neurons.functional.ATMNParameters`. It must be differentiable with respect to
``x_seq``, ``v`` and ``p.v_threshold`` and agree with the reference: spikes exactly, gradients
to rounding. Fused backends register here with :func:`register_backend`; ``'auto'`` picks the
available backend of lowest ``auto_priority`` that supports the call, and a backend the user
named never falls back silently: it raises, saying why it cannot run the input.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .functional import ATMNParameters, _atmn_multi_step_torch

__all__ = ["available_backends", "register_backend", "resolve_backend"]

BackendImpl = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class Backend:
    name: str
    impl: BackendImpl
    device_type: str | None  # the device it accelerates ('cpu', 'cuda'); None: any
    # why the backend cannot run this input with these parameters, or None when it can
    unusable_reason: Callable[[torch.Tensor, ATMNParameters], str | None]


_BACKENDS: dict[str, Backend] = {}
_AUTO_PRIORITY: dict[str, int] = {}
_WARNED: set[str] = set()


def register_backend(
    name: str,
    impl: BackendImpl,
    unusable_reason: Callable[[torch.Tensor, ATMNParameters], str | None] = lambda x, p: None,
    auto_priority: int | None = None,
    device_type: str | None = None,
) -> None:
    """Register ``impl`` under ``name``; ``auto_priority`` (lower first) enrols it in 'auto'."""
    _BACKENDS[name] = Backend(name, impl, device_type, unusable_reason)
    if auto_priority is not None:
        _AUTO_PRIORITY[name] = auto_priority


def available_backends() -> list[str]:
    """Names accepted by ``backend=`` (besides 'auto')."""
    return sorted(_BACKENDS)


def check_backend_name(name: str) -> None:
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {available_backends()}, got {name!r}")


def resolve_backend(name: str, x: torch.Tensor, p: ATMNParameters) -> BackendImpl:
    """The implementation for ``name`` on input ``x``; a clear error when it cannot run it."""
    check_backend_name(name)
    if name == "auto":
        skipped = []
        for candidate in sorted(_AUTO_PRIORITY, key=_AUTO_PRIORITY.__getitem__):
            backend = _BACKENDS[candidate]
            reason = backend.unusable_reason(x, p)
            if reason is None:
                _warn_once_about_fallback(candidate, skipped)
                return backend.impl
            if backend.device_type == x.device.type:
                skipped.append(f"{candidate!r}: {reason}")
        return _BACKENDS["torch"].impl
    backend = _BACKENDS[name]
    reason = backend.unusable_reason(x, p)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} cannot run this input: {reason}")
    return backend.impl


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

    register_backend("cpu", cpu_backend.atmn_multi_step_cpu, cpu_backend.unusable_reason, 10, "cpu")
    register_backend(
        "cupy", cupy_backend.atmn_multi_step_cupy, cupy_backend.unusable_reason, 5, "cuda"
    )


_register_builtin_backends()
