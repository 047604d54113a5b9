"""The inference fast paths equal the reference paths they stand in for.

With autograd off, a spike point runs one C call instead of ``neuron.quantize``, an RMSNorm one C
call, and the selective mixer's ``step`` the part between its projections in one C call. Each is
checked here against the reference on fresh random inputs, through public behaviour only (which
path ran is seen by making the reference fail, or by watching the public kernel functions), and
bad input still raises through it.
"""

import math

import pytest
import torch
from torch import nn

from spikemar import energy
from spikemar.models import MARLM, MARConfig, SpikeConfig, SpikePoint
from spikemar.models.common import NEURONS
from spikemar.neurons import cpu_backend
from spikemar.ssm import fast
from spikemar.ssm.mixer import DiscreteMixer, MixerState, SelectiveMixer
from spikemar.ssm.norm import FAST_MAX_VALUES, RMSNorm

pytestmark = pytest.mark.skipif(not cpu_backend.usable(), reason="no C compiler for the kernels")

BASE = {"vocab_size": 20, "d_model": 32, "n_layers": 3, "d_state": 8, "head_dim": 8,
        "chunk_size": 8, "max_len": 64}  # fmt: skip


def model(dtype=torch.float64, **kw) -> MARLM:
    return MARLM(MARConfig(**{**BASE, **kw})).to(dtype).eval()


def no_reference_quantize(monkeypatch):
    """Make the reference spike point fail, to prove that a test ran the fast path."""

    def fail(*args, **kwargs):
        raise AssertionError("the reference quantize ran where the fast path should")

    for cls in NEURONS.values():
        monkeypatch.setattr(cls, "quantize", fail)


def count_reference_quantize(monkeypatch) -> list:
    """Count the calls of the reference spike point (``neuron.quantize``): the fast paths make
    none."""
    calls = []
    for cls in NEURONS.values():
        original = cls.quantize

        def counted(self, *args, _original=original, **kwargs):
            calls.append(type(self).__name__)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "quantize", counted)
    return calls


def watch(monkeypatch, module, name: str) -> list:
    """Count the calls of the public kernel function ``module.name``."""
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def watch_mixer_kernel(monkeypatch) -> list:
    """Count the mixers' C steps: the calls of a prepared ``fast.MixerStep`` that ran (it
    refuses tensors it does not accept before its kernel sees them)."""
    calls = []
    original = fast.MixerStep.__call__

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append("MixerStep")
        return out

    monkeypatch.setattr(fast.MixerStep, "__call__", counted)
    return calls


# -- the spike point ------------------------------------------------------------------------


def random_point(channels, T, tau, threshold, neuron, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    config = SpikeConfig(T=T, tau=tau, v_threshold=0.5, threshold=threshold, neuron=neuron)
    point = SpikePoint(channels, config).to(dtype)
    with torch.no_grad():  # thresholds spread around 0.5, per channel or shared
        point.neuron.a.copy_(torch.log(torch.rand(point.neuron.a.shape, generator=g) + 0.1))
    return point, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("neuron", ["atmn", "binary", "ternary-single"])
@pytest.mark.parametrize("threshold", ["channel", "layer"])
@pytest.mark.parametrize(("T", "tau"), [(1, 1.0), (4, 1.0), (4, 2.0), (5, 1.5), (3, 0.5), (6, 0.7)])
def test_spike_point_fast_path_equals_the_reference(T, tau, threshold, neuron, dtype, monkeypatch):
    # 'ternary-single' has no τ (it is ∞): the τ given is ignored
    for seed, shape in enumerate([(37,), (3, 37), (2, 5, 37)]):
        point, g = random_point(shape[-1], T, tau, threshold, neuron, dtype, seed)
        x = torch.randn(shape, generator=g, dtype=dtype) * 2
        x.view(-1)[:4] = torch.tensor([0.0, 0.5, -0.5, 1.0])  # on a threshold when V = 0.5
        want, _ = point.neuron.quantize(x, T)
        with torch.no_grad(), monkeypatch.context() as m:
            no_reference_quantize(m)  # proof that the fast path ran
            got = point(x)
        assert got.dtype == dtype and got.shape == x.shape and not got.requires_grad
        if math.log2(tau).is_integer() or tau == 1.5:  # τ^t exact: every sum of spikes is exact
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=4 * torch.finfo(dtype).eps)


