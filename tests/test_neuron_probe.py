"""The ATMN module as a SpikingJelly / norse user drives it from outside: edge cases found by
probing the public API (each test failed before its fix)."""

import math

import pytest
import torch
from spikingjelly.activation_based import functional as sj_functional

from spikemar.neurons import (
    ATMN,
    ATan,
    ATMNParameters,
    Rectangle,
    Sigmoid,
    Triangle,
    atmn_multi_step,
    atmn_quantize,
    backends,
    cpu_backend,
)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_torch_compile_runs_the_module_as_eager(backend):
    # a graph break inside atmn_multi_step (the backend's call, the value check's .tolist())
    # once handed the rest of the function an empty ATMNParameters: IndexError on p.tau
    torch._dynamo.reset()
    x_seq = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    eager = ATMN(v_threshold=0.4, num_channels=5, step_mode="m", backend=backend)
    compiled = ATMN(v_threshold=0.4, num_channels=5, step_mode="m", backend=backend)
    xe, xc = x_seq.clone().requires_grad_(), x_seq.clone().requires_grad_()
    weights = torch.arange(x_seq.numel(), dtype=torch.float32).view_as(x_seq)
    se, sc = eager(xe), torch.compile(compiled, backend="eager")(xc)
    (se * weights).sum().backward()
    (sc * weights).sum().backward()
    assert torch.equal(se, sc)
    assert torch.equal(eager.v, compiled.v)
    torch.testing.assert_close(xe.grad, xc.grad)
    torch.testing.assert_close(eager.a.grad, compiled.a.grad)


def test_v_seq_follows_spikingjelly_reset_detach_and_single_step():
    # SpikingJelly 2.0's neurons forget v_seq on reset(), detach it in detach() (TBPTT through
    # detach_net) and record it step by step in 's' mode; ATMN kept a stale, attached record
    x_seq = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(1))
    n = ATMN(v_threshold=0.4, step_mode="m", store_v_seq=True)
    n(x_seq.clone().requires_grad_())
    assert n.v_seq.requires_grad
    sj_functional.detach_net(n)
    assert not n.v_seq.requires_grad
    sj_functional.reset_net(n)
    assert n.v_seq is None

    stepped = ATMN(v_threshold=0.4, step_mode="s", store_v_seq=True)
    for t in range(4):
        stepped(x_seq[t])
    n(x_seq)
    assert torch.equal(stepped.v_seq, n.v_seq)
    stepped(x_seq[0].double())  # a new dtype restarts the record, as SpikingJelly's does
    assert stepped.v_seq.shape == (1, 3, 5) and stepped.v_seq.dtype == torch.float64
    stepped.reset()
    assert stepped.v_seq is None


@pytest.mark.parametrize("surrogate", [Rectangle, Triangle, Sigmoid, ATan])
def test_surrogate_refuses_a_bool_shape_parameter(surrogate):
    # tau, T and v_threshold refuse bools; a surrogate took True as a width/alpha of 1
    with pytest.raises(ValueError, match=r"(width|alpha): expected a finite number > 0, got True"):
        surrogate(True)


def test_a_neuron_built_on_meta_prints_and_materialises():
    # repr read V with .item() (no value on meta); to_empty() passed torch's `recurse`, which
    # SpikingJelly's MemoryModule._apply does not take
    with torch.device("meta"):
        shared, per_channel = ATMN(step_mode="m"), ATMN(num_channels=3, step_mode="m")
    assert "v_threshold=meta" in repr(shared)
    assert "per-channel[3]" in repr(per_channel)
    shared.to_empty(device="cpu")
    shared.load_state_dict(ATMN(v_threshold=0.5).state_dict())
    x_seq = torch.full((2, 4, 3), 0.75)
    assert torch.equal(shared(x_seq), ATMN(v_threshold=0.5, step_mode="m")(x_seq))


def test_the_reference_backend_cannot_be_replaced():
    # unregister_backend refuses 'torch', so a register_backend('torch', ...) was a permanent,
    # silent swap of the reference every parity test and 'auto' fallback relies on
    reference = backends.get_backend("torch")
    with pytest.raises(ValueError, match="name: 'torch' is the reference backend"):
        backends.register_backend("torch", lambda x_seq, v, p, return_v_seq: None)
    assert backends.get_backend("torch") is reference


