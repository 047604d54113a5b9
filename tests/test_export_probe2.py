"""The hardware exporters' files read by the real peers (norse, SpikingJelly, nir) and by
spikemar's own readers, on networks the other tests do not build: found by probing from outside."""

from __future__ import annotations

import nir
import numpy as np
import pytest
import torch
from torch import nn

from spikemar.hardware import (
    CUBALIF,
    UnsupportedModuleError,
    export_nir,
    import_nir,
    quantize,
    simulate,
)
from spikemar.neurons import ATMN


def conv_flatten_cuba() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, bias=False), CUBALIF(0.5, 0.1, 0.3),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 5, bias=False), CUBALIF(0.3, 0.2, 0.2),
    ).double()  # fmt: skip


def spikes(shape, seed: int, steps: int = 24, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(steps, batch, *shape, generator=gen) < 0.3).double()


def test_norse_reproduces_a_conv_network_with_a_flatten(tmp_path):
    """A Flatten written with start_dim = 0 (NIR's dimensions without the batch) became norse's
    torch.nn.Flatten(0): the batch flattened too, and the Linear after it failed."""
    norse = pytest.importorskip("norse.torch")
    model, shape = conv_flatten_cuba(), (4, 7, 7)
    export_nir(model, tmp_path / "net.nir", shape)
    inputs = spikes(shape, seed=1)
    expected = simulate(model, inputs)
    net = norse.from_nir(nir.read(str(tmp_path / "net.nir")), dt=1e-3).double()
    state, got = None, []
    for x in inputs:
        out, state = net(x, state)
        got.append(out)
    assert 0 < expected.sum() < expected.numel()
    assert torch.equal(torch.stack(got), expected)


def test_spikingjelly_reads_the_flatten_over_one_sample(tmp_path):
    nir_exchange = pytest.importorskip("spikingjelly.activation_based.nir_exchange")
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, bias=False), ATMN(2.0, 0.5), nn.Flatten(), nn.Linear(27, 4), ATMN(1.0)
    )
    export_nir(model, tmp_path / "net.nir", (2, 5, 5))
    net = nir_exchange.import_from_nir(tmp_path / "net.nir", dt=1e-3, dtype=torch.float32)
    with torch.no_grad():
        out, _ = net(torch.ones(3, 2, 5, 5), None)
    assert out.shape == (3, 4)


def test_a_conv_without_bias_before_a_cuba_neuron_comes_back_without_one(tmp_path):
    """NIR's Conv2d always has a bias (export_nir writes zeros): read back with a zero bias, the
    conv before a CUBALIF was refused by the fixed-point model and the exporters."""
    model, shape = conv_flatten_cuba(), (4, 7, 7)
    export_nir(model, tmp_path / "net.nir", shape)
    back = import_nir(tmp_path / "net.nir").double()
    assert back[0].bias is None
    inputs = spikes(shape, seed=2)
    assert torch.equal(simulate(back, inputs), simulate(model, inputs))


def test_a_conv_with_a_bias_keeps_it(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), ATMN(2.0, 0.5)).double()
    export_nir(model, tmp_path / "net.nir", (2, 4, 4))
    back = import_nir(tmp_path / "net.nir").double()
    assert torch.equal(back[0].bias.double(), model[0].bias.float().double())


def test_a_grouped_conv_is_refused_by_name_before_anything_is_written(tmp_path):
    """nir 1.0.8 types a conv's input as weight.shape[1] channels: a grouped conv was nir's own
    'Type inference error: type mismatch: input.output: [[4 7 7]] -> 0.input: [[2 7 7]]'."""
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, bias=False), ATMN(2.0, 0.5))
    with pytest.raises(UnsupportedModuleError, match=r"^0: a Conv2d with groups = 2: nir 1\.0\.8"):
        export_nir(model, tmp_path / "net.nir", (4, 7, 7))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("dt", [1e-3, 1e-4])
def test_spikingjellys_cuba_lif_file_is_read_and_reproduces_spikingjelly(tmp_path, dt):
    """nirtorch's tracer (behind SpikingJelly's exporter) names the input node 'input_1': the
    file was refused as 'a NIR graph without an 'input' node'; and SpikingJelly's default dt is
    1e-4, which its CubaLIF states only through w_in = tau_syn/dt (no spikemar metadata)."""
    sj = pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based.nir_exchange import export_to_nir

    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Linear(6, 5, bias=False), sj.neuron.CUBALIFNode(c_decay=0.5, v_decay=0.75)
    ).double()
    export_to_nir(net, torch.zeros(1, 6, dtype=torch.float64), tmp_path / "sj.nir", dt=dt)
    assert "input" not in nir.read(str(tmp_path / "sj.nir")).nodes
    back = import_nir(tmp_path / "sj.nir").double()
    inputs = spikes((6,), seed=4, steps=50)
    sj.functional.reset_net(net)
    with torch.no_grad():
        expected = torch.stack([net(x) for x in inputs])
    assert 0 < expected.sum() < expected.numel()
    assert torch.equal(simulate(back, inputs), expected)