def test_spike_point_fast_path_runs_only_when_nothing_needs_the_spikes(monkeypatch):
    point = SpikePoint(16, SpikeConfig(T=4))
    x = torch.randn(2, 16)
    calls = count_reference_quantize(monkeypatch)

    def reference_ran(run) -> bool:
        before = len(calls)
        run()
        return len(calls) > before

    with torch.no_grad():
        assert not reference_ran(lambda: point(x))
        point.record = True
        assert reference_ran(lambda: point(x))
        point.record = False
        assert reference_ran(lambda: point(x.half()))
        with pytest.raises(ValueError):  # the reference raises its own message
            point(torch.randn(2, 15))
        assert calls[-1] == "ATMN"
        with energy.EnergyCounter(nn.Sequential(point)):
            assert reference_ran(lambda: point(x))
    torch_point = SpikePoint(16, SpikeConfig(T=4, backend="torch"))
    with torch.no_grad():
        assert reference_ran(lambda: torch_point(x))  # the user asked for it


# -- the spike point in training -----------------------------------------------------------


def assert_grads_close(got, want, dtype, n_summands=1):
    """To 1e-5 in float32 (1e-10 in float64); a sum of n terms (dL/dV) to that times √n."""
    tol = (1e-5 if dtype == torch.float32 else 1e-10) * math.sqrt(n_summands)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("neuron", ["atmn", "binary", "ternary-single"])
@pytest.mark.parametrize("threshold", ["channel", "layer"])
@pytest.mark.parametrize(("T", "tau"), [(1, 1.0), (4, 1.0), (4, 2.0), (5, 1.5), (6, 0.7)])
def test_spike_point_training_path_equals_the_reference(
    T, tau, threshold, neuron, dtype, monkeypatch
):
    """With autograd on, the fused training path gives the reference's decode and, to rounding,
    its gradients to the input and to the threshold parameter a (V = exp(a))."""
    for seed, shape in enumerate([(37,), (3, 37), (2, 5, 37), (70, 37)]):
        point, g = random_point(shape[-1], T, tau, threshold, neuron, dtype, seed)
        x = (torch.randn(shape, generator=g, dtype=dtype) * 2).requires_grad_()
        w = torch.randn(shape, generator=g, dtype=dtype)
        a = point.neuron.a
        want, _ = point.neuron.quantize(x, T)
        gx_want, ga_want = torch.autograd.grad((want * w).sum(), (x, a))
        with monkeypatch.context() as m:
            no_reference_quantize(m)  # proof that the fused training path ran
            got = point(x)
        assert got.dtype == dtype and got.shape == x.shape and got.requires_grad
        if math.log2(tau).is_integer() or tau == 1.5:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=4 * torch.finfo(dtype).eps)
        gx, ga = torch.autograd.grad((got * w).sum(), (x, a))
        assert_grads_close(gx, gx_want, dtype)
        assert_grads_close(ga, ga_want, dtype, x.numel() // a.numel())


def test_spike_point_training_path_runs_only_when_it_may(monkeypatch):
    from spikemar.neurons.surrogate import Surrogate

    point = SpikePoint(16, SpikeConfig(T=4))
    x = torch.randn(2, 16, requires_grad=True)
    calls = count_reference_quantize(monkeypatch)

    def reference_ran(p) -> bool:
        before = len(calls)
        p(x).sum().backward()
        return len(calls) > before

    assert not reference_ran(point)
    point.record = True  # the spikes are wanted: the reference path keeps them
    assert reference_ran(point)
    point.record = False
    with energy.EnergyCounter(nn.Sequential(point)):
        assert reference_ran(point)
    torch_point = SpikePoint(16, SpikeConfig(T=4, backend="torch"))
    assert reference_ran(torch_point)

    class Custom(Surrogate):
        def derivative(self, z):
            return torch.ones_like(z)

        def primitive(self, z):
            return z

    point.neuron.surrogate = Custom()  # not one the kernels implement
    assert reference_ran(point)


def test_recording_spike_points_still_record_in_training():
    """The documented way to collect spike trains (``record`` on the spike points, or a
    SpikingJelly ``AttributeMonitor('spikes', …, SpikePoint)``) takes the reference path."""
    from spikingjelly.activation_based import monitor

    lm = MARLM(MARConfig(**BASE, spikes=SpikeConfig(T=4))).train()
    points = [m for m in lm.modules() if isinstance(m, SpikePoint)]
    for p in points:
        p.record = True
    mon = monitor.AttributeMonitor("spikes", False, lm, SpikePoint)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 9))
    lm(tokens).sum().backward()
    assert len(mon.records) == len(points) and all(r.shape[0] == 4 for r in mon.records)
    assert all(p.neuron.a.grad is not None for p in points)
    mon.remove_hooks()


