"""No host syncs on the neurons' hot paths for CUDA inputs (issue 18 item 3), checked on the CPU.

A CUDA host sync is a value read back to the host (``.item()``, ``.tolist()``, ``bool(t)``,
``float(t)``, ``.cpu()``, ``.numpy()``) or a tensor built from host data on the device
(``torch.tensor(..., device='cuda')``, a pageable copy that waits). Tensors of ``_FakeCuda``
live in CPU memory but say they are on ``cuda:0``; any of those operations on them, or that
constructor, counts as a sync. The code under test takes its CUDA branches (``x.is_cuda``,
``x.device.type == 'cuda'``) as it would on a GPU.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from torch.overrides import TorchFunctionMode

from spikemar.neurons import (
    ATMN,
    ATMNParameters,
    atmn_decode,
    atmn_multi_step,
    checks,
    cuda_emulation,
    cupy_backend,
    raise_deferred_errors,
    value_checks,
)

CUDA = torch.device("cuda", 0)
_SYNC_METHODS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
}


_DEVICE_GET = torch.Tensor.device.__get__
_IS_CUDA_GET = torch.Tensor.is_cuda.__get__
_IS_CPU_GET = torch.Tensor.is_cpu.__get__


class _Syncs:
    """What the fake device saw: the syncs, by name, in order."""

    def __init__(self) -> None:
        self.seen: list[str] = []


_SYNCS = _Syncs()


def _to_cpu(value):
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    return value


class _FakeCuda(torch.Tensor):
    """A CPU tensor that reports itself on cuda:0 and records host syncs."""

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == _DEVICE_GET:  # property getters arrive as new method-wrappers: compare by ==
            return CUDA
        if func == _IS_CUDA_GET:
            return True
        if func == _IS_CPU_GET:
            return False
        if func in _SYNC_METHODS:
            _SYNCS.seen.append(func.__name__)
        if func is torch.Tensor.to:  # .to(cuda) of a tensor "on" cuda: stay in CPU memory
            args = tuple(_to_cpu(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        return super().__torch_function__(func, types_, args, kwargs)


class _FakeCudaFactories(TorchFunctionMode):
    """Factory calls with ``device='cuda'`` make fake-CUDA tensors; ``torch.tensor`` from host
    data onto the device is a sync."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        on_cuda = _to_cpu(device) is not device
        if on_cuda and func in (torch.tensor, torch.as_tensor):
            _SYNCS.seen.append(f"{func.__name__}(..., device=cuda)")
        if on_cuda:
            kwargs["device"] = _to_cpu(device)
        out = func(*args, **kwargs)
        if on_cuda and isinstance(out, torch.Tensor) and not isinstance(out, _FakeCuda):
            out = out.as_subclass(_FakeCuda)
        return out


