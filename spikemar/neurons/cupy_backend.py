"""The CuPy backend of ATMN: fused CUDA kernels (``_cuda/atmn.cu``) on torch's CUDA tensors.

The kernels receive raw device pointers, so torch tensors are used in place (no copy, no DLPack
dtype limits), and they launch on torch's current stream of the tensor's device so that they
order correctly with the surrounding torch ops. CuPy compiles the source with NVRTC on first use
for each device and ``MAX_T`` bucket (the next power of two ≥ T, from 8 to 64; longer trains
run in chunks of 64) and caches it on disk. CuPy is imported only when a CUDA tensor reaches
this backend, never at ``import spikemar``.

The launch geometry (``launch_geometry``) gives every thread one channel: blocks of
``bx × by = 256`` threads, ``bx`` consecutive channels by ``by`` rows, rows grid-strided. The
backward writes one partial dL/dV per (row block, channel), summed here in a fixed order, so
gradients do not depend on scheduling. Nothing here reads a value back from the device.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .._numbers import integer
from . import checks, fused
from .functional import (
    ATMNParameters,
    _decay,
    bad_threshold_error,
    check_input,
    check_micro_steps,
    check_parameters,
    compute_dtype,
    decode_weights,
    for_argument,
    nonfinite_error,
)
from .fused import cast, fused_multi_step, grad_home, refuse_create_graph, surrogate_code

__all__ = [
    "NVRTC_OPTIONS",
    "SOURCE",
    "atmn_multi_step_cupy",
    "atmn_quantize_cupy",
    "kernel_name",
    "launch_geometry",
    "max_t_bucket",
    "quantize_unusable_reason",
    "unusable_reason",
]

SOURCE = Path(__file__).parent / "_cuda" / "atmn.cu"
# the options every build uses (plus -DMAX_T=...): NVRTC's defaults otherwise, so --fmad=true,
# and CuPy appends -ftz=true (the last one wins): the forwards' exactness comes from their inline
# PTX (no FMA, no flush to zero), which tests/test_cuda_kernels.py checks under these options
NVRTC_OPTIONS = ("-std=c++17",)
_THREADS = 256  # BLOCK_THREADS in atmn.cu: the backward's shared reduction has this size
_MAX_T_BUCKETS = (8, 16, 32, 64)
_BLOCKS_PER_SM = 32
# the kernels index in 32 bits when every integer they compute stays below this (the emulation
# test lowers it to run the 64-bit kernels on small inputs): see _Launch.of
INDEX32_LIMIT = 2**31
_MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y
# the largest grid stride over rows: gridDim.y times rows per block (≤ 256)
_MAX_ROW_STRIDE = _MAX_GRID_Y * _THREADS
_HOW_TO_FIX = (
    "install the CuPy build matching your CUDA (pip install cupy-cuda12x, or cupy-cuda13x), "
    "or pass backend='torch'"
)

_lock = threading.Lock()
_modules: dict[tuple[int, int], object] = {}  # (device index, MAX_T) → RawModule
_functions: dict[tuple[int, int, str], object] = {}


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


def max_t_bucket(T: int) -> int:
    """The ``MAX_T`` a launch for T micro-steps is compiled with: the next power of two ≥ T,
    from 8 to 64 (one build per bucket; T > 64 runs in chunks of 64 in the backward)."""
    return next((b for b in _MAX_T_BUCKETS if b >= T), _MAX_T_BUCKETS[-1])


def kernel_name(direction: str, dtype: torch.dtype, index_bits: int) -> str:
    """The kernel's name in ``atmn.cu``: ``atmn_{forward|backward}_{f32|f64|f16|bf16}_i{32|64}``."""
    return f"atmn_{direction}_{_KERNEL_TYPES[dtype][1]}_i{index_bits}"