def test_non_finite_input_raises_through_the_training_path(monkeypatch):
    point = SpikePoint(8, SpikeConfig(T=4))
    x = torch.randn(3, 8)
    x[1, 5] = float("nan")
    no_reference_quantize(monkeypatch)
    with pytest.raises(ValueError, match="finite"):
        point(x.requires_grad_())


def test_training_a_mar_lm_through_the_fused_spike_points_equals_the_reference(monkeypatch):
    """One loss and backward of a whole spiking MAR LM: the same loss and, to rounding, the same
    gradient for every parameter as with the reference spike points (backend='torch')."""
    torch.manual_seed(0)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 17))
    grads = {}
    for backend in ("auto", "torch"):
        torch.manual_seed(1)
        lm = MARLM(MARConfig(**BASE, spikes=SpikeConfig(T=4, backend=backend))).double().train()
        with monkeypatch.context() as m:
            if backend == "auto":
                no_reference_quantize(m)  # proof that the fused path ran
            logits = lm(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        grads[backend] = (loss.detach(), {n: p.grad for n, p in lm.named_parameters()})
    torch.testing.assert_close(grads["auto"][0], grads["torch"][0], rtol=1e-12, atol=1e-12)
    for name, g in grads["torch"][1].items():
        torch.testing.assert_close(grads["auto"][1][name], g, rtol=1e-8, atol=1e-9, msg=name)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("tau", [1.0, math.inf])
def test_non_finite_input_raises_through_the_fast_path(monkeypatch, bad, tau):
    neuron = "ternary-single" if math.isinf(tau) else "atmn"
    point = SpikePoint(8, SpikeConfig(T=4, tau=1.0, neuron=neuron))
    x = torch.randn(3, 8)
    x[1, 5] = bad
    no_reference_quantize(monkeypatch)
    with torch.no_grad(), pytest.raises(ValueError, match="finite"):
        point(x)


def test_bad_threshold_raises_through_the_fast_path(monkeypatch):
    point = SpikePoint(8, SpikeConfig(T=4))
    with torch.no_grad():
        point.neuron.a[3] = float("nan")
    no_reference_quantize(monkeypatch)
    with torch.no_grad(), pytest.raises(ValueError, match="v_threshold"):
        point(torch.randn(2, 8))


def test_threshold_is_recomputed_whenever_a_changes_however_it_is_changed():
    point = SpikePoint(16, SpikeConfig(T=4))
    x = torch.randn(3, 16)
    a = point.neuron.a
    with torch.no_grad():
        for change in (
            lambda: a.data.mul_(0.5),  # behind autograd's version counter
            lambda: a.copy_(torch.randn(16) * 0.3),
            lambda: setattr(point.neuron, "a", nn.Parameter(torch.randn(16) * 0.3)),
            lambda: None,
        ):
            change()
            want, _ = point.neuron.quantize(x, 4)
            assert torch.equal(point(x), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", ["channel", "layer"])
def test_fast_norm_and_spike_point_equal_the_reference(dtype, threshold, monkeypatch):
    # the norm in C equals nn.RMSNorm to rounding; the spike point after it is exact
    norm_calls = watch(monkeypatch, fast, "rms_norm_cpu")
    for seed, shape in enumerate([(1, 128), (3, 37), (2, 5, 341)]):
        point, g = random_point(shape[-1], 4, 1.0, threshold, "atmn", dtype, seed)
        norm = RMSNorm(shape[-1], eps=None if seed else 1e-5).to(dtype)
        reference = nn.RMSNorm(shape[-1], eps=norm.eps).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(shape[-1], generator=g) + 0.5)
            reference.weight.copy_(norm.weight)
        x = torch.randn(shape, generator=g, dtype=dtype) * 3
        with torch.no_grad():
            normed = norm(x)
            torch.testing.assert_close(
                normed, reference(x), rtol=16 * torch.finfo(dtype).eps, atol=0
            )
            got = point(normed)
        assert torch.equal(got, point.neuron.quantize(normed, 4)[0])
    assert len(norm_calls) == 3


def test_non_finite_input_raises_through_the_fast_norm_and_spike_point(monkeypatch):
    point, norm = SpikePoint(8, SpikeConfig(T=4)), RMSNorm(8)
    x = torch.randn(3, 8)
    x[2, 1] = float("nan")
    no_reference_quantize(monkeypatch)
    with torch.no_grad(), pytest.raises(ValueError, match="finite"):
        point(norm(x))


# -- the pieces of the model step -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [None, 1e-5])
@pytest.mark.parametrize("groups", [1, 4])
def test_rms_norm_equals_nn_rmsnorm(dtype, eps, groups, monkeypatch):
    """Over inputs too large for the C norm, and with autograd on, RMSNorm is PyTorch's
    operations: bit for bit ``nn.RMSNorm`` for one group, each group by itself for several; the
    C norm (small inputs, autograd off) equals them to rounding."""
    g = torch.Generator().manual_seed(0)
    norm_calls = watch(monkeypatch, fast, "rms_norm_cpu")
    for width in (32, 128, 344):
        norm = RMSNorm(width, eps=eps, groups=groups).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(width, generator=g))
        plain = nn.RMSNorm(width // groups, eps=eps, elementwise_affine=False).to(dtype)
        for rows in (5, FAST_MAX_VALUES // width + 1):
            x = torch.randn(rows, width, generator=g, dtype=dtype) * 10
            want = plain(x.unflatten(-1, (groups, -1))).flatten(-2) * norm.weight
            if groups == 1:
                want_module = nn.RMSNorm(width, eps=eps).to(dtype)
                with torch.no_grad():
                    want_module.weight.copy_(norm.weight)
                    assert torch.equal(want, want_module(x))
            assert torch.equal(norm(x), want)  # autograd on: PyTorch's operations
            before = len(norm_calls)
            with torch.no_grad():
                got = norm(x)
            if rows == 5:
                assert len(norm_calls) == before + 1
                torch.testing.assert_close(got, want.detach(), rtol=16 * torch.finfo(dtype).eps,
                                           atol=0)  # fmt: skip
            else:
                assert len(norm_calls) == before and torch.equal(got, want.detach())


def random_state(m: SelectiveMixer, batch: int, dtype, g, in_place=False) -> MixerState:
    s = m.init_state(batch, in_place=in_place)
    with torch.no_grad():
        s.conv.copy_(torch.randn(s.conv.shape, generator=g, dtype=dtype))
        s.ssm.copy_(torch.randn(s.ssm.shape, generator=g, dtype=dtype))
    return s


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("in_place", [False, True])
def test_mixer_inference_step_equals_its_reference_step(monkeypatch, dtype, batch, in_place):
    kernel_calls = watch_mixer_kernel(monkeypatch)
    g = torch.Generator().manual_seed(batch)
    m = SelectiveMixer(24, d_state=8, head_dim=8, d_conv=4).to(dtype)
    _assert_inference_step_equals_reference(m, batch, dtype, g, kernel_calls, 1, in_place)


def _assert_inference_step_equals_reference(m, batch, dtype, g, kernel_calls, expected_calls,
                                            in_place=False):  # fmt: skip
    """``m.step`` with autograd off (the C step where it applies) equals its PyTorch step with
    autograd on, on perturbed weights, a random state and a random input. ``in_place``: the C
    step writes over its state (the reference steps from a copy); otherwise it leaves it as it
    was."""
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.1)
    state = random_state(m, batch, dtype, g, in_place)
    kept = MixerState(state.conv.clone(), state.ssm.clone())
    u = torch.randn(batch, m.in_proj.in_features, generator=g, dtype=dtype)
    want, want_state = m.step(u, kept)  # autograd on: the reference
    assert not kernel_calls
    with torch.no_grad():
        got, got_state = m.step(u, state)
    assert len(kernel_calls) == expected_calls
    assert (got_state is state) == in_place  # in place: the same state, written over
    assert got_state.in_place == in_place
    if not in_place:  # out of place: the state stepped from is untouched
        assert torch.equal(state.conv, kept.conv) and torch.equal(state.ssm, kept.ssm)
    # rounding of sums taken in other orders: relative to the outputs' scale
    scale = max(1.0, float(want.detach().abs().max()))
    atol = (1e-6 if dtype == torch.float32 else 1e-13) * scale
    tol = {"rtol": 1e-5 if dtype == torch.float32 else 1e-12, "atol": atol}
    torch.testing.assert_close(got, want, **tol)
    # the conv state is the input projection's output: spikemar.ssm.Linear's kernel (no grad)
    # and F.linear (grad) sum in other orders, so it is equal to rounding, not to the bit
    torch.testing.assert_close(got_state.conv, want_state.conv, **tol)
    torch.testing.assert_close(got_state.ssm, want_state.ssm, **tol)


DISCRETE_CASES = [(1, 2, "identity", False), (3, 1, "silu", True), (2, 4, "identity", True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("batch", "groups", "activation", "bias"), DISCRETE_CASES)
@pytest.mark.parametrize("in_place", [False, True])
def test_discrete_mixer_inference_step_equals_its_reference_step(
    monkeypatch, dtype, batch, groups, activation, bias, in_place
):
    """Llamba's mixer step in one C call (z_bias or projection biases, with or without the
    convolution's SiLU, B/C groups) equals its PyTorch step on fresh random inputs."""
    kernel_calls = watch_mixer_kernel(monkeypatch)
    g = torch.Generator().manual_seed(batch + 10 * groups)
    m = DiscreteMixer(24, d_state=8, n_qk_heads=groups, n_v_heads=8,
                      expand=2, activation=activation, bias=bias).to(dtype)  # fmt: skip
    _assert_inference_step_equals_reference(m, batch, dtype, g, kernel_calls, 1, in_place)


# batch 8 with more state values than the C step once took (2^18, single-threaded): 327,680
LARGE_MIXERS = {
    "selective": lambda: SelectiveMixer(128, d_state=160, head_dim=32, n_groups=2),
    "discrete": lambda: DiscreteMixer(128, d_state=160, n_qk_heads=2, n_v_heads=8, expand=2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", sorted(LARGE_MIXERS))
@pytest.mark.parametrize("in_place", [False, True])
def test_large_batch_takes_the_c_step_and_equals_the_reference(monkeypatch, dtype, kind, in_place):
    m = LARGE_MIXERS[kind]().to(dtype)
    assert 8 * m.state_heads * m.head_dim * m.d_state > 1 << 18
    kernel_calls = watch_mixer_kernel(monkeypatch)
    g = torch.Generator().manual_seed(8)
    _assert_inference_step_equals_reference(m, 8, dtype, g, kernel_calls, 1, in_place)


@pytest.mark.parametrize("kind", ["selective", "discrete"])
@pytest.mark.parametrize("in_place", [False, True])
def test_mixer_step_split_over_threads_anywhere_equals_one_thread(kind, in_place):
    """However many workers share the batch's channels and heads (ranges that cut through a
    sequence or a group of heads), each value is computed as on one thread, bit for bit."""
    g = torch.Generator().manual_seed(5)
    if kind == "selective":
        m = SelectiveMixer(24, d_state=8, head_dim=4, n_groups=2, dt_limit=(0.01, 0.5))
    else:
        m = DiscreteMixer(24, d_state=8, n_qk_heads=2, n_v_heads=6, expand=1, activation="silu")
    batch, H, P, N = 3, m.state_heads, m.head_dim, m.d_state
    m.double()
    s = random_state(m, batch, torch.float64, g)
    zxbcdt = torch.randn(batch, m.in_proj.out_features, generator=g, dtype=torch.float64)
    step = fast.MixerStep(*m._kernel_params(), head_dim=P, d_state=N,
                          **m._kernel_options())  # fmt: skip
    want = step(zxbcdt, s.conv, s.ssm, threads=1)
    for threads in (2, 3, 5, 7, 64):
        conv, ssm = s.conv.clone(), s.ssm.clone()
        got = step(zxbcdt, conv, ssm, in_place=in_place, threads=threads)
        for w, x in zip(want[:4], got[:4], strict=True):
            assert torch.equal(w, x), threads
        assert got[4] == want[4] == 0
        if in_place:  # written over the tensors given
            assert got[1] is conv and got[2] is ssm
        else:
            assert torch.equal(conv, s.conv) and torch.equal(ssm, s.ssm)
    assert want[2].shape == (batch, H, P, N)


def test_prepared_mixer_step_follows_its_parameters(monkeypatch):
    """The C step a mixer prepared once sees every later change of its parameters: values
    written in place (``load_state_dict``), a new dtype (``.double()``), a replaced tensor."""
    kernel_calls = watch_mixer_kernel(monkeypatch)
    torch.manual_seed(6)
    m = SelectiveMixer(16, d_state=4, head_dim=8)
    other = SelectiveMixer(16, d_state=4, head_dim=8)
    u = torch.randn(2, 16)

    def check(dtype):
        want, _ = m.step(u.to(dtype), m.init_state(2))  # autograd on: the reference
        with torch.no_grad():
            got, _ = m.step(u.to(dtype), m.init_state(2))
        torch.testing.assert_close(got, want.detach())

    check(torch.float32)
    m.load_state_dict(other.state_dict())  # in place: the same storage
    check(torch.float32)
    m.double()
    check(torch.float64)
    with torch.no_grad():
        m.A_log = nn.Parameter(m.A_log + 1)
    check(torch.float64)
    assert len(kernel_calls) == 4


def test_mixer_step_cpu_checks_its_tensors():
    m = SelectiveMixer(16, d_state=4, head_dim=8)
    s = m.init_state(2)
    c = m.conv._parameters
    params = (c["weight"], c["bias"], m.dt_bias, m.A_log, m.D)
    z = torch.randn(2, m.in_proj.out_features)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"zxbcdt, conv_state, ssm_state: .*\(2, 3, 8, 4\)"):
            fast.mixer_step_cpu(z, s.conv, s.ssm[:, :3], *params)
        with pytest.raises(ValueError, match=r"float32 tensors .* torch.float64 \(2, 4, 8, 4\)"):
            fast.mixer_step_cpu(z, s.conv, s.ssm.double(), *params)
        with pytest.raises(ValueError, match=r"D: expected a contiguous CPU torch.float32 tensor"):
            fast.MixerStep(*params[:4], torch.ones(5), head_dim=8, d_state=4)
        with pytest.raises(ValueError, match="in_place needs contiguous"):
            fast.mixer_step_cpu(z, s.conv.transpose(1, 2).contiguous().transpose(1, 2), s.ssm,
                                *params, in_place=True)  # fmt: skip
        gated, conv, ssm, _, bad = fast.mixer_step_cpu(z, s.conv, s.ssm, *params, in_place=True)
        assert conv is s.conv and ssm is s.ssm and bad == 0 and gated.shape == (2, 32)


def test_in_place_state_from_an_autograd_step_is_not_written_over():
    """A state that a step with autograd on returned is saved by that step's graph: the C step
    must not write over it (the graph's backward still gives the gradient it would have)."""
    torch.manual_seed(3)
    m = SelectiveMixer(16, d_state=4, head_dim=8)
    u = torch.randn(2, 16)
    out, state = m.step(u, m.init_state(2, in_place=True))  # autograd on
    assert state.in_place and state.ssm.requires_grad
    grads = torch.autograd.grad(out.sum(), m.A_log, retain_graph=True)[0]
    ssm = state.ssm.detach().clone()
    with torch.no_grad():
        _, after = m.step(u, state)
    assert after is not state and after.in_place  # new tensors, in place from then on
    assert torch.equal(state.ssm.detach(), ssm)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), m.A_log)[0], grads)
    with torch.no_grad():
        _, again = m.step(u, after)
    assert again is after


