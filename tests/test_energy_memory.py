"""Memory traffic in the energy counter (issue 17): byte counts of Linear, Conv, Embedding,
neuron, spike-point and SSM layers against hand counts (dense, ternary and binary inputs), the
packed and address-event spike widths, placement, memory profiles (priced, unpriced, included),
break-even firing rates against their closed form, and honest comparisons."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import layer
from spikingjelly.activation_based import neuron as sj_neuron
from torch import nn

import spikemar.energy as energy
from spikemar.energy import (
    EnergyReport,
    HardwareProfile,
    MemoryLevel,
    break_even,
    compare,
    declare_spikes,
    memory_traffic,
    profile,
)
from spikemar.neurons import ATMN, BinaryMultiStep


class Point(nn.Module):
    """A spike point: δ-inject into an ATMN (ternary) or its binary baseline for T micro-steps,
    declare the decode."""

    def __init__(self, channels: int, T: int = 4, binary: bool = False) -> None:
        super().__init__()
        kind = BinaryMultiStep if binary else ATMN
        self.neuron = kind(1.0, 0.5, num_channels=channels)
        self.T = T
        self.spikes: torch.Tensor | None = None

    def forward(self, x):
        decoded, spikes = self.neuron.quantize(x, self.T)
        self.spikes = spikes
        return declare_spikes(self, decoded, spikes, ternary=self.neuron.ternary)


class PointLinear(nn.Module):
    def __init__(self, n=16, m=8, T=4, bias=False, binary=False):
        super().__init__()
        self.point = Point(n, T, binary)
        self.fc = nn.Linear(n, m, bias=bias)

    def forward(self, x):
        return self.fc(self.point(x))


def one_level(name: str, pj_per_byte: float, spike_encoding: str) -> HardwareProfile:
    """A test chip with one unbounded memory level: placement cannot move any byte."""
    return HardwareProfile(name, ac_pj=0.5, mac_pj=3.0, neuron_update_pj=0.25, value_bytes=4,
                           memory=(MemoryLevel("mem", None, pj_per_byte),),
                           spike_encoding=spike_encoding)  # fmt: skip


# -- byte counts against hand counts -------------------------------------------------------------


def test_linear_dense_input_hand_counted():
    fc = nn.Linear(16, 8)
    rep = profile(fc, torch.randn(5, 16), hardware="45nm-fp32+mem")
    r = rep.row("Linear")
    assert r.weight_reads == 5 * (16 * 8 + 8)  # weights + bias re-read for each of 5 tokens
    assert r.weight_reads_call == 16 * 8 + 8
    assert r.weight_reads_event == r.weight_reads  # real input: no event-driven reads
    assert (r.activation_reads, r.activation_writes) == (5 * 16, 5 * 8)
    assert r.spike_read_bits_packed == r.spike_write_bits_packed == 0
    assert r.state_reads == r.state_writes == 0
    assert (r.weight_bytes, r.activation_bytes) == (4 * 5 * 136, 4 * (80 + 40))


@pytest.mark.parametrize("binary", [False, True])
def test_linear_fed_by_spike_point_hand_counted(binary):
    N, n, m, T = 6, 16, 8, 4
    net = PointLinear(n, m, T, binary=binary).eval()
    rep = profile(net, torch.randn(N, n) * 2, hardware="45nm-fp32+mem")
    s = net.point.spikes
    nnz = int(s.count_nonzero())
    width = 1 if binary else 2  # packed bits per neuron per micro-step
    address = 4 + (0 if binary else 1)  # log2(16) bits, plus a sign bit for ternary spikes
    point, fc = rep.row("point"), rep.row("fc")
    assert 0 < nnz < s.numel() and s.numel() == T * N * n
    # the spike point: reads its real input and its n thresholds per token, writes the train;
    # its δ-injected membrane lives in a register for the T micro-steps (no state traffic)
    assert point.activation_reads == N * n and point.weight_reads == N * n
    assert point.spike_write_bits_packed == width * T * N * n
    assert point.spike_write_bits_address == address * nnz
    assert point.state_reads == point.state_writes == 0
    # the Linear: reads the spikes, its weights once per token (or one per accumulate)
    assert fc.spike_read_bits_packed == width * T * N * n
    assert fc.spike_read_bits_address == address * nnz
    assert fc.activation_reads == 0 and fc.activation_writes == N * m
    assert fc.weight_reads == N * n * m and fc.weight_reads_event == fc.acs == nnz * m
    assert (fc.dense_macs, fc.dense_inputs) == (N * n * m, N * n)
    assert fc.spike_source == "point"
    # bytes under the packed and the address-event profiles
    assert memory_traffic(fc, energy.get_profile("45nm-fp32+mem"))[1] == pytest.approx(
        width * T * N * n / 8 + 4 * N * m
    )
    aer = memory_traffic(fc, energy.get_profile("45nm-fp32+mem+aer"))
    assert aer[0] == 4 * nnz * m and aer[1] == pytest.approx(address * nnz / 8 + 4 * N * m)


def test_packed_ternary_train_is_two_bits_per_neuron_per_micro_step():
    net = PointLinear(n=32, m=4, T=5).eval()
    rep = profile(net, torch.randn(3, 32) * 3, hardware="45nm-int8+mem")
    r = rep.row("point")
    assert r.spike_elements == 5 * 3 * 32
    assert r.spike_write_bits_packed == 2 * r.spike_elements
    # bytes: 2 bits per element, whatever fires (int8 values: 1 byte for each real input and
    # threshold read)
    _, act_b, _ = memory_traffic(r, rep.hardware)
    assert act_b == pytest.approx(2 * r.spike_elements / 8 + 1 * 3 * 32)


def test_spikingjelly_neuron_reads_and_writes_its_membrane_every_update():
    net = nn.Sequential(
        layer.Linear(8, 12), sj_neuron.IFNode(step_mode="m"), layer.Linear(12, 4)
    ).eval()
    sj_functional.set_step_mode(net, "m")
    x = torch.randn(3, 2, 8) * 3  # [T, N, features]
    rep = profile(net, x, hardware="45nm-fp32+mem")
    neuron = rep.row("1")
    n = 3 * 2 * 12
    assert neuron.neuron_updates == n and neuron.state_reads == neuron.state_writes == n
    assert neuron.activation_reads == n and neuron.spike_write_bits_packed == n  # binary: 1 bit
    fc = rep.row("2")
    assert fc.spike_read_bits_packed == n and fc.spike_source == "1"
    assert fc.spike_read_bits_address == neuron.spike_nnz * math.ceil(math.log2(12))


def test_conv2d_hand_counted_dense_and_spiking():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    rep = profile(conv, torch.randn(2, 3, 8, 8), hardware="45nm-fp32+mem")
    r = rep.row("Conv2d")
    weights = 4 * 3 * 3 * 3 + 4
    assert (r.weight_reads_call, r.weight_reads) == (weights, 2 * weights)  # once per sample
    assert (r.activation_reads, r.activation_writes) == (2 * 3 * 64, 2 * 4 * 64)

    spiking = nn.Sequential(ATMN(1.0, 0.5, step_mode="m"), layer.Conv2d(3, 4, 3, padding=1))
    sj_functional.set_step_mode(spiking, "m")
    x = torch.randn(2, 1, 3, 8, 8) * 2  # [T, N, C, H, W]
    rep = profile(spiking, x, hardware="45nm-fp32+mem")
    r, neuron = rep.row("1"), rep.row("0")
    nnz = neuron.spike_nnz
    assert r.spike_read_bits_packed == 2 * x.numel()
    # an address names the channel and the position: log2(3·8·8 = 192) → 8 bits, + sign
    assert r.spike_read_bits_address == nnz * (8 + 1)
    assert r.weight_reads == 2 * weights  # two samples (T·N) per call
    assert r.activation_writes == 2 * 4 * 64


def test_embedding_reads_the_rows_it_looks_up():
    emb = nn.Embedding(10, 6)
    rep = profile(emb, torch.randint(0, 10, (2, 5)), hardware="45nm-fp32+mem")
    r = rep.row("Embedding")
    assert r.weight_reads == r.weight_reads_call == 2 * 5 * 6
    assert r.activation_writes == 2 * 5 * 6 and r.activation_reads == 0


def test_ssm_layers_count_their_state_per_token():
    from spikemar.ssm import LTICell, SelectiveMixer

    cell = LTICell(6)
    rep = profile(cell, torch.randn(2, 5, 6), hardware="45nm-fp32+mem")
    r = rep.row("LTICell")
    tokens_x_channels = 2 * 5 * 6
    assert r.state_reads == r.state_writes == tokens_x_channels
    assert r.weight_reads == 4 * tokens_x_channels  # λ, b, c, d per channel and token
    assert (r.activation_reads, r.activation_writes) == (tokens_x_channels, tokens_x_channels)

    mixer = SelectiveMixer(8, d_state=4, head_dim=4, expand=2).eval()
    B, L = 2, 3
    rep = profile(mixer, torch.randn(B, L, 8), hardware="45nm-fp32+mem")
    r = rep.row("SelectiveMixer")
    state = mixer.n_heads * mixer.head_dim * mixer.d_state
    assert r.state_reads == r.state_writes == B * L * state  # h read and written per token
    assert r.weight_reads == B * L * 3 * mixer.n_heads  # dt_bias, A_log, D
    # forward and step count the same state traffic (step adds the convolution's window)
    state0 = mixer.init_state(B)
    with energy.EnergyCounter(mixer) as counter, torch.no_grad():
        mixer.step(torch.randn(B, 8), state0)
    step = counter.report("45nm-fp32+mem").row("SelectiveMixer")
    window = mixer.conv_channels * (mixer.d_conv - 1)
    assert step.state_reads == B * (state + window)


# -- profiles: priced, unpriced (listed, never zero), included -------------------------------------


def test_compute_only_profile_lists_memory_unpriced_never_zero():
    net = PointLinear().eval()
    x = torch.randn(4, 16) * 2
    rep = profile(net, x, hardware="45nm-fp32")
    moved = rep.total_memory_bytes
    assert moved > 0 and rep.unpriced["memory_bytes"] == round(moved)
    assert rep.total_memory_energy_pj == 0
    assert rep.total_energy_pj == pytest.approx(rep.total_compute_energy_pj)
    assert "memory bytes" in rep.to_table() and "not priced" in rep.to_table()
    # a user profile with no memory levels does the same
    mine = HardwareProfile("test-no-memory", ac_pj=1.0, mac_pj=2.0)
    assert "memory_bytes" in rep.with_hardware(mine).unpriced
    # a memory profile prices it: compute + memory
    mem = rep.with_hardware("45nm-fp32+mem")
    assert "memory_bytes" not in mem.unpriced and mem.total_memory_energy_pj > 0
    assert mem.total_energy_pj == pytest.approx(
        mem.total_compute_energy_pj + mem.total_memory_energy_pj
    )
    assert mem.total_compute_energy_pj == pytest.approx(rep.total_compute_energy_pj)


def test_loihi_includes_its_memory_and_says_so():
    rep = profile(PointLinear().eval(), torch.randn(4, 16) * 2, hardware="loihi")
    assert "memory_bytes" not in rep.unpriced and rep.total_memory_energy_pj == 0
    assert rep.hardware.memory_included and "included" in rep.to_table()


def test_placement_weights_beyond_the_chip_go_to_dram():
    levels = (MemoryLevel("small", 64, 1.0), MemoryLevel("dram", None, 100.0))
    chip = HardwareProfile("test-tiny-chip", ac_pj=1.0, mac_pj=1.0, memory=levels)
    fc = nn.Linear(4, 2, bias=False)  # 8 weights = 32 bytes: on chip
    assert profile(fc, torch.randn(1, 4), hardware=chip).row("Linear").weight_level == "small"
    fc = nn.Linear(8, 4, bias=False)  # 128 bytes: off chip
    r = profile(fc, torch.randn(1, 8), hardware=chip).row("Linear")
    assert r.weight_level == "dram" and r.weight_memory_pj == pytest.approx(128 * 100.0)
    assert r.activation_level == "small"  # 8 + 4 values per token fit
    # greedy, hottest first: a spike point's 16 thresholds (64 B, read once per token each)
    # stay on chip, the 16×8 matrix (512 B) spills to DRAM
    levels = (MemoryLevel("small", 100, 1.0), MemoryLevel("dram", None, 100.0))
    chip = HardwareProfile("test-tiny-chip-2", ac_pj=1.0, mac_pj=1.0, memory=levels)
    rep = profile(PointLinear(16, 8).eval(), torch.randn(3, 16), hardware=chip)
    assert rep.row("point").parameters == 16 and rep.row("point").weight_level == "small"
    assert rep.row("fc").parameters == 128 and rep.row("fc").weight_level == "dram"
    assert "64 B in small, 512 B in dram" in rep.to_table()


def test_memory_profiles_are_registered_cited_and_round_trip():
    names = energy.available_profiles()
    for base in ("45nm-fp32", "45nm-fp16", "45nm-int8"):
        assert base + "+mem" in names and base + "+mem+aer" in names
        p = energy.get_profile(base + "+mem")
        assert "Horowitz" in p.citation and p.spike_encoding == "packed"
        assert [lv.pj_per_byte for lv in p.memory] == [1.25, 2.5, 12.5, 162.5]
        assert energy.get_profile(base + "+mem+aer").spike_encoding == "address"
    assert energy.memory_sibling("45nm-int8").name == "45nm-int8+mem"
    assert energy.memory_sibling("loihi").name == "loihi"
    rep = profile(PointLinear().eval(), torch.randn(4, 16) * 2, hardware="45nm-fp16+mem")
    again = EnergyReport.from_json(rep.to_json())
    assert again == rep
    with pytest.raises(ValueError, match="spike_encoding"):
        HardwareProfile("bad", ac_pj=1.0, mac_pj=1.0, spike_encoding="morse")
    with pytest.raises(ValueError, match="memory: expected levels ordered"):
        HardwareProfile("bad", ac_pj=1.0, mac_pj=1.0,
                        memory=(MemoryLevel("a", None, 1.0), MemoryLevel("b", 8, 1.0)))  # fmt: skip


# -- break-even firing rates ----------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["packed", "address"])
def test_break_even_of_one_layer_matches_its_closed_form(encoding):
    N, n, m, T = 6, 16, 8, 4
    e, ac, mac, nu, vb = 1.0, 0.5, 3.0, 0.25, 4
    chip = one_level(f"test-one-level-{encoding}", e, encoding)
    net = PointLinear(n, m, T).eval()
    rep = profile(net, torch.randn(N, n) * 2, hardware=chip)
    entry = break_even(rep).row("point")
    # dense form: N·n·m MACs, the real input read, the weights read once per token, the N·m
    # outputs written (written by both forms: they cancel in the rate)
    dense = N * n * m * mac + e * vb * N * n + e * vb * n * m * N + e * vb * N * m
    # spiking: T·N·n neuron updates, the input and the n thresholds per token read, the
    # outputs written, and ...
    fixed = N * n * T * nu + e * vb * (N * n + N * n) + e * vb * N * m
    if encoding == "packed":
        # ... the 2-bit train written and read, the weights read per token; per unit rate,
        # T·N·n·m accumulates
        fixed += e * 2 * (2 * T * N * n / 8) + e * vb * n * m * N
        per_rate = T * N * n * m * ac
    else:
        # ... per non-zero spike: its 5-bit address written and read, m accumulates and m
        # weight reads
        per_rate = T * N * n * (2 * e * 5 / 8 + m * (ac + e * vb))
    assert entry.fixed_pj == pytest.approx(fixed)
    assert entry.per_rate_pj == pytest.approx(per_rate)
    assert entry.dense_pj == pytest.approx(dense)
    assert entry.break_even_rate == pytest.approx((dense - fixed) / per_rate)
    rate = int(net.point.spikes.count_nonzero()) / net.point.spikes.numel()
    assert entry.firing_rate == pytest.approx(rate)
    assert entry.spiking_pj == pytest.approx(fixed + per_rate * rate)
    # one spike point: the whole model's break-even is the point's
    assert break_even(rep).model.break_even_rate == pytest.approx(entry.break_even_rate)


def test_break_even_compute_only_is_the_mac_ac_ratio_over_T():
    T = 4
    rep = profile(PointLinear(T=T).eval(), torch.randn(6, 16) * 2, hardware="45nm-fp32")
    table = break_even(rep)
    assert table.row("point").break_even_rate == pytest.approx(4.6 / (0.9 * T))
    assert "neuron updates unpriced" in table.note and "memory unpriced" in table.note
    # against an int8 dense model (priced under 45nm-int8): 0.23 pJ per MAC
    assert break_even(rep, "45nm-int8").row("point").break_even_rate == pytest.approx(
        0.23 / (0.9 * T)
    )
    loihi = break_even(rep.with_hardware("loihi"))
    assert loihi.row("point").break_even_rate is None and "prices no MAC" in loihi.note
    assert "Break-even" in str(table) and "| point |" in table.to_markdown()


# -- comparisons ----------------------------------------------------------------------------------


def test_comparison_that_leaves_one_sides_work_unpriced_gives_no_ratio():
    x = torch.randn(4, 16) * 2
    student = profile(PointLinear().eval(), x, hardware="loihi", tokens=4)
    teacher = profile(nn.Linear(16, 8, bias=False), x, hardware="loihi", tokens=4)
    cmp = compare(student, teacher)
    assert cmp.ratio is None and cmp.savings is None
    assert "no ratio" in cmp.to_table() and "prices no MACs" in cmp.refusal
    assert "teacher 128" in cmp.refusal  # 16·8 MACs per token, counted as nothing
    assert '"ratio": null' in cmp.to_json()
    # under a profile that prices both sides the ratio is given, with what is left out
    fp32 = compare(student.with_hardware("45nm-fp32"), teacher.with_hardware("45nm-fp32"))
    assert fp32.ratio == pytest.approx(fp32.student_pj / fp32.teacher_pj)
    line = fp32.to_table().splitlines()[0]
    assert "not priced on either side" in line and "memory bytes" in line
    mem = compare(student.with_hardware("45nm-fp32+mem"), teacher.with_hardware("45nm-fp32+mem"))
    assert "memory bytes" not in mem.to_table().splitlines()[0]


def test_headline_gives_both_ratios_with_their_profile_names():
    x = torch.randn(4, 16) * 2
    student = profile(PointLinear().eval(), x, tokens=4)
    teacher = profile(nn.Linear(16, 8, bias=False), x, tokens=4)
    line = energy.headline(student, teacher)
    assert line.startswith("energy per token, spiking vs dense: ")
    assert "compute only (45nm-fp32): " in line and "with memory traffic (45nm-fp32+mem): " in line
    for hw in ("45nm-fp32", "45nm-fp32+mem"):
        cmp = compare(student.with_hardware(hw), teacher.with_hardware(hw))
        assert f"{cmp.savings:.3g}x less" in line or f"{1 / cmp.savings:.3g}x more" in line
    assert "no ratio" in energy.headline(student, teacher, compute="loihi")
    # a memory profile given as compute is one figure, named for what it prices (it was called
    # "compute only" and printed twice)
    mem = energy.headline(student, teacher, compute="45nm-fp32+mem")
    assert "compute only" not in mem and mem.count("(45nm-fp32+mem)") == 1
    assert "with memory traffic (45nm-fp32+mem): " in mem
    loihi = energy.headline(student, teacher, compute="loihi")
    assert loihi.count("(loihi)") == 1 and "memory included (loihi)" in loihi


def test_comparison_figure_leaves_out_rows_too_small_to_see():
    # a MAR model's norms, spike points and element-wise modules drew one empty row each
    # (a 4-layer comparison was 5,325 px tall); the figure names how many it left out
    from spikemar.checkpoint import dense_twin, load_checkpoint
    from spikemar.showcase import shipped_checkpoint

    student = load_checkpoint(shipped_checkpoint())[0].eval()
    ids = torch.randint(0, student.config.vocab_size, (1, 16))
    mem = "45nm-fp32+mem"
    cmp = compare(profile(student, ids).with_hardware(mem),
                  profile(dense_twin(student).eval(), ids).with_hardware(mem))  # fmt: skip
    ax = cmp.figure().axes[0]
    drawn = [t.get_text() for t in ax.get_yticklabels()]
    assert "layers.1.mixer.in_proj" in drawn and "layers.1.norm1" not in drawn
    hidden = len(cmp.rows) - len(drawn)
    assert hidden > 0 and f"{hidden} modules under 0.5% of the largest bar" in ax.get_xlabel()
    assert len({r.name for r in cmp.rows}) == len(cmp.rows)  # the table keeps every row
    # under Loihi the teacher's MACs are drawn as nothing and named: those rows stay
    loihi = compare(cmp.student.with_hardware("loihi"), cmp.teacher.with_hardware("loihi"))
    ticks = [t.get_text() for t in loihi.figure().axes[0].get_yticklabels()]
    assert any("teacher's MACs not priced" in t for t in ticks), ticks


def test_energy_command_memory_breakeven_and_comparison_png(tmp_path, capsys):
    import argparse

    from PIL import Image

    from spikemar.energy.cli import add_energy_arguments, energy_main

    parser = add_energy_arguments(argparse.ArgumentParser(prog="spikemar energy"))
    common = ["--model", "demo", "--d", "16", "--layers", "1", "--random-tokens", "8"]
    png = tmp_path / "cmp.png"
    args = parser.parse_args([*common, "--compare-dense", "--memory", "--png", str(png)])
    assert energy_main(args) == 0
    out = capsys.readouterr().out
    assert "hardware '45nm-fp32+mem'" in out and "bytes moved" in out and "memory" in out
    assert "Break-even firing rates under '45nm-fp32+mem'" in out
    assert "Break-even firing rates under '45nm-int8+mem'" in out
    assert "under each profile" in out and "45nm-fp32+mem+aer" in out
    assert Image.open(png).size[0] > 800  # both models, per token, compute and memory
    # Loihi prices no MAC: the comparison says so on its ratio line instead of a ratio
    assert energy_main(parser.parse_args([*common, "--compare-dense", "--hardware", "loihi"])) == 0
    ratio_line = next(ln for ln in capsys.readouterr().out.splitlines() if " vs dense twin" in ln)
    assert "no ratio" in ratio_line and "prices no MACs" in ratio_line
    # a profile with no memory sibling is refused in one line
    energy.register_profile(HardwareProfile("test-bare", ac_pj=1.0, mac_pj=2.0), overwrite=True)
    assert energy_main(parser.parse_args([*common, "--hardware", "test-bare", "--memory"])) == 2
    assert "no profile 'test-bare+mem'" in capsys.readouterr().err


def test_compare_profiles_reprices_one_count_under_every_profile():
    x = torch.randn(4, 16) * 2
    student = profile(PointLinear().eval(), x, tokens=4)
    teacher = profile(nn.Linear(16, 8, bias=False), x, tokens=4)
    cmps = energy.compare_profiles(student, teacher)
    names = [c.student.hardware.name for c in cmps]
    assert names[0] == "45nm-fp32" and len(names) == len(set(names))
    assert set(energy.available_profiles()) <= set(names)
    by_name = {c.student.hardware.name: c for c in cmps}
    assert by_name["loihi"].ratio is None and by_name["45nm-int8+mem"].ratio is not None
    assert by_name["45nm-fp32"].ratio == pytest.approx(compare(student, teacher).ratio)


@settings(max_examples=25)
@given(
    n=st.integers(2, 40),
    m=st.integers(1, 12),
    tokens=st.integers(1, 6),
    T=st.integers(1, 6),
    binary=st.booleans(),
)
def test_spike_fed_linear_bytes_follow_the_formula(n, m, tokens, T, binary):
    net = PointLinear(n, m, T, binary=binary).eval()
    rep = profile(net, torch.randn(tokens, n) * 2, hardware="45nm-fp16+mem")
    fc, point = rep.row("fc"), rep.row("point")
    nnz = int(net.point.spikes.count_nonzero())
    width = 1 if binary else 2
    address = max(1, math.ceil(math.log2(max(2, n)))) + (0 if binary else 1)
    assert fc.spike_read_bits_packed == point.spike_write_bits_packed == width * T * tokens * n
    assert fc.spike_read_bits_address == point.spike_write_bits_address == address * nnz
    assert fc.weight_reads == tokens * n * m and fc.weight_reads_event == nnz * m
    weight_b, act_b, state_b = memory_traffic(fc, rep.hardware)  # fp16: 2 bytes per value
    assert (weight_b, state_b) == (2 * tokens * n * m, 0)
    assert act_b == pytest.approx(width * T * tokens * n / 8 + 2 * tokens * m)
    # repricing never changes a count, only bytes and energy
    again = rep.with_hardware("45nm-int8+mem+aer").row("fc")
    assert again.spike_read_bits_address == fc.spike_read_bits_address
    assert memory_traffic(again, energy.get_profile("45nm-int8+mem+aer"))[0] == nnz * m  # int8


def test_a_report_written_before_memory_counting_still_reads():
    rep = profile(PointLinear().eval(), torch.randn(4, 16) * 2)
    data = rep.to_dict()
    data["schema"] = "spikemar.energy/1"
    for row in data["rows"]:  # what the first schema had: no memory counts
        for k in [*energy.counter.MEMORY_COUNT_FIELDS, "parameters", "spike_source"]:
            row.pop(k)
    old = EnergyReport.from_dict(data)
    assert old.total_acs == rep.total_acs and old.total_memory_bytes == 0
    assert "memory_bytes" not in old.unpriced  # nothing counted: nothing listed


def test_a_tied_head_and_embedding_hold_one_matrix():
    """A head tied to the embedding (Mamba-2 130M, Llamba) reads the embedding's matrix: the
    placement held it twice (a converted mamba2-130m: 670 MB "weights held" for 516 MB of
    weights), so a chip that holds the model once spilled a matrix to DRAM. Held once now,
    where the embedding's weights are; the report round-trips the sharing through JSON."""
    from spikemar.models import MARLM, MARConfig

    torch.manual_seed(0)
    config = MARConfig(vocab_size=40, d_model=8, n_layers=1, d_state=4, head_dim=4,
                       tie_embeddings=True)  # fmt: skip
    model = MARLM(config).eval()
    unique = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 40, (1, 6))
    chip = HardwareProfile("test-tied-chip", ac_pj=1.0, mac_pj=1.0,
                           memory=(MemoryLevel("sram", unique * 4, 1.0),
                                   MemoryLevel("dram", None, 100.0)))  # fmt: skip
    report = profile(model, ids, hardware=chip)
    head, embed = report.row("head"), report.row("embed")
    assert head.weights_of == "embed" and head.shared_parameters == 40 * 8
    assert sum(r.parameters - r.shared_parameters for r in report.rows) == unique
    assert {r.weight_level for r in report.rows if r.parameters} == {"sram"}  # all of it fits
    assert head.weight_level == embed.weight_level
    again = EnergyReport.from_json(report.to_json())
    assert again.row("head").weights_of == "embed"
    assert again.total_energy_pj == pytest.approx(report.total_energy_pj, rel=1e-12)
    untied = MARLM(MARConfig(**{**config.__dict__, "tie_embeddings": False})).eval()
    assert profile(untied, ids, hardware=chip).row("head").weights_of is None
