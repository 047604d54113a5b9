"""The ATMN neuron and its baselines: the equations of DESIGN.md §1 are the spec."""

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given
from spikingjelly.activation_based import neuron as sj_neuron

from spikemar.neurons import (
    ATMN,
    ATan,
    ATMNParameters,
    BinaryMultiStep,
    Rectangle,
    Sigmoid,
    TernarySingleStep,
    Triangle,
    atmn_decode,
    atmn_multi_step,
    atmn_quantize,
    atmn_step,
    delta_inject,
    spike_counts,
)
from spikemar.neurons.functional import _SpikeFn

SURROGATES = [Rectangle(), Rectangle(0.4), Triangle(), Sigmoid(), Sigmoid(1.5), ATan()]
taus = st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0])
thresholds = st.floats(0.05, 3.0)


def reference_python(xs: list[float], tau: float, v: float, ternary: bool = True):
    """The equations, written out once more in plain Python for one neuron."""
    u, spikes = 0.0, []
    for x in xs:
        h = x + u / tau
        s = 1.0 if h >= v else (-1.0 if ternary and h <= -v else 0.0)
        u = h - v * s
        spikes.append(s)
    return spikes, u


# -- dynamics ------------------------------------------------------------------------------


@given(
    xs=st.lists(st.floats(-10, 10), min_size=1, max_size=12),
    tau=taus,
    v=thresholds,
    ternary=st.booleans(),
)
def test_matches_plain_python_equations(xs, tau, v, ternary):
    cls = ATMN if ternary else BinaryMultiStep
    n = cls(tau=tau, v_threshold=v, step_mode="m").double()
    x_seq = torch.tensor(xs, dtype=torch.float64).reshape(-1, 1)
    spikes = n(x_seq)
    expected, u = reference_python(xs, tau, n.v_threshold.item(), ternary)
    assert spikes.flatten().tolist() == expected
    assert n.v.item() == pytest.approx(u, abs=1e-9)