def test_mixer_kernel_is_not_given_tensors_of_the_wrong_shape(monkeypatch):
    m = SelectiveMixer(16, d_state=4, head_dim=8)
    state = m.init_state(2)
    u = torch.randn(2, 16)
    kernel_calls = watch_mixer_kernel(monkeypatch)
    with torch.no_grad():
        for bad in (
            MixerState(state.conv[:, :-1], state.ssm),
            MixerState(state.conv, state.ssm[:1]),
            MixerState(state.conv.double(), state.ssm),
        ):
            with pytest.raises((RuntimeError, ValueError, TypeError)):  # as the reference does
                m.step(u, bad)
            assert not kernel_calls
        m.step(u, state)
        assert len(kernel_calls) == 1
        m.D = nn.Parameter(torch.ones(3))  # nor parameters of the wrong shape
        with pytest.raises(RuntimeError):
            m.step(u, state)
        assert len(kernel_calls) == 1
        half = SelectiveMixer(16, d_state=4, head_dim=8).to(torch.bfloat16)  # nor other dtypes
        out, _ = half.step(u.bfloat16(), half.init_state(2, in_place=True))
        assert len(kernel_calls) == 1 and out.dtype == torch.bfloat16


# -- the model step -------------------------------------------------------------------------

LAYERS = ["ssm", ["ssm", "attn", "lti"]]
SPIKES = [None, SpikeConfig(T=4), SpikeConfig(T=3, tau=1.5, threshold="layer")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spikes", SPIKES)
@pytest.mark.parametrize("layers", LAYERS)
def test_inference_step_equals_the_reference_step_and_forward(layers, spikes, dtype, monkeypatch):
    kernel_calls = watch_mixer_kernel(monkeypatch)
    torch.manual_seed(1)
    m = model(dtype, layers=layers, spikes=spikes)
    tokens = torch.randint(0, 20, (2, 13))
    logits = m(tokens)
    ref_state, state = m.init_state(2), m.init_state(2)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}
    for t in range(tokens.shape[1]):
        ref_logits, ref_state = m.step(tokens[:, t], ref_state)  # autograd on: the reference
        before = len(kernel_calls)
        with torch.no_grad():
            step_logits, state = m.step(tokens[:, t], state)
        n_ssm = sum(kind == "ssm" for kind in m.config.layer_kinds())
        assert len(kernel_calls) == before + n_ssm  # the fast path ran in every SSM layer
        torch.testing.assert_close(step_logits, ref_logits, **tol)
        torch.testing.assert_close(step_logits, logits[:, t].detach(), **tol)


