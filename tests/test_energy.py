"""The SOP energy counter: hand-counted ACs and MACs, SpikingJelly's SynOpCounter as a peer on
binary spikes (and the documented difference on ternary ones), MAR's spike-point protocol,
uncounted modules, profiles, and the reports (totals, JSON round trip, Markdown, PNG)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import layer
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based.op_counter import DispatchCounterMode, MACCounter, SynOpCounter
from torch import nn

import spikemar.energy as energy
from spikemar.energy import (
    EnergyCounter,
    EnergyReport,
    HardwareProfile,
    compare,
    declare_spikes,
    profile,
    record_ops,
    register_neuron,
)
from spikemar.neurons import ATMN, BinaryMultiStep

# -- stand-ins ------------------------------------------------------------------------------------


class Emit(nn.Module):
    """A 'neuron' that emits a fixed spike pattern whatever its input: hand-countable spikes."""

    def __init__(self, pattern: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("pattern", pattern.float())

    def forward(self, x):
        return self.pattern.clone()


register_neuron(Emit, ternary=lambda m: bool((m.pattern < 0).any()))


class SpikePoint(nn.Module):
    """MAR's spike point as the model issue will write it: δ-inject, spike T micro-steps,
    feed the (real-valued) decode on, and declare it to the energy counter."""

    def __init__(self, channels: int, T: int = 4, v_threshold: float = 0.5) -> None:
        super().__init__()
        self.atmn = ATMN(tau=2.0, v_threshold=v_threshold, num_channels=channels)
        self.T = T
        self.last_spikes: torch.Tensor | None = None

    def forward(self, x):
        decoded, spikes = self.atmn.quantize(x, self.T)
        self.last_spikes = spikes
        return declare_spikes(self, decoded, spikes)


def ternary_pattern(shape, p_zero=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(-1, 2, shape, generator=g).float()
    s[torch.rand(shape, generator=g) < p_zero] = 0
    return s


def brute_conv_acs(spikes: torch.Tensor, conv: nn.modules.conv._ConvNd) -> int:
    """Independent reference: for every output element, the non-zero inputs in its receptive
    field (each is one accumulate), summed. A conv of the non-zero mask with an all-ones kernel."""
    n_sp = len(conv.kernel_size)
    x = (spikes != 0).double().reshape(-1, *spikes.shape[-(n_sp + 1) :])
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    ones = torch.ones(
        conv.out_channels, conv.in_channels // conv.groups, *conv.kernel_size, dtype=torch.float64
    )
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n_sp]
    out = fn(x, ones, None, conv.stride, padding, conv.dilation, conv.groups)
    return int(out.sum().item())


# -- hand-counted ACs and MACs --------------------------------------------------------------------


def test_linear_binary_spikes_hand_counted():
    s = torch.tensor([[[1, 0, 1]], [[0, 0, 1]]])  # [T=2, N=1, C=3]: 3 spikes
    net = nn.Sequential(Emit(s), nn.Linear(3, 5, bias=False))
    rep = profile(net, torch.zeros(1))
    lin = rep.row("1")
    assert lin.kind == "linear" and lin.spike_kind == "binary"
    assert lin.acs == 3 * 5 and lin.macs == 0
    assert (lin.spike_nnz, lin.spike_pos, lin.spike_neg, lin.spike_elements) == (3, 3, 0, 6)
    assert lin.firing_rate == pytest.approx(0.5)
    neuron_row = rep.row("0")
    assert neuron_row.kind == "neuron" and neuron_row.neuron_updates == 6 and neuron_row.acs == 0


def test_linear_ternary_spikes_hand_counted():
    s = torch.tensor([[[1, -1, 0, 0]], [[0, -1, -1, 1]], [[0, 0, 0, 0]]])  # 5 spikes: 2 +, 3 −
    net = nn.Sequential(Emit(s), nn.Linear(4, 7))
    rep = profile(net, torch.zeros(1))
    lin = rep.row("1")
    assert lin.spike_kind == "ternary"
    assert lin.acs == 5 * 7  # a −1 spike is one subtract: one AC, like a +1
    assert (lin.spike_pos, lin.spike_neg) == (2, 3)
    assert lin.elementwise_ops == 3 * 7  # the bias adds, one per output element
    assert rep.total_macs == 0


def test_linear_real_input_counts_macs():
    net = nn.Linear(6, 4)
    x = torch.randn(3, 5, 6)
    rep = profile(net, x)
    (row,) = rep.rows
    assert row.macs == 3 * 5 * 6 * 4 and row.acs == 0 and row.spike_kind == "real"
    assert row.energy_pj == pytest.approx(row.macs * 4.6)


def test_conv2d_hand_counted_stride_padding_groups():
    # Conv2d(2 → 4, k=3, stride=2, padding=1, groups=2) on 5×5: output 3×3, 2 out channels/group.
    conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2, bias=False)
    s = torch.zeros(1, 1, 2, 5, 5)  # [T, N, C, H, W]
    s[0, 0, 0, 0, 0] = 1  # corner: read by output 0 via tap 1 in each dim → 1 · 1 · 2 = 2 ACs
    s[0, 0, 1, 1, 1] = -1  # (1, 1): two (output, tap) pairs per dim → 2 · 2 · 2 = 8 ACs
    s[0, 0, 0, 2, 2] = 1  # centre: only output 1, tap 1 → 1 · 1 · 2 = 2 ACs

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.spikes = Emit(s)
            self.conv = conv

        def forward(self, x):
            return self.conv(self.spikes(x).flatten(0, 1))

    rep = profile(Net(), torch.zeros(1))
    row = rep.row("conv")
    assert row.acs == 2 + 8 + 2
    assert row.acs == brute_conv_acs(s, conv)
    assert (row.spike_pos, row.spike_neg) == (2, 1)


def test_conv1d_and_sj_multistep_conv2d_hand_counted():
    conv1 = nn.Conv1d(1, 3, 2, stride=1, padding=0, bias=False)
    s1 = torch.tensor([[[[1.0, 0.0, 1.0, 1.0]]]])  # [T, N, C, L]: ends are read once, middle twice
    rep = profile(nn.Sequential(Emit(s1[0]), conv1), torch.zeros(1))
    assert rep.row("1").acs == (1 + 2 + 1) * 3

    conv2 = layer.Conv2d(2, 3, 3, padding=1, step_mode="m")  # [T, N, C, H, W] folded over T·N
    s2 = ternary_pattern((3, 2, 2, 4, 4), seed=3)
    rep = profile(nn.Sequential(Emit(s2), conv2), torch.zeros(1))
    assert rep.row("1").acs == brute_conv_acs(s2, conv2)


def test_conv_real_input_counts_dense_macs():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    x = torch.randn(2, 4, 9, 9)
    rep = profile(conv, x)
    out = conv(x)
    assert rep.rows[0].macs == out.numel() * (4 // 2) * 9


@given(
    dims=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    groups=st.sampled_from([1, 2]),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    size=st.integers(5, 8),
    seed=st.integers(0, 2**16),
)
def test_conv_acs_equal_brute_force(dims, kernel, stride, padding, dilation, groups, mode, size,
                                    seed):  # fmt: skip
    if mode == "reflect" and padding >= size:
        return
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    conv = cls(2, 4, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
               padding_mode=mode, bias=False)  # fmt: skip
    if (size + 2 * padding - dilation * (kernel - 1)) < 1:
        return
    s = ternary_pattern((2, 3, 2, *([size] * dims)), seed=seed)
    rep = profile(nn.Sequential(Emit(s), nn.Flatten(0, 1), conv), torch.zeros(1))
    assert rep.row("2").acs == brute_conv_acs(s, conv)


def test_conv_padding_same_equals_brute_force():
    conv = nn.Conv2d(2, 2, (3, 4), padding="same", dilation=(1, 2), bias=False)
    s = ternary_pattern((1, 2, 2, 6, 7), seed=5)
    rep = profile(nn.Sequential(Emit(s), nn.Flatten(0, 1), conv), torch.zeros(1))
    assert rep.row("2").acs == brute_conv_acs(s, conv)


def test_embedding_lookups_and_tokens():
    emb = nn.Embedding(50, 8)
    ids = torch.randint(0, 50, (2, 5))
    rep = profile(emb, ids)
    assert rep.rows[0].acs == 10 * 8 and rep.rows[0].spike_kind == "index"
    assert rep.tokens == 10
    assert rep.per_token()["acs"] == 8


# -- the peer: SpikingJelly 2.0's op_counter ------------------------------------------------------


def _sj_counts(counter_cls, net, x):
    counter = counter_cls()
    sj_functional.reset_net(net)
    with torch.no_grad(), DispatchCounterMode([counter]):
        net(x)
    root = type(net).__name__
    per_layer = {
        scope[len(root) + 1 :]: sum(v.values())
        for scope, v in counter.get_counts().items()
        if scope.startswith(root + ".")
    }
    return counter.get_total(), per_layer


def binary_mlp():
    return nn.Sequential(
        layer.Linear(16, 32, step_mode="m"),
        sj_neuron.LIFNode(step_mode="m"),
        layer.Linear(32, 24, step_mode="m"),
        BinaryMultiStep(tau=2.0, v_threshold=0.5, step_mode="m"),
        layer.Linear(24, 10, step_mode="m"),
    ).eval()


def binary_convnet():
    return nn.Sequential(
        layer.Conv2d(3, 8, 3, padding=1, step_mode="m"),
        sj_neuron.IFNode(step_mode="m"),
        layer.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, step_mode="m"),
        sj_neuron.LIFNode(step_mode="m"),
        layer.MaxPool2d(2, step_mode="m"),
        layer.Conv2d(8, 4, 3, padding=2, dilation=2, step_mode="m"),
        sj_neuron.IFNode(step_mode="m"),
        layer.Flatten(step_mode="m"),
        layer.Linear(4 * 4 * 4, 5, step_mode="m"),
    ).eval()


@pytest.mark.parametrize(
    "make, shape",
    [(binary_mlp, (4, 8, 16)), (binary_convnet, (4, 2, 3, 16, 16))],
    ids=["mlp", "convnet"],
)
def test_binary_acs_equal_spikingjelly_synopcounter(make, shape):
    net = make()
    x = torch.rand(shape) * 3
    sj_total, sj_layers = _sj_counts(SynOpCounter, net, x)
    rep = profile(net, x)
    assert rep.total_acs == sj_total > 0
    ours = {r.name: r.acs for r in rep.rows if r.acs}
    assert ours == {k: v for k, v in sj_layers.items() if v}


def ternary_mlp():
    return nn.Sequential(
        layer.Linear(16, 32, step_mode="m"),
        ATMN(tau=2.0, v_threshold=0.5, step_mode="m"),
        layer.Linear(32, 24, step_mode="m"),
        sj_neuron.TernaryLIFNode(v_threshold=0.1, v_reset=None, step_mode="m"),
        layer.Linear(24, 10, step_mode="m"),
    ).eval()


def test_ternary_documented_difference_from_spikingjelly():
    """SpikingJelly 2.0 decides 'spike' by values in {0, 1}: its SynOpCounter counts 0 synaptic
    ops for ternary-fed layers and its MACCounter counts them as dense MACs. Ours counts
    Σ nnz · fan-out ACs, the +1/−1 split, and no MACs for them."""
    net = ternary_mlp()
    x = torch.randn(4, 8, 16) * 2
    sj_synops, _ = _sj_counts(SynOpCounter, net, x)
    _, sj_macs = _sj_counts(MACCounter, net, x)
    rep = profile(net, x)

    spikes = {}
    hooks = [
        net[i].register_forward_hook(lambda m, a, o, i=i: spikes.__setitem__(i, o)) for i in (1, 3)
    ]
    sj_functional.reset_net(net)
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    assert all(bool((s < 0).any()) for s in spikes.values())  # both really ternary
    nnz1, nnz3 = (int(spikes[i].count_nonzero()) for i in (1, 3))

    assert sj_synops == 0  # the peer sees no synaptic op at all
    assert rep.row("2").acs == nnz1 * 24 and rep.row("4").acs == nnz3 * 10
    assert rep.total_acs == nnz1 * 24 + nnz3 * 10 > 0
    # the peer's MACs for the ternary-fed layers are dense; ours are zero
    assert sj_macs["2"] == 4 * 8 * 32 * 24 and sj_macs["4"] == 4 * 8 * 24 * 10
    assert rep.row("2").macs == 0 and rep.row("4").macs == 0
    assert rep.row("0").macs == sj_macs["0"] == 4 * 8 * 16 * 32
    neg = int((spikes[1] < 0).sum())
    assert rep.row("2").spike_neg == neg and rep.row("2").spike_pos == nnz1 - neg


def test_counter_accumulates_passes_and_can_be_reentered():
    net = binary_mlp()
    x = torch.rand(4, 8, 16) * 3
    one = profile(net, x)
    counter = EnergyCounter(net)
    with torch.no_grad():
        for _ in range(2):
            sj_functional.reset_net(net)
            with counter:
                net(x)
    rep = counter.report()
    assert rep.passes == 2 and [r.name for r in rep.rows] == [r.name for r in one.rows]
    assert rep.total_acs == 2 * one.total_acs and rep.per_pass()["acs"] == one.total_acs
    assert rep.row("2").calls == 2


def test_hooks_and_state_are_removed_even_when_forward_fails():
    from spikemar.counting import counting_active

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    net = nn.Sequential(nn.Linear(3, 3), Boom())
    with pytest.raises(RuntimeError, match="boom"):
        profile(net, torch.randn(2, 3))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert not counting_active()


# -- MAR's spike points ----------------------------------------------------------------------------


class SpikedMLP(nn.Module):
    def __init__(self, d=8, T=4):
        super().__init__()
        self.point1 = SpikePoint(d, T)
        self.fc1 = nn.Linear(d, 2 * d)
        self.point2 = SpikePoint(2 * d, T)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(self.point2(self.fc1(self.point1(x))))


def test_declared_spike_decode_counts_acs_over_micro_steps():
    net = SpikedMLP().eval()
    x = torch.randn(3, 5, 8) * 2
    rep = profile(net, x)
    s1, s2 = net.point1.last_spikes, net.point2.last_spikes
    assert s1.shape == (4, 3, 5, 8)
    nnz1, nnz2 = int(s1.count_nonzero()), int(s2.count_nonzero())
    assert 0 < nnz1 < s1.numel()
    assert rep.row("fc1").acs == nnz1 * 16 and rep.row("fc1").macs == 0
    assert rep.row("fc2").acs == nnz2 * 8 and rep.row("fc2").macs == 0
    assert rep.row("fc1").spike_elements == s1.numel()  # the rate is over T micro-steps
    point = rep.row("point1")
    assert point.kind == "spike_point" and point.neuron_updates == s1.numel()
    assert point.spike_neg == int((s1 < 0).sum())
    assert rep.total_macs == 0


def test_without_declaration_the_decode_is_real_valued():
    class Undeclared(SpikePoint):
        def forward(self, x):
            return self.atmn.quantize(x, self.T)[0]

    net = nn.Sequential(Undeclared(8), nn.Linear(8, 4))
    x = torch.randn(2, 8)
    rep = profile(net, x)
    assert rep.row("1").macs == 2 * 8 * 4 and rep.row("1").acs == 0


def test_declare_spikes_without_counter_is_a_no_op():
    decoded, spikes = torch.randn(2, 3), torch.zeros(4, 2, 3)
    assert declare_spikes(None, decoded, spikes) is decoded
    record_ops(None, macs=5)  # nothing to record into, nothing raised


# -- spike detection -------------------------------------------------------------------------------


class SignNet(nn.Module):
    """Spikes made by a plain function the counter does not know (no registered producer)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.fc(torch.sign(x))


