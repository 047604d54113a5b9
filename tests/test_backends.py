"""Every fast backend equals the PyTorch reference: spikes exactly, gradients to 1e-5 (float32)."""

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from spikemar.neurons import (
    ATMN,
    ATan,
    ATMNParameters,
    Rectangle,
    Sigmoid,
    Triangle,
    atmn_multi_step,
    available_backends,
    backends,
)
from spikemar.neurons.surrogate import Surrogate

# each fast backend with the device it runs on; it is tested wherever it can run, and skipped
# with its own reason elsewhere (the CuPy kernels need a CUDA device: see DEVELOPERS.md)
DEVICE_OF = {"cpu": "cpu", "cupy": "cuda"}
FAST = [b for b in available_backends() if b != "torch"]


def usable_reason(backend: str) -> str | None:
    device = DEVICE_OF[backend]
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    probe = torch.zeros(1, device=device)
    try:
        backends.select_backend(backend, probe, ATMNParameters(torch.tensor(1.0)))
    except RuntimeError as err:
        return str(err)
    return None


BACKENDS = [
    pytest.param(
        b, marks=pytest.mark.skipif(usable_reason(b) is not None, reason=f"{b}: {usable_reason(b)}")
    )
    for b in FAST
]


def run(backend, x, v0, V, p_kwargs, return_v_seq, weights):
    p = ATMNParameters(v_threshold=V, **p_kwargs)
    out = atmn_multi_step(x, v0, p, backend=backend, return_v_seq=return_v_seq)
    loss = sum((o * w).sum() for o, w in zip(out, weights, strict=False))
    inputs = [t for t in (x, v0, V) if t is not None and t.requires_grad]
    return out, torch.autograd.grad(loss, inputs)