@given(
    T=st.integers(1, 10),
    tau=taus,
    v=thresholds,
    per_channel=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_delta_injection_decode_identity(T, tau, v, per_channel, seed):
    """I = V·Σ_t τ^t s_t + τ^(T−1)·u_{T−1} holds exactly (float64) for any I."""
    g = torch.Generator().manual_seed(seed)
    C = 7
    I = torch.randn(33, C, generator=g, dtype=torch.float64) * 5
    V = torch.rand(C, generator=g, dtype=torch.float64) + v if per_channel else torch.tensor(v)
    p = ATMNParameters(v_threshold=V.to(torch.float64), tau=tau)
    spikes, u = atmn_multi_step(delta_inject(I, T), None, p)
    recon = atmn_decode(spikes, p.v_threshold, tau) + tau ** (T - 1) * u
    torch.testing.assert_close(recon, I, rtol=1e-10, atol=1e-10)


@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    tau=taus,
    scale=st.floats(0.1, 100),
)
def test_spikes_are_ternary_and_keep_shape_and_dtype(shape, dtype, tau, scale):
    x_seq = (torch.randn(shape) * scale).to(dtype)
    spikes = ATMN(tau=tau, v_threshold=0.5, step_mode="m")(x_seq)
    assert spikes.shape == x_seq.shape and spikes.dtype == dtype
    assert set(spikes.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_binary_baseline_spikes_are_zero_or_one():
    spikes = BinaryMultiStep(tau=2.0, v_threshold=0.3, step_mode="m")(torch.randn(6, 500) * 3)
    assert set(spikes.unique().tolist()) == {0.0, 1.0}


@given(T=st.integers(1, 10), v=thresholds, seed=st.integers(0, 2**16))
def test_count_code_error_bound_for_tau_one(T, v, seed):
    """τ = 1: |I − decode| < V whenever |I| < (T+1)·V."""
    g = torch.Generator().manual_seed(seed)
    V = torch.tensor(v, dtype=torch.float64)
    I = (torch.rand(2000, generator=g, dtype=torch.float64) * 2 - 1) * (T + 1) * V
    decoded, spikes = atmn_quantize(I, T, ATMNParameters(v_threshold=V, tau=1.0))
    assert (I - decoded).abs().max() < V
    # and the count code is a count: the decoded value is V times the signed spike count
    torch.testing.assert_close(decoded, V * spikes.sum(0))


@given(T=st.integers(1, 8), tau=taus, per_channel=st.booleans())
def test_single_step_mode_equals_multi_step_mode(T, tau, per_channel):
    C = 5
    kw = {"num_channels": C} if per_channel else {}
    x_seq = torch.randn(T, 4, C, dtype=torch.float64) * 2
    m = ATMN(tau=tau, v_threshold=0.4, step_mode="m", **kw).double()
    s = ATMN(tau=tau, v_threshold=0.4, step_mode="s", **kw).double()
    spikes_m = m(x_seq)
    spikes_s = torch.stack([s(x_seq[t]) for t in range(T)])
    assert torch.equal(spikes_m, spikes_s)
    torch.testing.assert_close(m.v, s.v, rtol=0, atol=1e-12)


def test_functional_step_equals_multi_step():
    p = ATMNParameters(v_threshold=torch.tensor(0.3), tau=1.7)
    x_seq = torch.randn(5, 10)
    spikes, v_last = atmn_multi_step(x_seq, None, p)
    v = None
    for t in range(5):
        s, v = atmn_step(x_seq[t], v, p)
        assert torch.equal(s, spikes[t])
    assert torch.equal(v, v_last)


def test_membrane_kept_until_reset_in_single_step_mode():
    n = ATMN(tau=2.0, v_threshold=1.0)
    assert n(torch.tensor([0.6])).item() == 0  # u = 0.6
    assert n(torch.tensor([0.8])).item() == 1  # h = 0.8 + 0.3 = 1.1
    n.reset()
    assert n(torch.tensor([0.8])).item() == 0  # fresh membrane
    assert n.v.item() == pytest.approx(0.8)


def test_multi_step_state_carries_across_calls_like_spikingjelly():
    x = torch.randn(8, 20)
    n = ATMN(tau=2.0, v_threshold=0.5, step_mode="m")
    whole = n(x)
    n.reset()
    halves = torch.cat([n(x[:4]), n(x[4:])])
    assert torch.equal(whole, halves)


def test_store_v_seq_records_post_reset_membrane():
    n = ATMN(tau=2.0, v_threshold=0.5, step_mode="m", store_v_seq=True)
    x = torch.randn(6, 9)
    spikes = n(x)
    assert n.v_seq.shape == x.shape
    assert torch.equal(n.v_seq[-1], n.v)
    h0 = n.v_seq[0] + n.v_threshold * spikes[0]
    torch.testing.assert_close(h0, x[0])


def test_per_channel_threshold_equals_separate_neurons():
    C = 4
    V = torch.tensor([0.2, 0.5, 1.0, 2.0])
    x = torch.randn(6, 30, C) * 2
    together = ATMN(tau=1.5, v_threshold=V, step_mode="m")(x)
    for c in range(C):
        alone = ATMN(tau=1.5, v_threshold=V[c].item(), step_mode="m")(x[..., c])
        assert torch.equal(together[..., c], alone)


def test_ternary_single_step_is_memoryless_and_atmn_at_T_1():
    n = TernarySingleStep(0.5, step_mode="m")
    x = torch.randn(5, 100)
    expected = (x >= 0.5).float() - (x <= -0.5).float()
    assert torch.equal(n(x), expected)
    I = torch.randn(200) * 2
    single, _ = n.quantize(I, 4)
    atmn_t1, _ = ATMN(tau=2.0, v_threshold=0.5).quantize(I, 1)
    assert torch.equal(single, atmn_t1)


def test_quantize_does_not_touch_the_membrane():
    n = ATMN(tau=2.0, v_threshold=0.5)
    n(torch.ones(3))
    before = n.v.clone()
    n.quantize(torch.randn(3), 4)
    assert torch.equal(n.v, before)


# -- the real peer: SpikingJelly ------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 1.25, 2.0, 4.0])
def test_equals_spikingjelly_ternary_neuron(tau):
    """ATMN's u/τ carry-over is SpikingJelly's charge with decay_input=False and soft reset:
    h = v + x − v/τ_sj, so τ_sj = τ/(τ−1) (and TernaryIFNode for τ = 1)."""
    kw = {"v_threshold": 0.7, "v_reset": None, "step_mode": "m"}
    if tau == 1.0:
        peer = sj_neuron.TernaryIFNode(**kw)
    else:
        peer = sj_neuron.TernaryLIFNode(tau=tau / (tau - 1), decay_input=False, **kw)
    ours = ATMN(tau=tau, v_threshold=0.7, step_mode="m")
    x = torch.randn(8, 3000, dtype=torch.float64)
    assert torch.equal(peer.double()(x), ours.double()(x))
    # both hold V = 0.7 rounded through float32 (ours as a = log V), so the membranes differ there
    torch.testing.assert_close(peer.v, ours.v, rtol=0, atol=1e-6)


def test_input_gradient_equals_spikingjelly_for_unit_threshold():
    """With V = 1 our threshold-relative surrogate is SpikingJelly's absolute one."""
    from spikingjelly.activation_based import surrogate

    peer = sj_neuron.TernaryIFNode(
        v_threshold=1.0, v_reset=None, step_mode="m", surrogate_function=surrogate.Sigmoid(4.0)
    )
    ours = ATMN(tau=1.0, v_threshold=1.0, surrogate=Sigmoid(4.0), step_mode="m")
    x1 = (torch.randn(6, 500, dtype=torch.float64) * 2).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    w = torch.randn(6, 500, dtype=torch.float64)
    (peer.double()(x1) * w).sum().backward()
    (ours.double()(x2) * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


# -- surrogate gradients --------------------------------------------------------------------


@pytest.mark.parametrize("surrogate", SURROGATES, ids=repr)
@pytest.mark.parametrize("ternary", [True, False])
def test_spike_backward_is_the_derivative_of_the_primitive(surrogate, ternary):
    """The hard firing function's backward equals autograd of its smooth primitive at the same
    membrane and threshold, for input and threshold."""
    h = (torch.randn(400, 3, dtype=torch.float64) * 2).requires_grad_()
    V = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64, requires_grad=True)
    w = torch.randn(400, 3, dtype=torch.float64)
    grads_hard = torch.autograd.grad((_SpikeFn.apply(h, V, surrogate, ternary) * w).sum(), (h, V))
    p = ATMNParameters(v_threshold=V, surrogate=surrogate, ternary=ternary, smooth=True)
    from spikemar.neurons.functional import spike_function

    grads_smooth = torch.autograd.grad((spike_function(h, p) * w).sum(), (h, V))
    for a, b in zip(grads_hard, grads_smooth, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("kind", "name"), [(Rectangle, "width"), (Triangle, "width"),
                                            (Sigmoid, "alpha"), (ATan, "alpha")])  # fmt: skip
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf, "2"])
def test_surrogate_parameters_must_be_finite_and_positive(kind, name, value):
    with pytest.raises(ValueError, match=rf"^{name}: expected a finite number > 0, got "):
        kind(value)
    assert getattr(kind(0.25), name) == 0.25