def test_auto_detects_spikes_by_value_producer_mode_does_not():
    x = torch.randn(4, 6)
    x[x.abs() < 0.5] = 0
    nnz = int(x.count_nonzero())
    auto = profile(SignNet(), x)
    assert auto.row("fc").acs == nnz * 3 and auto.row("fc").spike_kind == "ternary"
    producer = profile(SignNet(), x, spike_detection="producer")
    assert producer.row("fc").macs == 4 * 6 * 3 and producer.row("fc").acs == 0
    real = profile(nn.Linear(6, 3), torch.randn(4, 6) + 0.5)
    assert real.rows[0].macs == 72 and real.rows[0].spike_kind == "real"
    late = torch.zeros(100, 6)  # spikes in the leading values, a real value at the very end
    late[-1, -1] = 0.5
    assert profile(nn.Linear(6, 3), late).rows[0].macs == 100 * 6 * 3
    ones = torch.zeros(100, 6)
    ones[-1, -1] = -1.0
    assert profile(nn.Linear(6, 3), ones).rows[0].acs == 3


def test_values_mode_ignores_producers():
    x = torch.randn(4, 8, 16) * 2
    net = ternary_mlp()
    assert profile(net, x, spike_detection="values").total_acs == profile(net, x).total_acs
    spiked = SpikedMLP().eval()  # decodes are real-valued: by value alone they are MACs
    assert profile(spiked, torch.randn(3, 8), spike_detection="values").total_acs == 0


