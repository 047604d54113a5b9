"""The fused CPU backend of ATMN: one pass over memory forward, one (with recomputation) backward.

Why a C kernel: PyTorch's eager loop of the equations launches ~6 element-wise ops per micro-step,
each a full pass over N values, and autograd keeps every intermediate for the backward; that is
~15× the traffic of reading x and writing s once. The kernel in ``_cpu/atmn_impl.h`` streams x
→ s with each group of neurons' membrane in SIMD registers across the micro-steps, and its
backward recomputes h from x and the initial membrane instead of storing it.

Why plain C through ctypes, built on first use: it needs no torch headers (it compiles in about a
second instead of the ~40 s of a torch C++ extension), no build step in ``pip install`` (the
package stays pure Python and installs with the README's one command), and nothing is compiled at
import. Threads: the team of torch's own libgomp when the process has it loaded (found at run
time, not linked: a second OpenMP runtime beside torch's would spin against it, and so do
threads of our own, see ``_cpu/atmn.c``), pthreads otherwise. The shared library is cached per
source, flags and CPU under ``$SPIKEMAR_CACHE_DIR`` (default ``~/.cache/spikemar``), written to a
temporary name and renamed, so concurrent first uses are safe.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from .._io import atomic_write
from . import fused
from .functional import ATMNParameters, _decay, bad_threshold_error, nonfinite_error
from .fused import fused_multi_step, refuse_create_graph, surrogate_code

__all__ = [
    "atmn_multi_step_cpu",
    "atmn_quantize_decode_cpu",
    "atmn_quantize_train_cpu",
    "build_kernels_from",
    "build_library",
    "load_library",
    "unusable_reason",
    "usable",
]

_SOURCE_DIR = Path(__file__).parent / "_cpu"
# atmn.c and what it includes (all key the build cache): the neuron-agnostic scaffolding
# (parallel.h, per_type.h with per_type_one.h, simd.h, multistep.h) and ATMN's micro-step,
# backward and spike point (atmn_impl.h)
_SOURCES = ("atmn.c", "parallel.h", "per_type.h", "per_type_one.h", "simd.h", "multistep.h",
            "atmn_impl.h")  # fmt: skip
# the scaffolding that a kernel file of another package (spikemar/ssm/_cpu) includes by name
_SHARED_HEADERS = ("parallel.h", "per_type.h", "per_type_one.h", "simd.h")
# -fno-trapping-math lets GCC turn the float compares into vector selects (we never enable
# floating-point traps); without it none of the hot loops vectorise.
_FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-shared", "-fPIC", "-pthread", "-std=c11"]
# Elements per block (the unit that threads split): for T > 4 the backward keeps a block's T·B
# recomputed h in cache (at most 2^15 values, 128 KiB in float32: L2), and larger blocks mean
# fewer jumps between the streams of x, grad_s and grad_x, each of which costs the hardware
# prefetcher a restart.
_BLOCK_VALUES = 1 << 15
_MIN_BLOCK, _MAX_BLOCK = 1024, 8192
_MIN_ELEMENTS_PER_THREAD = 1 << 15


def _compiler() -> str | None:
    return (
        os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    )


def _cache_dir() -> Path:
    return Path(os.environ.get("SPIKEMAR_CACHE_DIR", Path.home() / ".cache" / "spikemar"))


def _cpu_identity() -> str:
    # -march=native code must not be reused on another CPU that shares the cache directory
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next((ln for ln in text.splitlines() if ln.startswith("flags")), text[:4096])
    except OSError:
        return platform.processor()


class KernelLibrary:
    """A C library built and loaded on first use, once per process, for every package's CPU
    kernels (this backend's ATMN library, ``spikemar.ssm``'s mixer and projection kernels).
    ``build`` compiles, loads and binds it, raising RuntimeError with the reason; a failure is
    remembered, so a machine without a compiler pays for one attempt, not one per call.
    ``lib`` is the loaded library, None before the first :meth:`load`."""

    def __init__(self, build: Callable[[], ctypes.CDLL]) -> None:
        self._build = build
        self._lock = threading.Lock()
        self._error: str | None = None
        self.lib: ctypes.CDLL | None = None

    def load(self) -> ctypes.CDLL:
        """The library (built on the first call); RuntimeError with the reason if impossible."""
        if self.lib is not None:
            return self.lib
        with self._lock:
            if self.lib is None:
                if self._error is not None:
                    raise RuntimeError(self._error)
                try:
                    self.lib = self._build()
                except RuntimeError as err:
                    self._error = str(err)
                    raise
            return self.lib

    def usable(self) -> bool:
        """Whether the library is built and loaded (building it on the first call)."""
        if self.lib is not None:
            return True
        if self._error is not None:
            return False
        try:
            self.load()
        except RuntimeError:
            return False
        return True


def _build_and_bind() -> ctypes.CDLL:
    try:
        return _bind(ctypes.CDLL(str(_build())))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"the fused CPU kernel could not be built or loaded: {err}") from err


_LIBRARY = KernelLibrary(_build_and_bind)


def load_library() -> ctypes.CDLL:
    """Build (once per machine) and load the kernel library; raise RuntimeError if impossible."""
    return _LIBRARY.load()


def build_library(source: Path, depends: tuple[Path, ...] = ()) -> ctypes.CDLL:
    """Compile the C file ``source`` (with the headers ``depends`` it includes, which key the
    cache too) with this backend's compiler, flags and cache, and load it: the scaffolding that
    other packages' CPU kernels (``spikemar.ssm``) share. ``source`` may include this backend's
    scaffolding by name (``parallel.h``: torch's thread team and ranges; ``simd.h``: vectors;
    ``per_type.h``: one instantiation per element type), which keys the cache too. Raises
    RuntimeError when no library can be built or loaded; the caller binds its own functions'
    argument types."""
    shared = tuple(_SOURCE_DIR / name for name in _SHARED_HEADERS)
    try:
        return ctypes.CDLL(str(_build(Path(source), (*(Path(d) for d in depends), *shared))))
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"{Path(source).name} could not be built or loaded: {err}") from err


def build_kernels_from(source_dir: Path | str) -> ctypes.CDLL:
    """Build and bind the kernel library from the ``atmn.c`` and headers in ``source_dir`` (the
    ``_cpu`` folder of this or another checkout): how a before/after benchmark loads two builds
    side by side in one process (``benchmarks/bench_neuron.py --compare-kernels``). The entry
    points are declared from this version's table; call only those whose arguments match."""
    d = Path(source_dir)
    if not (d / "atmn.c").is_file():
        raise FileNotFoundError(f"source_dir: no atmn.c in {d}")
    # this version's headers in their usual order (the same cache entry as load_library's),
    # then any others the folder holds
    known = [d / name for name in _SOURCES if name != "atmn.c" and (d / name).is_file()]
    others = sorted(set(d.glob("*.h")) - set(known))
    return _bind(build_library(d / "atmn.c", (*known, *others)))


