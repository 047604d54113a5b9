"""The energy counter's per-call fast paths stay exact: what a layer's geometry fixes is kept per
input shape (and shared between calls), a call's spike counts are filled in when the report is
built, the quick "surely not spikes" probe never calls spikes real, and the fused spike point's
per-channel count sums stay exact beyond float32's integers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spikemar import counting
from spikemar.energy import EnergyCounter, _stats, register_rule
from spikemar.energy.counter import _STATIC_LIMIT
from spikemar.models import SpikeConfig, SpikePoint
from spikemar.neurons import ATMNParameters, cpu_backend

FIELDS = ("acs", "macs", "elementwise_ops", "weight_reads", "weight_reads_call",
          "activation_reads", "activation_writes", "spike_elements", "spike_nnz", "dense_macs",
          "dense_inputs", "spike_read_bits_packed", "spike_read_bits_address")  # fmt: skip


def _rows(counter: EnergyCounter) -> dict:
    return {r.name: r for r in counter.report("45nm-fp32+mem").rows}


def _fresh_count(net: nn.Module, xs: list[torch.Tensor]) -> dict:
    """Each input counted by its own new counter, rows summed: the reference that shares
    nothing between calls or shapes."""
    total: dict = {}
    for x in xs:
        with torch.no_grad(), EnergyCounter(net) as counter:
            net(x)
        for name, row in _rows(counter).items():
            acc = total.setdefault(name, dict.fromkeys(FIELDS, 0))
            for f in FIELDS:
                acc[f] += getattr(row, f)
    return total


def _spiking_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.LayerNorm(6), SpikePoint(6, SpikeConfig(T=3, v_threshold=0.3)), nn.Linear(6, 5)
    ).eval()


def test_shapes_in_any_order_count_as_counted_one_at_a_time():
    net = _spiking_net()
    g = torch.Generator().manual_seed(1)
    shapes = [(2, 4, 6), (3, 6), (2, 4, 6), (1, 1, 6), (3, 6), (5, 6)]
    xs = [torch.randn(s, generator=g) for s in shapes]
    counter = EnergyCounter(net)
    with torch.no_grad(), counter:
        for x in xs:
            net(x)
    rows = _rows(counter)
    expected = _fresh_count(net, xs)
    for name, acc in expected.items():
        for f in FIELDS:
            assert getattr(rows[name], f) == acc[f], (name, f)
    # hand count of the projection: fed spikes, Σ nnz · 5 ACs, and no MACs
    assert rows["2"].macs == 0 and rows["2"].acs == rows["1"].spike_nnz * 5


def test_a_report_built_twice_and_more_passes_after_it_agree():
    net = _spiking_net()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    counter = EnergyCounter(net)
    with torch.no_grad(), counter:
        net(x)
        first = _rows(counter)
        again = _rows(counter)
        net(x)
    twice = _rows(counter)
    for name, row in first.items():
        for f in FIELDS:
            assert getattr(again[name], f) == getattr(row, f)
            assert getattr(twice[name], f) == 2 * getattr(row, f)


def test_the_same_layer_fed_spikes_then_real_values_counts_each_call_as_it_was():
    lin = nn.Linear(6, 5)
    point = SpikePoint(6, SpikeConfig(T=2, v_threshold=0.3))

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.point, self.lin = point, lin

        def forward(self, x):
            return self.lin(self.point(x)) + self.lin(x)

    net = Both().eval()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), EnergyCounter(net) as counter:
        net(x)
    row = _rows(counter)["lin"]
    assert row.macs == 3 * 6 * 5  # the real-valued call
    assert row.acs == _rows(counter)["point"].spike_nnz * 5  # the spike-fed call
    assert row.calls == 2


def test_more_shapes_than_the_static_cache_keeps_still_count_exactly():
    lin = nn.Linear(3, 2)
    counter = EnergyCounter(lin)
    lengths = range(1, _STATIC_LIMIT + 40)
    with torch.no_grad(), counter:
        for n in lengths:
            lin(torch.full((n, 3), 0.5))
    row = _rows(counter)["Linear"]
    assert row.macs == sum(lengths) * 3 * 2
    assert row.calls == len(lengths)


def test_record_and_record_ops_name_an_unknown_count():
    class Work(nn.Module):
        def forward(self, x):
            counting.record_ops(self, kind="w", macs=3, mcas=4)
            return x

    with EnergyCounter(Work()) as counter, pytest.raises(TypeError, match="unknown count 'mcas'"):
        counter.model(torch.zeros(1))
    with pytest.raises(TypeError, match="record_ops: unknown count 'mcas'"):  # no counter either
        Work()(torch.zeros(1))

    class Custom(nn.Module):
        def forward(self, x):
            return x * 2

    def rule(ctx, module, args, out):
        ctx.record(elementwise_ops=out.numel(), activation_writes=out.numel(), flops=1)

    register_rule(Custom, rule, kind="custom")
    with EnergyCounter(Custom()) as counter, pytest.raises(TypeError, match="count 'flops'"):
        counter.model(torch.zeros(4))


def test_record_ops_with_tensor_counts_are_read_back_per_call():
    class Work(nn.Module):
        def forward(self, x):
            counting.record_ops(self, kind="w", macs=(x != 0).sum(), state_reads=2)
            return x

    net = Work()
    with EnergyCounter(net) as counter:
        net(torch.tensor([1.0, 0.0, 2.0]))
        net(torch.tensor([0.0, 0.0, 5.0]))
    row = _rows(counter)["Work"]
    assert (row.macs, row.state_reads, row.calls) == (3, 4, 2)


def _probe_reference(x: torch.Tensor) -> bool:
    """The probe's definition: one of the first values of the first vector along the last
    dimension is not in {-1, 0, 1}."""
    if x.dtype == torch.bool or x.numel() == 0:
        return False
    first = x.reshape(-1)[:1] if x.dim() == 0 else x[(0,) * (x.dim() - 1)]
    return any(v not in (-1.0, 0.0, 1.0) for v in first[:16].tolist())


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    spikes=st.booleans(),
    view=st.sampled_from(["plain", "transposed", "strided", "grad"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_surely_not_spikes_is_exact_when_it_says_so(shape, dtype, spikes, view, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, 2, generator=g)
    if spikes:
        x = torch.sign(torch.round(x))
    x = x.to(dtype)
    if view == "transposed" and x.dim() >= 2:
        x = x.transpose(0, -1)
    elif view == "strided":
        x = x[..., ::2]
    elif view == "grad" and dtype != torch.float16:
        x = x.clone().requires_grad_()
    answer = _stats.surely_not_spikes(x)
    assert answer == _probe_reference(x.detach())
    if answer:  # proof that it is not a spike tensor
        assert not bool(_stats.value_test(x.detach()))
    if spikes:
        assert not answer


def test_per_channel_counts_stay_exact_beyond_float32_integers():
    # one channel, every micro-step spiking: 2^24 + 63·k spikes in a float32 sum would round
    # (T odd, so the partial sums are odd); the kernel moves its REAL sums into int64 in time
    T, rows = 63, 450_000
    x = torch.full((rows, 1), 1e4)
    x[::3] = -1e4  # a third spike −1 every micro-step
    p = ATMNParameters(torch.ones(1), 1.0, True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one slab of counts: all of it in one thread's sums
    try:
        _, counts = cpu_backend.atmn_quantize_decode_cpu(x, T, p, counts=True)
    finally:
        torch.set_num_threads(threads)
    neg = (rows + 2) // 3
    assert counts.tolist() == [[(rows - neg) * T, neg * T]]
    assert (rows - neg) * T > 2**24


def test_reset_forgets_rows_and_self_reporting_but_keeps_counting_exactly():
    class Work(nn.Module):
        """Computes with a parameter of its own; reports that work only when asked to."""

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))
            self.report_it = True

        def forward(self, x):
            if self.report_it:
                counting.record_ops(self, kind="work", macs=x.numel())
            return x * self.w

    net = nn.Sequential(Work(), nn.Linear(3, 2))
    counter = EnergyCounter(net)
    with torch.no_grad(), counter:
        net(torch.full((4, 3), 0.5))
        first = counter.report()
        assert {r.name for r in first.rows} == {"0", "1"} and not first.uncounted
        counter.reset()
        net[0].report_it = False  # now it computes without saying so: listed, not counted
        net(torch.full((5, 3), 0.5))
        second = counter.report()
        assert {r.name for r in second.rows} == {"1"}
        assert [name for name, _ in second.uncounted] == ["0"]
        assert second.row("1").macs == 5 * 3 * 2 and second.row("1").calls == 1
        counter.reset()
        net[0].report_it = True
        net(torch.full((2, 3), 0.5))
        third = counter.report()
        assert {r.name for r in third.rows} == {"0", "1"} and not third.uncounted
        assert third.row("0").macs == 6 and third.passes == 1


@pytest.mark.parametrize("C", [1, 300, 2048, 2049, 3000])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kernel_counts_on_either_side_of_the_stack_sums_width(C, tau):
    # up to 2048 channels the kernel sums per channel in REAL on its stack, above it straight
    # into the int64 counts: both equal the reference spike train's counts
    from spikemar.neurons import atmn_quantize, spike_counts

    g = torch.Generator().manual_seed(C)
    x = torch.randn(3, C, generator=g) * 2
    p = ATMNParameters(torch.rand(C, generator=g) + 0.2, tau, True)
    _, counts = cpu_backend.atmn_quantize_decode_cpu(x, 5, p, counts=True)
    _, spikes = atmn_quantize(x, 5, p, backend="torch")
    assert torch.equal(counts, spike_counts(spikes))
