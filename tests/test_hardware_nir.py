"""Export to NIR: norse reads the file and reproduces the CUBA LIF parts; ATMN and the LTI cell
travel in documented metadata and come back exactly through spikemar's reader."""

from __future__ import annotations

import math

import nir
import numpy as np
import pytest
import torch
from torch import nn

from spikemar.hardware import CUBALIF, UnsupportedModuleError, export_nir, import_nir, simulate
from spikemar.neurons import ATMN


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def batch_of(inputs: torch.Tensor, n: int = 3) -> torch.Tensor:
    """[T, *shape] → [T, n, *shape]: n samples, each the input rolled along time."""
    return torch.stack([inputs.roll(k, 0) for k in range(n)], dim=1).double()


def test_norse_reads_the_file_and_reproduces_the_lif_network(
    tmp_path, random_network, random_inputs
):
    norse = pytest.importorskip("norse.torch")
    model, shape = random_network("cuba-only", seed=5)
    inputs = batch_of(random_inputs(shape, ternary=False, seed=3))
    export_nir(model, tmp_path / "net.nir", shape, dt=1e-3)
    expected = simulate(model.double(), inputs)

    net = norse.from_nir(nir.read(str(tmp_path / "net.nir")), dt=1e-3).double()
    state, outputs = None, []
    for x in inputs:
        out, state = net(x, state)
        outputs.append(out)
    got = torch.stack(outputs)
    assert 0 < expected.sum() < expected.numel()
    assert torch.equal(got, expected)


def test_the_graph_is_documented_nir(tmp_path, random_network):
    model, shape = random_network("dense-lti", seed=1)
    export_nir(model, tmp_path / "net.nir", shape)
    graph = nir.read(str(tmp_path / "net.nir"))
    assert set(graph.nodes) == {"input", "0", "1", "2", "3", "4", "5", "output"}
    assert sorted(graph.edges) == sorted(
        [
            ("input", "0"),
            ("0", "1"),
            ("1", "2"),
            ("2", "3"),
            ("3", "4"),
            ("4", "5"),
            ("5", "output"),
        ]
    )
    assert [type(graph.nodes[k]).__name__ for k in ("0", "1", "2")] == ["Linear", "LI", "IF"]
    meta = graph.nodes["2"].metadata
    assert text(meta["spikemar_neuron"]) == "ATMN" and int(meta["ternary"]) == 1
    assert float(meta["tau"]) == 2.0
    np.testing.assert_allclose(meta["v_threshold"], model[2].v_threshold.detach().numpy())
    assert text(graph.nodes["1"].metadata["spikemar_neuron"]) == "LTI"
    assert set(graph.nodes["1"].metadata) >= {"decay", "b", "c", "d"}


@pytest.mark.parametrize(
    "kind", ["dense-ternary", "dense-binary", "dense-lti", "conv-ternary", "cuba-mixed"]
)
def test_metadata_carries_atmn_and_lti_exactly(tmp_path, kind, random_network, random_inputs):
    model, shape = random_network(kind, seed=2)
    export_nir(model, tmp_path / "net.nir", shape)
    back = import_nir(tmp_path / "net.nir")
    inputs = batch_of(random_inputs(shape, ternary=True, seed=4))
    expected = simulate(model.double(), inputs)
    assert 0 < expected.abs().sum() < expected.numel()
    assert torch.equal(simulate(back.double(), inputs), expected)


def test_cuba_without_decay_has_no_nir_form(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2, bias=False), CUBALIF(1.0, 0.0, 1.0))
    with pytest.raises(UnsupportedModuleError, match=r"1: CUBALIF .* voltage_decay = 0\.0"):
        export_nir(model, tmp_path / "net.nir", (3,))
    assert not list(tmp_path.iterdir())


def test_export_nir_checks_its_arguments(tmp_path, random_network):
    model = nn.Sequential(nn.Linear(3, 2, bias=False), ATMN(math.inf, 0.5))
    with pytest.raises(ValueError, match="dt"):
        export_nir(model, tmp_path / "net.nir", (3,), dt=0.0)
    with pytest.raises(ValueError, match="input_shape"):
        export_nir(model, tmp_path / "net.nir", 3)
    with pytest.raises(UnsupportedModuleError, match="0: a 3x2 kernel"):
        export_nir(random_network("conv-binary", seed=1)[0], tmp_path / "net.nir", (2, 5, 5))
    with pytest.raises(UnsupportedModuleError, match="1: Tanh"):
        export_nir(nn.Sequential(nn.Linear(3, 2), nn.Tanh()), tmp_path / "net.nir", (3,))