def _build(main: Path | None = None, depends: tuple[Path, ...] | None = None) -> Path:
    main = _SOURCE_DIR / "atmn.c" if main is None else main
    if depends is None:
        depends = tuple(_SOURCE_DIR / name for name in _SOURCES if name != "atmn.c")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    digest = hashlib.sha256()
    for path in (main, *depends):
        digest.update(path.read_bytes())
    digest.update(" ".join([cc, *_FLAGS, platform.machine(), _cpu_identity()]).encode())
    target = _cache_dir() / f"{main.stem}_cpu_{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    # the first build takes seconds (tens on a busy machine) of silence otherwise
    print(f"spikemar: compiling {main.name} for this CPU (once; cached in {target.parent})",
          file=sys.stderr, flush=True)  # fmt: skip
    with atomic_write(target, fsync=False, executable=True) as tmp:
        # quoted includes: beside the including header, then beside main, then the scaffolding
        quote = ["-iquote", str(main.parent), "-iquote", str(_SOURCE_DIR)]
        cmd = [cc, *_FLAGS, *quote, "-o", str(tmp), str(main), "-lm", "-ldl"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return target


# The C entry points, one row each: (name, with {s} for the type suffix), restype, argtypes in
# order. 'R' is the element type (float for f32, double for f64), 'p' a pointer, 'i64' int64_t,
# 'i32' int, 'f64' double. _bind turns the rows into ctypes declarations.
_ENTRY_POINTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("atmn_threading", "i32", ("i32",)),  # mode -> the threading in effect
    # x, v0, vth, T, N, C, B, decay, ternary, spikes, v_last, v_seq, nthreads
    ("atmn_forward_{s}", "i64",
     ("p", "p", "p", "i64", "i64", "i64", "i64", "R", "i32", "p", "p", "p", "i32")),
    # x, v0, vth, T, N, C, B, decay, ternary, detach_reset, kind, pa, pb,
    # g_spikes, g_vlast, g_vseq, g_x, g_v0, g_vth_partial, nthreads
    ("atmn_backward_{s}", "i32",
     ("p", "p", "p", "i64", "i64", "i64", "i64", "R", "i32", "i32", "i32", "R", "R",
      "p", "p", "p", "p", "p", "p", "i32")),
    # x, vth, N, C, T, tau, decay, ternary, decoded, counts, nthreads
    ("atmn_quantize_forward_{s}", "i64",
     ("p", "p", "i64", "i64", "i64", "f64", "R", "i32", "p", "p", "i32")),
    # x, vth, N, C, T, tau, decay, ternary, detach_reset, kind, pa, pb, g, g_x, partial, nthreads
    ("atmn_quantize_backward_{s}", "i32",
     ("p", "p", "i64", "i64", "i64", "f64", "R", "i32", "i32", "i32", "R", "R",
      "p", "p", "p", "i32")),
)  # fmt: skip
_ELEMENT_TYPES = {"f32": ctypes.c_float, "f64": ctypes.c_double}


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare every entry point of ``_ENTRY_POINTS`` on ``lib``, once per element type."""
    for name, restype, argtypes in _ENTRY_POINTS:
        for suffix, real in _ELEMENT_TYPES.items() if "{s}" in name else [("", None)]:
            types = {"p": ctypes.c_void_p, "i64": ctypes.c_int64, "i32": ctypes.c_int,
                     "f64": ctypes.c_double, "R": real}  # fmt: skip
            fn = getattr(lib, name.format(s=suffix))
            fn.argtypes = [types[t] for t in argtypes]
            fn.restype = types[restype]
    return lib


def usable() -> bool:
    """Whether the kernel library is built and loaded (building it on the first call)."""
    return _LIBRARY.usable()


def unusable_reason(x: torch.Tensor, p: ATMNParameters) -> str | None:
    """Why the fused CPU kernel cannot run ``x`` with ``p`` (None when it can)."""
    return fused.unusable_reason(x, p, "cpu", load_library)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _geometry(x: torch.Tensor, vth: torch.Tensor) -> tuple[int, int, int, int, int]:
    T, N = x.shape[0], x[0].numel()
    C = vth.numel() if vth.dim() == 1 else 0
    block = max(_MIN_BLOCK, min(_MAX_BLOCK, _BLOCK_VALUES // T))
    B = block if C == 0 else C * max(1, block // C)
    return T, N, C, B, _threads(T * N)


def _threads(values: int) -> int:
    """Threads for a kernel over ``values`` element-steps: torch's count, fewer where there is
    too little work to share (under 2^15 values a thread costs more than it saves)."""
    return max(1, min(torch.get_num_threads(), values // _MIN_ELEMENTS_PER_THREAD))


class _CpuKernels:
    """Launches of the C kernels (see ``fused.FusedKernels``)."""

    name = "cpu"
    dtypes = (torch.float32, torch.float64)

    def forward(self, x, v0, vth, p, spikes, v_last, v_seq) -> None:
        lib = load_library()
        T, N, C, B, nthreads = _geometry(x, vth)
        fwd = lib.atmn_forward_f32 if x.dtype == torch.float32 else lib.atmn_forward_f64
        bad = fwd(_ptr(x), _ptr(v0), _ptr(vth), T, N, C, B, _decay(p.tau), int(p.ternary),
                  _ptr(spikes), _ptr(v_last), _ptr(v_seq), nthreads)  # fmt: skip
        # the checks of functional.check_values, done by the kernel on data in cache
        if bad == -1:
            raise bad_threshold_error(vth)
        if bad:
            raise nonfinite_error(x, v0, p)

    def backward(self, x, v0, vth, p, g_spikes, g_vlast, g_vseq, g_x, g_v0) -> torch.Tensor:
        lib = load_library()
        T, N, C, B, nthreads = _geometry(x, vth)
        kind, pa, pb = surrogate_code(p)
        partial = torch.zeros(nthreads, B, dtype=torch.float64)  # per thread, per block slot
        bwd = lib.atmn_backward_f32 if x.dtype == torch.float32 else lib.atmn_backward_f64
        bwd(_ptr(x), _ptr(v0), _ptr(vth), T, N, C, B, _decay(p.tau), int(p.ternary),
            int(p.detach_reset), kind, pa, pb, _ptr(g_spikes), _ptr(g_vlast),
            _ptr(g_vseq), _ptr(g_x), _ptr(g_v0), _ptr(partial), nthreads)  # fmt: skip
        per_slot = partial.sum(0)
        return per_slot.sum() if C == 0 else per_slot.view(-1, C).sum(0)


_KERNELS = _CpuKernels()


def atmn_multi_step_cpu(
    x_seq: torch.Tensor, v: torch.Tensor | None, p: ATMNParameters, return_v_seq: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backend entry point (signature of ``functional._atmn_multi_step_torch``)."""
    return fused_multi_step(_KERNELS, x_seq, v, p, return_v_seq)