def fake_cuda(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().as_subclass(_FakeCuda)
    return out.requires_grad_(t.requires_grad)


@contextlib.contextmanager
def watching_syncs():
    _SYNCS.seen.clear()
    with _FakeCudaFactories():
        yield _SYNCS.seen


@pytest.fixture(autouse=True)
def fresh_flags(monkeypatch):
    # the deferred flags of the fake device must not outlive the test (a GPU run shares cuda:0)
    monkeypatch.setattr(checks, "_flags", {})
    monkeypatch.setattr(checks, "_named", {})


def test_the_detector_sees_syncs():
    x = fake_cuda(torch.randn(4, 3))
    assert x.device == CUDA and x.is_cuda
    with watching_syncs() as seen:
        x.sum().item()
        torch.tensor([1.0, 2.0], device=x.device)
        bool((x > 0).any())
    assert seen == ["item", "tensor(..., device=cuda)", "__bool__"]


def test_eager_value_checks_on_cuda_sync_once_per_call():
    """The default mode reads the extremes back once per call: what 'deferred' avoids."""
    x = fake_cuda(torch.randn(4, 3, 5))
    p = ATMNParameters(fake_cuda(torch.tensor(0.5)))
    with watching_syncs() as seen:
        atmn_multi_step(x, None, p, backend="torch")
    assert seen == ["tolist"]


@pytest.mark.parametrize("mode", ["deferred", "off"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_multi_step_and_decode_hold_no_sync_with_deferred_checks(mode, per_channel):
    V = torch.rand(5) + 0.3 if per_channel else torch.tensor(0.5)
    x = fake_cuda(torch.randn(4, 3, 5).requires_grad_())
    p = ATMNParameters(fake_cuda(V.requires_grad_()), tau=1.5)
    with watching_syncs() as seen, value_checks(mode):
        spikes, v = atmn_multi_step(x, fake_cuda(torch.zeros(3, 5)), p, backend="torch")
        decoded = atmn_decode(spikes, p.v_threshold, 1.5)
        decoded_inf = atmn_decode(spikes, 0.5, float("inf"))  # a float threshold too
        (decoded.sum() + decoded_inf.sum() + v.sum()).backward()
    assert seen == []
    with watching_syncs() as seen:
        raise_deferred_errors()  # nothing was wrong: reads the flag once, raises nothing
    assert seen == (["tolist"] if mode == "deferred" else [])


def test_module_forward_and_quantize_hold_no_sync_with_deferred_checks():
    n = ATMN(tau=1.0, v_threshold=0.5, num_channels=5, step_mode="m", backend="torch")
    n.a.data = fake_cuda(n.a.data)
    x = fake_cuda(torch.randn(4, 3, 5))
    with watching_syncs() as seen, value_checks("deferred"):
        n(x)
        n(x)  # the membrane carried over
        n.quantize(fake_cuda(torch.randn(3, 5)), 4)
    assert seen == []


def test_deferred_checks_raise_after_the_step():
    x = torch.randn(4, 3)
    x[2, 1] = float("nan")
    p = ATMNParameters(fake_cuda(torch.tensor(0.5)))
    with value_checks("deferred"):
        atmn_multi_step(fake_cuda(x), None, p, backend="torch")  # no error yet
    with pytest.raises(ValueError, match=r"^x_seq: .* NaN or inf"):
        raise_deferred_errors()
    raise_deferred_errors()  # the flag was cleared
    bad = ATMNParameters(fake_cuda(torch.tensor(float("inf"))))
    with value_checks("deferred"):
        atmn_multi_step(fake_cuda(torch.randn(4, 3)), None, bad, backend="torch")
    with pytest.raises(ValueError, match=r"^v_threshold: .* not finite"):
        raise_deferred_errors()


def test_value_check_mode_is_checked_and_restored():
    with pytest.raises(ValueError, match=r"^mode: expected one of"):
        with value_checks("later"):
            pass
    with value_checks("off"):
        assert checks.get_value_checks() == "off"
    assert checks.get_value_checks() == "eager"


@pytest.mark.skipif(
    cuda_emulation.emulation_unavailable_reason() is not None,
    reason=f"emulation: {cuda_emulation.emulation_unavailable_reason()}",
)
def test_cupy_backend_holds_no_sync(tmp_path_factory, monkeypatch):
    """The fused CUDA path end to end (host code, kernels emulated): forward and backward."""
    import sys

    build_dir = tmp_path_factory.getbasetemp() / "cuda_emulation"  # shared: keyed by source
    monkeypatch.setitem(sys.modules, "cupy", cuda_emulation.EmulatedCupy(build_dir))
    monkeypatch.setattr(cupy_backend, "_modules", {})
    monkeypatch.setattr(cupy_backend, "_functions", {})
    # torch's stream query needs a CUDA build; the stream is all it gives the launch
    stream = types.SimpleNamespace(cuda_stream=777)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    x = fake_cuda(torch.randn(4, 3, 5).requires_grad_())
    p = ATMNParameters(fake_cuda((torch.rand(5) + 0.3).requires_grad_()), tau=1.5)
    reference = atmn_multi_step(x.as_subclass(torch.Tensor), None, p, backend="torch")[0]
    with watching_syncs() as seen, value_checks("deferred"):
        spikes, v = cupy_backend.atmn_multi_step_cupy(x, None, p, False)[:2]
        (spikes.sum() + v.sum()).backward()
        # the fused spike point with its spike counts (an energy counter's input)
        decoded, counts = cupy_backend.atmn_quantize_cupy(x[0], 4, p, counts=True)
        decoded.sum().backward()
    assert seen == []
    assert counts.device == x.device and counts.shape == (5, 2)
    assert torch.equal(spikes.as_subclass(torch.Tensor), reference.as_subclass(torch.Tensor))
    # every launch names its stream as CuPy's stream= argument (the deprecated
    # cupy.cuda.ExternalStream warned at every launch in CuPy 14): torch's current stream (the
    # backward's saved tensors lose the fake-CUDA subclass here, so their launches say 0)
    streams = {fn.name: fn.streams for fn in sys.modules["cupy"].functions}
    assert all(s == [777] for name, s in streams.items() if "_forward_" in name), streams
    assert len(streams) == 4 and all(None not in s for s in streams.values()), streams


needs_emulation = pytest.mark.skipif(
    cuda_emulation.emulation_unavailable_reason() is not None,
    reason=f"emulation: {cuda_emulation.emulation_unavailable_reason()}",
)


def _emulate_cupy(tmp_path_factory, monkeypatch) -> cuda_emulation.EmulatedCupy:
    """CuPy replaced by the CPU emulation of the CUDA kernels (spikemar.neurons.cuda_emulation),
    with a fresh kernel cache and torch's current CUDA stream and device stubbed."""
    import sys

    fake = cuda_emulation.EmulatedCupy(tmp_path_factory.getbasetemp() / "cuda_emulation")
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cupy_backend, "_modules", {})
    monkeypatch.setattr(cupy_backend, "_functions", {})
    stream = types.SimpleNamespace(cuda_stream=0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return fake


@needs_emulation
def test_spike_point_on_cuda_runs_the_fused_kernel_without_sync(tmp_path_factory, monkeypatch):
    """MAR's spike point on a CUDA activation: one fused kernel each way (no spike train),
    the reference's decode and gradients, and no host sync with deferred value checks."""

    from spikemar.models.common import SpikeConfig, SpikePoint

    fake = _emulate_cupy(tmp_path_factory, monkeypatch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 16, generator=g)
    results = []
    for backend, device in (("torch", "cpu"), ("auto", "fake-cuda")):
        torch.manual_seed(0)
        point = SpikePoint(16, SpikeConfig(T=4, tau=1.5, v_threshold=0.5, backend=backend))
        xi = x.clone().requires_grad_()
        if device == "fake-cuda":
            point.neuron.a.data = fake_cuda(point.neuron.a.data)
            xi = fake_cuda(xi)
        with watching_syncs() as seen, value_checks("deferred"):
            out = point(xi)
            out.sum().backward()
        results.append((out.as_subclass(torch.Tensor), xi.grad, point.neuron.a.grad))
        if device == "fake-cuda":
            assert seen == []
            assert {fn.name for fn in fake.functions} == {
                "atmn_quantize_forward_f32_i32",
                "atmn_quantize_backward_f32_i32",
            }
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor))


class _CountsSink:
    """A counter that takes spike counts (spikemar.counting's protocol) and keeps them."""

    def __init__(self) -> None:
        self.counts: list[tuple[torch.Tensor, int, bool]] = []

    def needs_spike_train(self, module) -> bool:
        return False

    def on_declare_spike_counts(self, module, decoded, counts, T, ternary) -> None:
        self.counts.append((counts, T, ternary))

    def on_declare_spikes(self, module, decoded, spikes, ternary) -> None:
        raise AssertionError("the spike train was materialised for a counter that takes counts")

    def on_record_ops(self, module, kind, counts) -> None:
        pass


@needs_emulation
def test_spike_point_on_cuda_gives_a_counter_its_spike_counts_without_sync(
    tmp_path_factory, monkeypatch
):
    """Under an energy counter that can do with counts, MAR's spike point on CUDA still runs the
    fused kernel and declares the kernel's +1/−1 counts: those of the reference spike train."""

    from spikemar import counting
    from spikemar.models.common import SpikeConfig, SpikePoint
    from spikemar.neurons import spike_counts

    fake = _emulate_cupy(tmp_path_factory, monkeypatch)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1)) * 2
    point = SpikePoint(16, SpikeConfig(T=4, tau=1.5, v_threshold=0.5))
    with torch.no_grad():
        decoded_ref, spikes = point.neuron.quantize(x, 4)
    point.neuron.a.data = fake_cuda(point.neuron.a.data)
    sink = _CountsSink()
    token = counting.activate(sink)
    try:
        with watching_syncs() as seen, value_checks("deferred"), torch.no_grad():
            out = point(fake_cuda(x))
    finally:
        counting.deactivate(token)
    assert seen == []
    assert {fn.name for fn in fake.functions} == {"atmn_quantize_forward_f32_i32"}
    ((counts, T, ternary),) = sink.counts
    assert (T, ternary) == (4, True)
    assert torch.equal(counts.as_subclass(torch.Tensor), spike_counts(spikes))
    torch.testing.assert_close(out.as_subclass(torch.Tensor), decoded_ref)