@pytest.mark.parametrize("surrogate", [Sigmoid(), ATan(), Triangle(2.0)], ids=repr)
@pytest.mark.parametrize("per_channel", [False, True])
def test_gradcheck_through_the_micro_steps(surrogate, per_channel):
    """gradcheck of the whole BPTT chain (input, initial membrane, threshold) in float64, with the
    smooth primitive in the forward pass so that finite differences see what the surrogate says."""
    T, N, C = 4, 3, 2
    x = torch.randn(T, N, C, dtype=torch.float64, requires_grad=True)
    v0 = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    V = (torch.rand(C if per_channel else (), dtype=torch.float64) + 0.5).requires_grad_()

    def run(x, v0, V):
        p = ATMNParameters(v_threshold=V, tau=1.7, surrogate=surrogate, smooth=True)
        spikes, v = atmn_multi_step(x, v0, p, backend="torch", validate=False)
        return spikes, v

    assert torch.autograd.gradcheck(run, (x, v0, V))


def test_detach_reset_changes_gradients_not_spikes():
    x = (torch.randn(6, 200) * 2).requires_grad_()
    w = torch.randn(6, 200)
    results = []
    for detach in (False, True):
        n = ATMN(tau=2.0, v_threshold=0.5, detach_reset=detach, step_mode="m")
        spikes = n(x)
        (grad,) = torch.autograd.grad((spikes * w).sum(), x)
        results.append((spikes, grad))
    assert torch.equal(results[0][0], results[1][0])
    assert not torch.allclose(results[0][1], results[1][1])
    # the last micro-step has no reset after it that could matter: its input gradient agrees
    torch.testing.assert_close(results[0][1][-1], results[1][1][-1])


