"""A small network of Linear + ATMN blocks for trying the hardware export (the CLI's default and
the benchmark's subject): ``sizes[0]`` inputs, a ternary ATMN after every Linear, per-channel
thresholds at ``threshold_ratio`` × the block's largest weight so that every layer fires."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from ..neurons import ATMN

__all__ = ["demo_network"]


def demo_network(
    sizes: tuple[int, ...] = (64, 128, 128, 10),
    *,
    tau: float = 2.0,
    threshold_ratio: float = 1.0,
    seed: int = 0,
) -> nn.Sequential:
    if len(sizes) < 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"sizes: expected at least two ints >= 1, got {sizes!r}")
    if not threshold_ratio > 0:
        raise ValueError(f"threshold_ratio: expected a number > 0, got {threshold_ratio!r}")
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for n_in, n_out in pairwise(sizes):
        linear = nn.Linear(n_in, n_out, bias=False)
        with torch.no_grad():
            linear.weight.copy_((torch.rand(n_out, n_in, generator=gen) * 2 - 1) / n_in**0.5)
        v = threshold_ratio * float(linear.weight.detach().abs().max())
        layers += [linear, ATMN(tau, v, num_channels=n_out, step_mode="m")]
    return nn.Sequential(*layers)
