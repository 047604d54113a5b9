"""Run spikemar's CUDA kernels on the CPU, for tests on machines without a GPU.

:class:`EmulatedCupy` stands in for the ``cupy`` module (``RawModule``, ``cuda.Device``,
``cuda.ExternalStream``, ``cuda.is_available``; a kernel's ``stream=`` argument), so the real
host code of :mod:`spikemar.neurons.cupy_backend` and :mod:`spikemar.neurons.fused` runs
unchanged on CPU tensors: ``RawModule(code=...)`` builds the CUDA source with the host C++
compiler and the shim below, and a kernel launch runs every GPU thread of a block as a POSIX
thread (blocks one after another), with ``__syncthreads`` a barrier of the block,
``__shared__`` memory shared by the block's threads, and ``threadIdx``/``blockIdx``
thread-local. Kernels read and write the CPU tensors' memory through the same raw pointers they
would get on a GPU.

What it checks: indexing, launch geometry, chunking, reductions and the arithmetic (the
round-to-nearest intrinsics are functions the host compiler cannot contract; the source's
float32 add_rn/ge/... take them where the device build has inline PTX). What it does not:
timing, coalescing, warp-synchronous code (no shuffles are emulated), PTX, CuPy's -ftz=true
(the host keeps subnormals, as the forwards' PTX does). ``contract=True``
builds with ``-ffp-contract=fast`` (and ``-mfma`` on x86-64), so that any ``a + b*c`` the source
leaves to the compiler is fused as nvcc's default ``--fmad=true`` fuses it; ``False`` rounds
every operation.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

__all__ = ["EmulatedCupy", "emulation_unavailable_reason"]

_SHIM = r"""
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <stdexcept>

#define SPIKEMAR_CUDA_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

struct dim3 { unsigned x, y, z; };
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static pthread_barrier_t emu_block_barrier;

static inline void __syncthreads() { pthread_barrier_wait(&emu_block_barrier); }
static inline int atomicOr(int *address, int value) {
  return __atomic_fetch_or(address, value, __ATOMIC_RELAXED);
}
static inline unsigned long long atomicAdd(unsigned long long *address, unsigned long long value) {
  return __atomic_fetch_add(address, value, __ATOMIC_RELAXED);
}

// never inlined: the host compiler cannot fuse them into an FMA, as nvcc cannot fuse __f*_rn
#define EMU_RN __attribute__((noinline))
EMU_RN float __fadd_rn(float a, float b) { return a + b; }
EMU_RN float __fsub_rn(float a, float b) { return a - b; }
EMU_RN float __fmul_rn(float a, float b) { return a * b; }
EMU_RN double __dadd_rn(double a, double b) { return a + b; }
EMU_RN double __dsub_rn(double a, double b) { return a - b; }
EMU_RN double __dmul_rn(double a, double b) { return a * b; }

static inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
static inline float half_to_float(unsigned short bits) {
  _Float16 h; memcpy(&h, &bits, 2); return (float)h;
}
static inline unsigned short float_to_half(float v) {  // round to nearest even, as cvt.rn
  _Float16 h = (_Float16)v; unsigned short bits; memcpy(&bits, &h, 2); return bits;
}

struct emu_job { void (*thunk)(void *); void *args; dim3 block_idx, thread_idx; };
static void *emu_thread(void *p) {
  emu_job *job = (emu_job *)p;
  blockIdx = job->block_idx;
  threadIdx = job->thread_idx;
  job->thunk(job->args);
  return NULL;
}

