"""ATMN turning a static activation into ternary spikes, across τ and T, beside the binary neuron.

A ramp of static inputs I (one neuron each) is δ-injected (x_0 = I, x_t = 0 after) and run for T
micro-steps; the spikes decode to ``V·Σ_t τ^t s_t``. Three figures, written to ``--out``:

* ``atmn_ramp_staircase.png``: decoded value against input, the quantisation staircase, for
  τ ∈ {1, 1.5, 2} (rows) and T ∈ {2, 4, 8} (columns), ATMN beside the binary {0, 1} neuron.
  τ = 1 is a count code: steps of V up to ±T·V. τ > 1 spends later micro-steps on larger
  amounts (a spike at step t stands for V·τ^t), so T buys range rather than resolution.
  The binary neuron cannot represent anything below zero.
* ``atmn_ramp_rasters.png``: the spike rasters behind the staircases.
* ``atmn_ramp_rates.png``: firing rate (+1 up, −1 down) against input.

Run: ``python examples/atmn_ramp.py [--out out/examples] [--quick]``. Everything is in units of
V (V = 1). Takes a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from spikemar import viz
from spikemar.neurons import ATMN, BinaryMultiStep

TAUS = (1.0, 1.5, 2.0)
TS = (2, 4, 8)
RANGE_V = 8.0  # inputs span ±RANGE_V·V
ATMN_COLOR = "#000000"
BINARY_COLOR = "#CC79A7"
T_STYLES = {2: ":", 4: "--", 8: "-"}


def quantize(kind: str, tau: float, T: int, inputs: torch.Tensor):
    """δ-inject ``inputs`` and return ``(decoded, spikes [T, N])`` for one neuron kind."""
    cls = ATMN if kind == "atmn" else BinaryMultiStep
    neuron = cls(tau, 1.0, learnable_threshold=False)
    with torch.no_grad():
        decoded, spikes = neuron.quantize(inputs, T)
    return decoded.numpy(), spikes


def staircase_figure(inputs: torch.Tensor) -> tuple[Figure, list[str]]:
    fig = viz.new_figure((13, 11))
    axes = fig.subplots(len(TAUS), len(TS), sharex=True, sharey=True)
    x = inputs.numpy()
    lines = []
    for i, tau in enumerate(TAUS):
        for j, T in enumerate(TS):
            ax = axes[i, j]
            ax.plot(x, x, color="#A0A0A0", linewidth=0.8, linestyle="--", label="identity")
            # The binary neuron first, wide and light, so that ATMN's line stays visible on top
            # where the two agree (I > 0).
            for kind, color, width in (("binary", BINARY_COLOR, 3.5), ("atmn", ATMN_COLOR, 1.3)):
                decoded, _ = quantize(kind, tau, T, inputs)
                rmse = float(np.sqrt(np.mean((decoded - x) ** 2)))
                label = "ATMN (ternary)" if kind == "atmn" else "binary baseline"
                ax.plot(
                    x, decoded, color=color, linewidth=width, label=f"{label}, RMSE {rmse:.2f}V"
                )
                lines.append(f"{kind:6s} tau={tau:<4g} T={T}: RMSE {rmse:.3f} V over ±{RANGE_V:g}V")
            ax.set_title(f"τ = {tau:g}, T = {T}")
            ax.legend(loc="upper left", fontsize="x-small", frameon=False)
            ax.grid(color="#EEEEEE", linewidth=0.5)
            if i == len(TAUS) - 1:
                ax.set_xlabel("static input I / V")
            if j == 0:
                ax.set_ylabel(r"decoded $V\,\sum_t \tau^t s_t$ / V")
    fig.suptitle("ATMN quantisation staircase under δ-injection (V = 1), beside the binary neuron")
    return fig, lines


def raster_figure(T_values: Sequence[int], n_inputs: int) -> Figure:
    inputs = torch.linspace(-6.0, 6.0, n_inputs)
    rows = [("atmn", tau) for tau in TAUS] + [("binary", 2.0)]
    fig = viz.new_figure((15, 16))
    axes = fig.subplots(len(rows), len(T_values), sharey=True)
    ticks = [i for i in range(n_inputs) if abs(inputs[i].item() % 2.0) < 1e-6]
    for i, (kind, tau) in enumerate(rows):
        for j, T in enumerate(T_values):
            _, spikes = quantize(kind, tau, T, inputs)
            name = "ATMN" if kind == "atmn" else "binary"
            ax = axes[i, j]
            viz.raster(
                spikes,
                ax,
                neuron_label="neuron (input I)" if j == 0 else "",
                title=f"{name}, τ = {tau:g}, T = {T}",
                ternary=kind == "atmn",
                legend=j == len(T_values) - 1,
            )
            ax.set_yticks(ticks, [f"{inputs[k].item():+.0f}V" for k in ticks])
    fig.suptitle("Spikes behind the staircase: one neuron per static input, δ-injected")
    return fig


def rate_figure(inputs: torch.Tensor) -> Figure:
    panels = [("atmn", tau) for tau in TAUS] + [("binary", 2.0)]
    fig = viz.new_figure((17, 4.6))
    axes = fig.subplots(1, len(panels), sharey=True)
    x = inputs.numpy()
    for ax, (kind, tau) in zip(axes, panels, strict=True):
        for T in TS:
            _, spikes = quantize(kind, tau, T, inputs)
            rates = viz.firing_rates(spikes)
            style = T_STYLES[T]
            ax.plot(x, rates.rate_pos, color=viz.POS_COLOR, linestyle=style, label=f"+1, T = {T}")
            ax.plot(x, -rates.rate_neg, color=viz.NEG_COLOR, linestyle=style, label=f"−1, T = {T}")
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_title(f"{'ATMN' if kind == 'atmn' else 'binary'}, τ = {tau:g}")
        ax.set_xlabel("static input I / V")
        ax.grid(color="#EEEEEE", linewidth=0.5)
    axes[0].set_ylabel("firing rate (spikes / micro-step)\n+1 up, −1 down")
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{abs(v):.2g}"))
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)
    fig.suptitle("Firing rate against static input (δ-injection, V = 1)")
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/examples"),
                        help="output folder (default: out/examples)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="fewer inputs, lower resolution")
    args = parser.parse_args(argv)
    try:  # before any drawing: a folder that cannot hold the figures
        for name in ("atmn_ramp_staircase.png", "atmn_ramp_rasters.png", "atmn_ramp_rates.png"):
            viz.check_figure_path(args.out / name, name="--out")
    except (OSError, ValueError) as err:
        parser.error(str(err))

    n_fine = 241 if args.quick else 1601
    dpi = 60 if args.quick else 120
    inputs = torch.linspace(-RANGE_V, RANGE_V, n_fine)

    fig, lines = staircase_figure(inputs)
    paths = [viz.save_figure(fig, args.out / "atmn_ramp_staircase.png", dpi=dpi)]
    paths.append(
        viz.save_figure(raster_figure(TS, 49), args.out / "atmn_ramp_rasters.png", dpi=dpi)
    )
    paths.append(viz.save_figure(rate_figure(inputs), args.out / "atmn_ramp_rates.png", dpi=dpi))
    print("\n".join(lines))
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