def test_generation_takes_the_fast_path_and_is_unchanged(monkeypatch):
    torch.manual_seed(2)
    m = model(torch.float32, spikes=SpikeConfig(T=4))
    prompt = torch.randint(0, 20, (1, 5))
    with torch.no_grad():
        want = m(prompt)[:, -1]
    out = m.generate(prompt, 6, temperature=0)
    for t in range(5, 11):
        assert torch.equal(out[:, t], m(out[:, :t])[:, -1].argmax(-1))
    no_reference_quantize(monkeypatch)
    state = m.init_state(1)
    with torch.no_grad():
        for t in range(5):
            logits, state = m.step(prompt[:, t], state)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers", LAYERS)
def test_in_place_states_step_as_new_states_do(layers):
    """``init_state(in_place=True)``: the SSM layers' states are written over and returned as
    they are, token after token, with the logits of out-of-place stepping, bit for bit; an
    out-of-place state is left as it was."""
    torch.manual_seed(4)
    m = model(torch.float32, layers=layers, spikes=SpikeConfig(T=4))
    tokens = torch.randint(0, 20, (2, 6))
    fresh, spent = m.init_state(2, in_place=True), m.init_state(2)
    start = [[t.clone() for t in (s.conv, s.ssm)] for s in spent if isinstance(s, MixerState)]
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            want, spent_next = m.step(tokens[:, t], spent)
            got, fresh_next = m.step(tokens[:, t], fresh)
            assert torch.equal(got, want)
            for a, b in zip(fresh, fresh_next, strict=True):
                assert (a is b) == isinstance(a, MixerState)
            if t == 0:  # the state stepped from out of place is still the zero state
                kept = [s for s in spent if isinstance(s, MixerState)]
                for s, (conv, ssm) in zip(kept, start, strict=True):
                    assert torch.equal(s.conv, conv) and torch.equal(s.ssm, ssm)
            spent, fresh = spent_next, fresh_next


