"""The CUDA kernels checked without a GPU (DESIGN.md §3, "GPU kernels without a GPU").

1. Emulation: the real host code (``cupy_backend.py``, ``fused.py``, ``functional.py``) runs the
   real ``_cuda/atmn.cu`` with only CuPy replaced by ``spikemar.neurons.cuda_emulation`` (each
   GPU thread a POSIX thread, ``__syncthreads`` a barrier), on CPU tensors, against the PyTorch
   reference on random cases: spikes and membranes exact, gradients to 1e-5 (float32), with the
   host compiler contracting ``a + b*c`` into FMAs (as nvcc does by default) and without.
2. Compilation: NVRTC from the registry's ``nvidia-cuda-nvrtc-cu12`` wheel compiles the source
   for sm_80 and sm_90, and the forward's PTX holds no FMA (a contracted ``h = x + d·u`` flips
   spikes: issue 18). Skipped, saying so, where the wheel is not installed; ``$SPIKEMAR_NVRTC``
   may point at another ``libnvrtc.so``.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from spikemar.neurons import (
    ATan,
    ATMNParameters,
    Rectangle,
    Sigmoid,
    Triangle,
    atmn_multi_step,
    atmn_quantize,
    backends,
    cpu_backend,
    cupy_backend,
    spike_counts,
)
from spikemar.neurons.cuda_emulation import EmulatedCupy, emulation_unavailable_reason

_NO_EMULATION = emulation_unavailable_reason()
emulated = pytest.mark.skipif(_NO_EMULATION is not None, reason=f"emulation: {_NO_EMULATION}")


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory) -> Path:
    # one folder for the session: builds are keyed by source and flags, so files share them
    return tmp_path_factory.getbasetemp() / "cuda_emulation"


@pytest.fixture(params=[False, True], ids=["rounded", "contracted"])
def emulated_cupy(request, build_dir, monkeypatch) -> Iterator[EmulatedCupy]:
    """CuPy replaced by the emulation, and the kernels registered as backend 'cupy-emulated'
    (the 'cupy' record with its CUDA-device check lifted: everything else is the real path)."""
    fake = EmulatedCupy(build_dir, contract=request.param)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    # compiled modules are cached per device; a fresh cache so that this fake builds its own
    monkeypatch.setattr(cupy_backend, "_modules", {})
    monkeypatch.setattr(cupy_backend, "_functions", {})
    record = backends.get_backend("cupy")
    backends.register_backend(
        "cupy-emulated",
        record.impl,
        native_dtypes=record.native_dtypes,
        checks_values=record.checks_values,
    )
    yield fake
    backends.unregister_backend("cupy-emulated")


def _run(backend, x, v0, V, p_kwargs, weights):
    p = ATMNParameters(V, **p_kwargs)
    out = atmn_multi_step(x, v0, p, backend=backend, return_v_seq=True, validate=False)
    loss = sum((o.double() * w).sum() for o, w in zip(out, weights, strict=True))
    inputs = [t for t in (x, v0, V) if t is not None]
    return out, torch.autograd.grad(loss, inputs)


def _random_case(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=g))]

    tau = pick([1.0, 1.5, 2.0, 3.0, 10.0, 0.7, math.inf])
    return {
        # T <= 8: one build (MAX_T = 8) per rounding mode; longer trains in their own test
        "T": pick([1, 2, 3, 4, 5, 7, 8]),
        "shape": pick([(1,), (3,), (257,), (13, 37), (4, 3, 5), (2, 64), (40, 1), (9, 33)]),
        "tau": tau,
        "surrogate": pick([Rectangle(), Rectangle(3.0), Triangle(0.7), Sigmoid(), ATan()]),
        "ternary": pick([True, False]),
        "detach_reset": pick([False, True]),
        "per_channel": pick([False, True]),
        "with_v0": pick([False, True]),
        "dtype": pick([torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16]),
        "seed": seed,
    }


def _assert_equals_reference(backend: str, case: dict) -> None:
    g = torch.Generator().manual_seed(case["seed"])
    T, shape, dtype = case["T"], case["shape"], case["dtype"]
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(T, *shape, generator=g) * 1.5).to(dtype).requires_grad_()
    v0 = torch.randn(*shape, generator=g, dtype=cdtype) if case["with_v0"] else None
    v0 = None if v0 is None else v0.requires_grad_()
    C = shape[-1]
    V = torch.rand(C, generator=g) + 0.2 if case["per_channel"] else torch.tensor(0.6)
    V = V.to(cdtype).requires_grad_()
    weights = [torch.randn(T, *shape, generator=g, dtype=torch.float64) for _ in range(3)]
    weights[1] = weights[1][0]
    kw = {k: case[k] for k in ("tau", "surrogate", "ternary", "detach_reset")}
    ref_out, ref_grads = _run("torch", x, v0, V, kw, weights)
    out, grads = _run(backend, x, v0, V, kw, weights)
    assert torch.equal(ref_out[0], out[0]), f"spikes differ: {case}"
    for a, b in zip(ref_out[1:], out[1:], strict=True):  # membranes: exact
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=str(case))
    half = dtype in (torch.float16, torch.bfloat16)
    n = T * math.prod(shape) // V.numel()
    for a, b in zip(ref_grads, grads, strict=True):
        tol = 1e-2 if half else 1e-9 if dtype == torch.float64 else 1e-5
        if a.shape == V.shape:  # dL/dV: a sum of n terms (see test_backends.py's sum_tol)
            tol *= math.sqrt(n)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True, msg=str(case))


@emulated
@pytest.mark.parametrize("seed", range(16))
def test_emulated_kernels_equal_the_reference(emulated_cupy, seed):
    _assert_equals_reference("cupy-emulated", _random_case(seed))
    for fn in emulated_cupy.functions:
        for grid, block in fn.launches:
            assert block[0] * block[1] == 256 and grid[1] <= 65535
    # one build per rounding mode: the cache is keyed by device and MAX_T bucket
    assert emulated_cupy.builds in ([], [(*cupy_backend.NVRTC_OPTIONS, "-DMAX_T=8")])


@emulated
@pytest.mark.parametrize("T", [33, 65, 150])
def test_any_number_of_micro_steps_runs_in_chunks(emulated_cupy, T):
    """The backward keeps at most 64 recomputed h per thread: longer trains run in chunks."""
    case = _random_case(T) | {"T": T, "tau": 1.5, "shape": (3, 5), "with_v0": True}
    _assert_equals_reference("cupy-emulated", case | {"dtype": torch.float32})
    assert any("-DMAX_T=64" in build for build in emulated_cupy.builds)


@emulated
@pytest.mark.parametrize("T", [16, 17])
def test_chunks_of_max_t_end_on_a_chunk_boundary(emulated_cupy, monkeypatch, T):
    """With one bucket of 8, T = 16 replays two whole chunks and T = 17 a chunk of one: the
    neuron and the spike point equal the reference (cheap: the MAX_T = 8 build)."""
    monkeypatch.setattr(cupy_backend, "_MAX_T_BUCKETS", (8,))
    case = _random_case(T) | {"T": T, "tau": 1.5, "shape": (5, 3), "with_v0": True}
    _assert_equals_reference("cupy-emulated", case | {"dtype": torch.float32})
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(T)).requires_grad_()
    p = ATMNParameters((torch.rand(3, generator=torch.Generator().manual_seed(1)) + 0.1), 2.0)
    p.v_threshold.requires_grad_()
    ref, _ = atmn_quantize(x, T, p, backend="torch")
    out = cupy_backend.atmn_quantize_cupy(x, T, p)
    assert torch.equal(out, ref)
    grads = [torch.autograd.grad(o.sum(), (x, p.v_threshold)) for o in (ref, out)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert emulated_cupy.builds in ([], [(*cupy_backend.NVRTC_OPTIONS, "-DMAX_T=8")])


@emulated
@pytest.mark.parametrize("seed", range(3))
def test_64_bit_index_kernels(emulated_cupy, monkeypatch, seed):
    monkeypatch.setattr(cupy_backend, "INDEX32_LIMIT", 0)
    _assert_equals_reference("cupy-emulated", _random_case(100 + seed))
    assert all(fn.name.endswith("_i64") for fn in emulated_cupy.functions)


@pytest.mark.parametrize("C", [1, 3, 1000])
@pytest.mark.parametrize("T", [1, 4, 64])
def test_32_bit_index_kernels_only_where_every_integer_fits(T, C):
    """The host picks the int kernels only where no integer they compute overflows: t·N + n, the
    forward's offset after its last micro-step (n + T·N) and a row plus the rows' grid stride
    (for N just below 2^31 / T, r + stride overflowed: an endless loop or a write out of
    bounds). Sizes around each boundary, on devices of 1 to 1000 multiprocessors."""
    limit = 2**31 - 1
    sizes = {limit // T, limit // (T + 1), limit // T - 2**20, limit // (T + 1) - 2**24, 2**20}
    for N in sorted((n // C) * C for n in sizes):
        x_step = torch.empty(()).expand(N)  # N elements, no memory
        vth = torch.empty(C) if C > 1 else torch.empty(())
        launch = cupy_backend._Launch.of(x_step, vth, T)
        assert launch.rows * launch.C == N
        if launch.bits == 64:
            continue
        for sms in (1, 132, 1000):
            (_, gy), (_, by) = cupy_backend.launch_geometry(launch.rows, C, sms)
            last_row = launch.rows - 1
            largest = max(T * N - 1, N - 1 + T * N, last_row + gy * by)
            assert largest <= limit, (T, N, C, sms)
    small = cupy_backend._Launch.of(torch.empty(()).expand(2**20), torch.empty(()), T)
    assert small.bits == 32  # no needless 64-bit indexing


@emulated
def test_threshold_gradient_is_deterministic_and_independent_of_the_grid(
    emulated_cupy, monkeypatch
):
    """dL/dV is reduced in shared memory in a fixed order, then over row blocks on the host:
    the same bits every run, and (to rounding) the same value for another grid."""
    # one block per multiprocessor: grids of 2 and 1 row blocks, each grid-striding the rows
    monkeypatch.setattr(cupy_backend, "_BLOCKS_PER_SM", 1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 300, 6, generator=g).requires_grad_()
    results = []
    for multiprocessors in (2, 2, 1):
        emulated_cupy.multiprocessors = multiprocessors
        V = (torch.rand(6, generator=g) * 0 + 0.5).requires_grad_()
        s, _ = atmn_multi_step(x, None, ATMNParameters(V, tau=1.5), backend="cupy-emulated")
        results.append(torch.autograd.grad((s * torch.arange(6.0)).sum(), V)[0])
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], results[2], rtol=1e-12, atol=1e-12)


@emulated
@pytest.mark.parametrize(
    "case",
    ["nan_x", "inf_x", "inf_v0", "nan_x_tau_inf", "nan_threshold", "zero_threshold", "overflow"],
)
def test_kernels_probe_values_and_raise_as_the_reference(emulated_cupy, case):
    """The forward kernels probe what ``check_values`` probes (no extra pass) and the host raises
    the reference's errors, word for word, for the neuron and for the fused spike point."""
    x = torch.randn(3, 2000, generator=torch.Generator().manual_seed(1))
    v0, V, tau = None, torch.tensor(1.0), 2.0
    if case in ("nan_x", "inf_x", "nan_x_tau_inf"):
        x[1 if case != "nan_x_tau_inf" else 0, 1234] = float("inf" if case == "inf_x" else "nan")
        tau = math.inf if case == "nan_x_tau_inf" else tau
    elif case == "inf_v0":
        v0 = torch.zeros(2000)
        v0[77] = float("inf")
    elif case == "overflow":  # finite input, tau < 1: the membrane overflows
        x, tau = torch.full((200, 4), 0.5), 0.1
    else:
        V = torch.tensor(float("nan") if case == "nan_threshold" else 0.0)
    errors = []
    for backend in ("torch", "cupy-emulated"):
        with pytest.raises(ValueError) as info:
            atmn_multi_step(x, v0, ATMNParameters(V, tau=tau), backend=backend)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    if case in ("nan_x_tau_inf", "nan_threshold", "zero_threshold", "overflow"):
        # the spike point on x[0]; the overflow's message names the T micro-steps (it said T = 1)
        p, T = ATMNParameters(V, tau=tau), 50 if case == "overflow" else 4
        with pytest.raises(ValueError) as reference:
            atmn_quantize(x[0], T, p, backend="torch")
        with pytest.raises(ValueError) as fused:
            cupy_backend.atmn_quantize_cupy(x[0], T, p)
        assert str(reference.value) == str(fused.value)


