"""Spike rasters of a small spiking character model on Tiny Shakespeare, before and after training.

A window of previous characters is embedded and passed through two spike points and a readout:

    a₁ = LayerNorm(W₁ · embed(context))        s₁ = ATMN(δ-inject(a₁))    z₁ = V₁ Σ_t τ^t s₁,t
    a₂ = LayerNorm(W₂ · z₁)                    s₂ = ATMN(δ-inject(a₂))    z₂ = V₂ Σ_t τ^t s₂,t
    logits = W₃ · z₂

as at MAR's spike points: each activation is δ-injected over T micro-steps and the next matrix
product consumes the ternary spikes (``W·z = V Σ_t τ^t (W s_t)``: accumulates, not MACs). The
net is trained for next-character prediction for a few hundred steps with the straight-through
(rectangle) surrogate, in seconds on a CPU. Per-layer rates are recorded with SpikingJelly's
``OutputMonitor`` (:func:`spikemar.viz.layer_firing_rates`). Figures, written to ``--out``:

* ``shakespeare_rasters.png``: the rasters of both spike points over a line of text, before and
  after training (time: character position × micro-step; the characters label the axis);
* ``shakespeare_rates.png``: the training loss, per-layer firing rates before and after training,
  and per-channel firing rates after training.

Run: ``python examples/shakespeare_raster.py [--data PATH] [--out out/examples] [--quick]``.
The data is Tiny Shakespeare where ``spikemar train`` finds it (``$SPIKEMAR_DATA``, else
``../shared/data/tinyshakespeare/input.txt`` beside the repository), or ``--data PATH``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from spikingjelly.activation_based.monitor import OutputMonitor
from torch import nn

from spikemar import viz
from spikemar.data import default_corpus
from spikemar.neurons import ATMN, delta_inject

#: Printable stand-ins for characters that would be invisible as tick labels.
_SHOW = {" ": "␣", "\n": "↵"}


class SpikingCharModel(nn.Module):
    """Next-character model with two ATMN spike points (see the module docstring)."""

    def __init__(
        self, vocab: int, context: int, embed: int, hidden: int, T: int, tau: float
    ) -> None:
        super().__init__()
        self.T = T
        self.embed = nn.Embedding(vocab, embed)
        self.fc1 = nn.Linear(context * embed, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.spike1 = ATMN(tau, 0.5, num_channels=hidden, step_mode="m")
        self.fc2 = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.spike2 = ATMN(tau, 0.5, num_channels=hidden, step_mode="m")
        self.head = nn.Linear(hidden, vocab)

    def spike_point(self, neuron: ATMN, activation: torch.Tensor) -> torch.Tensor:
        # Each token's activation is encoded from a zero membrane: reset, then run the module
        # itself (not .quantize) so that forward hooks such as SpikingJelly's monitors see it.
        neuron.reset()
        return neuron.decode(neuron(delta_inject(activation, self.T)))

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        z1 = self.spike_point(self.spike1, self.norm1(self.fc1(self.embed(context).flatten(1))))
        z2 = self.spike_point(self.spike2, self.norm2(self.fc2(z1)))
        return self.head(z2)


def load_text(path: Path) -> tuple[torch.Tensor, list[str]]:
    """The text as character ids [n] and the sorted vocabulary."""
    text = path.read_text(encoding="utf-8")
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab, ids = np.unique(codes, return_inverse=True)
    return torch.from_numpy(ids.astype(np.int64)), [chr(c) for c in vocab]


def windows(data: torch.Tensor, starts: torch.Tensor, context: int):
    """Contexts [B, context] and next characters [B] for windows starting at ``starts``."""
    offsets = torch.arange(context)
    return data[starts[:, None] + offsets], data[starts + context]


def train(
    model: nn.Module, data: torch.Tensor, context: int, steps: int, batch: int, gen: torch.Generator
) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        x, y = windows(data, starts, context)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return nn.functional.cross_entropy(model(x), y).item()


@torch.no_grad()
def line_spikes(model: SpikingCharModel, data: torch.Tensor, start: int, length: int, context: int):
    """Spikes of both spike points [T, length, hidden] for ``length`` consecutive windows from
    ``start`` (window i reads ``data[start + i : start + i + context]``)."""
    x, _ = windows(data, torch.arange(start, start + length), context)
    with OutputMonitor(model, ATMN, function_on_output=lambda s: s.detach()) as monitor:
        model(x)
    return [monitor[name][0] for name in monitor.monitored_layers]


def raster_figure(
    before: list[torch.Tensor],
    after: list[torch.Tensor],
    chars: list[str],
    line: list[int],
    T: int,
    n_channels: int,
) -> Figure:
    fig = viz.new_figure((18, 12))
    axes = fig.subplots(2, 2, sharex=True, sharey=True)
    labels = [_SHOW.get(chars[i], chars[i]) for i in line]
    for col, (stage, records) in enumerate(
        (("before training", before), ("after training", after))
    ):
        for row, spikes in enumerate(records):
            ax = axes[row, col]
            by_position = spikes[..., :n_channels].permute(1, 0, 2).reshape(-1, n_channels)
            viz.raster(
                by_position,
                ax,
                time_label=f"character read (T = {T} micro-steps each)",
                neuron_label=f"channel of spike point {row + 1}",
                title=f"spike point {row + 1}, {stage}",
                boundary_every=T,
                legend=col == 1,
            )
            ax.set_xticks(np.arange(len(line)) * T + (T - 1) / 2, labels, fontsize="small")
            ax.tick_params(axis="x", length=0)
    fig.suptitle(
        f"Spiking character model on Tiny Shakespeare: first {n_channels} channels of each spike "
        "point while it reads a line (each character's context is δ-injected on its own)"
    )
    return fig


def rate_figure(
    losses: list[float],
    val: tuple[float, float],
    rates_before: dict[str, viz.FiringRates],
    rates_after: dict[str, viz.FiringRates],
    vocab: int,
) -> Figure:
    fig = viz.new_figure((16, 9))
    grid = fig.add_gridspec(2, 2)
    ax = fig.add_subplot(grid[0, 0])
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="#A0A0A0", linewidth=0.6, label="training batch")
    window = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1 :], smooth, color="black", label=f"mean of {window} steps")
    ax.axhline(math.log(vocab), color="#CC79A7", linestyle=":", label="uniform guess, ln(vocab)")
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy (nats / character)")
    ax.set_title(f"training; validation loss {val[0]:.2f} → {val[1]:.2f}")
    ax.legend(frameon=False, fontsize="small")
    names = {name: f"spike point {k + 1}" for k, name in enumerate(rates_after)}
    viz.plot_layer_firing_rates(
        [{names[n]: r for n, r in rates.items()} for rates in (rates_before, rates_after)],
        fig.add_subplot(grid[0, 1]),
        labels=["before", "after"],
        title="mean firing rate per spike point (validation batch)",
    )
    for k, (name, rates) in enumerate(rates_after.items()):
        viz.plot_firing_rates(
            rates,
            fig.add_subplot(grid[1, k]),
            neuron_label="channel",
            title=f"{names[name]} after training: rate per channel",
        )
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="Tiny Shakespeare text (default: $SPIKEMAR_DATA, else "
                             "../shared/data/tinyshakespeare/input.txt)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("out/examples"),
                        help="output folder (default: out/examples)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a few training steps, small figures")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default 400; 30 with --quick)")  # fmt: skip
    parser.add_argument("--T", type=int, default=4, help="micro-steps per spike point (default 4)")
    parser.add_argument("--tau", type=float, default=2.0, help="ATMN's τ (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="weights and batches (default 0)")
    args = parser.parse_args(argv)
    args.data = args.data or default_corpus()
    if not args.data.is_file():
        parser.error(
            f"--data: Tiny Shakespeare not found at {args.data}; pass --data PATH to input.txt "
            "(https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt)"
        )
    if args.T < 1:
        parser.error(f"--T: expected an int >= 1, got {args.T}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps: expected an int >= 1, got {args.steps}")
    if not args.tau > 0:  # NaN too
        parser.error(f"--tau: expected a number > 0 (inf: no carry-over), got {args.tau}")
    try:  # before any training: a folder that cannot hold the figures
        for name in ("shakespeare_rasters.png", "shakespeare_rates.png"):
            viz.check_figure_path(args.out / name, name="--out")
    except (OSError, ValueError) as err:
        parser.error(str(err))
    steps = args.steps if args.steps is not None else (30 if args.quick else 400)
    dpi = 60 if args.quick else 110
    context, batch = 16, 64 if args.quick else 256

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    data, chars = load_text(args.data)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    model = SpikingCharModel(len(chars), context, 16, 128, args.T, args.tau)
    val_x, val_y = windows(
        val_data,
        torch.randint(0, len(val_data) - context - 1, (128 if args.quick else 512,), generator=gen),
        context,
    )
    line_start = int((val_data[:2000] == chars.index("\n")).nonzero()[3]) + 1
    line = val_data[line_start : line_start + (16 if args.quick else 36)].tolist()  # read in order
    first_window = line_start - context + 1  # the window that ends on the line's first character

    rates_before = viz.layer_firing_rates(model, val_x)
    spikes_before = line_spikes(model, val_data, first_window, len(line), context)
    val_before = evaluate(model, val_x, val_y)
    t0 = time.perf_counter()
    losses = train(model, train_data, context, steps, batch, gen)
    seconds = time.perf_counter() - t0
    rates_after = viz.layer_firing_rates(model, val_x)
    spikes_after = line_spikes(model, val_data, first_window, len(line), context)
    val_after = evaluate(model, val_x, val_y)

    n_channels = 32 if args.quick else 64
    paths = [
        viz.save_figure(
            raster_figure(spikes_before, spikes_after, chars, line, args.T, n_channels),
            args.out / "shakespeare_rasters.png",
            dpi=dpi,
        ),
        viz.save_figure(
            rate_figure(losses, (val_before, val_after), rates_before, rates_after, len(chars)),
            args.out / "shakespeare_rates.png",
            dpi=dpi,
        ),
    ]
    print(
        f"trained {steps} steps in {seconds:.1f} s; validation loss {val_before:.3f} → "
        f"{val_after:.3f} nats/char"
    )
    for name, before, after in zip(
        rates_before, rates_before.values(), rates_after.values(), strict=True
    ):
        print(
            f"spike point {name}: rate +{before.mean_pos:.3f}/−{before.mean_neg:.3f} → "
            f"+{after.mean_pos:.3f}/−{after.mean_neg:.3f} spikes per neuron per micro-step"
        )
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