def launch_geometry(rows: int, C: int, sms: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(grid, block)`` for ``rows × C`` neurons (C = 1 for a shared threshold) on a device with
    ``sms`` multiprocessors: ``bx`` consecutive channels (a power of two ≤ 32 covering C where it
    can) by ``256 / bx`` rows per block, row blocks capped near ``sms · 32`` blocks in all."""
    bx = min(32, 1 << max(0, math.ceil(math.log2(C))))
    by = _THREADS // bx
    gx = math.ceil(C / bx)
    cap = max(1, (sms * _BLOCKS_PER_SM) // gx)
    gy = max(1, min(math.ceil(rows / by), cap, _MAX_GRID_Y))
    return (gx, gy), (bx, by)


def _function(name: str, T: int, device_index: int):
    """The compiled kernel ``name`` for T micro-steps on the device, compiled and loaded inside
    that device's context (a module is loaded per context, so per device)."""
    cupy = _cupy()
    max_t = max_t_bucket(T)
    key = (device_index, max_t, name)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    with _lock, cupy.cuda.Device(device_index):
        module = _modules.get(key[:2])
        if module is None:
            module = cupy.RawModule(
                code=SOURCE.read_text(), options=(*NVRTC_OPTIONS, f"-DMAX_T={max_t}")
            )
            _modules[key[:2]] = module
        fn = _functions[key] = module.get_function(name)
    return fn


def _device_index(x: torch.Tensor) -> int:
    # a CUDA tensor names its device; a tensor elsewhere (the CPU emulation of the tests) runs
    # on CuPy's current device
    if x.device.type == "cuda":
        return x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _cupy().cuda.Device().id


def _launch(
    name: str, x: torch.Tensor, T: int, rows: int, C: int, args: tuple, partials: bool
) -> torch.Tensor | None:
    """Launch kernel ``name`` over ``rows × C`` neurons on torch's current stream. ``partials``
    (a backward): the kernel takes one more pointer, to one partial dL/dV per (row block,
    channel), every one written by the kernel; returns their sum over row blocks, in a fixed
    order (deterministic)."""
    cupy = _cupy()
    index = _device_index(x)
    kernel = _function(name, T, index)
    with cupy.cuda.Device(index):
        sms = cupy.cuda.Device(index).attributes["MultiProcessorCount"]
        grid, block = launch_geometry(rows, C, sms)
        if partials:
            partial = torch.empty(grid[1], C, dtype=torch.float64, device=x.device)
            args = (*args, _ptr(partial))
        stream_ptr = torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0
        # CuPy launches on any ``stream`` with a ``ptr`` (cupy.cuda.ExternalStream, deprecated
        # since CuPy 14, warned at every launch)
        kernel(grid, block, args, stream=_Stream(stream_ptr))
    return partial.sum(0) if partials else None


class _Stream(NamedTuple):
    """torch's current stream as CuPy's launch reads a stream: its handle, ``ptr``."""

    ptr: int


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _raise_or_defer(bad: torch.Tensor, vth: torch.Tensor, x_seq, v0, p: ATMNParameters) -> None:
    """The outcome of the kernels' own value probe (``bad``: [1] int32, set when a probe was
    not finite, see ``atmn.cu``) and of V's extremes, as ``functional.check_values`` reports
    them: at once with one read for both ('eager', and any tensor not on CUDA), folded into the
    device flags without waiting ('deferred'), or not at all ('off')."""
    mode = checks.get_value_checks() if bad.is_cuda else "eager"
    if mode == "off":
        return
    v_lo, v_hi = torch.aminmax(vth.detach())
    if mode == "deferred":
        checks.defer(checks.threshold_is_bad(v_lo, v_hi), bad[0] != 0, bad)
        return
    lo, hi, flag = torch.stack([v_lo.double(), v_hi.double(), bad[0].double()]).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi) and lo > 0):
        raise bad_threshold_error(vth)
    if flag:
        raise nonfinite_error(x_seq, v0, p)


class _CupyKernels:
    """Launches of the CUDA kernels (see ``fused.FusedKernels``)."""

    name = "cupy"
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

    def forward(self, x, v0, vth, p, spikes, v_last, v_seq) -> None:
        if x.numel() == 0:
            return
        launch = _Launch.of(x[0], vth, x.shape[0])
        bad = torch.zeros(1, dtype=torch.int32, device=x.device)
        args = (_ptr(x), _ptr(v0), _ptr(vth), *launch.dynamics(p), _ptr(spikes), _ptr(v_last),
                _ptr(v_seq), _ptr(bad))  # fmt: skip
        launch.run("forward", x, args)
        _raise_or_defer(bad, vth, x, v0, p)

    def backward(self, x, v0, vth, p, g_spikes, g_vlast, g_vseq, g_x, g_v0) -> torch.Tensor:
        if x.numel() == 0:
            if g_v0 is not None:
                g_v0.zero_()
            return torch.zeros_like(vth, dtype=torch.float64)
        launch = _Launch.of(x[0], vth, x.shape[0])
        args = (_ptr(x), _ptr(v0), _ptr(vth), *launch.dynamics(p, backward=True),
                _ptr(g_spikes), _ptr(g_vlast), _ptr(g_vseq), _ptr(g_x), _ptr(g_v0))  # fmt: skip
        g_vth = launch.run("backward", x, args, partials=True)
        return g_vth[0] if vth.dim() == 0 else g_vth