def test_a_training_step_on_cuda_inputs_defers_the_value_checks_and_reads_them_once():
    """spikemar.training's step: the spike points' checks deferred during forward and
    backward on CUDA inputs, one read of the flags after the backward, eager on the CPU."""
    from spikemar.training import Objective, forward_backward

    modes = []

    class Probe(Objective):
        def forward(self, x, y):
            modes.append(checks.get_value_checks())
            if x.is_cuda:  # what a spike point's deferred check folds into the device flags
                checks.defer(torch.tensor(False), torch.tensor(self.bad), x)
            loss = self.model.weight.square().sum()
            return loss, {"loss": loss.detach()}

    probe = Probe(torch.nn.Linear(2, 2))
    probe.bad = False
    x = fake_cuda(torch.zeros(2, 3, dtype=torch.long))
    with watching_syncs() as seen:
        forward_backward(probe, x, x)
    assert modes == ["deferred"] and seen == ["tolist"]  # the flags, read once
    assert checks.get_value_checks() == "eager" and probe.model.weight.grad is not None
    probe.bad = True
    with pytest.raises(ValueError, match=r"^x_seq: .* NaN or inf"):
        forward_backward(probe, x, x)
    modes.clear()
    with watching_syncs() as seen:
        forward_backward(probe, torch.zeros(2, 3, dtype=torch.long), None)
    assert modes == ["eager"] and seen == []