def test_emulation_contracts_with_flags_the_target_accepts(monkeypatch):
    """The contracted build adds -mfma on x86-64 only (AArch64 has FMA and its compilers refuse
    the flag: the emulation failed to build there instead of running or skipping)."""
    from spikemar.neurons import cuda_emulation

    for machine, mfma in (("x86_64", True), ("AMD64", True), ("aarch64", False), ("arm64", False)):
        monkeypatch.setattr(cuda_emulation.platform, "machine", lambda m=machine: m)
        contracted, rounded = cuda_emulation._flags(True), cuda_emulation._flags(False)
        assert "-ffp-contract=fast" in contracted and ("-mfma" in contracted) == mfma, machine
        assert "-ffp-contract=off" in rounded and "-mfma" not in rounded


@emulated
def test_emulation_catches_a_contracted_membrane_update(build_dir, monkeypatch):
    """The check can fail: the membrane update written plainly (h = x + d*u, as before issue
    18) and contracted into an FMA by the compiler flips spikes against the reference."""
    plain = cupy_backend.SOURCE.read_text()
    for op, intrinsic in (("+", "__fadd_rn"), ("-", "__fsub_rn"), ("*", "__fmul_rn")):
        plain = plain.replace(f"return {intrinsic}(a, b);", f"return a {op} b;")
    fake = EmulatedCupy(build_dir, contract=True)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cupy_backend, "_modules", {})
    monkeypatch.setattr(cupy_backend, "_functions", {})
    monkeypatch.setattr(cupy_backend, "SOURCE", build_dir / "plain.cu")
    (build_dir / "plain.cu").write_text(plain)
    x = torch.randn(32, 4096, generator=torch.Generator().manual_seed(0))
    p = ATMNParameters(torch.tensor(0.6), tau=0.7)
    with torch.no_grad():
        ref, _ = atmn_multi_step(x, None, p, backend="torch")
        fused, _ = cupy_backend.atmn_multi_step_cupy(x, None, p, False)[:2]
    assert not torch.equal(ref, fused)


