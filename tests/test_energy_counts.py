"""The energy counter fed spike counts instead of spike trains (the fused spike-point kernels'
``counts=True``), and the element-wise work of MAR's layers that no module rule sees (residual
adds, the SwiGLU gate): equal reports on both paths, hand counts, the declaration's bad input."""

import math

import pytest
import torch
from torch import nn

from spikemar import counting
from spikemar.energy import EnergyCounter
from spikemar.models import MARLM, MARConfig, SpikeConfig, SpikePoint
from spikemar.models.transformer import TransformerConfig, TransformerLM

SAME = (
    "acs", "macs", "elementwise_ops", "neuron_updates", "spike_elements", "spike_nnz",
    "spike_pos", "spike_neg", "weight_reads", "weight_reads_call", "weight_reads_event",
    "activation_reads", "activation_writes", "spike_read_bits_packed",
    "spike_read_bits_address", "spike_write_bits_packed", "spike_write_bits_address",
    "state_reads", "state_writes", "dense_macs", "dense_inputs", "spike_source",
)  # fmt: skip


class CountingCounter(EnergyCounter):
    """The built-in counter, noting which declaration each spike-point call used."""

    def __init__(self, model):
        super().__init__(model)
        self.by_counts = self.by_train = 0

    def on_declare_spike_counts(self, *args):
        self.by_counts += 1
        super().on_declare_spike_counts(*args)

    def on_declare_spikes(self, *args):
        self.by_train += 1
        super().on_declare_spikes(*args)


def _model(seed: int, **kw) -> MARLM:
    torch.manual_seed(seed)
    config = dict(vocab_size=40, d_model=16, n_layers=2, d_state=8, head_dim=8)
    # thresholds small enough that every point fires
    return MARLM(MARConfig(**{**config, "spikes": SpikeConfig(T=3, v_threshold=0.05), **kw}))


def _count(model: nn.Module, tokens: torch.Tensor, *, keep_trains: bool, grad: bool = False):
    points = [m for m in model.modules() if isinstance(m, SpikePoint)]
    for p in points:
        p.record = keep_trains  # a recording point materialises its spike train
    counter = CountingCounter(model)
    with torch.set_grad_enabled(grad), counter:
        out = model(tokens)
    for p in points:
        p.record = False
    rows = {r.name: r for r in counter.report("45nm-fp32+mem", tokens=tokens.numel()).rows}
    return rows, counter, out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("grad", [False, True])
def test_counts_path_reports_what_the_spike_train_path_reports(seed, grad):
    model = _model(seed).train(grad)
    tokens = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(seed))
    fast, c_fast, out_fast = _count(model, tokens, keep_trains=False, grad=grad)
    ref, c_ref, out_ref = _count(model, tokens, keep_trains=True, grad=grad)
    n_points = len(list(model.spike_points()))
    assert (c_fast.by_counts, c_fast.by_train) == (n_points, 0)  # the kernel's counts were used
    assert (c_ref.by_counts, c_ref.by_train) == (0, n_points)
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-5, atol=1e-5)
    assert fast.keys() == ref.keys()
    for name, row in ref.items():
        for f in SAME:
            assert getattr(fast[name], f) == getattr(row, f), (name, f)
    assert any(r.spike_neg for r in fast.values())  # both signs were exercised


def test_spike_train_is_asked_for_where_counts_do_not_suffice():
    mar = _model(0)
    point = mar.layers[0].mixer.spike_in
    conv_fed = nn.Sequential(SpikePoint(4, SpikeConfig(T=2)), nn.Conv1d(4, 4, 3))
    with EnergyCounter(mar) as counter:  # feeds Linears only: counts suffice
        assert not counter.needs_spike_train(point)
        assert not counting.spike_train_needed(point)
    with EnergyCounter(conv_fed) as counter:  # no spike_points(): the train, as before
        assert counter.needs_spike_train(conv_fed[0])
        assert counting.spike_train_needed(conv_fed[0])
    assert not counting.spike_train_needed(point)  # no counter active
    lti = _model(0, layers="lti")  # its spike point feeds the cell itself, no projection
    with EnergyCounter(lti) as counter:
        assert counter.needs_spike_train(lti.layers[0].mixer.spike_in)


def test_residual_adds_and_swiglu_gate_hand_counted():
    model = _model(0).eval()
    B, L, d = 2, 5, 16
    hidden = model.layers[0].ffn.gate.out_features
    tokens = torch.randint(0, 40, (B, L))
    rows, _, _ = _count(model, tokens, keep_trains=False)
    for i in range(2):
        residual, gate = rows[f"layers.{i}"], rows[f"layers.{i}.ffn"]
        assert (residual.kind, gate.kind) == ("residual", "gating")
        n = 2 * B * L * d  # two adds (mixer, FFN) per element of the stream
        assert (residual.elementwise_ops, residual.activation_reads,
                residual.activation_writes) == (n, 2 * n, n)  # fmt: skip
        m = B * L * hidden  # SiLU and the product, per hidden element
        assert (gate.elementwise_ops, gate.activation_reads, gate.activation_writes) == (
            2 * m, 2 * m, m)  # fmt: skip
    no_ffn = _model(0, ffn=None).eval()
    rows, _, _ = _count(no_ffn, tokens, keep_trains=False)
    assert rows["layers.0"].elementwise_ops == B * L * d
    assert "layers.0.ffn" not in rows