// every block in turn, each with one thread per GPU thread
static int emu_launch(void (*thunk)(void *), void *args, unsigned gx, unsigned gy, unsigned bx,
                      unsigned by) {
  const unsigned n = bx * by;
  if (n == 0 || n > 1024) return -1;
  gridDim = dim3{gx, gy, 1};
  blockDim = dim3{bx, by, 1};
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 1 << 18);
  pthread_t threads[1024];
  emu_job jobs[1024];
  for (unsigned y = 0; y < gy; ++y)
    for (unsigned x = 0; x < gx; ++x) {
      pthread_barrier_init(&emu_block_barrier, NULL, n);
      for (unsigned k = 0; k < n; ++k) {
        jobs[k] = emu_job{thunk, args, dim3{x, y, 0}, dim3{k % bx, k / bx, 0}};
        if (pthread_create(&threads[k], &attr, emu_thread, &jobs[k]) != 0) return -2;
      }
      for (unsigned k = 0; k < n; ++k) pthread_join(threads[k], NULL);
      pthread_barrier_destroy(&emu_block_barrier);
    }
  pthread_attr_destroy(&attr);
  return 0;
}
"""

_KERNEL = re.compile(r'extern\s+"C"\s+void\s+(\w+)\s*\(([^)]*)\)')
_CTYPES = {
    "ptr_t": ctypes.c_uint64,
    "int": ctypes.c_int32,
    "long long": ctypes.c_int64,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
}


def _compiler() -> str | None:
    return shutil.which("g++") or shutil.which("clang++")


def _flags(contract: bool) -> list[str]:
    """The host compiler's flags for a kernel build. -O2: GCC forms FMAs (under
    -ffp-contract=fast) only from -O2 on; -mfma where the instruction set makes FMA optional
    (x86-64: without it nothing is fused; other targets, e.g. AArch64, have it and refuse the
    flag)."""
    flags = ["-O2", "-std=c++17", "-shared", "-fPIC", "-pthread"]
    if not contract:
        return [*flags, "-ffp-contract=off"]
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return [*flags, "-ffp-contract=fast", *(["-mfma"] if x86 else [])]


@functools.cache
def emulation_unavailable_reason() -> str | None:
    """Why kernels cannot be emulated here, or None: the shim must build with a C++ compiler
    that has ``_Float16`` (the float16 conversions) and POSIX barriers (``__syncthreads``;
    macOS has none), with the flags of both builds. Probed once per process."""
    cxx = _compiler()
    if cxx is None:
        return "no C++ compiler (g++ or clang++) found"
    probe = _SHIM + "int main() { _Float16 h = (_Float16)1.5f; return (float)h != 1.5f; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text(probe)
        for contract in (False, True):
            flags = [f for f in _flags(contract) if f not in ("-shared", "-fPIC")]
            done = subprocess.run(
                [cxx, *flags, str(src), "-o", str(Path(tmp) / "probe")],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                return (
                    f"{cxx} cannot build the CUDA shim (_Float16, POSIX barriers; "
                    f"{' '.join(flags)}): {done.stderr.strip()[-300:]}"
                )
    return None


def _signatures(preprocessed: str) -> list[tuple[str, list[tuple[str, str]]]]:
    kernels = []
    for name, params in _KERNEL.findall(preprocessed):
        args = []
        for param in (p.strip() for p in params.split(",")):
            ctype, _, arg = param.rpartition(" ")
            args.append((" ".join(ctype.split()), arg))
        kernels.append((name, args))
    return kernels


def _launchers(kernels: list[tuple[str, list[tuple[str, str]]]]) -> str:
    """A struct, a thunk and an ``extern "C"`` launcher per kernel, for ctypes to call."""
    out = []
    for name, args in kernels:
        fields = "".join(f"{t} {a}; " for t, a in args)
        params = ", ".join(f"{t} {a}" for t, a in args)
        names = ", ".join(a for _, a in args)
        unpack = ", ".join(f"k->{a}" for _, a in args)
        out.append(
            f"struct emu_args_{name} {{ {fields}}};\n"
            f"static void emu_thunk_{name}(void *p) {{ emu_args_{name} *k = "
            f"(emu_args_{name} *)p; {name}({unpack}); }}\n"
            f'extern "C" int emu_launch_{name}(unsigned emu_gx, unsigned emu_gy, '
            f"unsigned emu_bx, unsigned emu_by, {params}) {{ emu_args_{name} k = {{ {names} }}; "
            f"return emu_launch(emu_thunk_{name}, &k, emu_gx, emu_gy, emu_bx, emu_by); }}\n"
        )
    return "\n".join(out)


class _Kernel:
    def __init__(self, lib: ctypes.CDLL, name: str, args: list[tuple[str, str]]) -> None:
        self.name = name
        self._fn = getattr(lib, f"emu_launch_{name}")
        self._types = [_CTYPES[t] for t, _ in args]
        self._fn.argtypes = [ctypes.c_uint] * 4 + self._types
        self._fn.restype = ctypes.c_int
        self.launches: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        self.streams: list[int | None] = []  # the stream handle of each launch (None: CuPy's)

    def __call__(self, grid, block, args, shared_mem: int = 0, stream=None) -> None:
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        if grid[2] != 1 or block[2] != 1:
            raise ValueError("the emulation runs 2-d grids and blocks only")
        if len(args) != len(self._types):
            raise TypeError(f"{self.name}: {len(self._types)} arguments expected, got {len(args)}")
        for value, ctype in zip(args, self._types, strict=True):
            if not isinstance(value, np.generic):
                raise TypeError(f"{self.name}: pass numpy scalars as CuPy needs, got {value!r}")
            if np.dtype(value.dtype).itemsize != ctypes.sizeof(ctype):
                raise TypeError(f"{self.name}: {value.dtype} passed where {ctype} is expected")
        self.launches.append((grid, block))
        self.streams.append(None if stream is None else int(stream.ptr))
        code = self._fn(grid[0], grid[1], block[0], block[1], *(v.item() for v in args))
        if code != 0:
            raise RuntimeError(f"{self.name}: emulated launch failed ({code})")


class _RawModule:
    def __init__(self, owner: EmulatedCupy, code: str, options: tuple[str, ...] = ()) -> None:
        self._owner = owner
        self._lib, self._kernels = owner._build(code, tuple(options))
        self._functions: dict[str, _Kernel] = {}

    def get_function(self, name: str) -> _Kernel:
        if name not in self._kernels:
            raise KeyError(f"no kernel {name!r} in the module")
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = _Kernel(self._lib, name, self._kernels[name])
            self._owner.functions.append(fn)
        return fn


class _Device:
    def __init__(self, owner: EmulatedCupy, index: int | None = None) -> None:
        self.id = 0 if index is None else int(index)
        self.attributes = {"MultiProcessorCount": owner.multiprocessors}

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc) -> None:
        return None


class _Stream:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc) -> None:
        return None


class EmulatedCupy:
    """A stand-in for the ``cupy`` module (put it in ``sys.modules['cupy']``).

    ``multiprocessors`` is what ``Device().attributes['MultiProcessorCount']`` reports (small, so
    that grids are small and grid-stride loops run); ``contract`` see the module docstring;
    ``build_dir`` caches the host builds. ``builds`` lists the options of every build and
    ``functions`` every kernel handed out (each records its launches).
    """

    def __init__(self, build_dir: Path, *, contract: bool = False, multiprocessors: int = 2):
        self.build_dir = Path(build_dir)
        self.contract = contract
        self.multiprocessors = multiprocessors
        self.builds: list[tuple[str, ...]] = []
        self.functions: list[_Kernel] = []
        owner = self

        class cuda:
            @staticmethod
            def is_available() -> bool:
                return True

            @staticmethod
            def Device(index: int | None = None) -> _Device:
                return _Device(owner, index)

            ExternalStream = _Stream

        self.cuda = cuda

    def RawModule(self, code: str, options: tuple[str, ...] = (), **kwargs) -> _RawModule:
        return _RawModule(self, code, tuple(options))

    def _build(self, code: str, options: tuple[str, ...]):
        cxx = _compiler()
        if cxx is None:
            raise RuntimeError("no C++ compiler for the CUDA emulation")
        defines = [o for o in options if o.startswith("-D")]
        flags = [*_flags(self.contract), *defines]
        self.builds.append(tuple(options))
        key = hashlib.sha256("\0".join([code, _SHIM, cxx, *flags]).encode()).hexdigest()[:16]
        self.build_dir.mkdir(parents=True, exist_ok=True)
        src = self.build_dir / f"kernels_{key}.cpp"
        lib_path = self.build_dir / f"kernels_{key}.so"
        body = _SHIM + '\n#line 1 "kernel.cu"\n' + code + "\n"
        pre = subprocess.run(
            [cxx, "-E", "-P", "-x", "c++", "-std=c++17", *defines, "-"],
            input=body, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if pre.returncode != 0:
            raise RuntimeError(f"preprocessing the kernels failed:\n{pre.stderr[-2000:]}")
        kernels = _signatures(pre.stdout)
        if not lib_path.exists():  # built under a private name, then renamed: runs may share
            tag = f"{os.getpid()}_{threading.get_ident()}"
            src = src.with_name(f"{src.stem}_{tag}.cpp")
            tmp = lib_path.with_name(f"{lib_path.stem}_{tag}.so")
            src.write_text(body + _launchers(kernels))
            done = subprocess.run(
                [cxx, *flags, "-o", str(tmp), str(src)], capture_output=True, text=True
            )
            src.unlink()
            if done.returncode != 0:
                raise RuntimeError(f"building the kernels failed:\n{done.stderr[-3000:]}")
            os.replace(tmp, lib_path)
        return ctypes.CDLL(str(lib_path)), dict(kernels)