@emulated
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_subnormal_inputs_thresholds_and_membranes_are_exact(emulated_cupy, dtype):
    """Subnormal inputs, thresholds and decaying membranes: spikes, membranes and the spike
    point's decode equal the reference's bit for bit (on a GPU the forwards are kept from
    flushing them by PTX without .ftz: test_forward_ptx_holds_no_fma_and_flushes_no_subnormal)."""
    tiny = 1e-39  # float32 (and bfloat16) subnormal
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.tensor(
        [[tiny, -tiny, 0.0, 3 * tiny, 0.7, -5e-39], [0.0] * 6, [2e-39, 0.0, -2e-39, 0.0, 1.0, 0.0]]
    )
    x = x.unsqueeze(1).expand(3, 2, 6).to(dtype).contiguous()
    V = torch.tensor([tiny, 2 * tiny, 1e-3, tiny, 0.5, 1e-38], dtype=cdtype)
    for tau, ternary in ((2.0, True), (10.0, False), (math.inf, True)):
        p = ATMNParameters(V, tau=tau, ternary=ternary)
        ref = atmn_multi_step(x, None, p, backend="torch", return_v_seq=True)
        out = atmn_multi_step(x, None, p, backend="cupy-emulated", return_v_seq=True)
        for a, b in zip(ref, out, strict=True):
            assert torch.equal(a, b), (tau, ternary)
        decoded, _ = atmn_quantize(x[0], 5, p, backend="torch")
        assert torch.equal(decoded, cupy_backend.atmn_quantize_cupy(x[0], 5, p)), (tau, ternary)


