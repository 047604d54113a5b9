"""The projections of spikemar's models: :class:`Linear` is ``nn.Linear`` with a CPU kernel for
generation's few rows (``_cpu/linear.c``: one token's projections stream their weights once, at
close to the machine's read bandwidth).

Why not torch's own: at batch 1 a projection is a matrix-vector product whose whole cost is
reading the weight once, and ``F.linear`` on torch's CPU wheel (MKL, 2 threads, the AMD EPYC of
benchmarks/RESULTS.md) reads it at ~14 GB/s where a sum over the same bytes reads ~29 GB/s: a
converted 130 M Mamba-2 spends ~37 ms of a ~40 ms token in ``F.linear``, ~18 ms here. For more
rows (training, prefill, large batches) torch's blocked GEMM is the better kernel and
:class:`Linear` calls it; with autograd recording it always does.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..neurons.cpu_backend import KernelLibrary, build_library

__all__ = ["MAX_FAST_ROWS", "Linear", "linear_cpu"]

# Rows of x up to which the kernel is used. benchmarks/bench_linear.py measures it against
# F.linear on the 130 M Mamba-2's weights (2 threads, best of 12, load ~3): 1.7× faster at 1 row,
# 1.9× at 8, 1.4× at 16, 1.2× at 32, even at 64; beyond, torch's blocked GEMM, which reuses a
# tile of W for many rows from cache, is the better kernel.
MAX_FAST_ROWS = 16

_DIR = Path(__file__).parent / "_cpu"
_DTYPES = (torch.float32, torch.float64)


def _build() -> ctypes.CDLL:
    lib = build_library(_DIR / "linear.c", (_DIR / "linear_impl.h",))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for suffix in ("f32", "f64"):
        fn = getattr(lib, f"linear_{suffix}")
        fn.argtypes = [p, p, p, p, i64, i64, i64, ctypes.c_int]  # x W b y M K N threads
        fn.restype = None
    return lib


# built on first use; where it cannot be (no C compiler), F.linear serves everywhere
_LIBRARY = KernelLibrary(_build)


def _run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel on checked, contiguous tensors of one dtype: x [..., K], weight [N, K]."""
    lib = _LIBRARY.load()
    N, K = weight.shape
    out = x.new_empty(*x.shape[:-1], N)
    fn = lib.linear_f32 if x.dtype == torch.float32 else lib.linear_f64
    b = 0 if bias is None else bias.data_ptr()
    fn(x.data_ptr(), weight.data_ptr(), b, out.data_ptr(), x.numel() // K, K, N,
       torch.get_num_threads())  # fmt: skip
    return out


def linear_cpu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` by spikemar's CPU kernel, for any number of rows (it pays up to
    :data:`MAX_FAST_ROWS`), without autograd: equal to ``F.linear`` to float rounding (the sums
    run in another order). ``x`` [..., K], ``weight`` [N, K], ``bias`` [N] or None: CPU tensors
    of one dtype, float32 or float64. Raises ValueError naming the argument that does not fit,
    RuntimeError where the kernel cannot be built."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_cpu or t.dtype not in _DTYPES:
            raise ValueError(f"{name}: expected a float32/float64 CPU tensor, got {_describe(t)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from x's {x.dtype}")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"weight: expected shape [N, {x.shape[-1] if x.dim() else '?'}] for x of shape "
            f"{tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    _LIBRARY.load()  # RuntimeError with the reason where it cannot be built
    with torch.no_grad():
        bias = None if bias is None else bias.contiguous()
        return _run(x.contiguous(), weight.contiguous(), bias)


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor on {t.device}"
    return type(t).__name__


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names, initialisation and state dict; ``isinstance`` of
    it, so every rule and exporter that knows ``nn.Linear`` knows this) whose forward takes
    :func:`linear_cpu`'s kernel where that is the faster one and nothing can tell the
    difference: CPU float32/float64 input and parameters of one dtype, contiguous, at most
    :data:`MAX_FAST_ROWS` rows, and autograd not recording (no grad mode, or nothing requires
    grad). Hooks run as for any module. Everything else is ``F.linear``.

    The kernel runs outside torch's dispatcher: a ``TorchDispatchMode`` (SpikingJelly's
    ``op_counter``, say) active around a no-grad step of a few rows does not see its matrix
    product; spikemar's own counter counts through module hooks and does."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if (
            input.is_cpu
            and input.dtype in _DTYPES
            and input.dtype == w.dtype
            and input.numel() <= MAX_FAST_ROWS * self.in_features
            and input.dim() >= 1
            and input.shape[-1] == self.in_features
            and not (torch.is_grad_enabled() and (input.requires_grad or w.requires_grad))
            and w.is_cpu
            and w.is_contiguous()
            and input.is_contiguous()
            and (b is None or (b.dtype == w.dtype and b.is_cpu and b.is_contiguous()))
            and input.numel() > 0
            and _LIBRARY.usable()
        ):
            return _run(input, w, b)
        return F.linear(input, w, b)