@pytest.mark.parametrize("mode", ["deferred", "off"])
def test_token_and_ssm_value_checks_hold_no_sync_unless_eager(mode):
    """check_tokens, check_decay and check_finite (the models' and the scan's value checks)
    follow the value-check mode on CUDA: no sync under 'deferred' or 'off'; 'deferred' raises
    the check's own words at raise_deferred_errors(), 'off' never; 'eager' syncs and raises."""
    from spikemar.models.common import check_tokens
    from spikemar.ssm.scan import check_decay, check_finite

    good, bad = fake_cuda(torch.tensor([[1, 4]])), fake_cuda(torch.tensor([[1, 9]]))
    a_good, a_bad = fake_cuda(-torch.rand(2, 3)), fake_cuda(torch.tensor([[-1.0, 0.5]]))
    x_bad = fake_cuda(torch.tensor([1.0, float("nan")]))
    calls = [  # the call, its deferred message, its eager one
        (lambda: check_tokens(bad, 5, "tokens"), r"^tokens: ids must lie in \[0, 5\), but",
         r"^tokens: ids must lie in \[0, 5\), got"),
        (lambda: check_decay(a_bad, "a_t"), r"^a_t \(log decay\) .* reached the scan",
         r"^a_t \(log decay\) must be finite and ≤ 0, but 1 of 2"),
        (lambda: check_finite(x=x_bad, B=a_good), r"^x, B must be finite, but NaN",
         r"^x must be finite, but x\[1\] = nan"),
    ]  # fmt: skip
    with value_checks(mode), watching_syncs() as seen:
        check_tokens(good, 5, "tokens")
        check_decay(a_good)
        check_finite(x=a_good)
    assert seen == []
    with watching_syncs() as seen:
        raise_deferred_errors()  # good values: nothing raises
    for call, message, eager in calls:
        with value_checks(mode), watching_syncs() as seen:
            call()
        assert seen == []
        if mode == "off":
            raise_deferred_errors()
        else:
            with pytest.raises(ValueError, match=message):
                raise_deferred_errors()
        with pytest.raises(ValueError, match=eager):
            call()  # eager, the default: at once