# -- NVRTC: the source compiles for the GPUs we target, and the forward holds no FMA ----------


def _nvrtc_path() -> str | None:
    env = os.environ.get("SPIKEMAR_NVRTC")
    if env:
        return env
    spec = importlib.util.find_spec("nvidia.cuda_nvrtc") if _has_nvidia() else None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(folder, "lib").glob("libnvrtc.so.*"))
        if found:
            return str(found[0])
    return None


def _has_nvidia() -> bool:
    try:
        return importlib.util.find_spec("nvidia") is not None
    except (ImportError, ValueError):
        return False


NVRTC = _nvrtc_path()
needs_nvrtc = pytest.mark.skipif(
    NVRTC is None,
    reason="NVRTC not installed: pip install nvidia-cuda-nvrtc-cu12 (the 'test' extra), "
    "or set SPIKEMAR_NVRTC to a libnvrtc.so",
)


def _nvrtc_compile(source: str, options: list[str], want: str) -> tuple[str | bytes, str]:
    """Compile with NVRTC; ``want`` 'ptx' or 'cubin'. Returns (output, log); raises on error."""
    lib = ctypes.CDLL(NVRTC)
    prog = ctypes.c_void_p()
    assert (
        lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"atmn.cu", 0, None, None) == 0
    )
    try:
        opts = [o.encode() for o in options]
        status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert status == 0, log.value.decode()
        get_size, get = (
            (lib.nvrtcGetPTXSize, lib.nvrtcGetPTX)
            if want == "ptx"
            else (lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN)
        )
        get_size(prog, ctypes.byref(size))
        out = ctypes.create_string_buffer(size.value)
        get(prog, out)
        return (out.value.decode() if want == "ptx" else out.raw), log.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _entries(ptx: str) -> dict[str, str]:
    parts = re.split(r"\.entry\s+", ptx)[1:]
    return {part.split("(", 1)[0].strip(): part for part in parts}


