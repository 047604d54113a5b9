"""What the fused backends share: the autograd Function around a forward and a backward kernel
(neuron-agnostic: it reads nothing of ``p`` but ``p.v_threshold``, so a second neuron's kernels
use it as ATMN's do, see tests/test_neuron_seam.py), and the encoding of ATMN's surrogates and
thresholds that its kernels read.

A kernel set implements two launches over contiguous tensors (``x`` [T, N] viewed flat,
``v0`` [N] or None for a zero membrane):

* ``forward(x, v0, vth, p, spikes, v_last, v_seq)`` fills ``spikes``, ``v_last`` and, when not
  None, ``v_seq``;
* ``backward(x, v0, vth, p, g_spikes, g_vlast, g_vseq, g_x, g_v0) -> g_vth`` fills ``g_x`` and,
  when not None, ``g_v0``, and returns the threshold gradient with ``vth``'s shape. Gradients
  that are None are zero. The backward recomputes h from ``x`` and ``v0``: nothing but the
  inputs is saved.

``vth`` is 0-d (shared) or [C] over the last dimension of x (per channel).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from .functional import ATMNParameters, compute_dtype
from .surrogate import ATan, Rectangle, Sigmoid, Triangle

__all__ = [
    "SURROGATE_CODES",
    "FusedKernels",
    "fused_multi_step",
    "surrogate_code",
    "unsupported_parameters",
    "unusable_reason",
]

# kernel-side code of each built-in surrogate and the name of its parameter
SURROGATE_CODES: dict[type, tuple[int, str]] = {
    Rectangle: (0, "width"),
    Triangle: (1, "width"),
    Sigmoid: (2, "alpha"),
    ATan: (3, "alpha"),
}


def surrogate_code(p: ATMNParameters) -> tuple[int, float, float]:
    """``(kind, pa, pb)``: the surrogate's code and parameters as the kernels' g(z) reads them.

    rectangle: width/2, 1/width · triangle: width/2 · sigmoid: alpha · atan: π/2·alpha, alpha/2
    """
    kind, attr = SURROGATE_CODES[type(p.surrogate)]
    a = float(getattr(p.surrogate, attr))
    pa, pb = {0: (0.5 * a, 1.0 / a), 1: (0.5 * a, 0.0), 2: (a, 0.0)}.get(
        kind, (0.5 * math.pi * a, 0.5 * a)
    )
    return kind, pa, pb


def unsupported_parameters(p: ATMNParameters) -> str | None:
    """Why a fused kernel cannot run ``p`` (None when it can)."""
    if type(p.surrogate) not in SURROGATE_CODES:
        names = [c.__name__ for c in SURROGATE_CODES]
        return (
            f"it implements the built-in surrogates {names}, not {type(p.surrogate).__name__}; "
            "use backend='torch'"
        )
    if p.smooth:
        return "smooth=True is a gradient-testing mode of the torch reference"
    return None


def unusable_reason(
    x: torch.Tensor, p: ATMNParameters, device_type: str, load: Callable[[], object]
) -> str | None:
    """Why a fused backend for ``device_type`` cannot run ``x`` with ``p``: the device, then the
    parameters, then ``load()`` (building or importing the kernels, RuntimeError on failure)."""
    if x.device.type != device_type:
        return f"it runs on {device_type.upper()} tensors, got a tensor on {x.device}"
    reason = unsupported_parameters(p)
    if reason is not None:
        return reason
    try:
        load()
    except RuntimeError as err:
        return str(err)
    return None


class FusedKernels(Protocol):
    name: str  # the backend's name (for errors; optional)
    dtypes: tuple[torch.dtype, ...]  # the dtypes of x (and the spikes) that the kernels take

    def forward(self, x, v0, vth, p, spikes, v_last, v_seq) -> None: ...

    def backward(self, x, v0, vth, p, g_spikes, g_vlast, g_vseq, g_x, g_v0) -> torch.Tensor: ...


def refuse_create_graph(backend: str) -> None:
    """For a fused kernel's backward: refuse one run with ``create_graph=True`` (grad mode is on
    inside it), which wants a graph of the gradients. The kernels compute them without one, so
    the second derivatives through the neuron would be silently missing (``once_differentiable``
    sees only the incoming gradient, which need not require grad)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"backend={backend!r} (the fused kernels, also chosen by 'auto') computes first "
            "derivatives only, and this backward asked for a graph (create_graph=True); use "
            "backend='torch' for higher-order gradients"
        )


