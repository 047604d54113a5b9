"""Export to Lava, checked in Lava's own simulator (Loihi2SimCfg) against spikemar's models.

Needs the Lava environment (``bash .ci/lava-env``). Without it these tests skip on a developer's
machine and fail under CI (``CI`` set), where .ci/run builds it first.
"""

from __future__ import annotations

import os

import h5py
import pytest
import torch
from torch import nn

from spikemar.hardware import (
    CUBALIF,
    LavaUnavailableError,
    export_lava,
    lava_python,
    quantize,
    run_lava,
    simulate,
)
from spikemar.neurons import ATMN, BinaryMultiStep, TernarySingleStep
from spikemar.ssm.mixer import LTICell

STEPS = 120


@pytest.fixture(scope="module")
def lava():
    try:
        return lava_python()
    except LavaUnavailableError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Lava tests: {err}")
        pytest.skip(str(err))


def _thresholds_near_weights(model: nn.Sequential, gen: torch.Generator) -> nn.Sequential:
    """Thresholds between 0.6 and 1.8 × the block's largest weight, so that layers fire."""
    weight = None
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear | nn.Conv2d):
                weight = m.weight
            if isinstance(m, ATMN):
                factor = 0.6 + 1.2 * torch.rand(m.a.shape, generator=gen)
                m.a.copy_(torch.log(factor * weight.abs().max()))
    return model


def random_network(kind: str, seed: int) -> tuple[nn.Sequential, tuple[int, ...]]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if kind == "dense-ternary":
        model = nn.Sequential(
            nn.Linear(12, 24, bias=False), ATMN(2.0, num_channels=24),
            nn.Linear(24, 10), ATMN(1.5),
        )  # fmt: skip
        shape = (12,)
    elif kind == "dense-binary":
        model = nn.Sequential(
            nn.Linear(12, 24), BinaryMultiStep(2.0, num_channels=24),
            nn.Linear(24, 10, bias=False), BinaryMultiStep(1.0),
        )  # fmt: skip
        shape = (12,)
    elif kind == "dense-lti":
        model = nn.Sequential(
            nn.Linear(12, 24, bias=False), LTICell(24), ATMN(2.0, num_channels=24),
            nn.Linear(24, 10, bias=False), LTICell(10), BinaryMultiStep(2.0),
        )  # fmt: skip
        shape = (12,)
    elif kind == "conv-ternary":
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, bias=False), ATMN(2.0),
            nn.Conv2d(4, 4, 3, stride=2, bias=False), TernarySingleStep(),
            nn.Flatten(), nn.Linear(4 * 2 * 2, 6, bias=False), ATMN(3.0, num_channels=6),
        )  # fmt: skip
        shape = (2, 6, 6)
    elif kind == "conv-binary":
        model = nn.Sequential(
            nn.Conv2d(2, 3, (3, 2), padding=(1, 0), bias=False), BinaryMultiStep(2.0),
            nn.Flatten(), nn.Linear(3 * 5 * 4, 6, bias=False), BinaryMultiStep(2.0),
        )  # fmt: skip
        shape = (2, 5, 5)
    elif kind == "cuba-mixed":
        model = nn.Sequential(
            nn.Linear(12, 24, bias=False), ATMN(2.0, num_channels=24),
            nn.Linear(24, 16, bias=False), CUBALIF(0.25, 0.1, 0.3),
            nn.Linear(16, 8, bias=False), ATMN(1.0),
        )  # fmt: skip
        shape = (12,)
    else:  # cuba-only
        model = nn.Sequential(
            nn.Linear(12, 16, bias=False), CUBALIF(0.5, 0.05, 0.4),
            nn.Linear(16, 8, bias=False), CUBALIF(1.0, 0.2, 0.3),
        )  # fmt: skip
        shape = (12,)
    return _thresholds_near_weights(model, gen), shape


def random_inputs(shape, ternary: bool, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    active = torch.rand(STEPS, *shape, generator=gen) < 0.3
    sign = torch.where(torch.rand(STEPS, *shape, generator=gen) < 0.5, -1.0, 1.0)
    return active * (sign if ternary else 1.0)


KINDS = ["dense-ternary", "dense-binary", "dense-lti", "conv-ternary", "conv-binary", "cuba-mixed"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_lava_fixed_point_equals_spikemar_bit_for_bit(lava, tmp_path, kind):
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
def test_lava_floating_point_agrees_with_the_pytorch_model(lava, tmp_path, kind):
    model, shape = random_network(kind, seed=3)
    inputs = random_inputs(shape, ternary=True, seed=11)
    export_lava(model, tmp_path / "net.h5", shape)
    expected = simulate(model.double(), inputs[:, None].double())[:, 0].float()
    got = run_lava(tmp_path / "net.h5", inputs, STEPS, fixed_point=False)
    assert 0 < expected.abs().sum() < expected.numel()
    assert torch.equal(got, expected)


@pytest.mark.slow
def test_netx_loader_reads_a_cuba_network(lava, tmp_path):
    """A file of CUBA layers is a plain netx network: netx.hdf5.Network loads and runs it."""
    model, shape = random_network("cuba-only", seed=5)
    inputs = random_inputs(shape, ternary=False, seed=2)
    fixed = export_lava(model, tmp_path / "net.h5", shape)
    expected = fixed(inputs[:, None])[:, 0]
    got = run_lava(tmp_path / "net.h5", inputs, STEPS, netx_network=True)
    assert 0 < expected.sum() < expected.numel()
    assert torch.equal(got, expected)


def test_the_file_is_netx_layout(tmp_path):
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


def test_export_and_run_check_their_arguments(tmp_path):
    model, _ = random_network("dense-ternary", seed=1)
    with pytest.raises(ValueError, match="input_shape"):
        export_lava(model, tmp_path / "net.h5", (12, 3))
    with pytest.raises(ValueError, match="a Conv2d needs a"):
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