def test_threshold_gradient_reaches_log_threshold_parameter():
    n = ATMN(tau=2.0, v_threshold=0.5, num_channels=3, step_mode="m")
    x = torch.randn(4, 50, 3) * 2
    spikes = n(x)
    (spikes * torch.randn_like(spikes)).sum().backward()
    assert n.a.grad is not None and n.a.grad.shape == (3,)
    assert torch.all(n.a.grad != 0)


def test_fixed_threshold_is_a_buffer():
    n = ATMN(tau=2.0, v_threshold=0.5, learnable_threshold=False)
    assert list(n.parameters()) == []
    assert "a" in dict(n.named_buffers())


def test_atmn_trains_a_tiny_classifier():
    """A SpikingJelly user drops ATMN into a network and trains it: the loss falls."""
    torch.manual_seed(1)
    x = torch.randn(256, 8)
    y = (x[:, :4].sum(1) > x[:, 4:].sum(1)).long()
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 32),
        ATMN(tau=2.0, v_threshold=0.3, num_channels=32),
        torch.nn.Linear(32, 2),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)

    def loss_fn():
        out = 0
        for _ in range(4):  # four time steps of a constant input, SpikingJelly style
            out = out + net(x)
        net[1].reset()
        return torch.nn.functional.cross_entropy(out / 4, y)

    first = loss_fn().item()
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first


# -- public contract and bad input ------------------------------------------------------------


def test_public_contract():
    x_seq = torch.randn(4, 2, 3, dtype=torch.float64)
    n = ATMN(tau=2.0, v_threshold=0.5, step_mode="m")
    spikes = n(x_seq)
    assert spikes.shape == x_seq.shape and spikes.dtype == x_seq.dtype
    assert spikes.device == x_seq.device
    assert isinstance(n.v_threshold, torch.Tensor)
    assert n.v_threshold.item() == pytest.approx(0.5)
    assert n.tau == 2.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"v_threshold": 0.0}, "v_threshold"),
        ({"v_threshold": -0.5}, "v_threshold"),
        ({"v_threshold": float("nan")}, "v_threshold"),
        ({"v_threshold": float("inf")}, "v_threshold"),
        ({"v_threshold": torch.tensor([0.5, -1.0])}, "v_threshold"),
        ({"v_threshold": torch.ones(2, 2)}, "v_threshold"),
        ({"num_channels": 0}, "num_channels"),
        ({"surrogate": "nope"}, "surrogate"),
        ({"backend": "nope"}, "backend"),
        ({"step_mode": "x"}, "step_mode"),
    ],
)
def test_bad_construction_names_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ATMN(**kwargs)


def test_non_floating_input_is_rejected():
    with pytest.raises(TypeError, match=r"x_seq.*floating"):
        ATMN(step_mode="m")(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"x.*floating"):
        ATMN(step_mode="s")(torch.ones(3, dtype=torch.int32))