def test_value_test_is_exact_near_one():
    from spikemar.energy._stats import value_test

    assert bool(value_test(torch.tensor([1.0, -1.0, 0.0, -0.0])))
    for bad in (1 - 2**-24, 1 + 2**-23, 1e-45, 2.0, math.nan, math.inf):
        assert not bool(value_test(torch.tensor([1.0, bad]))), bad


def test_training_dropout_keeps_spikes_and_counts_them():
    s = ternary_pattern((2, 3, 10), seed=1)
    net = nn.Sequential(Emit(s), nn.Dropout(0.5), nn.Linear(10, 4, bias=False)).train()
    kept = []
    net[1].register_forward_hook(lambda m, a, o: kept.append(o))
    rep = profile(net, torch.zeros(1))
    assert 0 < int(kept[0].count_nonzero()) < int(s.count_nonzero())
    assert rep.row("2").acs == int(kept[0].count_nonzero()) * 4  # scaled spikes: still one AC each
    assert rep.row("2").spike_kind == "ternary"


def test_single_step_neuron_loop_accumulates():
    net = nn.Sequential(nn.Linear(5, 6), ATMN(v_threshold=0.3), nn.Linear(6, 2))
    xs = torch.randn(3, 4, 5)
    counter = EnergyCounter(net)
    outs = []
    sj_functional.reset_net(net)
    with torch.no_grad(), counter:
        for t in range(3):
            outs.append(net[1](net[0](xs[t])))
            net[2](outs[-1])
    rep = counter.report()
    nnz = sum(int(o.count_nonzero()) for o in outs)
    assert rep.row("2").acs == nnz * 2 and rep.row("1").calls == 3


