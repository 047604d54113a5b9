"""A small built-in model to try the energy counter on: a byte-level spiking language model.

Not MAR (that arrives with the model issue), but written the way MAR will be: MAR-style *spike
points* turn an activation into ternary ATMN spikes by δ-injection over T micro-steps and feed
the real-valued decode to the next Linear, declaring it with
:func:`~spikemar.energy.declare_spikes`, so the counter prices those Linears as ACs. Each block is
pre-norm, x + W_out · spike(W_in · spike(norm(x))); the residual add is plain Python, so the block
counts it with :func:`~spikemar.energy.record_ops`. :func:`dense_demo_model` is the same
architecture without spike points (the "teacher" of a comparison).
"""

from __future__ import annotations

import torch
from torch import nn

from spikemar.neurons import ATMN

from .counter import declare_spikes, record_ops

__all__ = ["DemoSpikePoint", "DemoSpikingLM", "demo_model", "dense_demo_model"]

VOCAB = 256  # bytes


class DemoSpikePoint(nn.Module):
    """δ-inject an activation [N, …, C] into a per-channel ATMN for T micro-steps; return the
    decode V · Σ_t τ^t s_t, declared as the decode of the spikes."""

    def __init__(self, channels: int, T: int = 4, tau: float = 2.0, v_threshold: float = 0.25):
        super().__init__()
        self.atmn = ATMN(tau=tau, v_threshold=v_threshold, num_channels=channels)
        self.T = T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        decoded, spikes = self.atmn.quantize(x, self.T)
        return declare_spikes(self, decoded, spikes)


class _Block(nn.Module):
    def __init__(self, d: int, T: int | None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.spike_in = DemoSpikePoint(d, T) if T else nn.Identity()
        self.fc_in = nn.Linear(d, 4 * d)
        self.act = nn.Identity() if T else nn.GELU()
        self.spike_mid = DemoSpikePoint(4 * d, T) if T else nn.Identity()
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_out(self.spike_mid(self.act(self.fc_in(self.spike_in(self.norm(x))))))
        record_ops(self, kind="residual", elementwise_ops=x.numel())
        return x + h


class DemoSpikingLM(nn.Module):
    """Byte embedding → ``layers`` blocks → LayerNorm → (spike point) → vocabulary head.

    ``T=None`` builds the dense twin (GELU instead of spike points).
    """

    def __init__(self, d: int = 64, layers: int = 2, T: int | None = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(_Block(d, T) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.spike_head = DemoSpikePoint(d, T) if T else nn.Identity()
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.spike_head(self.norm(x)))


def demo_model(d: int = 64, layers: int = 2, T: int = 4, *, seed: int = 0) -> DemoSpikingLM:
    """The spiking demo model with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return DemoSpikingLM(d, layers, T).eval()


def dense_demo_model(d: int = 64, layers: int = 2, *, seed: int = 0) -> DemoSpikingLM:
    """The dense twin of :func:`demo_model` (same seed, same shapes), in eval mode."""
    torch.manual_seed(seed)
    return DemoSpikingLM(d, layers, None).eval()
