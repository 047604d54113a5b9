"""A small network of Linear + ATMN blocks for trying the hardware export (the CLI's default and
the benchmark's subject): ``sizes[0]`` inputs, a ternary ATMN after every Linear, per-channel
thresholds at ``threshold_ratio`` × the block's largest weight so that every layer fires."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch
from torch import nn

from .._numbers import integer, real
from ..neurons import ATMN

__all__ = ["demo_network"]


def demo_network(
    sizes: tuple[int, ...] = (64, 128, 128, 10),
    *,
    tau: float = 2.0,
    threshold_ratio: float = 1.0,
    seed: int = 0,
) -> nn.Sequential:
    # NumPy's numbers as Python's (sizes from np.arange, a ratio from np.linspace); a bool is
    # refused
    listed = isinstance(sizes, Sequence) or (isinstance(sizes, np.ndarray) and sizes.ndim == 1)
    widths = [integer(n) for n in sizes] if listed else []
    if len(widths) < 2 or any(n is None or n < 1 for n in widths):
        raise ValueError(f"sizes: expected at least two ints >= 1, got {sizes!r}")
    ratio = real(threshold_ratio)
    if ratio is None or not ratio > 0:
        raise ValueError(f"threshold_ratio: expected a number > 0, got {threshold_ratio!r}")
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for n_in, n_out in pairwise(widths):
        linear = nn.Linear(n_in, n_out, bias=False)
        with torch.no_grad():
            linear.weight.copy_((torch.rand(n_out, n_in, generator=gen) * 2 - 1) / n_in**0.5)
        v = ratio * float(linear.weight.detach().abs().max())
        layers += [linear, ATMN(tau, v, num_channels=n_out, step_mode="m")]
    return nn.Sequential(*layers)
