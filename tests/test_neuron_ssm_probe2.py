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