# the kernel's limit on T (a weight table on its stack)
QUANTIZE_MAX_T = 64


def atmn_quantize_decode_cpu(
    activation: torch.Tensor, T: int, p: ATMNParameters, *, counts: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``atmn_quantize(activation, T, p)[0]`` for inference, in one C call: the decode
    ``V·Σ_t τ^t s_t`` of the δ-injected spike train, without the spikes and without autograd
    (the result never requires grad).

    ``counts=True`` returns ``(decoded, counts)``: the spike train's +1 and −1 spikes, int64 of
    shape ``(*p.v_threshold.shape, 2)`` (per channel, or one pair for a shared threshold), as
    :func:`~spikemar.neurons.functional.spike_counts` counts the spikes of ``atmn_quantize``,
    counted in the same pass.

    For callers that have checked the input's type and shape (a float32/float64 CPU tensor whose
    last dimension matches a per-channel V) and ``1 <= T <= QUANTIZE_MAX_T``. The values are
    checked in C as :func:`~spikemar.neurons.functional.check_values` checks them: a threshold
    that is not finite and positive, or NaN / ±inf in the input, raises ValueError.
    """
    lib = _LIBRARY.load()
    x = activation.contiguous()
    vth = p.v_threshold.to(x.dtype).contiguous()
    C = vth.numel() if vth.dim() == 1 else 0
    # the kernel writes float32/float64 through raw pointers (a float16 buffer would be
    # overrun: heap corruption), so these tests stay even for callers that checked
    if x.dtype not in _CpuKernels.dtypes or not x.is_cpu:
        raise TypeError(
            f"activation: expected a float32 or float64 CPU tensor, got {x.dtype} on {x.device}"
        )
    if C and (x.dim() == 0 or x.shape[-1] != C):
        raise ValueError(
            f"activation: last dimension of shape {tuple(x.shape)} does not match the {C} "
            "per-channel thresholds"
        )
    decoded = torch.empty_like(x, requires_grad=False)
    fn = (
        lib.atmn_quantize_forward_f32 if x.dtype == torch.float32 else lib.atmn_quantize_forward_f64
    )
    # the per-token activations of generation stay on one thread (see _threads)
    nthreads = _threads(x.numel() * T)
    # one [2, C] slab per thread that may run (the kernel uses at most nthreads): +1, −1 rows
    # (one thread: the [2, C] slab alone, so that no index or reshape follows per call)
    slab = (nthreads, 2, max(C, 1)) if nthreads > 1 else (2, max(C, 1))
    tally = torch.zeros(slab, dtype=torch.int64) if counts else None
    bad = fn(x.data_ptr(), vth.data_ptr(), x.numel(), C, T, p.tau, _decay(p.tau), int(p.ternary),
             decoded.data_ptr(), _ptr(tally), nthreads)  # fmt: skip
    _raise_if_bad(bad, vth, x.numel(), T, "activation")
    if tally is None:
        return decoded
    if nthreads > 1:
        tally = tally.sum(0)
    return decoded, tally.t() if C else tally.view(2)  # [C, 2] or [2]: a view


class _FusedQuantize(torch.autograd.Function):
    """MAR's spike point for training in two C calls: δ-inject, spike, decode forward (without the
    [T, N] injected input or spikes), and its backward by recomputation (``_cpu/atmn_impl.h``).
    With ``counts`` the forward also returns the spike counts (not differentiable)."""

    @staticmethod
    def forward(ctx, x, v_threshold, p, T, counts):  # type: ignore[override]
        x = x.contiguous()
        out = atmn_quantize_decode_cpu(x, T, p, counts=counts)
        ctx.save_for_backward(x, v_threshold.detach().to(x.dtype).contiguous())
        ctx.p, ctx.T = p, T
        if counts:
            ctx.mark_non_differentiable(out[1])
        return out

    @staticmethod
    def backward(ctx, g, g_counts=None):  # type: ignore[override]
        refuse_create_graph("cpu")
        lib = load_library()
        x, vth = ctx.saved_tensors
        p, T = ctx.p, ctx.T
        g = g.to(x.dtype).contiguous()
        C = vth.numel() if vth.dim() == 1 else 0
        kind, pa, pb = surrogate_code(p)
        nthreads = _threads(x.numel() * T)
        partial = torch.zeros(nthreads, max(C, 1), dtype=torch.float64)
        g_x = torch.empty_like(x)
        fn = (
            lib.atmn_quantize_backward_f32
            if x.dtype == torch.float32
            else lib.atmn_quantize_backward_f64
        )
        fn(x.data_ptr(), vth.data_ptr(), x.numel(), C, T, p.tau, _decay(p.tau), int(p.ternary),
           int(p.detach_reset), kind, pa, pb, g.data_ptr(), g_x.data_ptr(), partial.data_ptr(),
           nthreads)  # fmt: skip
        g_vth = partial.sum(0)
        g_vth = g_vth[0] if C == 0 else g_vth
        return g_x, g_vth.to(ctx.p.v_threshold.dtype), None, None, None


def atmn_quantize_train_cpu(
    activation: torch.Tensor, T: int, p: ATMNParameters, *, counts: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``atmn_quantize(activation, T, p)[0]`` with gradients to ``activation`` and
    ``p.v_threshold``, in two C calls: the same decode and, to rounding, the same gradients as the
    reference path, without materialising the [T, N] injected input and spikes.
    ``counts=True`` returns ``(decoded, counts)`` as :func:`atmn_quantize_decode_cpu` does.

    For callers that have checked what :func:`atmn_quantize_decode_cpu` requires and that
    ``fused.unsupported_parameters(p)`` is None. The values are checked in C (a threshold that
    is not finite and positive, or NaN / ±inf in the input, raises ValueError).
    """
    return _FusedQuantize.apply(activation, p.v_threshold, p, T, bool(counts))


def _raise_if_bad(bad: int, vth: torch.Tensor, n: int, T: int, what: str) -> None:
    """The errors of the quantize kernels' return code (see ``_cpu/atmn_impl.h``)."""
    if bad == 0:
        return
    if bad == -1:
        raise bad_threshold_error(vth)
    if bad < 0:
        raise ValueError(f"T: expected 1 <= T <= {QUANTIZE_MAX_T} micro-steps, got {T!r}")
    raise ValueError(
        f"{what}: expected finite values at a spike point, but {bad} of its {n} values are NaN "
        "or inf"
    )
