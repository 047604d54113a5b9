"""The MAR LM, its dense twin and hybrids: parallel == recurrent, spiking → dense, energy."""

import itertools

import pytest
import torch

from spikemar import energy
from spikemar.models import MARLM, ActivationSparsifier, MARConfig, SpikeConfig, SpikePoint
from spikemar.ssm.mixer import LTICell, SelectiveMixer

BASE = {"vocab_size": 20, "d_model": 32, "n_layers": 3, "d_state": 8, "head_dim": 8,
        "chunk_size": 8, "max_len": 64}  # fmt: skip


def model(**kw) -> MARLM:
    return MARLM(MARConfig(**{**BASE, **kw})).double().eval()


@pytest.mark.parametrize("layers", ["ssm", ["ssm", "attn", "lti"], ["attn", "ssm", "ssm"]])
@pytest.mark.parametrize("spiking", [None, True, [True, False, True]])
@pytest.mark.parametrize("L", [1, 8, 21])
def test_step_by_step_logits_equal_the_parallel_forward(layers, spiking, L):
    torch.manual_seed(L)
    spikes = None if spiking is None else SpikeConfig(T=4, backend="torch")
    m = model(layers=layers, spikes=spikes, spiking=True if spiking is None else spiking)
    tokens = torch.randint(0, 20, (2, L))
    logits = m(tokens)
    state = m.init_state(2)
    for t in range(L):
        step_logits, state = m.step(tokens[:, t], state)
        torch.testing.assert_close(step_logits, logits[:, t], rtol=1e-9, atol=1e-9)


def test_generation_continues_the_prompt_through_the_recurrent_state():
    m = model()
    prompt = torch.randint(0, 20, (2, 6))
    out = m.generate(prompt, 5, temperature=0)
    assert torch.equal(out[:, :6], prompt)
    for t in range(6, 11):
        assert torch.equal(out[:, t], m(out[:, :t])[:, -1].argmax(-1))


def test_spike_points_sit_where_mar_puts_them():
    m = model(spiking=[True, False, True])
    names = [n for n, mod in m.named_modules() if isinstance(mod, SpikePoint)]
    points = ("mixer.spike_in", "mixer.spike_out", "ffn.spike_in", "ffn.spike_hidden")
    expected = [f"layers.{i}.{p}" for i in (0, 2) for p in points]
    assert names == expected


def test_spiking_model_approaches_the_dense_one_as_T_grows_and_V_shrinks():
    torch.manual_seed(0)
    dense = model(spikes=None)
    tokens = torch.randint(0, 20, (2, 33))
    ref = dense(tokens)
    errors = []
    for T, V in [
        (4, 0.5),
        (16, 0.25),
        (64, 0.125),
        (256, 0.0625),
    ]:  # range T·V grows, step V shrinks
        m = model(spikes=SpikeConfig(T=T, tau=1.0, v_threshold=V))
        missing, unexpected = m.load_state_dict(dense.state_dict(), strict=False)
        assert not unexpected and all(".neuron." in k for k in missing)
        with torch.no_grad():
            errors.append(((m(tokens) - ref).norm() / ref.norm()).item())
    assert all(b < 0.7 * a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 0.25


def test_dense_config_is_the_same_architecture_without_spikes():
    cfg = MARConfig(**BASE)
    dense = MARLM(cfg.dense())
    assert cfg.dense().spikes is None and cfg.spikes is not None
    assert not any(isinstance(mod, SpikePoint) for mod in dense.modules())
    spiking_keys = {k for k in MARLM(cfg).state_dict() if ".neuron." not in k}
    assert spiking_keys == set(dense.state_dict())


def test_forward_returns_pre_norm_hidden_states():
    m = model()
    tokens = torch.randint(0, 20, (2, 5))
    _, hidden = m(tokens, return_hidden=True)
    assert len(hidden) == 3 and torch.equal(hidden[0], m.embed(tokens))
    torch.testing.assert_close(hidden[2], m.layers[1](hidden[1]))


def test_ffn_activation_sparsity_alternative():
    torch.manual_seed(0)
    x = torch.randn(4, 10, 50)
    topk = ActivationSparsifier("topk", 0.2)(x)
    assert ((topk != 0).sum(-1) == 10).all()
    thr = ActivationSparsifier("threshold", 1.0)(x)
    assert torch.equal(thr != 0, x.abs() > 1.0)
    m = model(spikes=None, ffn_sparsity=("topk", 0.25))
    assert isinstance(m.layers[0].ffn.spike_hidden, ActivationSparsifier)
    m(torch.randint(0, 20, (1, 4)))


def test_lti_cell_scan_equals_its_step():
    cell = LTICell(6).double()
    u = torch.randn(2, 13, 6, dtype=torch.float64)
    y = cell(u)
    state = cell.init_state(2)
    for t in range(13):
        y_t, state = cell.step(u[:, t], state)
        torch.testing.assert_close(y_t, y[:, t])
    assert ((cell.decay > 0) & (cell.decay < 1)).all()


def test_selective_mixer_gradients_reach_every_parameter():
    mixer = SelectiveMixer(16, d_state=4, head_dim=8, chunk_size=4)
    mixer(torch.randn(2, 9, 16)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mixer.parameters())


def test_energy_report_counts_spiking_projections_as_accumulates_and_the_scan_as_macs():
    torch.manual_seed(0)
    cfg = MARConfig(**{**BASE, "layers": "ssm"})
    student, teacher = MARLM(cfg).eval(), MARLM(cfg.dense()).eval()
    tokens = torch.randint(0, 20, (2, 16))
    rs, rt = energy.profile(student, tokens), energy.profile(teacher, tokens)
    rows = {r.name: r for r in rs.rows}
    for proj in ("mixer.in_proj", "mixer.out_proj", "ffn.gate", "ffn.up", "ffn.down"):
        assert rows[f"layers.0.{proj}"].macs == 0 and rows[f"layers.0.{proj}"].acs > 0
    m = student.layers[0].mixer
    per_token = m.n_heads * (3 * m.head_dim * m.d_state + m.head_dim)
    assert rows["layers.0.mixer"].macs == 2 * 16 * per_token
    assert {r.name: r.macs for r in rt.rows}[
        "layers.0.mixer.in_proj"
    ] == 2 * 16 * 32 * m.in_proj.out_features
    assert rs.total_energy_pj < rt.total_energy_pj


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"layers": ["ssm", "rnn", "ssm"]}, "layers"),
        ({"layers": ["ssm", "ssm"]}, "layers"),
        ({"spiking": [True]}, "spiking"),
        ({"ffn_sparsity": ("topk", 0.0)}, "ffn_sparsity"),
        ({"ffn_sparsity": ("random", 0.5)}, "ffn_sparsity"),
        ({"d_model": 0}, "d_model"),
    ],
)
def test_bad_configs_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        MARConfig(**{**BASE, **kw})