def test_a_per_channel_threshold_of_no_channels_is_refused():
    # the fused CPU kernel read an empty [0] threshold as a shared V (C = 0) and crashed the
    # process reading it; the reference failed deep inside aminmax
    message = r"v_threshold: expected at least one per-channel value, got shape \(0,\)"
    with pytest.raises(ValueError, match=message):
        ATMN(v_threshold=torch.tensor([]))
    with pytest.raises(ValueError, match=message):
        ATMNParameters(torch.ones(0))
    emptied = ATMNParameters(1.0)._replace(v_threshold=torch.ones(0))  # _replace skips checks
    with pytest.raises(ValueError, match=message):
        atmn_multi_step(torch.randn(2, 3, 0), None, emptied, backend="torch")


def test_a_surrogate_set_after_construction_is_checked_when_set():
    # ATMN(surrogate='sigmoid') takes a name; `neuron.surrogate = 'sigmoid'` stored the string,
    # the forward ran, and the backward failed with AttributeError inside autograd
    n = ATMN(step_mode="m", backend="torch")
    n.surrogate = "sigmoid"
    assert n.surrogate == Sigmoid()
    x_seq = torch.randn(3, 4, requires_grad=True)
    n(x_seq).sum().backward()
    assert x_seq.grad is not None
    with pytest.raises(ValueError, match="surrogate: expected one of"):
        n.surrogate = "foo"
    bad = ATMNParameters(1.0)._replace(surrogate="atan")  # _replace skips the checks
    with pytest.raises(TypeError, match=r"surrogate: expected a spikemar\.neurons\.surrogate"):
        atmn_multi_step(torch.randn(2, 3), None, bad, backend="torch")


def test_the_fused_quantize_refuses_what_its_kernel_cannot_read():
    # a float16 activation had float32 decodes written into its half-size buffer (heap
    # corruption, an abort later); a per-channel mismatch decoded with the wrong thresholds
    if not cpu_backend.usable():
        pytest.skip("no C compiler for the CPU kernel")
    with pytest.raises(TypeError, match="activation: expected a float32 or float64 CPU tensor"):
        cpu_backend.atmn_quantize_decode_cpu(torch.randn(4, 6).half(), 3, ATMNParameters(1.0))
    with pytest.raises(ValueError, match="does not match the 3 per-channel thresholds"):
        cpu_backend.atmn_quantize_train_cpu(torch.randn(4, 5), 3, ATMNParameters(torch.ones(3)))
    x = torch.randn(4, 6, dtype=torch.float64)
    p = ATMNParameters(torch.rand(6, dtype=torch.float64) + 0.2, 1.5)
    decoded = cpu_backend.atmn_quantize_decode_cpu(x, 3, p)
    assert torch.equal(decoded, atmn_quantize(x, 3, p, backend="torch")[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("v", [1e5, 1e-8])
@pytest.mark.parametrize("tau", [math.inf, 2.0])
def test_a_threshold_half_types_cannot_hold_is_valid_for_half_inputs(dtype, v, tau):
    # the membrane of a half input runs in float32, so V = 1e5 (> float16's max) and 1e-8
    # (< its smallest subnormal) are valid; the value check cast V to the input's dtype (τ = ∞)
    # and refused both as inf / 0
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    p = ATMNParameters(torch.tensor(v), tau=tau)
    want, _ = atmn_multi_step(x.to(dtype).float(), None, p, backend="torch")
    got, _ = atmn_multi_step(x.to(dtype), None, p, backend="torch")
    assert torch.equal(got.float(), want)


def test_the_reference_quantize_of_a_float16_activation_has_finite_gradients():
    # V·τ^t reaches 3^16 ≈ 4.3e7 at T = 17: the decode's gradient to a float16 spike train
    # overflowed (NaN for every input and V) where the fused kernels stay in float32
    x0 = 2 * torch.randn(64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(64, generator=torch.Generator().manual_seed(2))
    grads = {}
    for dtype in (torch.float16, torch.float32):
        x = x0.to(torch.float16).to(dtype).requires_grad_()
        a = torch.tensor(0.0, requires_grad=True)
        decoded, spikes = atmn_quantize(x, 17, ATMNParameters(a.exp(), tau=3.0), backend="torch")
        assert decoded.dtype == spikes.dtype == dtype
        (decoded.float() * w).sum().backward()
        grads[dtype] = x.grad.float(), a.grad
    (gx16, ga16), (gx32, ga32) = grads[torch.float16], grads[torch.float32]
    assert torch.isfinite(gx16).all() and gx16.abs().max() > 0
    torch.testing.assert_close(gx16, gx32, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(ga16, ga32, rtol=2e-3, atol=0)