def test_residual_adds_are_counted_per_generated_token():
    model = _model(0).eval()
    state = model.init_state(3)
    counter = EnergyCounter(model)
    with torch.no_grad(), counter:
        model.step(torch.tensor([1, 2, 3]), state)
    rows = {r.name: r for r in counter.report().rows}
    assert rows["layers.1"].elementwise_ops == 2 * 3 * 16


def test_transformer_residual_and_position_adds_counted():
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=30, d_model=16, n_layers=2, n_heads=2))
    B, L = 2, 6
    counter = EnergyCounter(model)
    with torch.no_grad(), counter:
        model(torch.randint(0, 30, (B, L)))
    rows = {r.name: r for r in counter.report().rows}
    assert rows["blocks.0"].elementwise_ops == 2 * B * L * 16
    assert rows["TransformerLM"].elementwise_ops == B * L * 16
    assert not counter.report().uncounted


class TrainOnly:
    """A listener without the counts protocol: it must be given spike trains."""

    def on_declare_spikes(self, *args):
        pass

    def on_record_ops(self, *args):
        pass


def test_declare_spike_counts_bad_input_and_listener_without_counts():
    x = torch.zeros(3, 4)
    counter = EnergyCounter(nn.Identity())
    with counter:
        with pytest.raises(ValueError, match=r"counts: expected a tensor \[\.\.\., 2\]"):
            counting.declare_spike_counts(None, x, torch.zeros(4, 3, dtype=torch.int64), 2)
        with pytest.raises(ValueError, match="T: expected an int >= 1, got 0"):
            counting.declare_spike_counts(None, x, torch.zeros(4, 2, dtype=torch.int64), 0)
    token = counting.activate(TrainOnly())
    try:
        assert counting.spike_train_needed(None)
        with pytest.raises(RuntimeError, match="takes spike trains only"):
            counting.declare_spike_counts(None, x, torch.zeros(4, 2, dtype=torch.int64), 2)
        model = _model(0).eval()  # its spike points hand this listener their trains
        with torch.no_grad():
            model(torch.randint(0, 40, (1, 4)))
    finally:
        counting.deactivate(token)
    # no listener: a no-op that returns the decode
    assert counting.declare_spike_counts(None, x, torch.zeros(1), 2) is x


# -- sparsified spike points under zero-skipping profiles ------------------------------------


def _sparse_model(amount: float) -> MARLM:
    point = {"sparsify": "topk", "amount": amount}
    return _model(0, points={"layers.*.ffn.spike_hidden": point}).eval()


@pytest.mark.parametrize("amount", [0.25, 0.5])
def test_sparsified_point_priced_by_its_nonzeros_under_zero_skipping(amount):
    model = _sparse_model(amount)
    B, L, d = 2, 5, 16
    hidden = model.layers[0].ffn.down.in_features
    k = max(1, round(amount * hidden))  # top-k keeps k of each token's hidden values
    tokens = torch.randint(0, 40, (B, L))
    counter = EnergyCounter(model)
    with torch.no_grad(), counter:
        model(tokens)
    dense = counter.report("45nm-fp32", tokens=B * L)
    skip = counter.report("45nm-fp32+zs", tokens=B * L)
    down = {r.name: r for r in dense.rows}["layers.0.ffn.down"]
    zeros = B * L * (hidden - k)
    assert down.macs == B * L * hidden * d  # counted in full, as dense hardware does them
    assert down.skipped_macs == zeros * d
    assert down.skipped_reads == zeros
    assert down.sparse_index_bits == B * L * k * math.ceil(math.log2(hidden))
    down_skip = {r.name: r for r in skip.rows}["layers.0.ffn.down"]
    assert down_skip.mac_energy_pj == pytest.approx(B * L * k * d * 4.6)
    assert down.mac_energy_pj == pytest.approx(B * L * hidden * d * 4.6)
    saved = dense.total_energy_pj - skip.total_energy_pj
    assert saved == pytest.approx(2 * zeros * d * 4.6)  # two layers, nothing else differs
    # memory: the non-zeros and their indices are read instead of the dense vector
    mem, mem_skip = (counter.report(h, tokens=B * L) for h in ("45nm-fp32+mem", "45nm-fp32+mem+zs"))
    a = {r.name: r for r in mem.rows}["layers.0.ffn.down"].activation_bytes
    b = {r.name: r for r in mem_skip.rows}["layers.0.ffn.down"].activation_bytes
    assert a - b == pytest.approx(zeros * 4 - B * L * k * math.ceil(math.log2(hidden)) / 8)


def test_zero_skipping_changes_nothing_without_sparsified_points():
    model = _model(0).eval()
    tokens = torch.randint(0, 40, (2, 5))
    counter = EnergyCounter(model)
    with torch.no_grad(), counter:
        model(tokens)
    for dense, skipping in (("45nm-fp32", "45nm-fp32+zs"), ("45nm-int8+mem", "45nm-int8+mem+zs")):
        a, b = counter.report(dense), counter.report(skipping)
        assert a.total_energy_pj == pytest.approx(b.total_energy_pj)
        assert all(r.skipped_macs == 0 for r in a.rows)


def test_zero_skipping_profiles_flagged_and_memory_sibling():
    from spikemar.energy import HardwareProfile, get_profile, memory_sibling

    assert get_profile("45nm-fp32+zs").zero_skipping
    assert not get_profile("45nm-fp32").zero_skipping
    assert memory_sibling("45nm-fp32+zs").name == "45nm-fp32+mem+zs"
    with pytest.raises(TypeError, match="zero_skipping: expected a bool"):
        HardwareProfile("x", ac_pj=1.0, mac_pj=1.0, zero_skipping="yes")