def test_a_graph_with_two_inputs_is_refused_by_name(tmp_path):
    nodes = {
        "a": nir.Input(input_type=torch.tensor([3]).numpy()),
        "b": nir.Input(input_type=torch.tensor([3]).numpy()),
        "out": nir.Output(output_type=torch.tensor([3]).numpy()),
    }
    graph = nir.NIRGraph(nodes=nodes, edges=[("a", "out"), ("b", "out")])
    nir.write(str(tmp_path / "g.nir"), graph)
    with pytest.raises(
        ValueError, match=r"g\.nir holds a NIR graph with 2 input nodes \['a', 'b'\]"
    ):
        import_nir(tmp_path / "g.nir")


@pytest.mark.parametrize("tied", [False, True])
def test_the_chip_report_counts_a_tied_head_once(tied):
    """A head tied to the embedding (tie_embeddings, as pretrained Mamba-2 and Llamba
    checkpoints often are) was counted twice: the host's share and the total overstated."""
    from spikemar.hardware import chip_report
    from spikemar.models import MARLM, MARConfig
    from spikemar.models.common import SpikeConfig

    torch.manual_seed(0)
    config = MARConfig(
        vocab_size=40, d_model=16, n_layers=2, layers=["ssm", "lti"], head_dim=8, d_state=4,
        tie_embeddings=tied, spikes=SpikeConfig(T=4, tau=1.0, v_threshold=0.3),
    )  # fmt: skip
    model = MARLM(config)
    report = chip_report(model)
    counts = report.counts()
    assert counts["chip"]["params"] + counts["host"]["params"] == sum(
        p.numel() for p in model.parameters()
    )
    head = next(e for e in report.entries if e.path == "head")
    assert (head.params == 0) == tied
    assert ("shares its weight" in head.why) == tied
    assert ("shares its weight" in report.to_table()) == tied


def test_the_chip_report_places_a_biased_spike_fed_projection_as_the_export_does():
    # the report put it on chip while export_mar_lava refuses it: the two now agree
    from spikemar.hardware import chip_report
    from spikemar.models import MARLM, MARConfig

    model = MARLM(MARConfig(vocab_size=20, d_model=16, n_layers=1, d_state=4, head_dim=8,
                            bias=True))  # fmt: skip
    entries = {e.path: e for e in chip_report(model).entries}
    for path in ("layers.0.mixer.in_proj", "layers.0.mixer.out_proj"):
        assert not entries[path].on_chip and "export_mar_lava" in entries[path].why
    assert entries["layers.0.mixer.spike_in"].on_chip  # the neurons still can
    assert entries["layers.0.ffn.gate"].on_chip  # the FFN's projections have no bias


@pytest.mark.parametrize(
    "change, message",
    [
        ("bias", r"^layers\.1\.ffn\.down: a projection with a bias has no mapping"),
        ("zero", r"^layers\.1\.ffn\.down: the weights are all zero or not finite"),
    ],
)
def test_a_mar_segment_that_cannot_go_on_chip_leaves_no_folder_behind(tmp_path, change, message):
    """The last segments were checked after the first ones' files were written (a folder of
    five netx files and no manifest); an all-zero projection was CUBALIF's 'v_threshold:
    expected a finite number > 0, got 0.0', naming no module."""
    from spikemar.hardware.mar_export import export_mar_lava
    from spikemar.models import MARLM, MARConfig
    from spikemar.models.common import SpikeConfig

    torch.manual_seed(0)
    config = MARConfig(
        vocab_size=20, d_model=16, n_layers=2, layers=["ssm", "lti"], head_dim=8, d_state=4,
        spikes=SpikeConfig(T=4, tau=1.0, v_threshold=0.3),
    )  # fmt: skip
    model = MARLM(config)
    down = model.layers[1].ffn.down
    with torch.no_grad():
        if change == "bias":
            down.bias = nn.Parameter(torch.zeros(down.out_features))
        else:
            down.weight.zero_()
    tokens = torch.randint(0, 20, (2, 16), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=message):
        export_mar_lava(model, tmp_path / "segments", tokens)
    assert not (tmp_path / "segments").exists()


def _with(value: float, where: str) -> nn.Sequential:
    from spikemar.ssm.mixer import LTICell

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), LTICell(2), ATMN(2.0, 0.5))
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[0].bias.fill_(value if where == "bias" else 0.1)
        if where == "threshold":
            model[2].a.fill_(value)
        if where == "lti":
            model[1].b.fill_(value)
    return model