def _fake_cuda_mar(spikes=None):
    """A MARLM (dense unless ``spikes``, a SpikeConfig) whose parameters and batch-2 state say
    they are on CUDA."""
    from spikemar.models import MARLM, MARConfig

    torch.manual_seed(0)
    model = MARLM(MARConfig(vocab_size=11, d_model=16, n_layers=2, d_state=4, head_dim=8,
                            spikes=spikes))  # fmt: skip
    state = [
        type(s)(*(fake_cuda(t) if isinstance(t, torch.Tensor) else t for t in vars(s).values()))
        for s in model.init_state(2)
    ]  # (a state's flags, e.g. MixerState.in_place, stay as they are)
    for p in model.parameters():
        p.data = fake_cuda(p.data)
    return model, state


def test_dense_mar_step_on_cuda_holds_no_sync_with_deferred_checks():
    """MARLM.step (token ids, layer states, the SSM step's decay check) on CUDA inputs: no sync
    under 'deferred'."""
    model, state = _fake_cuda_mar()
    with torch.no_grad(), value_checks("deferred"), watching_syncs() as seen:
        logits, state = model.step(fake_cuda(torch.tensor([3, 7])), state)
    assert seen == [] and logits.shape == (2, 11)


def test_prefill_on_cuda_holds_no_sync_with_deferred_checks():
    """MARLM.prefill (the prompt of generate: token ids, layer states, the chunked scan from the
    state and its decay check) on CUDA inputs: no sync under 'deferred'."""
    model, state = _fake_cuda_mar()
    tokens = fake_cuda(torch.tensor([[3, 7, 1, 0, 5], [2, 2, 9, 4, 1]]))
    with torch.no_grad(), value_checks("deferred"), watching_syncs() as seen:
        logits, state = model.prefill(tokens, state)
    assert seen == [] and logits.shape == (2, 11)


@needs_emulation
def test_spiking_mar_training_step_and_token_on_cuda_hold_no_sync(tmp_path_factory, monkeypatch):
    """Issue 18's two counts on the spiking model: a training step (forward, cross-entropy,
    backward) and a generated token (step) of a spiking MARLM on CUDA inputs, its spike points
    on the fused kernels (emulated), hold no host sync under 'deferred'; the step's flags are
    read after it (raise_deferred_errors), and nothing was wrong."""
    from spikemar.models import SpikeConfig

    fake = _emulate_cupy(tmp_path_factory, monkeypatch)
    model, state = _fake_cuda_mar(SpikeConfig(T=4))
    tokens = fake_cuda(torch.tensor([[3, 7, 1, 0, 5], [2, 2, 9, 4, 1]]))
    with watching_syncs() as seen, value_checks("deferred"):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
    assert seen == []
    assert {fn.name for fn in fake.functions} == {
        "atmn_quantize_forward_f32_i32",
        "atmn_quantize_backward_f32_i32",
    }
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with watching_syncs() as seen:
        raise_deferred_errors()
    assert seen == ["tolist"]  # the flags of the neurons and the named checks: one read
    with torch.no_grad(), value_checks("deferred"), watching_syncs() as seen:
        logits, state = model.step(fake_cuda(torch.tensor([3, 7])), state)
    assert seen == [] and logits.shape == (2, 11)