def cast(t: torch.Tensor, device: torch.device | None, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (and on ``device`` unless None): itself where it is already."""
    if t.dtype == dtype and (device is None or t.device == device):
        return t
    return t.to(dtype=dtype) if device is None else t.to(device=device, dtype=dtype)


def grad_home(t: torch.Tensor, x: torch.Tensor) -> tuple[torch.device | None, torch.dtype]:
    """Where the gradient of a kernel input ``t`` (a threshold, a membrane) goes back, as
    :func:`cast` takes it: ``t``'s dtype, and ``t``'s device where that is not ``x``'s (the
    kernels compute on ``x``'s device in its compute dtype)."""
    return (None if t.device == x.device else t.device), t.dtype


class _FusedATMN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_seq, v0, v_threshold, p, return_v_seq, kernels):  # type: ignore[override]
        x = x_seq.contiguous()
        # spikes in x's dtype; membranes and thresholds in the compute dtype (float32 for a
        # 16-bit x) on x's device: the kernels read raw pointers, so a float64 threshold with a
        # float32 x (or a CPU one with a CUDA x) would be read as other numbers
        cdtype = compute_dtype(x.dtype)
        # the gradients go back to the inputs' own dtype, and device where it was not x's
        ctx.v0_home = None if v0 is None else grad_home(v0, x)
        ctx.vth_home = grad_home(v_threshold, x)
        v0 = None if v0 is None else cast(v0.detach(), x.device, cdtype).contiguous()
        vth = cast(v_threshold.detach(), x.device, cdtype).contiguous()
        spikes, v_last = torch.empty_like(x), torch.empty_like(x[0], dtype=cdtype)
        v_seq = torch.empty_like(x, dtype=cdtype) if return_v_seq else None
        kernels.forward(x, v0, vth, p, spikes, v_last, v_seq)
        ctx.save_for_backward(x, vth, v0)  # v0 is None for a zero membrane
        ctx.p, ctx.kernels = p, kernels
        ctx.set_materialize_grads(False)
        return (spikes, v_last, v_seq) if return_v_seq else (spikes, v_last)

    @staticmethod
    def backward(ctx, g_spikes, g_vlast, g_vseq=None):  # type: ignore[override]
        refuse_create_graph(getattr(ctx.kernels, "name", "fused"))
        x, vth, v0 = ctx.saved_tensors
        cdtype = compute_dtype(x.dtype)
        g_spikes = None if g_spikes is None else g_spikes.to(x.dtype).contiguous()
        g_vlast, g_vseq = (
            None if g is None else g.to(cdtype).contiguous() for g in (g_vlast, g_vseq)
        )
        g_x = torch.empty_like(x)
        g_v0 = torch.empty_like(v0) if v0 is not None and ctx.needs_input_grad[1] else None
        g_vth = ctx.kernels.backward(x, v0, vth, ctx.p, g_spikes, g_vlast, g_vseq, g_x, g_v0)
        g_vth = cast(g_vth, *ctx.vth_home) if ctx.needs_input_grad[2] else None
        g_v0 = None if g_v0 is None else cast(g_v0, *ctx.v0_home)
        return g_x, g_v0, g_vth, None, None, None


def fused_multi_step(
    kernels: FusedKernels,
    x_seq: torch.Tensor,
    v: torch.Tensor | None,
    p: ATMNParameters,
    return_v_seq: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A backend entry point (signature of ``functional._atmn_multi_step_torch``) on ``kernels``."""
    if x_seq.dtype not in kernels.dtypes:
        names = "/".join(str(d).removeprefix("torch.") for d in kernels.dtypes)
        raise TypeError(f"x_seq: these fused kernels take {names}, got {x_seq.dtype}")
    out = _FusedATMN.apply(x_seq, v, p.v_threshold, p, return_v_seq, kernels)
    return out[0], out[1], (out[2] if return_v_seq else None)
