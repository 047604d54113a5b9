"""spikemar.hardware: the Loihi fixed-point model, lowering, and the CUBA LIF module.

The Lava side (bit-for-bit against Lava's own ProcessModels) is tests/test_hardware_lava.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from spikemar.hardware import (
    CUBALIF,
    FixedPointOverflowError,
    UnsupportedModuleError,
    lower,
    quantize,
    simulate,
)
from spikemar.hardware.fixed_point import _decay
from spikemar.neurons import ATMN, BinaryMultiStep
from spikemar.ssm.mixer import LTICell


def linear(w) -> nn.Linear:
    w = torch.as_tensor(w, dtype=torch.float32)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


@given(st.integers(-(2**23), 2**23), st.integers(0, 4096))
def test_decay_rounds_towards_zero_like_lava(x, m):
    got = int(_decay(torch.tensor(x), m))
    p = x * m
    assert got == int(math.copysign(abs(p) >> 12, p)) if p else got == 0
    assert abs(got) <= abs(x)


def test_atmn_integers_by_hand():
    """One neuron, weight 1 → 254, V = 1.5 → 381 (× 64 = 24384), τ = 2 → carry 2048."""
    net = quantize(nn.Sequential(linear([[1.0]]), ATMN(2.0, 1.5, learnable_threshold=False)))
    fb = net.blocks[0]
    assert (fb.scale, int(fb.weight), int(fb.vth_mant), fb.carry) == (254.0, 254, 381, 2048)
    inputs = torch.tensor([1, 1, 0, -1, -1, -1, 0]).float()[:, None, None]
    u, expected = 0, []
    for x in inputs.flatten().long().tolist():
        h = x * 254 * 64 + int(math.copysign(abs(u * 2048) >> 12, u))  # towards zero
        s = 1 if h >= 24384 else -1 if h <= -24384 else 0
        u = h - s * 24384
        expected.append(s)
    assert expected.count(0) < len(expected)  # the example does fire
    assert net(inputs).flatten().tolist() == expected


def test_cuba_integers_follow_lava_lif():
    """iDecay = round(4096·δ_u), vDecay = round(4096·δ_v), v > vth·64 fires, v resets to 0."""
    net = quantize(nn.Sequential(linear([[0.5]]), CUBALIF(0.25, 0.125, 0.8)))
    fb = net.blocks[0]
    assert (fb.i_decay, fb.v_decay, int(fb.weight), int(fb.vth_mant)) == (1024, 512, 254, 406)
    u = v = 0
    expected = []
    for _ in range(12):
        u = (u * 3072 >> 12) + 254 * 64
        v = (v * 3584 >> 12) + u
        s = int(v > 406 * 64)
        v = 0 if s else v
        expected.append(s)
    got = net(torch.ones(12, 1, 1)).flatten().tolist()
    assert got == expected and 0 < sum(expected) < 12


def test_weights_are_even_8bit_with_the_largest_at_254():
    torch.manual_seed(1)
    net = quantize(nn.Sequential(nn.Linear(20, 10, bias=False), ATMN(2.0, 0.3)))
    w = net.blocks[0].weight
    assert int(w.abs().max()) == 254 and bool((w % 2 == 0).all())
    assert int(w.min()) >= -256 and w.dtype == torch.int64


def test_fixed_point_tracks_the_float_model():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(32, 64, bias=False), ATMN(2.0, 0.4, num_channels=64),
        nn.Linear(64, 16, bias=False), ATMN(2.0, 0.4),
    )  # fmt: skip
    inputs = torch.randint(-1, 2, (60, 4, 32)).float()
    float_spikes = simulate(model, inputs)
    fixed_spikes = quantize(model)(inputs)
    agree = (float_spikes == fixed_spikes).float().mean().item()
    assert float_spikes.abs().sum() > 0 and 0.9 < agree < 1.0 + 1e-9


def test_simulate_is_the_model_in_multi_step_mode():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(8, 12), ATMN(2.0, 0.3, num_channels=12, step_mode="m"),
        nn.Linear(12, 5, bias=False), BinaryMultiStep(1.5, 0.3, step_mode="m"),
    )  # fmt: skip
    inputs = torch.randint(-1, 2, (30, 3, 8)).float()
    with torch.no_grad():
        expected = model(inputs)
    got = simulate(model, inputs)
    assert torch.equal(got, expected) and expected.abs().sum() > 0
    assert model[1].step_mode == "m"  # restored


def test_lowering_reads_blocks_and_lti():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False), ATMN(2.0, 0.5),
        nn.Flatten(), nn.Linear(12, 4), LTICell(4), BinaryMultiStep(2.0, 0.5),
    )  # fmt: skip
    blocks = lower(model)
    assert [(b.path, b.synapse, b.neuron) for b in blocks] == [
        ("1", "conv", "atmn"),
        ("5", "dense", "atmn"),
    ]
    assert blocks[0].stride == (2, 2) and blocks[1].flatten and not blocks[1].ternary
    assert set(blocks[1].lti) == {"decay", "b", "c", "d"}


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "1: ReLU has no Loihi mapping"),
        (nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), ATMN()), "1: two synaptic layers"),
        (nn.Sequential(nn.Linear(4, 4)), "model ends without a neuron"),
        (nn.Sequential(nn.Linear(4, 4), CUBALIF()), "0.*bias=False"),
        (nn.Sequential(ATMN()), "0: a neuron needs a Linear"),
        (nn.Linear(4, 4), "model: expected an nn.Sequential"),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), LTICell(2), ATMN()),
            "1: an LTICell works on channels last",
        ),
        (
            nn.Sequential(nn.Sequential(nn.Linear(4, 4, bias=False)), nn.GELU()),
            "1: GELU",
        ),
    ],
)
def test_unsupported_modules_are_named(model, message):
    with pytest.raises(UnsupportedModuleError, match=message):
        quantize(model)


def test_overflow_raises_naming_the_block_and_step():
    """τ = 1 and a threshold near the 17-bit limit: the membrane passes 2^23 before firing."""
    model = nn.Sequential(linear(torch.ones(1, 100)), ATMN(1.0, 510.0))
    net = quantize(model)
    with pytest.raises(FixedPointOverflowError, match=r"1: the ATMN membrane .* at step 5"):
        net(torch.ones(10, 1, 100))


def test_threshold_beyond_17_bits_is_an_error():
    with pytest.raises(ValueError, match=r"1: v_threshold .*17-bit"):
        quantize(nn.Sequential(linear([[1.0]]), ATMN(2.0, 600.0)))


def test_tiny_thresholds_are_clamped_and_counted():
    v = torch.tensor([1e-4, 0.5, 1e-5])
    net = quantize(nn.Sequential(linear(torch.ones(3, 2)), ATMN(2.0, v)))
    assert net.blocks[0].vth_mant.tolist() == [1, 127, 1]
    assert net.clamp_counts["1"]["threshold"] == 2


def test_fractional_inputs_are_rejected():
    net = quantize(nn.Sequential(linear([[1.0]]), ATMN()))
    with pytest.raises(ValueError, match="inputs: Loihi takes integer"):
        net(torch.full((3, 1, 1), 0.5))


def test_tau_below_one_is_an_error():
    with pytest.raises(ValueError, match=r"1: tau = 0\.5"):
        quantize(nn.Sequential(linear([[1.0]]), ATMN(0.5, 1.0)))


def test_cubalif_checks_its_arguments():
    with pytest.raises(ValueError, match="current_decay"):
        CUBALIF(1.5)
    with pytest.raises(ValueError, match="voltage_decay"):
        CUBALIF(0.5, 1.0)
    with pytest.raises(ValueError, match="v_threshold"):
        CUBALIF(0.5, 0.5, -1.0)