# x's dtype → (the kernels' arithmetic type, their name suffix); 16-bit x computes in float32
_KERNEL_TYPES = {
    torch.float32: (np.float32, "f32"),
    torch.float64: (np.float64, "f64"),
    torch.float16: (np.float32, "f16"),
    torch.bfloat16: (np.float32, "bf16"),
}


class _Launch(NamedTuple):
    """A launch of the kernels over T micro-steps of ``rows × C`` neurons (C = 1 for a shared
    threshold), in the kernels' arithmetic type, indexing in 32 bits when every integer the
    kernels compute fits: the offsets ``t·N + n < T·N``, the forward's running offset after its
    last micro-step (``n + T·N < (T + 1)·N``) and a row index plus the grid stride of the rows
    (``< N + _MAX_ROW_STRIDE``), which overflowed int for N just below 2^31 / T."""

    T: int
    rows: int
    C: int
    real: type
    index: type
    bits: int

    @classmethod
    def of(cls, x_step: torch.Tensor, vth: torch.Tensor, T: int) -> _Launch:
        """For T micro-steps of the neurons of ``x_step``, one micro-step's input (the neuron's
        ``x[0]``, the spike point's activation)."""
        N = x_step.numel()
        C = vth.numel() if vth.dim() == 1 else 1
        small = (T + 1) * N + _MAX_ROW_STRIDE <= INDEX32_LIMIT
        bits = 32 if small else 64
        real = _KERNEL_TYPES[x_step.dtype][0]
        return cls(T, N // C, C, real, np.int32 if small else np.int64, bits)

    def dynamics(self, p: ATMNParameters, *, backward: bool = False) -> tuple:
        """The kernels' arguments after their input pointers: T, rows, C, d = 1/τ and the
        polarity; a backward's also the reset's detach and the surrogate (kind, pa, pb)."""
        args = (*map(self.index, (self.T, self.rows, self.C)), self.real(_decay(p.tau)),
                np.int32(p.ternary))  # fmt: skip
        if not backward:
            return args
        kind, pa, pb = surrogate_code(p)
        return (*args, np.int32(p.detach_reset), np.int32(kind), self.real(pa), self.real(pb))

    def run(self, direction: str, x: torch.Tensor, args: tuple, *, partials: bool = False):
        """Launch ``atmn_{direction}`` for x's dtype (see :func:`_launch`)."""
        name = kernel_name(direction, x.dtype, self.bits)
        return _launch(name, x, self.T, self.rows, self.C, args, partials)


_KERNELS = _CupyKernels()


def atmn_multi_step_cupy(
    x_seq: torch.Tensor, v: torch.Tensor | None, p: ATMNParameters, return_v_seq: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backend entry point (signature of ``functional._atmn_multi_step_torch``)."""
    return fused_multi_step(_KERNELS, x_seq, v, p, return_v_seq)


class _FusedQuantize(torch.autograd.Function):
    """MAR's spike point on CUDA: ``atmn_quantize_{forward,backward}`` of ``_cuda/atmn.cu``."""

    @staticmethod
    def forward(ctx, x, v_threshold, p, T, counts):  # type: ignore[override]
        x = x.contiguous()
        cdtype = compute_dtype(x.dtype)
        vth = cast(v_threshold.detach(), x.device, cdtype).contiguous()
        w = decode_weights(T, p.tau, cdtype, x.device)
        out = torch.empty_like(x)
        # the spike counts (+1, −1) per threshold channel, added to by the kernel
        tally = torch.zeros(*vth.shape, 2, dtype=torch.int64, device=x.device) if counts else None
        if x.numel():
            launch = _Launch.of(x, vth, T)
            bad = torch.zeros(1, dtype=torch.int32, device=x.device)
            args = (_ptr(x), _ptr(vth), _ptr(w), *launch.dynamics(p), _ptr(out), _ptr(bad),
                    _ptr(tally))  # fmt: skip
            launch.run("quantize_forward", x, args)
            # the error names the T micro-steps of the δ-injected input (a view: no copy)
            _raise_or_defer(bad, vth, x.unsqueeze(0).expand(T, *x.shape), None, p)
        ctx.save_for_backward(x, vth, w)
        ctx.p, ctx.T, ctx.vth_home = p, T, grad_home(v_threshold, x)
        if tally is None:
            return out
        ctx.mark_non_differentiable(tally)
        return out, tally

    @staticmethod
    def backward(ctx, g, g_counts=None):  # type: ignore[override]
        refuse_create_graph("cupy")
        x, vth, w = ctx.saved_tensors
        p, T = ctx.p, ctx.T
        g = g.to(x.dtype).contiguous()
        g_x = torch.empty_like(x)
        if x.numel() == 0:
            return g_x, cast(torch.zeros_like(vth), *ctx.vth_home), None, None, None
        launch = _Launch.of(x, vth, T)
        args = (_ptr(x), _ptr(vth), _ptr(w), *launch.dynamics(p, backward=True), _ptr(g),
                _ptr(g_x))  # fmt: skip
        g_vth = launch.run("quantize_backward", x, args, partials=True)
        g_vth = g_vth[0] if vth.dim() == 0 else g_vth
        return g_x, cast(g_vth, *ctx.vth_home), None, None, None


def quantize_unusable_reason(
    activation: torch.Tensor, T: int, p: ATMNParameters, backend: str = "auto"
) -> str | None:
    """Why :func:`atmn_quantize_cupy` may not stand in for ``atmn_quantize(activation, T, p,
    backend=backend)`` (None when it may): the backend must be 'auto' or 'cupy', the activation
    a CUDA floating tensor whose last dimension fits a per-channel V, T ≥ 1, the surrogate one
    the kernels implement, and CuPy usable. Cheap after the first call (no device work)."""
    if backend not in ("auto", "cupy"):
        return f"backend={backend!r} is not the CuPy kernels"
    if not isinstance(activation, torch.Tensor) or not activation.is_cuda:
        return "the activation is not a CUDA tensor"
    if activation.dtype not in _KERNEL_TYPES or activation.dim() < 1:
        return f"the activation's dtype {activation.dtype} or shape is not one the kernels take"
    v = p.v_threshold
    if v.dim() > 1 or (v.dim() == 1 and v.shape[0] != activation.shape[-1]):
        return "the threshold does not fit the activation's last dimension"
    steps = integer(T)
    if steps is None or steps < 1:
        return f"T={T!r} is not a number of micro-steps"
    return unusable_reason(activation, p)


def atmn_quantize_cupy(
    activation: torch.Tensor, T: int, p: ATMNParameters, *, counts: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``atmn_quantize(activation, T, p)[0]`` on CUDA in one kernel forward and one backward,
    without the [T, N] injected input and spike train (the backward recomputes h): the decode,
    and to rounding its gradients to ``activation`` and ``p.v_threshold``, as the reference
    path's. float32, float64, and float16/bfloat16 read and written in 16 bits (float32
    arithmetic, the decode's weights exact in float32).

    For callers that have checked what ``atmn_quantize`` checks (a floating tensor whose last
    dimension matches a per-channel V, T ≥ 1) and that ``fused.unsupported_parameters(p)`` is
    None. The values are checked in the kernel as the reference path checks them (NaN / ±inf
    reaching the final membrane, a threshold not finite and positive), reported following
    :func:`~spikemar.neurons.value_checks` (no wait for the device in 'deferred').

    ``counts=True`` returns ``(decoded, counts)``: the +1 and −1 spikes, int64 of shape
    ``(*p.v_threshold.shape, 2)``, counted by the forward kernel (no spike train, no sync), as
    :func:`~spikemar.neurons.functional.spike_counts` counts those of ``atmn_quantize``.
    Its arguments' types and shapes are checked here too (no wait for the device): a V that
    does not match the last dimension or T < 1 read memory the kernel was not given.
    """
    check_parameters(p)
    check_input(activation, "activation", 1, p)
    T = check_micro_steps(T)
    if not isinstance(counts, bool):
        raise ValueError(f"counts: expected True or False, got {counts!r}")
    try:
        return _FusedQuantize.apply(activation, p.v_threshold, p, T, counts)
    except ValueError as err:  # about the δ-injected sequence: name the argument, as the reference
        raise for_argument(err, "activation") from None