@pytest.mark.parametrize(
    "value, where, message",
    [
        (float("inf"), "bias", r"^0: the bias holds NaN or inf"),
        (float("nan"), "bias", r"^0: the bias holds NaN or inf"),
        (1e4, "bias", r"^0: the bias reaches 1e\+04, 2e\+04 × the largest weight; .* 24-bit"),
        (float("inf"), "threshold", r"^2: v_threshold holds NaN or inf"),
        (float("nan"), "lti", r"^1: LTI coefficient b holds NaN or inf"),
    ],
)
def test_values_that_do_not_fit_loihi_are_refused_not_written(tmp_path, value, where, message):
    """NaN/inf rounded to int64's minimum: the file was written with a bias of -2^63, an
    infinite threshold became a clamped threshold of 1 (firing every step), a NaN LTI
    coefficient passed the 16-bit check (|int64 min| is negative); a bias that alone leaves the
    24-bit state was written too, though every step of the fixed-point model overflows."""
    from spikemar.hardware import export_lava

    with pytest.raises(ValueError, match=message):
        quantize(_with(value, where))
    with pytest.raises(ValueError, match=message):
        export_lava(_with(value, where), tmp_path / "net.h5", (3,))
    assert not list(tmp_path.iterdir())


def test_a_conv_comes_back_with_python_ints_and_same_padding_is_named(tmp_path):
    """nir hands back numpy integers (the Conv2d read back had stride=(np.int64(2), ...)); a
    padding of 'same' (nir allows it) became nn.Conv2d(padding=('same',)), torch's error."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=(1, 2), dilation=(2, 1)), ATMN(2.0))
    graph = export_nir(model, tmp_path / "net.nir", (2, 7, 7))
    conv = import_nir(tmp_path / "net.nir")[0]
    settings = (*conv.stride, *conv.padding, *conv.dilation)
    assert settings == (2, 2, 1, 2, 2, 1) and all(type(n) is int for n in settings)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), ATMN(2.0))
    graph = export_nir(model, tmp_path / "net.nir", (2, 7, 7))
    graph.nodes["0"].padding = "same"  # the same output shape
    nir.write(str(tmp_path / "same.nir"), graph)
    with pytest.raises(ValueError, match=r"^0: a Conv2d with padding 'same'"):
        import_nir(tmp_path / "same.nir")


@pytest.mark.parametrize(
    "node, key, value, message",
    [
        ("2", "tau", None, r"^2: ATMN metadata without 'tau'"),
        ("2", "ternary", None, r"^2: ATMN metadata without 'ternary'"),
        ("2", "tau", "abc", r"^2: metadata tau = .*abc.*, expected a number"),
        ("2", "tau", -1.0, r"^2: ATMN metadata that spikemar cannot read \(tau"),
        ("2", "v_threshold", np.full(3, 0.5), r"^2: ATMN metadata v_threshold of shape \(3,\)"),
        ("1", "decay", None, r"^1: LTI metadata without 'decay'"),
        ("1", "decay", np.full(4, 2.0), r"^1: LTI metadata decay .*: expected one value in"),
        ("1", "b", np.ones(3), r"^1: LTI metadata that spikemar cannot read \(RuntimeError"),
    ],
)
def test_metadata_import_nir_cannot_read_is_named_by_node(tmp_path, node, key, value, message):
    """A missing key was a bare KeyError ('tau'); a decay of 2 became an LTICell of NaN rates
    and a threshold per channel of the wrong length an ATMN that failed later, both silently."""
    from spikemar.ssm.mixer import LTICell

    model = nn.Sequential(nn.Linear(3, 4, bias=False), LTICell(4), ATMN(2.0, 0.5))
    graph = export_nir(model, tmp_path / "net.nir", (3,))
    meta = dict(graph.nodes[node].metadata)
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    graph.nodes[node].metadata = meta
    nir.write(str(tmp_path / "other.nir"), graph)
    with pytest.raises(ValueError, match=message):
        import_nir(tmp_path / "other.nir")


def test_a_failed_write_names_the_path_not_the_temporary(tmp_path, monkeypatch, capsys):
    """h5py's OSError on a full disk named the temporary file beside the path
    ('.net.h5.<pid>.<random>.tmp'), and spikemar export printed it without naming --lava."""
    import errno

    import h5py

    from spikemar import cli
    from spikemar.hardware import export_lava

    def full(name, *args, **kwargs):
        raise OSError(errno.ENOSPC, f"Unable to synchronously create file (name = '{name}')")

    monkeypatch.setattr(h5py, "File", full)
    monkeypatch.setattr(nir, "write", full)
    model = nn.Sequential(nn.Linear(3, 2, bias=False), ATMN(2.0, 0.5))
    for export, name in ((export_lava, "net.h5"), (export_nir, "net.nir")):
        target = tmp_path / name
        with pytest.raises(OSError, match=r"^path: cannot write .*net\.\w+' \(No space left"):
            export(model, target, (3,))
    assert not list(tmp_path.iterdir())
    assert cli.main(["export", "--lava", str(tmp_path / "d.h5")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("spikemar export: error: --lava: cannot write") and ".tmp" not in err