def test_hooks_recording_and_energy_counting_work_on_the_fast_path(monkeypatch):
    """Modules are entered through ``__call__`` on every path: a forward hook fires during an
    inference step, a recording spike point records, and an energy counter counts."""
    m = model(torch.float32)
    point = m.layers[0].ffn.spike_in
    seen = []
    handle = point.register_forward_hook(lambda mod, args, out: seen.append(out))
    kernel_calls = watch_mixer_kernel(monkeypatch)
    with torch.no_grad():
        m.train(False)
        m.step(torch.tensor([3]), m.init_state(1))
    assert len(seen) == 1 and len(kernel_calls) == 3
    handle.remove()
    with torch.no_grad():
        point.record = True
        m.step(torch.tensor([3]), m.init_state(1))  # a recording point records on the fast path
        assert point.spikes is not None and point.spikes.shape == (4, 1, 32)
        point.record = False
    report = energy.profile(m, torch.tensor([[3, 4]]))  # counting still works after the fast path
    assert report.rows


@pytest.mark.parametrize("spikes", [None, SpikeConfig(T=4)])
def test_non_finite_values_raise_through_the_inference_step(monkeypatch, spikes):
    m = model(torch.float32, spikes=spikes, layers="ssm")
    # a NaN decay in layer 1: the decay check raises, unless the spike point after the scan
    # sees the NaN first
    match = r"a_t.*finite" if spikes is None else "finite"
    with torch.no_grad():
        m.layers[1].mixer.dt_bias[2] = float("nan")
        with pytest.raises(ValueError, match=match):
            m.step(torch.tensor([3, 4]), m.init_state(2))
    if spikes is None:
        return
    m = model(torch.float32, spikes=spikes)
    no_reference_quantize(monkeypatch)
    with torch.no_grad():
        m.embed.weight[3, 7] = float("nan")
        with pytest.raises(ValueError, match="finite"):
            m.step(torch.tensor([3, 4]), m.init_state(2))


def test_inference_step_checks_tokens_and_state_as_before():
    m = model()
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"\[0, 20\)"):
            m.step(torch.tensor([3, 20]), m.init_state(2))
        with pytest.raises(ValueError, match="state"):
            m.step(torch.tensor([1, 2]), [])