def test_bad_inputs_are_rejected():
    m = model()
    with pytest.raises(ValueError, match=r"\[0, 20\)"):
        m(torch.tensor([[3, 20]]))
    with pytest.raises(ValueError, match="non-empty"):
        m(torch.zeros(2, 0, dtype=torch.int64))
    with pytest.raises(ValueError, match="state"):
        m.step(torch.tensor([1, 2]), [])
    with pytest.raises(ValueError, match="prompt"):
        m.generate(torch.zeros(0, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="head_dim"):
        SelectiveMixer(16, head_dim=7)


def test_energy_of_the_causal_convolution_is_the_same_in_forward_and_step():
    cfg = MARConfig(**{**BASE, "n_layers": 1, "spikes": None})
    m = MARLM(cfg).eval()
    mixer = m.layers[0].mixer
    tokens = torch.randint(0, 20, (2, 5))
    conv = {r.name: r for r in energy.profile(m, tokens).rows}["layers.0.mixer.conv"]
    assert conv.macs == 2 * 5 * mixer.conv_channels * mixer.d_conv  # batch · L · channels · k


def test_bad_config_fields_name_themselves():
    for kwargs, name in [
        ({"ffn_mult": 0}, "ffn_mult"),
        ({"d_conv": 0}, "d_conv"),
        ({"spikes": "yes"}, "spikes"),
    ]:
        with pytest.raises(ValueError, match=f"^{name}:"):
            MARConfig(**kwargs)
    MARConfig(ffn_mult=0, ffn=None)  # no FFN: the multiplier means nothing


def test_step_refuses_another_batch_state_and_garbage():
    model = MARLM(MARConfig(vocab_size=11, d_model=16, n_layers=2, head_dim=8)).eval()
    state = model.init_state(2)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"state\[0\]\..*batch 2.*batch 1"):
            model.step(torch.tensor([1]), state)
        with pytest.raises(ValueError, match=r"state\[0\]: expected the layer state"):
            model.step(torch.tensor([1, 2]), ["garbage", 3])


def test_ssd_scan_refuses_non_finite_inputs():
    from spikemar.ssm import ssd_scan

    x, a = torch.randn(1, 8, 2, 4), -torch.rand(1, 8, 2)
    B, C = torch.randn(1, 8, 1, 3), torch.randn(1, 8, 1, 3)
    for name, t in (("x", x), ("B", B), ("C", C)):
        bad = t.clone()
        bad[0, 3, 0, 1] = float("nan")
        args = {"x": x, "B": B, "C": C, name: bad}
        with pytest.raises(ValueError, match=f"^{name} must be finite"):
            ssd_scan(args["x"], a, args["B"], args["C"])
