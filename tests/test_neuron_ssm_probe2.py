"""Second acceptance probe of the ATMN neuron (issues 2 and 5) and the SSM scan (issue 3): inputs
the earlier tests did not try."""

from __future__ import annotations

import pytest
import torch

from spikemar.neurons import ATMN
from spikemar.neurons import functional as F


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_single_step_channel_mismatch_names_x_and_its_shape(backend: str) -> None:
    # step_mode 's': the error named x_seq and the one-step sequence (1, 2, 3) built inside
    neuron = ATMN(num_channels=4, backend=backend)
    with pytest.raises(ValueError, match=r"^x: last dimension 3 .* 4 per-channel .*\(2, 3\)"):
        neuron(torch.ones(2, 3))


def test_atmn_step_channel_mismatch_names_x() -> None:
    p = ATMN(num_channels=4).parameters_tuple()
    with pytest.raises(ValueError, match=r"^x: last dimension 3 .*\(2, 3\)"):
        F.atmn_step(torch.ones(2, 3), None, p)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_nan_input_error_names_the_argument_given(backend: str) -> None:
    # the one-step and δ-injection paths named the sequence x_seq they build inside
    nan = torch.tensor([[0.5, float("nan")]])
    neuron = ATMN(backend=backend)
    with pytest.raises(ValueError, match=r"^x: expected finite values"):
        neuron(nan)
    with pytest.raises(ValueError, match=r"^x: expected finite values"):
        F.atmn_step(nan, None, neuron.parameters_tuple(), backend=backend)
    with pytest.raises(ValueError, match=r"^activation: expected finite values"):
        neuron.quantize(nan, 4)
    with pytest.raises(ValueError, match=r"^x_seq: expected finite values"):
        ATMN(step_mode="m", backend=backend)(nan[None])


def test_diverged_threshold_still_reported_as_such_in_single_step() -> None:
    neuron = ATMN()
    with torch.no_grad():
        neuron.a.fill_(float("nan"))
    with pytest.raises(ValueError, match="threshold") as info:
        neuron(torch.ones(2, 3))
    assert not str(info.value).startswith("x")