def test_wrong_rank_for_step_mode_is_rejected():
    with pytest.raises(ValueError, match=r"x_seq.*step_mode='m'.*\[T, N"):
        ATMN(step_mode="m")(torch.ones(5))
    with pytest.raises(ValueError, match=r"x.*step_mode='s'"):
        ATMN(step_mode="s")(torch.tensor(1.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("cls", [ATMN, BinaryMultiStep, TernarySingleStep])
def test_non_finite_input_is_rejected_and_state_is_kept(bad, cls):
    n = cls(v_threshold=0.5, step_mode="m")
    n(torch.ones(2, 3))
    before = n.v.clone()
    x = torch.randn(4, 3)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"x_seq.*finite"):
        n(x)
    assert torch.equal(n.v, before)


def test_per_channel_mismatch_is_rejected():
    with pytest.raises(ValueError, match=r"last dimension 4.*3 per-channel"):
        ATMN(num_channels=3, step_mode="m")(torch.ones(2, 5, 4))


def test_batch_change_without_reset_is_rejected():
    n = ATMN(step_mode="m")
    n(torch.ones(2, 5))
    with pytest.raises(ValueError, match="reset"):
        n(torch.ones(2, 6))


@pytest.mark.parametrize("T", [0, -1, 2.0, True])
def test_bad_micro_step_count_is_rejected(T):
    with pytest.raises(ValueError, match="T"):
        delta_inject(torch.ones(3), T)


def test_ternary_single_step_has_no_tau():
    with pytest.raises(TypeError, match="tau"):
        TernarySingleStep(tau=2.0)
    assert math.isinf(TernarySingleStep().tau)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_functional_rejects_a_bad_threshold(bad, backend):
    p = ATMNParameters(v_threshold=torch.tensor([0.5, bad]), tau=2.0)
    with pytest.raises(ValueError, match="v_threshold"):
        atmn_multi_step(torch.randn(3, 4, 2), None, p, backend=backend)


def test_half_precision_decode_does_not_overflow_for_many_micro_steps():
    n = ATMN(tau=2.0, v_threshold=0.01)
    x = torch.tensor([0.3, -0.2, 0.0])
    full, _ = n.quantize(x, 17)
    half, _ = n.quantize(x.half(), 17)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), full, rtol=1e-3, atol=1e-3)


def test_empty_time_axis_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"x_seq: expected at least one micro-step"):
        ATMN(step_mode="m")(torch.zeros(0, 3))


@pytest.mark.parametrize("cls", [ATMN, BinaryMultiStep, TernarySingleStep])
def test_modules_default_to_the_fast_backend_and_expose_read_only_properties(cls):
    n = cls(v_threshold=0.5, num_channels=3)
    assert n.backend == "auto"  # the reference is one argument away: backend='torch'
    assert n.ternary is (cls is not BinaryMultiStep)
    assert n.log_threshold is n.a and isinstance(n.log_threshold, torch.nn.Parameter)
    torch.testing.assert_close(n.log_threshold.exp(), n.v_threshold)
    fixed = cls(v_threshold=0.5, learnable_threshold=False)
    assert fixed.log_threshold is fixed.a and not fixed.log_threshold.requires_grad
    for name in ("ternary", "log_threshold"):
        with pytest.raises(AttributeError):
            setattr(n, name, None)


# -- bad input at the public API: one clear error naming the argument ---------------------------

_P = ATMNParameters(torch.tensor(0.5))


def _diverged_neuron():
    n = ATMN(step_mode="m", num_channels=4)
    with torch.no_grad():
        n.a[1] = float("inf")  # what an update with --lr inf leaves behind
    return n