@needs_nvrtc
@pytest.mark.parametrize(("arch", "max_t"), [("sm_80", 8), ("sm_90", 64)])
def test_source_compiles_with_nvrtc_without_warnings(arch, max_t):
    options = [*cupy_backend.NVRTC_OPTIONS, f"-DMAX_T={max_t}", f"--gpu-architecture={arch}"]
    cubin, log = _nvrtc_compile(cupy_backend.SOURCE.read_text(), options, "cubin")
    assert len(cubin) > 0 and "warning" not in log.lower(), log


def _plain_device_source() -> str:
    """atmn.cu with the device's float32 add_rn/sub_rn/mul_rn/ge/le written plainly (a + b,
    a >= b) instead of as PTX: what the compiler may contract and flush."""
    plain = cupy_backend.SOURCE.read_text()
    for op in ("add", "sub", "mul"):
        sign = {"add": "+", "sub": "-", "mul": "*"}[op]
        line = f'asm("{op}.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));'
        assert line in plain
        plain = plain.replace(line, f"r = a {sign} b;")
    for op in ("ge", "le"):
        sign = {"ge": ">=", "le": "<="}[op]
        line = (
            f'asm("{{ .reg .pred p; setp.{op}.f32 p, %1, %2; selp.s32 %0, 1, 0, p; }}" '
            ': "=r"(r) : "f"(a), "f"(b));'
        )
        assert line in plain
        plain = plain.replace(line, f"r = a {sign} b;")
    return plain


@needs_nvrtc
def test_forward_ptx_holds_no_fma_and_flushes_no_subnormal():
    """Built as CuPy builds it: CuPy appends -ftz=true after the caller's options (and NVRTC
    takes the last), under which float32 arithmetic and comparisons flush subnormals (a
    subnormal input or decayed membrane became 0, a subnormal V fired at h = 0). The forwards
    hold neither an fma nor a .ftz instruction."""
    options = [*cupy_backend.NVRTC_OPTIONS, "-DMAX_T=8", "--gpu-architecture=compute_80"]
    options.append("-ftz=true")  # cupy.cuda.compiler._compile_with_cache_cuda
    ptx, _ = _nvrtc_compile(cupy_backend.SOURCE.read_text(), options, "ptx")
    entries = _entries(ptx)
    # the neuron's forward and the spike point's, 4 dtypes × 2 index widths each
    forwards = [name for name in entries if "_forward_" in name]
    assert len(forwards) == 16
    for name in forwards:
        assert "fma." not in entries[name], f"{name}: the membrane update was contracted"
        assert ".ftz" not in entries[name], f"{name}: subnormals are flushed to zero"
    # the same checks on the update written plainly find the FMA and the flush (they can fail)
    plain = _entries(_nvrtc_compile(_plain_device_source(), options, "ptx")[0])
    assert "fma.rn.ftz.f32" in plain["atmn_forward_f32_i32"]
    assert "setp.ge.ftz.f32" in plain["atmn_quantize_forward_bf16_i32"]


# -- the fused spike point: δ-inject → ATMN → decode in one kernel each way ---------------------


@emulated
@pytest.mark.parametrize("seed", range(8))
def test_emulated_fused_spike_point_equals_the_reference(emulated_cupy, seed):
    """``cupy_backend.atmn_quantize_cupy`` against ``atmn_quantize(..., backend='torch')``:
    the decode to rounding of its sum, gradients to 1e-5 (float32)."""
    case = _random_case(1000 + seed)
    g = torch.Generator().manual_seed(seed)
    shape, dtype, T = case["shape"], case["dtype"], case["T"]
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(*shape, generator=g) * 2).to(dtype).requires_grad_()
    V = torch.rand(shape[-1], generator=g) + 0.2 if case["per_channel"] else torch.tensor(0.4)
    V = V.to(cdtype).requires_grad_()
    kw = {k: case[k] for k in ("tau", "surrogate", "ternary", "detach_reset")}
    p = ATMNParameters(V, **kw)
    weight = torch.randn(*shape, generator=g, dtype=torch.float64)
    ref, _ = atmn_quantize(x, T, p, backend="torch")
    ref_grads = torch.autograd.grad((ref.double() * weight).sum(), (x, V))
    out = cupy_backend.atmn_quantize_cupy(x, T, p)
    grads = torch.autograd.grad((out.double() * weight).sum(), (x, V))
    assert out.dtype == dtype and out.shape == x.shape
    half = dtype in (torch.float16, torch.bfloat16)
    tol = 1e-2 if half else 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, msg=str(case))
    n = math.prod(shape) * T // V.numel()
    for a, b in zip(ref_grads, grads, strict=True):
        t = tol * math.sqrt(n) if a.shape == V.shape else tol
        torch.testing.assert_close(a, b, rtol=t, atol=t, msg=str(case))


