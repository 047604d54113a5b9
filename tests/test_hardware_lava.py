"""Export to Lava, checked in Lava's own simulator (Loihi2SimCfg) against spikemar's models.

Needs the Lava environment (``bash .ci/lava-env``). Without it these tests skip on a developer's
machine and fail under CI (``CI`` set), where .ci/run builds it first.
"""

from __future__ import annotations

import h5py
import pytest
import torch

from spikemar.hardware import (
    export_lava,
    quantize,
    run_lava,
    simulate,
)

STEPS = 120


KINDS = ["dense-ternary", "dense-binary", "dense-lti", "conv-ternary", "conv-binary", "cuba-mixed"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_lava_fixed_point_equals_spikemar_bit_for_bit(
    lava, tmp_path, kind, random_network, random_inputs
):
    model, shape = random_network(kind, seed=len(kind))
    inputs = random_inputs(shape, ternary="binary" not in kind, seed=7)
    fixed = export_lava(model, tmp_path / "net.h5", shape)
    expected = fixed(inputs[:, None])[:, 0]
    got = run_lava(tmp_path / "net.h5", inputs, STEPS)
    assert got.shape == expected.shape == (STEPS, *expected.shape[1:])
    assert 0 < expected.abs().sum() < expected.numel()  # the output layer is active
    mismatch = (got != expected).nonzero()
    assert torch.equal(got, expected), f"{len(mismatch)} spikes differ, first at {mismatch[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dense-lti", "conv-ternary", "cuba-mixed"])
def test_lava_floating_point_agrees_with_the_pytorch_model(
    lava, tmp_path, kind, random_network, random_inputs
):
    model, shape = random_network(kind, seed=3)
    inputs = random_inputs(shape, ternary=True, seed=11)
    export_lava(model, tmp_path / "net.h5", shape)
    expected = simulate(model.double(), inputs[:, None].double())[:, 0].float()
    got = run_lava(tmp_path / "net.h5", inputs, STEPS, fixed_point=False)
    assert 0 < expected.abs().sum() < expected.numel()
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_netx_loader_reads_a_cuba_network(lava, tmp_path, random_network, random_inputs):
    """A file of CUBA layers is a plain netx network: netx.hdf5.Network loads and runs it."""
    model, shape = random_network("cuba-only", seed=5)
    inputs = random_inputs(shape, ternary=False, seed=2)
    fixed = export_lava(model, tmp_path / "net.h5", shape)
    expected = fixed(inputs[:, None])[:, 0]
    got = run_lava(tmp_path / "net.h5", inputs, STEPS, netx_network=True)
    assert 0 < expected.sum() < expected.numel()
    assert torch.equal(got, expected)


def test_the_file_is_netx_layout(tmp_path, random_network):
    model, shape = random_network("conv-binary", seed=1)
    fixed = export_lava(model, tmp_path / "net.h5", shape)
    with h5py.File(tmp_path / "net.h5") as f:
        types = [f[f"layer/{i}/type"][0].decode() for i in range(len(f["layer"]))]
        assert types == ["input", "conv", "flatten", "dense"]
        assert f["layer/0/shape"][()].tolist() == [2, 5, 5]
        assert f["layer/1/shape"][()].tolist() == [3, 5, 4]
        assert f["layer/1/neuron/type"][0].decode() == "ATMN"
        assert f["layer/1/neuron/ternary"][()] == 0
        w = f["layer/3/weight"][()]
        assert w.tolist() == fixed.blocks[1].weight.tolist()
        assert abs(w).max() == 254 and (w % 2 == 0).all()


def test_export_and_run_check_their_arguments(tmp_path, random_network):
    model, _ = random_network("dense-ternary", seed=1)
    with pytest.raises(ValueError, match="input_shape"):
        export_lava(model, tmp_path / "net.h5", (12, 3))
    with pytest.raises(ValueError, match=r"input_shape: \(50,\) does not fit 0, a Conv2d"):
        conv, _ = random_network("conv-binary", seed=1)
        export_lava(conv, tmp_path / "net.h5", (50,))
    assert not list(tmp_path.iterdir())  # nothing half-written
    export_lava(quantize(model), tmp_path / "net.h5", (12,))
    with pytest.raises(ValueError, match="num_steps"):
        run_lava(tmp_path / "net.h5", torch.zeros(4, 12), 0)
    with pytest.raises(ValueError, match="inputs: 4 steps given"):
        run_lava(tmp_path / "net.h5", torch.zeros(4, 12), 5)
    with pytest.raises(FileNotFoundError, match="path"):
        run_lava(tmp_path / "missing.h5", torch.zeros(4, 12), 4)
    with pytest.raises(ValueError, match="integer spike payloads"):
        run_lava(tmp_path / "net.h5", torch.full((4, 12), 0.5), 4)


@pytest.mark.slow
def test_a_conv_layer_with_a_bias_runs_in_lava(lava, tmp_path, random_inputs):
    """The bias of an ATMN conv layer is per channel: Lava's layer takes it per neuron (C, H, W)."""
    from torch import nn

    from spikemar.neurons import ATMN

    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2), ATMN(3.0),
        nn.Flatten(), nn.Linear(6 * 6 * 4, 7), ATMN(1.3, num_channels=7),
    )  # fmt: skip
    with torch.no_grad():
        model[1].a.fill_(float(model[0].weight.abs().max().log()))
        model[4].a.copy_((0.5 + torch.rand(7)).log() + model[3].weight.abs().max().log())
    shape = (4, 6, 7)
    inputs = random_inputs(shape, ternary=True, seed=9)
    fixed = export_lava(model, tmp_path / "net.h5", shape)
    expected = fixed(inputs[:, None])[:, 0]
    assert 0 < expected.abs().sum() < expected.numel()
    assert torch.equal(run_lava(tmp_path / "net.h5", inputs, STEPS), expected)
    floating = simulate(model.double(), inputs[:, None].double())[:, 0].float()
    assert torch.equal(run_lava(tmp_path / "net.h5", inputs, STEPS, fixed_point=False), floating)