BAD_INPUTS = {
    # validate=False skips value scans only: shapes are still checked before any kernel runs
    "membrane of the wrong size, no validation": (
        lambda b: atmn_multi_step(
            torch.randn(3, 10), torch.zeros(5), _P, backend=b, validate=False
        ),
        ValueError,
        r"^v: expected the membrane shape \(10,\)",
    ),
    "threshold of the wrong length, no validation": (
        lambda b: atmn_multi_step(
            torch.randn(3, 10), None, ATMNParameters(torch.ones(4)), backend=b, validate=False
        ),
        ValueError,
        r"^x_seq: last dimension 10 does not match the 4 per-channel",
    ),
    "membrane on another dtype kind": (
        lambda b: atmn_multi_step(
            torch.randn(3, 4), torch.zeros(4, dtype=torch.int64), _P, backend=b
        ),
        TypeError,
        r"^v: expected None or a floating-point tensor",
    ),
    "membrane not a tensor": (
        lambda b: atmn_multi_step(torch.randn(3, 4), [0.0] * 4, _P, backend=b),
        TypeError,
        r"^v: expected None",
    ),
    "parameters not ATMNParameters": (
        lambda b: atmn_multi_step(torch.randn(3, 4), None, (torch.tensor(1.0), 2.0), backend=b),
        TypeError,
        r"^p: expected ATMNParameters",
    ),
    "meta tensor": (
        lambda b: atmn_multi_step(torch.empty(3, 4, device="meta"), None, _P, backend=b),
        ValueError,
        r"^x_seq: expected a tensor with data, got a meta tensor",
    ),
    "absurd T": (
        lambda b: atmn_quantize(torch.randn(3, 10), 10**12, _P, backend=b),
        ValueError,
        r"^T: 1000000000000 micro-steps .* GiB",
    ),
    "T not an int": (
        lambda b: atmn_quantize(torch.randn(3, 10), 4.0, _P, backend=b),
        ValueError,
        r"^T: expected an int >= 1",
    ),
    "quantize of a non-tensor": (
        lambda b: atmn_quantize([1.0, 2.0], 4, _P, backend=b),
        TypeError,
        r"^activation: expected a torch.Tensor",
    ),
    "quantize with a mismatched per-channel threshold": (
        lambda b: atmn_quantize(torch.randn(3, 10), 4, ATMNParameters(torch.ones(3)), backend=b),
        ValueError,
        r"^activation: last dimension 10 does not match the 3",
    ),
    "decode with tau 0": (
        lambda b: atmn_decode(torch.zeros(3, 4), torch.tensor(0.5), 0.0),
        ValueError,
        r"^tau: expected a float > 0",
    ),
    "decode with negative tau": (
        lambda b: atmn_decode(torch.zeros(3, 4), 0.5, -2.0),
        ValueError,
        r"^tau: expected a float > 0",
    ),
    "decode with a threshold of the wrong length": (
        lambda b: atmn_decode(torch.zeros(3, 4), torch.ones(5), 2.0),
        ValueError,
        r"^v_threshold: 5 per-channel thresholds do not match",
    ),
    "decode with a string threshold": (
        lambda b: atmn_decode(torch.zeros(3, 4), "0.5", 2.0),
        TypeError,
        r"^v_threshold: expected a float or a 0-d / 1-d tensor",
    ),
    "spike counts of a non-tensor": (
        lambda b: spike_counts([1.0, 0.0, -1.0]),
        TypeError,
        r"^spikes: expected a torch.Tensor",
    ),
    "spike counts of a 0-d tensor": (
        lambda b: spike_counts(torch.tensor(1.0)),
        ValueError,
        r"^spikes: expected a tensor \[T, \.\.\., C\], got shape \(\)",
    ),
    "parameters with an unknown surrogate name": (
        lambda b: ATMNParameters(torch.tensor(1.0), surrogate="nope"),
        ValueError,
        r"^surrogate: expected one of",
    ),
    "parameters with a surrogate of the wrong type": (
        lambda b: ATMNParameters(torch.tensor(1.0), surrogate=3),
        ValueError,
        r"^surrogate: expected one of",
    ),
    "parameters with tau 0": (
        lambda b: ATMNParameters(torch.tensor(1.0), tau=0.0),
        ValueError,
        r"^tau: expected a float > 0",
    ),
    "parameters with a 2-d threshold": (
        lambda b: ATMNParameters(torch.ones(2, 2)),
        ValueError,
        r"^v_threshold: expected a floating-point scalar or 1-d",
    ),
    "parameters with an integer threshold tensor": (
        lambda b: ATMNParameters(torch.tensor(1)),
        ValueError,
        r"^v_threshold: expected a floating-point scalar or 1-d",
    ),
    "tau < 1 overflows the membrane from finite input": (
        lambda b: ATMN(tau=0.1, step_mode="m", backend=b)(torch.full((200, 4), 0.5)),
        ValueError,
        r"^tau: the membrane overflowed float32 over the T = 200 .* tau = 0\.1 < 1",
    ),
    "a threshold driven to inf by an update": (
        lambda b: _diverged_neuron().to(torch.float32)(torch.randn(2, 3, 4)),
        ValueError,
        r"^v_threshold became inf during training .*diverged update",
    ),
    "a threshold driven to inf, quantize": (
        lambda b: _diverged_neuron().quantize(torch.randn(3, 4), 4),
        ValueError,
        r"^v_threshold became inf during training",
    ),
}


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_error_naming_the_argument(case, backend):
    call, error, match = BAD_INPUTS[case]
    with pytest.raises(error, match=match):
        call(backend)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_threshold_driven_to_zero_is_reported_as_diverged(backend):
    n = ATMN(step_mode="m", backend=backend)
    with torch.no_grad():
        n.a.fill_(-1e4)  # exp underflows to 0
    with pytest.raises(ValueError, match=r"^v_threshold became 0\.0 during training"):
        n(torch.randn(2, 3))
    # the functional form blames its argument instead
    with pytest.raises(ValueError, match=r"^v_threshold: expected finite values > 0, got \[0\.0\]"):
        atmn_multi_step(torch.randn(2, 3), None, ATMNParameters(torch.tensor(0.0)), backend=backend)