def assert_backend_matches_reference(
    backend,
    T,
    shape,
    p_kwargs,
    *,
    per_channel,
    with_v0,
    return_v_seq=False,
    dtype=torch.float32,
    seed=0,
    grad_tol=1e-5,
    sum_tol=False,
):
    """``sum_tol``: compare dL/dV, a sum over every neuron and micro-step of its channel, to
    within ``grad_tol·√n`` for n summands (the float32 reference's own error grows so; its
    cancelling sums then differ from the kernels', which sum in double, beyond ``grad_tol``)."""
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = (torch.randn(T, *shape, generator=g, dtype=dtype) * 1.5).requires_grad_()
    v0 = (torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_() if with_v0 else None
    V = torch.rand(C, generator=g) + 0.2 if per_channel else torch.tensor(0.6)
    V = V.to(dtype).requires_grad_()
    weights = [
        torch.randn(T, *shape, generator=g, dtype=dtype),
        torch.randn(*shape, generator=g, dtype=dtype),
        torch.randn(T, *shape, generator=g, dtype=dtype),
    ]
    ref_out, ref_grads = run("torch", x, v0, V, p_kwargs, return_v_seq, weights)
    out, grads = run(backend, x, v0, V, p_kwargs, return_v_seq, weights)
    assert torch.equal(ref_out[0], out[0]), "spikes differ"
    for a, b in zip(ref_out[1:], out[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    n_summands = T * math.prod(shape) // V.numel()
    for a, b in zip(ref_grads, grads, strict=True):
        tol = grad_tol * math.sqrt(n_summands) if sum_tol and a.shape == V.shape else grad_tol
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("tau", [1.0, 1.5, 2.0, 4.0])
@pytest.mark.parametrize("per_channel", [False, True])
def test_parity_across_micro_steps_tau_and_threshold_sharing(backend, T, tau, per_channel):
    assert_backend_matches_reference(
        backend, T, (13, 37), {"tau": tau}, per_channel=per_channel, with_v0=False, seed=T
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("surrogate", "ternary", "detach_reset"),
    list(
        itertools.product(
            # width ≤ 2: the fused kernels' one-pulse path; wider: both pulses
            [
                Rectangle(),
                Rectangle(0.3),
                Rectangle(2.0),
                Rectangle(3.0),
                Triangle(),
                Triangle(2.5),
                Sigmoid(),
                ATan(),
            ],
            [True, False],
            [False, True],
        )
    ),
    ids=str,
)
def test_parity_across_surrogates_polarity_and_reset(backend, surrogate, ternary, detach_reset):
    kw = {"tau": 1.7, "surrogate": surrogate, "ternary": ternary, "detach_reset": detach_reset}
    assert_backend_matches_reference(
        backend, 4, (9, 5), kw, per_channel=True, with_v0=True, return_v_seq=True
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("T", "shape"), [(4, (20_001,)), (2, (11, 3001)), (16, (2, 5000))])
def test_parity_across_blocks_and_threads(backend, T, shape):
    """Many blocks (the 'cpu' kernel's block grows to 8192 values for small T), a ragged last
    block, channels that do not divide the block, and two threads splitting the blocks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for per_channel in (False, True):
            assert_backend_matches_reference(
                backend, T, shape, {"tau": 2.0}, per_channel=per_channel, with_v0=True
            )
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [5, 8, 13])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("surrogate", [Rectangle(), Triangle(3.0)], ids=str)
def test_parity_when_micro_steps_run_in_chunks(backend, T, per_channel, surrogate):
    """More micro-steps than the 'cpu' kernel streams side by side (4): the membrane, the
    recomputed h and dL/du cross chunk boundaries, with every optional input and output."""
    kw = {"tau": 1.5, "surrogate": surrogate}
    assert_backend_matches_reference(
        backend, T, (3, 1001), kw, per_channel=per_channel, with_v0=True, return_v_seq=True
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1,), (3,), (1023,), (1025,), (7, 3, 11), (5, 2049)])
def test_parity_on_odd_sizes(backend, shape):
    assert_backend_matches_reference(
        backend, 3, shape, {"tau": 2.0}, per_channel=True, with_v0=True
    )


def assert_parity_in_dtype(backend, dtype, T, shape, tau, *, per_channel):
    """Inputs in ``dtype``, with the initial membrane and the membrane sequence. A 16-bit x (read
    natively by 'cupy', widened first by the others): spikes and membranes exact, since x widens
    exactly to float32; gradients within a 16-bit rounding (1e-2)."""
    half = dtype in (torch.float16, torch.bfloat16)
    assert_backend_matches_reference(
        backend,
        T,
        shape,
        {"tau": tau},
        per_channel=per_channel,
        with_v0=True,
        return_v_seq=True,
        dtype=dtype,
        grad_tol=1e-2 if half else 1e-5,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "shape", "tau", "per_channel"),
    [
        (torch.float64, (40, 6), 1.3, False),
        *((dt, (7, 33), 1.5, pc) for dt in (torch.float16, torch.bfloat16) for pc in (False, True)),
    ],
    ids=str,
)
def test_parity_in_float64_and_half_types(backend, dtype, shape, tau, per_channel):
    assert_parity_in_dtype(backend, dtype, 5, shape, tau, per_channel=per_channel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_on_large_inputs_split_across_threads(backend):
    assert_backend_matches_reference(
        backend, 4, (300_000,), {"tau": 2.0}, per_channel=False, with_v0=False
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    base = torch.randn(16, 4, 30, device=DEVICE_OF[backend])
    x = base.transpose(0, 1)[:, ::2]  # [4, 8, 30], strided
    assert not x.is_contiguous()
    p = ATMNParameters(v_threshold=torch.rand(30, device=x.device) + 0.2, tau=2.0)
    s_ref, v_ref = atmn_multi_step(x, None, p, backend="torch")
    s, v = atmn_multi_step(x, None, p, backend=backend)
    assert torch.equal(s_ref, s) and torch.equal(v_ref, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_compute_in_float32(backend, dtype):
    x = (torch.randn(4, 64, 8, device=DEVICE_OF[backend]) * 2).to(dtype)
    p = ATMNParameters(v_threshold=torch.tensor(0.5, device=x.device), tau=2.0)
    s_ref, v_ref = atmn_multi_step(x, None, p, backend="torch")
    s, v = atmn_multi_step(x, None, p, backend=backend)
    assert s.dtype == dtype and v.dtype == torch.float32
    assert torch.equal(s_ref, s) and torch.equal(v_ref, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_on_fast_backend_equals_reference_and_trains_threshold(backend):
    dev = DEVICE_OF[backend]
    x = (torch.randn(6, 20, 12, device=dev) * 2).requires_grad_()
    grads = {}
    for b in ("torch", backend):
        n = ATMN(tau=2.0, v_threshold=0.5, num_channels=12, step_mode="m", backend=b).to(dev)
        s = torch.cat([n(x[:3]), n(x[3:])])  # membrane carried across calls
        (s * torch.linspace(-1, 1, 12, device=dev)).sum().backward()
        grads[b] = (s, n.a.grad.clone(), n.v.detach().clone())
    for a, b in zip(grads["torch"], grads[backend], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_auto_prefers_the_fused_cpu_backend_when_it_builds():
    x = torch.randn(2, 3)
    chosen = backends.resolve_backend("auto", x, ATMNParameters(torch.tensor(1.0)))
    expected = "cpu" if usable_reason("cpu") is None else "torch"
    assert chosen.__name__.endswith(expected)


def test_named_backend_that_cannot_run_the_input_raises_instead_of_falling_back():
    class MySurrogate(Surrogate):
        def derivative(self, z):
            return torch.ones_like(z)

    p = ATMNParameters(v_threshold=torch.tensor(1.0), surrogate=MySurrogate())
    with pytest.raises(RuntimeError, match=r"backend='cpu'.*MySurrogate"):
        atmn_multi_step(torch.randn(2, 3), None, p, backend="cpu")
    # 'auto' runs the reference, which runs any surrogate, and says once why
    backends._WARNED.clear()
    with pytest.warns(RuntimeWarning, match="torch reference.*MySurrogate"):
        atmn_multi_step(torch.randn(2, 3), None, p, backend="auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cupy_backend_on_a_cpu_tensor_says_what_is_wrong():
    with pytest.raises(RuntimeError, match=r"backend='cupy'.*CUDA tensors"):
        ATMN(step_mode="m", backend="cupy")(torch.randn(2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_is_still_caught_on_the_fast_path(backend):
    x = torch.randn(4, 100, device=DEVICE_OF[backend])
    x[2, 7] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        ATMN(step_mode="m", backend=backend).to(x.device)(x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    ["nan_x", "inf_x", "neg_inf_x", "inf_v0", "nan_x_tau_inf", "nan_threshold", "zero_threshold"],
)
def test_bad_values_raise_as_the_reference_does(backend, case):
    """Each backend raises what the reference's check raises, with the same message (the 'cpu'
    kernel checks in the forward pass instead of a separate pass)."""
    device = DEVICE_OF[backend]
    x = torch.randn(3, 70_000, device=device)  # several blocks and threads
    v0 = None
    V, tau = torch.tensor(1.0), 2.0
    nan, inf = float("nan"), float("inf")
    bad_x = {"nan_x": nan, "inf_x": inf, "neg_inf_x": -inf, "nan_x_tau_inf": nan}
    if case in bad_x:
        x[1, 65_537] = bad_x[case]
        tau = inf if case == "nan_x_tau_inf" else tau
    elif case == "inf_v0":
        v0 = torch.zeros(70_000, device=device)
        v0[123] = inf
    else:
        V = torch.tensor(nan if case == "nan_threshold" else 0.0)
    errors = []
    for b in ("torch", backend):
        p = ATMNParameters(V.to(device), tau=tau)
        with pytest.raises(ValueError) as info:
            atmn_multi_step(x, v0, p, backend=b)
        errors.append(str(info.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_extremes_do_not_raise(backend):
    x = torch.zeros(4, 50, device=DEVICE_OF[backend])
    x[0] = torch.finfo(torch.float32).max  # δ-injected: the membrane stays finite
    p = ATMNParameters(torch.tensor(1.0).to(x.device))
    spikes, _ = atmn_multi_step(x, None, p, backend=backend)
    assert torch.equal(spikes, atmn_multi_step(x, None, p, backend="torch")[0])


class _TorchKernels:
    """A kernel set written with torch ops on the CPU, taking 16-bit x natively as the CuPy
    kernels do: it checks the fused autograd layer's plumbing of dtypes without a GPU."""

    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def forward(self, x, v0, vth, p, spikes, v_last, v_seq):
        assert x.dtype == spikes.dtype and v_last.dtype == vth.dtype == torch.float32
        s, v, vs = atmn_multi_step(
            x.float(), v0, p._replace(v_threshold=vth), return_v_seq=True, backend="torch"
        )
        spikes.copy_(s)
        v_last.copy_(v)
        if v_seq is not None:
            v_seq.copy_(vs)

    def backward(self, x, v0, vth, p, g_spikes, g_vlast, g_vseq, g_x, g_v0):
        assert g_x.dtype == x.dtype and (g_spikes is None or g_spikes.dtype == x.dtype)
        assert all(g is None or g.dtype == torch.float32 for g in (g_vlast, g_vseq, g_v0))
        xf = x.float().requires_grad_()
        v = None if v0 is None else v0.clone().requires_grad_()
        V = vth.clone().requires_grad_()
        with torch.enable_grad():  # autograd runs a Function's backward with grad mode off
            out = atmn_multi_step(
                xf, v, p._replace(v_threshold=V), return_v_seq=True, backend="torch"
            )
            grads = [g_spikes, g_vlast, g_vseq]
            pairs = zip(out, grads, strict=True)
            loss = sum((o * g.float()).sum() for o, g in pairs if g is not None)
            wrt = [xf, V] + ([v] if v is not None else [])
            d = torch.autograd.grad(loss, wrt)
        g_x.copy_(d[0])
        if g_v0 is not None:
            g_v0.copy_(d[2])
        return d[1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_layer_hands_16_bit_x_to_kernels_that_take_it(dtype):
    from spikemar.neurons.fused import fused_multi_step

    def impl(x_seq, v, p, return_v_seq):
        assert x_seq.dtype == dtype  # not widened first
        return fused_multi_step(_TorchKernels(), x_seq, v, p, return_v_seq)

    backends.register_backend("native16", impl, native_dtypes=(torch.float16, torch.bfloat16))
    try:
        assert_parity_in_dtype("native16", dtype, 4, (6, 10), 2.0, per_channel=True)
    finally:
        backends.unregister_backend("native16")


def test_fused_layer_names_the_dtypes_its_kernels_take():
    from spikemar.neurons.cpu_backend import _KERNELS
    from spikemar.neurons.fused import fused_multi_step

    x = torch.randn(2, 5).to(torch.float16)
    with pytest.raises(TypeError, match=r"x_seq: these fused kernels take float32/float64, got"):
        fused_multi_step(_KERNELS, x, None, ATMNParameters(torch.tensor(1.0)), False)


@pytest.mark.skipif(usable_reason("cpu") is not None, reason=f"cpu: {usable_reason('cpu')}")
def test_cpu_kernels_run_on_torchs_openmp_team_when_loaded_and_agree_with_pthreads():
    """The C kernels run their threads on torch's libgomp team when the process has it (so that
    torch's spinning OpenMP threads do not contend with threads of our own), on pthreads
    otherwise; both give the same bits."""
    from pathlib import Path

    from spikemar.neurons import cpu_backend

    lib = cpu_backend.load_library()
    maps = Path("/proc/self/maps")
    if maps.exists() and "libgomp.so.1" in maps.read_text():
        assert lib.atmn_threading(-1) == 1
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    before = lib.atmn_threading(-1)
    try:
        results = []
        for mode in (0, 1):
            lib.atmn_threading(mode)
            g = torch.Generator().manual_seed(3)
            x = torch.randn(5, 3, 40_001, generator=g).requires_grad_()
            V = (torch.rand(40_001, generator=g) + 0.2).requires_grad_()
            p = ATMNParameters(V, tau=1.5)
            s, v = atmn_multi_step(x, None, p, backend="cpu")
            w = torch.randn(s.shape, generator=g)
            results.append((s, v, *torch.autograd.grad((s * w).sum() + v.sum(), (x, V))))
    finally:
        lib.atmn_threading(before)
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


_SURROGATES = st.one_of(
    st.floats(0.2, 3.0).map(Rectangle),  # around width 2: one pulse or both
    st.floats(0.2, 3.0).map(Triangle),
    st.floats(0.5, 8.0).map(Sigmoid),
    st.floats(0.5, 4.0).map(ATan),
)


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    T=st.integers(1, 13),
    rows=st.integers(1, 40),
    C=st.integers(1, 70),
    tau=st.sampled_from([1.0, 1.3, 2.0, 5.0, float("inf")]),
    surrogate=_SURROGATES,
    ternary=st.booleans(),
    detach_reset=st.booleans(),
    per_channel=st.booleans(),
    with_v0=st.booleans(),
    return_v_seq=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_parity_on_random_configurations(
    backend, T, rows, C, tau, surrogate, ternary, detach_reset, per_channel, with_v0,
    return_v_seq, dtype, seed,
):  # fmt: skip
    """Any micro-step count, shape (groups cut anywhere, channels not dividing anything), τ
    (∞ included), surrogate and width, polarity, reset and optional input/output. float64
    checks the logic at 1e-9; float32 the rounding at 1e-5 (dL/dV: see ``sum_tol``)."""
    kw = {"tau": tau, "surrogate": surrogate, "ternary": ternary, "detach_reset": detach_reset}
    assert_backend_matches_reference(
        backend,
        T,
        (rows, C),
        kw,
        per_channel=per_channel,
        with_v0=with_v0,
        return_v_seq=return_v_seq,
        dtype=dtype,
        seed=seed,
        grad_tol=1e-9 if dtype == torch.float64 else 1e-5,
        sum_tol=True,
    )


@pytest.mark.parametrize("vth_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("v0_dtype", [None, torch.float64])
def test_fused_backend_reads_a_threshold_of_another_dtype_as_its_value(vth_dtype, v0_dtype):
    """The fused kernels read raw pointers: a float64 threshold (or membrane) with a float32
    input is cast to the compute dtype first, not read as other numbers; the gradients come
    back in the threshold's and membrane's own dtype."""
    from spikemar.neurons import ATMNParameters, atmn_multi_step, cpu_backend

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, generator=g, requires_grad=True)
    vth = torch.full((8,), 0.5, dtype=vth_dtype, requires_grad=True)
    v0 = None if v0_dtype is None else (0.1 * torch.randn(3, 8, generator=g)).to(v0_dtype)
    if v0 is not None:
        v0.requires_grad_(True)
    p = ATMNParameters(vth)
    s_ref, v_ref = atmn_multi_step(x, v0, ATMNParameters(vth.float()), backend="torch")[:2]
    s, v = cpu_backend.atmn_multi_step_cpu(x, v0, p, False)[:2]
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(v, v_ref)
    (s.sum() + v.sum()).backward()
    assert vth.grad.dtype == vth_dtype and vth.grad.shape == vth.shape
    assert v0 is None or v0.grad.dtype == v0_dtype
