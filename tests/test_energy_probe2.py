"""Memory-aware energy (issue 17) from outside, a second time: SpikingJelly's own memory
counter on the layers both count, the break-even rate recomputed on either side of it, a tiny
model priced by hand under every built-in profile, and the command on models without spikes."""

import math

import pytest
import torch
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import layer
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based.op_counter import (
    ModuleCounterMode,
    NeuromorphicMemoryAccessCounter,
)
from torch import nn

import spikemar.energy as energy
from spikemar.energy import break_even, declare_spikes, profile


def _sj_memory(net: nn.Module, x: torch.Tensor) -> dict[str, dict[str, int]]:
    """SpikingJelly 2.0's NeuromorphicMemoryAccessCounter: bytes per module scope."""
    sj_functional.reset_net(net)
    counter = NeuromorphicMemoryAccessCounter()
    with torch.no_grad(), ModuleCounterMode([counter], model=net):
        net(x)
    sj_functional.reset_net(net)
    return counter.get_counts()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("conv", [False, True])
def test_event_driven_weight_and_state_bytes_equal_spikingjelly_on_binary_spikes(conv, bias):
    """SpikingJelly's neuromorphic memory counter reads one weight per spike-driven synaptic op
    and one bias per output element, and a neuron's membrane once read and once written per
    step. Under address-events ('+mem+aer') spikemar counts the same bytes for binary spikes;
    the bias reads were missing (a spike-fed layer read only its synaptic weights, while the
    same layer fed real values read its bias, so break-even rates favoured spikes)."""
    torch.manual_seed(0)
    if conv:
        syn = layer.Conv1d(4, 6, 3, stride=2, padding=1, bias=bias, step_mode="m")
        x = torch.rand(3, 2, 4, 11)
    else:
        syn = layer.Linear(16, 8, bias=bias, step_mode="m")
        x = torch.rand(3, 5, 16)
    net = nn.Sequential(sj_neuron.IFNode(v_threshold=0.5, step_mode="m"), syn)
    sj = _sj_memory(net, x)
    sj_syn = next(v for k, v in sj.items() if k.endswith(".1"))
    sj_neuron_bytes = next(v for k, v in sj.items() if k.endswith(".0"))
    rep = profile(net, x, hardware="45nm-fp32+mem+aer")
    row = rep.row("1")
    assert row.spike_kind == "binary" and row.acs > 0
    assert row.weight_reads_event * 4 == sj_syn["weight_read_bytes"] + sj_syn["bias_read_bytes"]
    assert row.weight_bytes == sj_syn["weight_read_bytes"] + sj_syn["bias_read_bytes"]
    if bias:
        assert sj_syn["bias_read_bytes"] > 0
    point = rep.row("0")
    assert point.state_reads * 4 == sj_neuron_bytes["neuron_state_read_bytes"]
    assert point.state_writes * 4 == sj_neuron_bytes["neuron_state_write_bytes"]


def test_ternary_spikes_are_event_driven_where_spikingjelly_reads_every_weight():
    """SpikingJelly decides 'spike' by values in {0, 1}: a ternary spike train is a dense input
    to it (every weight read for every output), while ternary ±1 spikes drive one weight read
    each here, like binary ones."""
    torch.manual_seed(1)
    net = nn.Sequential(sj_neuron.TernaryIFNode(step_mode="m"), layer.Linear(16, 8, step_mode="m"))
    x = torch.randn(3, 5, 16) * 2
    sj = next(v for k, v in _sj_memory(net, x).items() if k.endswith(".1"))
    row = profile(net, x, hardware="45nm-fp32+mem+aer").row("1")
    assert row.spike_kind == "ternary" and row.spike_neg > 0
    assert sj["weight_read_bytes"] == 3 * 5 * 8 * 16 * 4  # dense: every output reads 16
    assert row.weight_reads_event == row.spike_nnz * 8 + 3 * 5 * 8  # per spike, plus the bias


class _Source(nn.Module):
    """A spike point firing exactly ``k`` of its T·N·n spike elements (alternate signs)."""

    def __init__(self, T: int) -> None:
        super().__init__()
        self.T, self.k = T, 0

    def forward(self, x):
        spikes = torch.zeros(self.T, *x.shape)
        g = torch.Generator().manual_seed(1)
        idx = torch.randperm(spikes.numel(), generator=g)[: self.k]
        sign = torch.ones(self.k)
        sign[::2] = -1
        spikes.view(-1)[idx] = sign
        return declare_spikes(self, spikes.mean(0), spikes, ternary=True)


