"""The CPU kernels of :mod:`spikemar.ssm` for inference: one token of the selective mixer between
its projections, and RMSNorm (``_cpu/ssm_impl.h`` has the equations).

Why C: generating one token at batch 1 is a few hundred tiny tensor operations whose entry costs
are the time; the mixer's middle (convolution window, softplus, the scan step, the gate) is ~15
of them, here one call. The library is built on first use with the compiler, flags and cache of
the neurons' CPU backend (:func:`spikemar.neurons.cpu_backend.build_library`). Callers check
shapes and dtypes (the kernels trust them) and run these only with autograd off; each function
equals its PyTorch reference to rounding, which the tests check on random inputs.
"""

from __future__ import annotations

import ctypes
import math
import threading
from pathlib import Path

import torch

from ..neurons.cpu_backend import build_library

__all__ = ["mixer_step_cpu", "rms_norm_cpu", "usable"]

_DIR = Path(__file__).parent / "_cpu"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _load() -> ctypes.CDLL:
    global _lib, _error
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _bind(build_library(_DIR / "ssm.c", (_DIR / "ssm_impl.h",)))
            except RuntimeError as err:
                _error = str(err)
        if _lib is None:
            raise RuntimeError(_error)
        return _lib


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    for suffix in ("f32", "f64"):
        mix = getattr(lib, f"mixer_step_{suffix}")
        # zxbcdt, conv_state, ssm_state, conv_w, conv_b, dt_bias, A_log, D, batch, I, N, G, H,
        # P, k, dt_min, dt_max, xi_off, z_off, dt_off, conv_silu, dt_scales_x, z_bias, gated,
        # new_conv, new_ssm, a_out, scratch
        mix.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, f64, f64,
                        i64, i64, i64, i64, i64, p, p, p, p, p, p]  # fmt: skip
        mix.restype = i64
        norm = getattr(lib, f"rms_norm_{suffix}")
        norm.argtypes = [p, i64, i64, i64, p, f64, p]  # x, rows, groups, D, w, eps, out
        norm.restype = None
    return lib


def usable() -> bool:
    """Whether the kernels are built and loaded (building them on the first call)."""
    if _lib is not None:
        return True
    try:
        _load()
    except RuntimeError:
        return False
    return True


def mixer_step_cpu(
    zxbcdt: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    A_log: torch.Tensor | None,
    D: torch.Tensor,
    n_groups: int = 1,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    *,
    discrete: bool = False,
    conv_silu: bool = True,
    z_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One token of :class:`spikemar.ssm.SelectiveMixer` from the input projection's output to
    the gated output before the norm, in one C call. All tensors on the CPU in one dtype
    (float32 or float64) with the mixer's shapes: ``zxbcdt`` [batch, I + K + H], ``conv_state``
    [batch, K, k − 1], ``ssm_state`` [batch, H, P, N], ``conv_weight`` [K, 1, k] (K = I + 2GN).

    ``discrete``: one token of :class:`spikemar.ssm.DiscreteMixer` (Llamba's) instead: the row
    is ``[x B C | z | Δ_raw]``, the state's input is x ⊗ B (not Δx ⊗ B), ``dt_bias`` and
    ``A_log`` are None (A = −1), ``conv_silu`` says whether a SiLU follows the convolution and
    ``z_bias`` [I] (or None) is added to z before its SiLU.

    Returns ``(gated [batch, I], new conv state, new SSM state, a [batch, H], bad)``, ``bad`` the
    number of log decays that are not finite and ≤ 0 (the caller raises).
    """
    lib = _lib if _lib is not None else _load()
    batch, H, P, N = ssm_state.shape
    I = H * P
    K = I + 2 * n_groups * N
    k = conv_weight.shape[-1]
    zxbcdt, conv_state, ssm_state = (t.contiguous() for t in (zxbcdt, conv_state, ssm_state))
    gated = zxbcdt.new_empty(batch, I)
    new_conv = torch.empty_like(conv_state)
    new_ssm = torch.empty_like(ssm_state)
    a = zxbcdt.new_empty(batch, H)
    scratch = zxbcdt.new_empty(K)
    offsets = (0, K, K + I) if discrete else (I, 0, I + K)  # ξ, z, Δ_raw in a row

    kept = []  # contiguous copies (if any) must outlive the call

    def ptr(t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        kept.append(t.contiguous())
        return kept[-1].data_ptr()

    fn = lib.mixer_step_f32 if zxbcdt.dtype == torch.float32 else lib.mixer_step_f64
    bad = fn(zxbcdt.data_ptr(), conv_state.data_ptr(), ssm_state.data_ptr(), ptr(conv_weight),
             ptr(conv_bias), ptr(dt_bias), ptr(A_log), ptr(D), batch, I, N, n_groups, H, P, k,
             float(dt_limit[0]), float(dt_limit[1]), *offsets, int(conv_silu), int(not discrete),
             ptr(z_bias), gated.data_ptr(), new_conv.data_ptr(), new_ssm.data_ptr(),
             a.data_ptr(), scratch.data_ptr())  # fmt: skip
    return gated, new_conv, new_ssm, a, bad


def rms_norm_cpu(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, groups: int = 1
) -> torch.Tensor:
    """RMSNorm of ``x`` over each of ``groups`` equal slices of its last dimension, times
    ``weight`` (over the whole last dimension; None: none), in one C call: equal to
    ``nn.RMSNorm`` (``groups`` = 1) to rounding, the sum of squares taken in double. For a
    float32/float64 CPU ``x`` and a ``weight`` of its dtype and last dimension."""
    lib = _lib if _lib is not None else _load()
    x = x.contiguous()
    width = x.shape[-1]
    out = torch.empty_like(x, requires_grad=False)
    w = 0 if weight is None else weight.contiguous().data_ptr()
    fn = lib.rms_norm_f32 if x.dtype == torch.float32 else lib.rms_norm_f64
    fn(x.data_ptr(), x.numel() // width, groups, width // groups, w, float(eps), out.data_ptr())
    return out
