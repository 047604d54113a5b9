"""The CuPy backend of ATMN: fused CUDA kernels (``_cuda/atmn.cu``) on torch's CUDA tensors.

The kernels receive raw device pointers, so torch tensors are used in place (no copy, no DLPack
dtype limits), and they launch on torch's current stream of the tensor's device so that they
order correctly with the surrounding torch ops. CuPy compiles the source with NVRTC on first use
for each ``MAX_T`` bucket (the next power of two ≥ T, at least 8) and caches it on disk.
CuPy is imported only when a CUDA tensor reaches this backend, never at ``import spikemar``.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import torch

from . import fused
from .functional import ATMNParameters, _decay
from .fused import fused_multi_step, surrogate_code

__all__ = ["atmn_multi_step_cupy", "unusable_reason"]

_SOURCE = Path(__file__).parent / "_cuda" / "atmn.cu"
_THREADS = 256  # a multiple of 32: the shared-threshold reduction is per warp
_HOW_TO_FIX = (
    "install the CuPy build matching your CUDA (pip install cupy-cuda12x, or cupy-cuda13x), "
    "or pass backend='torch'"
)

_lock = threading.Lock()
_modules: dict[int, object] = {}


def _cupy():
    try:
        import cupy
    except ImportError as err:
        raise RuntimeError(f"CuPy is not installed ({err}); {_HOW_TO_FIX}") from err
    try:
        available = cupy.cuda.is_available()
    except Exception as err:  # CuPy raises its own CUDA errors when the driver is missing
        raise RuntimeError(f"CuPy cannot reach a CUDA device ({err}); {_HOW_TO_FIX}") from err
    if not available:
        raise RuntimeError(f"CuPy finds no CUDA device; {_HOW_TO_FIX}")
    return cupy


def unusable_reason(x: torch.Tensor, p: ATMNParameters) -> str | None:
    """Why the CuPy kernels cannot run ``x`` with ``p`` (None when it can)."""
    return fused.unusable_reason(x, p, "cuda", _cupy)


def _function(name: str, T: int):
    max_t = max(8, 1 << math.ceil(math.log2(max(T, 1))))
    with _lock:
        module = _modules.get(max_t)
        if module is None:
            cupy = _cupy()
            module = cupy.RawModule(
                code=_SOURCE.read_text(), options=("-std=c++17", f"-DMAX_T={max_t}")
            )
            _modules[max_t] = module
    return module.get_function(name)


def _launch(kernel, x: torch.Tensor, N: int, args: tuple) -> None:
    cupy = _cupy()
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    blocks = max(1, min(math.ceil(N / _THREADS), sms * 32))
    with cupy.cuda.Device(x.device.index):
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream)
        with stream:
            kernel((blocks,), (_THREADS,), args)


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


class _CupyKernels:
    """Launches of the CUDA kernels (see ``fused.FusedKernels``)."""

    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

    def forward(self, x, v0, vth, p, spikes, v_last, v_seq) -> None:
        T, N, C, real, suffix = _geometry(x, vth)
        args = (_ptr(x), _ptr(v0), _ptr(vth), np.int64(T), np.int64(N), np.int64(C),
                real(_decay(p.tau)), np.int32(p.ternary), _ptr(spikes), _ptr(v_last),
                _ptr(v_seq))  # fmt: skip
        _launch(_function(f"atmn_forward_{suffix}", T), x, N, args)

    def backward(self, x, v0, vth, p, g_spikes, g_vlast, g_vseq, g_x, g_v0) -> torch.Tensor:
        T, N, C, real, suffix = _geometry(x, vth)
        kind, pa, pb = surrogate_code(p)
        g_vth = torch.zeros(max(C, 1), dtype=torch.float64, device=x.device)
        args = (_ptr(x), _ptr(v0), _ptr(vth), np.int64(T), np.int64(N), np.int64(C),
                real(_decay(p.tau)), np.int32(p.ternary), np.int32(p.detach_reset),
                np.int32(kind), real(pa), real(pb), _ptr(g_spikes), _ptr(g_vlast),
                _ptr(g_vseq), _ptr(g_x), _ptr(g_v0), _ptr(g_vth))  # fmt: skip
        _launch(_function(f"atmn_backward_{suffix}", T), x, N, args)
        return g_vth[0] if C == 0 else g_vth


# x's dtype → (the kernels' arithmetic type, their name suffix); 16-bit x computes in float32
_KERNEL_TYPES = {
    torch.float32: (np.float32, "f32"),
    torch.float64: (np.float64, "f64"),
    torch.float16: (np.float32, "f16"),
    torch.bfloat16: (np.float32, "bf16"),
}


def _geometry(x: torch.Tensor, vth: torch.Tensor):
    T, N = x.shape[0], x[0].numel()
    C = vth.numel() if vth.dim() == 1 else 0
    real, suffix = _KERNEL_TYPES[x.dtype]
    return T, N, C, real, suffix


_KERNELS = _CupyKernels()


def atmn_multi_step_cupy(
    x_seq: torch.Tensor, v: torch.Tensor | None, p: ATMNParameters, return_v_seq: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backend entry point (signature of ``functional._atmn_multi_step_torch``)."""
    return fused_multi_step(_KERNELS, x_seq, v, p, return_v_seq)