class _PointLinear(nn.Module):
    def __init__(self, n: int, m: int, T: int) -> None:
        super().__init__()
        self.point = _Source(T)
        self.fc = nn.Linear(n, m)

    def forward(self, x):
        return self.fc(self.point(x))


@pytest.mark.parametrize(
    "hardware, reference",
    [
        ("45nm-fp32+mem+aer", "45nm-int8+mem+aer"),
        ("45nm-fp16+mem+aer", None),
        ("45nm-fp16", "45nm-int8+mem"),
        ("45nm-fp32+mem", None),
    ],
)
def test_break_even_rate_is_where_the_two_forms_cost_the_same(hardware, reference):
    """The printed rate is where the spike point and its consumer, priced under the report's
    profile, cost what the consumer fed real values costs under the reference: recomputed from
    two real reports of each form. Against an int8 reference the outputs and bias adds that
    both forms do cost less on the int8 side; they were left out as if they cancelled, and the
    rate was off (fp32 address-events against int8: 0.0325 printed, 0.0311 where they cross)."""
    N, n, m, T = 8, 64, 48, 4
    torch.manual_seed(0)
    net = _PointLinear(n, m, T)
    x = torch.randn(N, n)
    ref = energy.get_profile(reference or hardware)
    dense = profile(net.fc, x, hardware=ref).total_energy_pj
    elements = T * N * n
    gap = {}
    for k in (elements // 10, elements // 2):
        net.point.k = k
        rep = profile(net, x, hardware=hardware)
        gap[k / elements] = rep.total_energy_pj - dense
        if k == elements // 10:
            rate = break_even(rep, reference).row("point").break_even_rate
    (r0, g0), (r1, g1) = gap.items()  # the energies are linear in the firing rate
    crossing = r0 - g0 * (r1 - r0) / (g1 - g0)
    assert rate == pytest.approx(crossing, rel=1e-9)


def test_tiny_model_priced_by_hand_under_every_built_in_profile():
    """Linear (real input) → binary neuron → Linear (spikes), every term by its closed form;
    the weights and activations all fit the 8 KB SRAM (1.25 pJ per byte)."""
    torch.manual_seed(0)
    B, N, H, M = 4, 16, 32, 8
    net = nn.Sequential(nn.Linear(N, H), sj_neuron.IFNode(v_threshold=0.3), nn.Linear(H, M))
    x = torch.randn(B, N)
    with torch.no_grad():
        nnz = int(net[1](net[0](x)).count_nonzero())
    sj_functional.reset_net(net)
    assert 0 < nnz < B * H
    address = math.ceil(math.log2(H))
    for name in energy.available_profiles():
        hw = energy.get_profile(name)

        def price(v):
            return 0.0 if v is None else v

        acs, macs, updates, ew = nnz * M, B * N * H, B * H, B * H + B * M
        want = (acs * price(hw.ac_pj) + macs * price(hw.mac_pj)
                + updates * price(hw.neuron_update_pj) + ew * price(hw.elementwise_pj))  # fmt: skip
        if hw.prices_memory:
            vb, e = hw.value_bytes, hw.memory[0].pj_per_byte
            aer = hw.spike_encoding == "address"
            weights = (N * H + H) * B + ((acs + B * M) if aer else (H * M + M) * B)
            spike_bits = 2 * nnz * address if aer else 2 * B * H  # written, then read
            reals = B * N + B * H + B * H + B * M  # fc1 in and out, neuron in, fc2 out
            state = 2 * B * H  # the membrane read and written at each update
            want += e * ((weights + reals + state) * vb + spike_bits / 8)
        rep = profile(net, x, hardware=name, tokens=B)
        assert rep.total_energy_pj == pytest.approx(want, rel=1e-12), name
        assert rep.total_energy_pj == sum(r.energy_pj for r in rep.rows)


class _TwoPoints(nn.Module):
    """Two spike points of different widths, each feeding its own projection, or (``shared``)
    one projection called on both decodes."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.a, self.b = _Source(4), _Source(2)
        self.fa = nn.Linear(16, 8)
        self.fb = self.fa if shared else nn.Linear(16, 12)

    def forward(self, x):
        return self.fa(self.a(x)).sum(-1) + self.fb(self.b(x)).sum(-1)


def test_whole_model_rate_is_where_every_point_firing_at_it_costs_what_the_dense_form_does():
    torch.manual_seed(0)
    net = _TwoPoints()
    x = torch.randn(6, 16)
    hw = "45nm-fp32+mem+aer"
    dense = sum(profile(f, x, hardware=hw).total_energy_pj for f in (net.fa, net.fb))
    gap = {}
    for rate in (0.125, 0.5):  # whole spike counts at both widths
        net.a.k, net.b.k = round(rate * 4 * 6 * 16), round(rate * 2 * 6 * 16)
        rep = profile(net, x, hardware=hw)
        spiking = sum(rep.row(n).energy_pj for n in ("a", "b", "fa", "fb"))
        gap[rate] = spiking - dense
        if rate == 0.125:
            model = break_even(rep).model
    (r0, g0), (r1, g1) = gap.items()
    assert model.break_even_rate == pytest.approx(r0 - g0 * (r1 - r0) / (g1 - g0), rel=1e-9)


def test_a_point_that_fired_nothing_is_listed_and_counted_in_the_model_rate():
    """It was dropped (its consumer had no ACs): the table lost the point, and the model's rate
    and break-even were those of the other points alone."""
    net = _TwoPoints()
    net.a.k = 40
    rep = profile(net, torch.randn(6, 16), hardware="45nm-fp32+mem")
    table = break_even(rep)
    assert [p.name for p in table.points] == ["a", "b"]
    dead = table.row("b")
    assert dead.firing_rate == 0 and dead.break_even_rate is None and dead.pays is None
    assert dead.consumers == ("fb",) and dead.dense_pj > 0
    assert table.model.firing_rate == pytest.approx(40 / (4 * 96 + 2 * 96))
    assert table.model.break_even_rate is None
    assert "b fired no spike" in table.note


def test_a_layer_fed_by_two_points_joins_them_in_one_entry():
    """One projection called on two points' decodes reads spikes of 'a+b': it was in no entry,
    and the table came out empty."""
    net = _TwoPoints(shared=True)
    net.a.k, net.b.k = 40, 30
    x = torch.randn(6, 16)
    rep = profile(net, x, hardware="45nm-fp32+mem")
    assert rep.row("fa").spike_source == "a+b"
    table = break_even(rep)
    (entry,) = table.points
    assert entry.name == "a+b" and entry.consumers == ("fa",)
    assert entry.firing_rate == pytest.approx(70 / (4 * 96 + 2 * 96))
    spiking = sum(rep.row(n).energy_pj for n in ("a", "b", "fa"))
    assert entry.spiking_pj == pytest.approx(spiking)
    assert table.model.break_even_rate == pytest.approx(entry.break_even_rate)


def test_a_report_without_spike_points_says_so():
    rep = profile(nn.Linear(16, 8), torch.randn(3, 16), hardware="45nm-fp32+mem")
    table = break_even(rep)
    assert table.points == () and table.model is None
    assert "no spike point" in table.to_table() and "no spike point" in table.to_markdown()
    assert "| spike point |" not in table.to_markdown()


@pytest.mark.parametrize(
    "call, error, needle",
    [
        (lambda r: break_even(r, "nope"), ValueError, "reference: unknown profile 'nope'"),
        (lambda r: break_even(r, 3), TypeError, "reference: expected a profile name"),
        (lambda r: energy.headline(r, r, compute="nope"), ValueError, "compute: unknown"),
        (lambda r: energy.headline(r, r, memory="nope"), ValueError, "memory: unknown"),
        (lambda r: energy.compare_profiles(r, r, ["nope"]), ValueError, "profiles: unknown"),
        # a bare name is not a list of them (it was read letter by letter: "profile '4'")
        (lambda r: energy.compare_profiles(r, r, "45nm-fp32"), TypeError, "profiles: expected"),
        (lambda r: energy.memory_traffic(r.rows[0], "nope"), ValueError, "hw: unknown profile"),
    ],
)
def test_a_bad_profile_argument_is_named_as_given(call, error, needle):
    """Each public function names its own argument (they all said 'hardware:')."""
    rep = profile(nn.Linear(4, 2), torch.randn(2, 4), hardware="45nm-fp32+mem", tokens=2)
    with pytest.raises(error, match=needle):
        call(rep)


def test_memory_traffic_takes_a_profile_name():
    rep = profile(nn.Linear(4, 2), torch.randn(2, 4), hardware="45nm-fp32+mem", tokens=2)
    row = rep.rows[0]
    by_name = energy.memory_traffic(row, "45nm-fp16+mem")
    assert by_name == energy.memory_traffic(row, energy.get_profile("45nm-fp16+mem"))
    assert by_name[0] == 2 * (4 * 2 + 2) * 2  # fp16 weights and bias, per token


def test_a_profile_refuses_two_levels_of_one_name_and_a_flag_that_is_not_a_bool():
    """Reports and break-even tables name the level each byte lives in and look its price up by
    that name: two levels named alike priced the second's bytes at the first's figure."""
    levels = (energy.MemoryLevel("sram", 64, 1.0), energy.MemoryLevel("sram", None, 100.0))
    with pytest.raises(ValueError, match=r"memory: expected levels with different names"):
        energy.HardwareProfile("test-dup-levels", ac_pj=1.0, mac_pj=1.0, memory=levels)
    with pytest.raises(TypeError, match="memory_included: expected a bool, got 'yes'"):
        energy.HardwareProfile("test-flag", ac_pj=1.0, mac_pj=None, memory_included="yes")


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize(
    "make",
    [sj_neuron.IzhikevichNode, sj_neuron.ComplementaryLIFNode, sj_neuron.LIFNode],
    ids=["izhikevich", "complementary-lif", "lif"],
)
def test_a_neuron_reads_and_writes_every_state_variable_as_spikingjelly_counts(make, step_mode):
    """A neuron with two state variables (Izhikevich's v and w) reads and writes both at every
    step, as SpikingJelly's memory counter has it; only the membrane was counted."""
    torch.manual_seed(2)
    net = nn.Sequential(make(step_mode=step_mode), layer.Linear(16, 8, step_mode=step_mode))
    x = torch.randn(3, 5, 16) * 2 if step_mode == "m" else torch.randn(5, 16) * 2
    sj = next(v for k, v in _sj_memory(net, x).items() if k.endswith(".0"))
    row = profile(net, x, hardware="45nm-fp32+mem").row("0")
    assert row.state_reads * 4 == sj["neuron_state_read_bytes"]
    assert row.state_writes * 4 == sj["neuron_state_write_bytes"]
    assert row.state_bytes == sj["neuron_state_read_bytes"] + sj["neuron_state_write_bytes"]


def test_without_a_token_count_a_batch_costs_its_samples_under_per_token_fetching():
    """A float-input network has no token ids, so its report has no token count; under per-token
    weight fetching each sample's activations were still placed by the whole call's size: at
    batch 64 a 512-wide MLP's activations went to the 1 MB SRAM (12.5 pJ/B) instead of 8 KB
    (1.25 pJ/B), and a sample cost more in a batch than alone."""
    net = nn.Sequential(nn.Linear(512, 512), sj_neuron.IFNode(), nn.Linear(512, 512))
    x = torch.randn(64, 512)
    reps = []
    for batch in (x[:1], x):
        sj_functional.reset_net(net)
        reps.append(profile(net, batch, hardware="45nm-fp32+mem"))
    one, many = reps
    assert one.tokens is None and many.tokens is None
    for a, b in zip(one.rows, many.rows, strict=True):
        assert b.vectors == 64 * a.vectors
        assert b.activation_level == a.activation_level == "SRAM 8 KB"
    sj_functional.reset_net(net)
    told = profile(net, x, hardware="45nm-fp32+mem", tokens=64)  # placed per token: the same
    assert [r.activation_memory_pj for r in told.rows] == [
        r.activation_memory_pj for r in many.rows
    ]
    assert energy.EnergyReport.from_json(many.to_json()) == many


def test_energy_command_names_the_report_it_cannot_write(tmp_path, capsys, monkeypatch):
    """A write that fails after the checks (a full disk; /proc as root passes them) printed the
    bare '[Errno 28] ...' of a temporary file, naming no option."""
    import argparse
    import contextlib
    import errno

    import spikemar.energy.cli as energy_cli

    @contextlib.contextmanager
    def full_disk(path, **_):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
        yield

    monkeypatch.setattr(energy_cli, "atomic_write", full_disk)
    parser = energy_cli.add_energy_arguments(argparse.ArgumentParser(prog="spikemar energy"))
    out = str(tmp_path / "r.json")
    args = parser.parse_args(
        ["--model", "demo", "--d", "16", "--layers", "1", "--random-tokens", "4", "--json", out]
    )
    assert energy_cli.energy_main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"spikemar energy: error: --json: cannot write {out!r} (No space left on device)"
    ]


def test_energy_command_writes_the_break_even_rates_and_ratios_it_prints(tmp_path, capsys):
    """--memory prints break-even rates and the ratio under every profile, but --json and
    --markdown held the per-layer report alone; the JSON still reads as that report."""
    import argparse
    import json

    from spikemar.energy.cli import add_energy_arguments, energy_main

    parser = add_energy_arguments(argparse.ArgumentParser(prog="spikemar energy"))
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    args = parser.parse_args(["--model", "demo", "--d", "16", "--layers", "1", "--random-tokens",
                              "8", "--compare-dense", "--memory", "--json", str(js),
                              "--markdown", str(md)])  # fmt: skip
    assert energy_main(args) == 0
    out = capsys.readouterr().out
    doc = json.loads(js.read_text())
    assert [t["hardware"] for t in doc["break_even"]] == ["45nm-fp32+mem", "45nm-int8+mem"]
    names = [p["name"] for p in doc["break_even"][0]["points"]]
    assert names and all(f"\n{n} " in out for n in names)
    ratios = {c["hardware"]: c for c in doc["comparisons"]}
    assert set(ratios) == set(energy.available_profiles())
    assert ratios["loihi"]["ratio"] is None and "prices no MACs" in ratios["loihi"]["refusal"]
    fp32 = ratios["45nm-fp32+mem"]
    assert fp32["ratio"] == pytest.approx(fp32["student_pj"] / fp32["teacher_pj"])
    assert f"{fp32['ratio']:8.4f}" in out
    report = energy.EnergyReport.from_json(js.read_text())
    assert report.hardware.name == "45nm-fp32+mem" and report.tokens == 8
    text = md.read_text()
    assert text.startswith("Energy report") and text.count("Break-even firing rates") == 2
    assert "student vs dense twin on '45nm-fp32+mem'" in text


def test_spikingjelly_simple_energy_memory_term_equals_ours_on_binary_spikes():
    """SpikingJelly's SimpleEnergyProfiler (MACs and ACs at Horowitz's figures, plus the
    weights, biases and neuron states its memory counter reads at 24.96 pJ/B): on a binary
    network, its MACs, synaptic ops and memory energy are ours under the same single-level,
    event-driven profile (we also count activations and spike addresses, which it leaves out;
    it prices bias adds as ACs, we count them as element-wise ops)."""
    from spikingjelly.activation_based.op_counter import estimate_simple_energy

    torch.manual_seed(0)
    net = nn.Sequential(
        layer.Linear(16, 32, step_mode="m"), sj_neuron.IFNode(v_threshold=0.5, step_mode="m"),
        layer.Linear(32, 8, step_mode="m"), sj_neuron.LIFNode(step_mode="m"),
    )  # fmt: skip
    x = torch.randn(4, 3, 16)
    sj_functional.reset_net(net)
    sj = estimate_simple_energy(net, x)
    sj_functional.reset_net(net)
    chip = energy.HardwareProfile("test-sj-simple", ac_pj=0.9, mac_pj=4.6, spike_encoding="address",
                                  memory=(energy.MemoryLevel("mem", None, 24.96),))  # fmt: skip
    rep = profile(net, x, hardware=chip)
    assert rep.total_macs == sj.counts["mac"] and rep.total_acs == sj.counts["synop"] > 0
    assert rep.total_mac_energy_pj == pytest.approx(sj.energy_mac_pj)
    ours = sum(r.weight_memory_pj + r.state_memory_pj for r in rep.rows)
    assert ours == pytest.approx(sj.energy_memory_pj, rel=1e-12)


def test_headline_names_each_profile_for_what_it_prices():
    """A compute-only profile given as ``memory`` was labelled 'with memory traffic'; a ratio of
    1 read '1x less'."""
    rep = profile(nn.Linear(4, 2), torch.randn(2, 4), tokens=2)
    with pytest.raises(ValueError, match="memory: '45nm-fp16' prices no memory traffic"):
        energy.headline(rep, rep, memory="45nm-fp16")
    line = energy.headline(rep, rep, memory="loihi")
    assert "memory included (loihi)" in line and "with memory traffic" not in line
    line = energy.headline(rep, rep)
    assert "with memory traffic (45nm-fp32+mem)" in line and "the same to 3 digits" in line
    assert "1x less" not in line