# -- uncounted modules, bad input -----------------------------------------------------------------


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.w


class Recording(Functional):
    def forward(self, x):
        record_ops(self, kind="matmul", macs=x.numel() * 4)
        return x @ self.w


def test_uncounted_module_is_listed_by_name_not_counted_zero():
    net = nn.Sequential(nn.Linear(4, 4), Functional(), nn.Linear(4, 2))
    rep = profile(net, torch.randn(3, 4))
    assert rep.uncounted == (("1", "Functional"),)
    assert not rep.complete
    assert "1" not in {r.name for r in rep.rows}
    assert "UNCOUNTED" in rep.to_table() and "1 (Functional)" in rep.to_markdown()
    assert json.loads(rep.to_json())["uncounted"] == [{"name": "1", "type": "Functional"}]


def test_record_ops_counts_functional_work():
    net = nn.Sequential(nn.Linear(4, 4), Recording())
    rep = profile(net, torch.randn(3, 4))
    assert rep.complete
    assert rep.row("1").macs == 48 and rep.row("1").kind == "matmul"


def test_unknown_profile_lists_known_ones():
    with pytest.raises(ValueError, match=r"hardware: unknown profile 'tpu'.*45nm-fp32.*loihi"):
        profile(nn.Linear(2, 2), torch.randn(1, 2), hardware="tpu")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spike_detection": "guess"}, "spike_detection"),
        ({"tokens": 0}, "tokens"),
        ({"hardware": 3}, "hardware"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        profile(nn.Linear(2, 2), torch.randn(1, 2), **kwargs)
    with pytest.raises(TypeError, match="model"):
        profile(lambda x: x, torch.randn(1))


# -- profiles ------------------------------------------------------------------------------------


def test_builtin_profiles_carry_the_cited_constants():
    p = {n: energy.get_profile(n) for n in energy.available_profiles()}
    assert (p["45nm-fp32"].mac_pj, p["45nm-fp32"].ac_pj) == (4.6, 0.9)
    assert (p["45nm-fp16"].mac_pj, p["45nm-fp16"].ac_pj) == (1.5, 0.4)
    assert (p["45nm-int8"].mac_pj, p["45nm-int8"].ac_pj) == (0.23, 0.03)
    assert p["loihi"].ac_pj == 23.6 and p["loihi"].mac_pj is None
    assert p["loihi"].neuron_update_pj == 81.0  # Table 2: active neuron update
    assert "Horowitz" in p["45nm-fp32"].citation and "Davies" in p["loihi"].citation


def test_user_profile_and_repricing():
    energy.register_profile(
        HardwareProfile("test-chip", ac_pj=2.0, mac_pj=10.0, neuron_update_pj=1.0), overwrite=True
    )
    net = ternary_mlp()
    x = torch.randn(4, 8, 16) * 2
    rep = profile(net, x, hardware="test-chip")
    expected = 2.0 * rep.total_acs + 10.0 * rep.total_macs + 1.0 * rep.total_neuron_updates
    assert rep.total_energy_pj == pytest.approx(expected)
    fp32 = rep.with_hardware("45nm-fp32")
    assert fp32.total_energy_pj == pytest.approx(0.9 * rep.total_acs + 4.6 * rep.total_macs)
    with pytest.raises(ValueError, match="exists"):
        energy.register_profile(HardwareProfile("test-chip", ac_pj=1.0, mac_pj=1.0))
    with pytest.raises(ValueError, match="ac_pj"):
        HardwareProfile("bad", ac_pj=-1.0, mac_pj=1.0)


def test_loihi_prices_synaptic_ops_and_neuron_updates_and_leaves_macs_unpriced():
    rep = profile(ternary_mlp(), torch.randn(4, 8, 16) * 2, hardware="loihi")
    assert rep.total_neuron_updates > 0
    assert rep.total_energy_pj == pytest.approx(
        23.6 * rep.total_acs + 81.0 * rep.total_neuron_updates
    )
    assert rep.unpriced["macs"] == rep.total_macs > 0
    assert "not priced under 'loihi'" in rep.to_table()


# -- reports -------------------------------------------------------------------------------------


def test_totals_are_sums_of_rows_and_json_round_trips():
    net = SpikedMLP().eval()
    rep = profile(net, torch.randn(3, 5, 8) * 2, tokens=15)
    assert rep.total_acs == sum(r.acs for r in rep.rows)
    assert rep.total_macs == sum(r.macs for r in rep.rows)
    assert rep.total_energy_pj == pytest.approx(sum(r.energy_pj for r in rep.rows), rel=1e-12)
    for r in rep.rows:
        assert r.energy_pj == pytest.approx(0.9 * r.acs + 4.6 * r.macs)
    text = rep.to_json()
    again = EnergyReport.from_json(text)
    assert again == rep and again.to_json() == text
    assert json.loads(text)["per_token"]["energy_pj"] == pytest.approx(rep.total_energy_pj / 15)
    with pytest.raises(ValueError, match="schema"):
        EnergyReport.from_json('{"schema": "other"}')


def test_table_and_markdown_show_every_row_and_totals():
    rep = profile(ternary_mlp(), torch.randn(4, 8, 16) * 2)
    table, md = rep.to_table(), rep.to_markdown()
    for r in rep.rows:
        assert f"{r.acs:,}" in table and f"| {r.name} | {r.kind} |" in md
    assert "TOTAL" in table and "**TOTAL**" in md and "Horowitz" in md


def test_compare_student_teacher_per_layer_and_total():
    teacher = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    student = SpikedMLP().eval()
    x = torch.randn(3, 5, 8) * 2
    rep_s, rep_t = profile(student, x, tokens=15), profile(teacher, x, tokens=15)
    cmp = compare(rep_s, rep_t)
    assert cmp.basis == "token"
    assert cmp.ratio == pytest.approx(rep_s.total_energy_pj / rep_t.total_energy_pj)
    assert cmp.savings == pytest.approx(1 / cmp.ratio) and cmp.ratio < 1
    names = {r.name: r for r in cmp.rows}
    assert names["fc1"].teacher_pj is None and names["0"].student_pj is None
    assert "point1" not in names  # no energy on either side: left out
    assert "ratio" in cmp.to_table() and "| TOTAL |" in cmp.to_markdown()
    assert json.loads(cmp.to_json())["ratio"] == pytest.approx(cmp.ratio)
    with pytest.raises(ValueError, match="teacher: priced under 'loihi'"):
        compare(rep_s, rep_t.with_hardware("loihi"))


def test_png_is_written_atomically(tmp_path):
    rep = profile(SpikedMLP().eval(), torch.randn(3, 5, 8) * 2, tokens=15)
    path = rep.save_png(tmp_path / "sub" / "energy.png", per_token=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["energy.png"]  # no temporary left
    with pytest.raises(ValueError, match="path"):
        rep.save_png(tmp_path / "energy.svg")


# -- the demo model and the `spikemar energy` entry point -----------------------------------------


def test_demo_model_is_fully_counted_and_cheaper_than_its_dense_twin():
    from spikemar.energy.demo import demo_model, dense_demo_model

    ids = torch.randint(0, 256, (2, 12))
    student = profile(demo_model(d=16, layers=1, T=3), ids)
    teacher = profile(dense_demo_model(d=16, layers=1), ids)
    assert student.complete and teacher.complete and student.tokens == 24
    assert teacher.total_acs == 24 * 16  # only the embedding
    # four spike points per layer: every projection they feed counts ACs
    points = [r for r in student.rows if r.kind == "spike_point"]
    assert len(points) == 4 and all(r.spike_kind == "ternary" for r in points)
    for name in ("layers.0.mixer.in_proj", "layers.0.mixer.out_proj", "layers.0.ffn.up"):
        assert student.row(name).macs == 0 and student.row(name).acs > 0
    assert compare(student, teacher).ratio < 1


def test_energy_main_writes_reports_and_rejects_bad_input(tmp_path, capsys):
    import argparse

    from spikemar.energy.cli import add_energy_arguments, energy_main

    parser = add_energy_arguments(argparse.ArgumentParser(prog="spikemar energy"))
    args = parser.parse_args(
        ["--model", "demo", "--d", "16", "--layers", "1", "--random-tokens", "8", "--compare-dense",
         "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]
    )  # fmt: skip
    assert energy_main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("model: the random-weight demo MAR LM")
    assert "TOTAL" in out and "student vs dense twin" in out
    assert EnergyReport.from_json((tmp_path / "r.json").read_text()).tokens == 8
    assert (tmp_path / "r.md").read_text().startswith("Energy report")
    assert energy_main(parser.parse_args(["--hardware", "tpu"])) == 2
    assert "known profiles" in capsys.readouterr().err


def test_energy_main_prices_a_converted_student_against_its_hugging_face_teacher(tmp_path, capsys):
    """``--teacher DIR`` (and ``--checkpoint DIR``): a Hugging Face Llamba/Mamba-2 directory, as
    the other commands take it. It was refused ("is a folder; expected a checkpoint file"), and
    only after the student's tables were printed; a teacher that cannot be compared is refused
    before any table."""
    import argparse

    from references.hf_checkpoints import bpe_tokenizer
    from references.llamba import tiny_llamba_config, write_llamba_checkpoint

    from spikemar.checkpoint import save_checkpoint
    from spikemar.convert import spiking_student
    from spikemar.energy.cli import add_energy_arguments, energy_main
    from spikemar.models import SpikeConfig, from_pretrained

    teacher_dir = tmp_path / "llamba"
    write_llamba_checkpoint(teacher_dir, tiny_llamba_config(vocab_size=300), seed=1)
    bpe_tokenizer(300).save(teacher_dir)
    teacher = from_pretrained(teacher_dir)
    student = spiking_student(teacher, SpikeConfig(T=2, v_threshold=0.05))
    save_checkpoint(tmp_path / "student.pt", student, teacher.tokenizer)
    parser = add_energy_arguments(argparse.ArgumentParser(prog="spikemar energy"))
    text = "First Citizen: hear me speak."
    args = parser.parse_args(["--checkpoint", str(tmp_path / "student.pt"), "--teacher",
                              str(teacher_dir), "--text", text,
                              "--json", str(tmp_path / "s.json")])  # fmt: skip
    capsys.readouterr()
    assert energy_main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    ids = torch.tensor([teacher.tokenizer.encode(text)])
    want = profile(teacher, ids).total_energy_pj / ids.numel()
    total = [line for line in out.splitlines() if line.startswith("TOTAL")][-1]
    assert f"{want / 1e3:.4g} nJ" in total, total  # the comparison: the teacher per token
    args = parser.parse_args(["--checkpoint", str(teacher_dir), "--text", text])
    assert energy_main(args) == 0 and "TOTAL" in capsys.readouterr().out
    from spikemar.data import CharTokenizer
    from spikemar.models import MARLM, MARConfig

    other = tmp_path / "char.pt"
    tiny = MARLM(MARConfig(vocab_size=2, d_model=8, n_layers=1, d_state=4, head_dim=4))
    save_checkpoint(other, tiny, CharTokenizer("ab"))
    for teacher_arg, message in [(tmp_path / "nowhere", "--teacher: no file at"),
                                 (other, "--teacher: its vocabulary (2)")]:  # fmt: skip
        args = parser.parse_args(["--checkpoint", str(tmp_path / "student.pt"), "--teacher",
                                  str(teacher_arg), "--text", text])  # fmt: skip
        assert energy_main(args) == 2
        captured = capsys.readouterr()
        assert message in captured.err and captured.out == "", captured