@emulated
@pytest.mark.parametrize("seed", range(6))
def test_emulated_fused_spike_point_counts_equal_the_reference_spike_train(emulated_cupy, seed):
    """``atmn_quantize_cupy(..., counts=True)``: the +1/−1 spikes per threshold channel, exactly
    those of the reference's spike train, with inputs on ±V (ties) among random ones."""
    case = _random_case(2000 + seed)
    g = torch.Generator().manual_seed(seed)
    shape, dtype, T = case["shape"], case["dtype"], case["T"]
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    V = torch.rand(shape[-1], generator=g) + 0.2 if case["per_channel"] else torch.tensor(0.4)
    V = V.to(cdtype)
    x = torch.randn(*shape, generator=g, dtype=cdtype) * 2
    pick = torch.randint(0, 4, shape, generator=g)
    x = torch.where(pick == 0, V.expand(shape), torch.where(pick == 1, -V.expand(shape), x))
    x = x.to(dtype)
    kw = {k: case[k] for k in ("tau", "surrogate", "ternary", "detach_reset")}
    p = ATMNParameters(V, **kw)
    _, spikes = atmn_quantize(x, T, p, backend="torch")
    out, counts = cupy_backend.atmn_quantize_cupy(x, T, p, counts=True)
    assert counts.dtype == torch.int64 and counts.shape == (*V.shape, 2)
    assert torch.equal(counts, spike_counts(spikes, per_channel=case["per_channel"])), case
    assert torch.equal(out, cupy_backend.atmn_quantize_cupy(x, T, p)), case


@emulated
def test_emulated_fused_spike_point_runs_any_T_and_checks_values(emulated_cupy):
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()
    p = ATMNParameters(torch.tensor(0.05).requires_grad_(), tau=1.0)
    ref, _ = atmn_quantize(x, 100, p, backend="torch")
    out = cupy_backend.atmn_quantize_cupy(x, 100, p)  # chunks of 64 in the backward
    torch.testing.assert_close(out, ref)
    g_ref = torch.autograd.grad(ref.sum(), (x, p.v_threshold))
    g = torch.autograd.grad(out.sum(), (x, p.v_threshold))
    for a, b in zip(g_ref, g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    bad = x.detach().clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        cupy_backend.atmn_quantize_cupy(bad, 4, p)


def _assert_refuses_a_double_backward(backend: str, quantize, name: str) -> None:
    # the fused backwards (C, CUDA) build no graph: backward(create_graph=True) returned second
    # derivatives with the neuron's part silently missing (the reference's differ)
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1)).requires_grad_()
    p = ATMNParameters(torch.tensor(0.4), 1.5, surrogate="sigmoid")
    outputs = {
        "multi-step": lambda: atmn_multi_step(x, None, p, backend=backend)[0],
        "spike point": lambda: quantize(x[0], 4, p),
    }
    for out in outputs.values():
        with pytest.raises(RuntimeError, match=f"backend='{name}'.*use backend='torch'"):
            torch.autograd.grad(out().sum() + x.pow(3).sum(), x, create_graph=True)
        (g,) = torch.autograd.grad(out().sum(), x)  # first derivatives as before
        assert g.shape == x.shape


@pytest.mark.skipif(not cpu_backend.usable(), reason="no C compiler for the CPU kernel")
def test_the_fused_cpu_kernels_refuse_a_double_backward():
    _assert_refuses_a_double_backward("cpu", cpu_backend.atmn_quantize_train_cpu, "cpu")


@emulated
def test_the_emulated_cuda_kernels_refuse_a_double_backward(emulated_cupy):
    _assert_refuses_a_double_backward("cupy-emulated", cupy_backend.atmn_quantize_cupy, "cupy")