def test_decode_takes_a_float_threshold_and_equals_the_tensor_form():
    spikes = torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    for tau in (1.0, 1.5, 2.0, math.inf):
        assert torch.equal(
            atmn_decode(spikes, 0.5, tau), atmn_decode(spikes, torch.tensor(0.5), tau)
        )
    expected = 0.5 * (spikes[0] + 1.5 * spikes[1] + 2.25 * spikes[2])
    torch.testing.assert_close(atmn_decode(spikes, 0.5, 1.5), expected)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_a_spike_point_with_a_diverged_threshold_says_so(grad, backend):
    """MAR's spike points (fused C paths included) blame the update, not an argument."""
    from spikemar.models.common import SpikeConfig, SpikePoint

    point = SpikePoint(8, SpikeConfig(T=4, backend=backend))
    with torch.no_grad():
        point.neuron.a[2] = float("nan")  # what an update with --lr inf leaves behind
    x = torch.randn(3, 8, requires_grad=grad)
    with pytest.raises(ValueError, match=r"^v_threshold became nan during training"):
        point(x)


def test_decode_is_not_rounded_by_autocast():
    """bf16 autocast would round the decode's contraction: τ = 2, T = 12 needs 12 bits."""
    g = torch.Generator().manual_seed(0)
    spikes = torch.randint(-1, 2, (12, 64, 8), generator=g).float()
    exact = atmn_decode(spikes, 0.5, 2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = atmn_decode(spikes, 0.5, 2.0)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, exact)


def test_a_neuron_error_leaves_a_named_deferred_error_for_the_next_read():
    """raise_deferred_errors reads all flags of a device at once; when it raises a neuron's
    error, a named check's flag stays set and is raised by the next read."""
    from spikemar.neurons import checks, raise_deferred_errors

    raise_deferred_errors()  # nothing pending from other tests
    flag = torch.tensor(True)
    checks.defer(torch.tensor(False), flag, flag)  # a NaN input seen
    checks.defer_error(torch.tensor(True), "tokens: a named check")
    with pytest.raises(ValueError, match="x_seq: a spiking neuron"):
        raise_deferred_errors()
    with pytest.raises(ValueError, match="tokens: a named check"):
        raise_deferred_errors()
    raise_deferred_errors()  # both cleared