def test_spikingjelly_reads_atmn_as_nirs_if_with_one_step_of_dt(tmp_path):
    """NIR's IF is v̇ = R·I; read with the file's dt (as its CubaLIF and LI nodes are), R = 1/dt
    adds the input once per step. SpikingJelly's importer requires that and then runs the
    binary, hard-reset IF that a reader ignoring the ATMN metadata sees."""
    nir_exchange = pytest.importorskip("spikingjelly.activation_based.nir_exchange")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 16, bias=False), ATMN(2.0, 0.8), nn.Linear(16, 8), ATMN(1.5, 0.6)
    ).double()
    dt = 1e-3
    export_nir(model, tmp_path / "net.nir", (12,), dt=dt)
    graph = nir.read(str(tmp_path / "net.nir"))
    np.testing.assert_allclose(graph.nodes["1"].r * dt, 1.0)
    net = nir_exchange.import_from_nir(tmp_path / "net.nir", dt=dt, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(50, 3, 12, generator=gen) < 0.3).double()
    state, got, v1, v2, expected = None, [], 0.0, 0.0, []
    with torch.no_grad():
        for x_t in x:
            out, state = net(x_t, state)
            got.append(out)
            v1 = v1 + model[0](x_t)
            s1 = (v1 >= 0.8).double()
            v2 = v2 + model[2](s1)
            s2 = (v2 >= 0.6).double()
            v1, v2 = v1 * (1 - s1), v2 * (1 - s2)
            expected.append(s2)
    assert 0 < torch.stack(expected).sum() < torch.stack(expected).numel()
    assert torch.equal(torch.stack(got), torch.stack(expected))


@pytest.mark.parametrize(
    "edges, message",
    [
        (
            [("input", "a"), ("input", "b"), ("a", "output"), ("b", "output")],
            r"not one chain from 'input' to 'output': node 'input' feeds \['a', 'b'\]",
        ),
        (
            [("input", "a"), ("a", "b"), ("b", "a"), ("b", "output")],
            r"node 'b' feeds \['a', 'output'\]",
        ),
        ([("input", "a"), ("a", "b"), ("b", "a")], r"a recurrent NIR graph \(a cycle through 'a'"),
        ([("input", "a"), ("a", "output")], r"NIR nodes off the chain .*: \['b', "),
        ([("input", "a"), ("a", "b")], r"feeds no node"),  # nir gives 'b' an output node
    ],
)
def test_import_nir_refuses_a_graph_that_is_not_one_chain(tmp_path, edges, message):
    """An nn.Sequential holds a chain: a branch or a recurrent edge was dropped silently."""
    ones = np.ones(3)
    lif = nir.CubaLIF(
        tau_syn=ones * 1e-3, tau_mem=ones * 1e-2, r=ones * 10, v_leak=0 * ones,
        v_threshold=ones, v_reset=0 * ones, w_in=ones,
    )  # fmt: skip
    nodes = {
        "input": nir.Input(input_type=np.array([3])),
        "a": nir.Linear(weight=np.eye(3)),
        "b": lif,
        "output": nir.Output(output_type=np.array([3])),
    }
    nir.write(str(tmp_path / "g.nir"), nir.NIRGraph(nodes=nodes, edges=edges))
    with pytest.raises(ValueError, match=f"path: .*g.nir holds .*{message}"):
        import_nir(tmp_path / "g.nir")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"r": 1.0}, r"3: a CubaLIF with r = 1; .* read with dt = 0.001 needs r = 10"),
        ({"w_in": 2.0}, r"needs w_in = 2\.5"),
        ({"v_leak": 0.1}, r"v_leak = 0\.1"),
        ({"tau_mem": np.array([1e-2] * 7 + [2e-2])}, r"3: a CubaLIF whose tau_mem varies"),
        ({"tau_syn": 1e-4, "w_in": 0.1}, r"3: a CubaLIF that CUBALIF cannot hold .*current_decay"),
    ],
)
def test_import_nir_refuses_a_cuba_lif_that_cubalif_cannot_hold(tmp_path, change, message):
    """A CubaLIF of another producer (norse writes r = 1) was read with its r, w_in, v_leak and
    v_reset ignored: a neuron that computes something else."""
    model = nn.Sequential(
        nn.Linear(12, 16, bias=False), CUBALIF(0.5, 0.05, 0.4),
        nn.Linear(16, 8, bias=False), CUBALIF(0.4, 0.1, 0.3),
    )  # fmt: skip
    graph = export_nir(model, tmp_path / "net.nir", (12,))
    node = graph.nodes["3"]
    for key, value in change.items():
        setattr(node, key, np.broadcast_to(value, (8,)).astype(np.float64))
    nir.write(str(tmp_path / "other.nir"), graph)
    with pytest.raises(ValueError, match=message):
        import_nir(tmp_path / "other.nir")
