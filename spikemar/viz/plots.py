"""Plots for looking at spiking activity: ternary rasters, firing rates, membrane traces.

What a researcher checks first on a spiking net: which neurons fire, with which sign, how often,
and why (the membrane against its thresholds). Spikes are time-first as everywhere in spikemar
(``[T, N, …]``, T micro-steps); +1 and −1 spikes are drawn in two colour-blind-safe colours
(Okabe–Ito vermillion and blue), so binary {0, 1} spikes are simply the +1 half.

Figures are built with matplotlib's object API (:class:`matplotlib.figure.Figure`, rendered by
the Agg canvas), never through ``pyplot``: nothing here changes the global backend or opens a
window, and nothing calls ``show()``. Every function takes an optional ``ax`` and returns it;
:func:`save_figure` writes a figure atomically.

Firing rate here is spikes per neuron per micro-step, split by sign: ``rate_pos`` is the fraction
of micro-steps with a +1 spike, ``rate_neg`` with a −1 spike, ``rate_total`` their sum (the
fraction of non-zero spikes, i.e. 1 − activation sparsity).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from torch import nn

from .._io import atomic_write, check_output_path
from .._numbers import check_count, integer

__all__ = [
    "NEG_COLOR",
    "POS_COLOR",
    "FiringRates",
    "check_figure_path",
    "firing_rates",
    "layer_firing_rates",
    "membrane_trace",
    "new_figure",
    "plot_firing_rates",
    "plot_layer_firing_rates",
    "raster",
    "save_figure",
]

#: +1 spikes: Okabe–Ito vermillion; −1 spikes: Okabe–Ito blue (distinct under all common
#: colour-vision deficiencies).
POS_COLOR = "#D55E00"
NEG_COLOR = "#0072B2"
_ZERO_COLOR = "#FFFFFF"
_GRID_COLOR = "#D9D9D9"
#: Line colours for membrane traces of different neurons (kept apart from the spike colours).
_TRACE_COLORS = ("#000000", "#009E73", "#CC79A7", "#8C564B", "#7F7F7F", "#E69F00")
# a spike's sign → how the membrane trace marks it (on the trace and in the legend)
_SPIKE_MARKERS = ((1, "^", POS_COLOR, "+1 spike"), (-1, "v", NEG_COLOR, "−1 spike"))

ArrayLike = torch.Tensor | np.ndarray | Sequence[Any]


# -- input checks -------------------------------------------------------------------------------


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.is_complex():  # its imaginary part would be dropped with a warning
            raise TypeError(f"{name}: expected real values, got a {x.dtype} tensor")
        return x.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(x)
        real = not np.iscomplexobj(arr)
        if real:
            arr = arr.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name}: expected a torch.Tensor, a numpy array or a rectangular nested list of "
            f"numbers, got {type(x).__name__}"
        ) from err
    if not real:
        raise TypeError(f"{name}: expected real values, got complex ones")
    return arr


def _spike_matrix(spikes: ArrayLike, name: str = "spikes", batch_dims: int = 0) -> np.ndarray:
    """``spikes`` [T, (batch…), N…] → float array [T·batch, N] with values in {−1, 0, 1}."""
    arr = _to_numpy(spikes, name)
    if arr.ndim < 2:
        raise ValueError(
            f"{name}: expected spikes [T, N, ...] (time first, at least 2 dimensions), "
            f"got shape {arr.shape}"
        )
    batch_dims = check_count("batch_dims", batch_dims, 0)
    if arr.ndim < 2 + batch_dims:
        raise ValueError(
            f"{name}: with batch_dims={batch_dims} expected [T, {'B, ' * batch_dims}N, ...] "
            f"(at least {2 + batch_dims} dimensions), got shape {arr.shape}"
        )
    if arr.size == 0:
        raise ValueError(
            f"{name}: expected at least one micro-step and neuron, got shape {arr.shape}"
        )
    bad = ~np.isin(arr, (-1.0, 0.0, 1.0))
    if bad.any():
        examples = np.unique(arr[bad])[:4].tolist()
        raise ValueError(
            f"{name}: expected spike values in {{-1, 0, 1}} (ternary) or {{0, 1}} (binary), "
            f"got {bad.sum()} other values, e.g. {examples}"
        )
    n_samples = int(np.prod(arr.shape[: 1 + batch_dims]))
    return arr.reshape(n_samples, -1)


def _check_ax(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is None:
        return new_figure(figsize).add_subplot()
    if not isinstance(ax, Axes):
        raise TypeError(f"ax: expected a matplotlib Axes or None, got {type(ax).__name__}")
    return ax


def new_figure(figsize: tuple[float, float] = (6.4, 4.8), **kwargs: Any) -> Figure:
    """A matplotlib Figure on the Agg canvas, without pyplot (no window, no global state)."""
    return Figure(figsize=figsize, layout=kwargs.pop("layout", "constrained"), **kwargs)


# -- raster -------------------------------------------------------------------------------------


def raster(
    spikes: ArrayLike,
    ax: Axes | None = None,
    *,
    time_label: str = "micro-step t",
    neuron_label: str = "neuron",
    title: str | None = None,
    ternary: bool | None = None,
    boundary_every: int | None = None,
    legend: bool = True,
) -> Axes:
    """Draw a spike raster: time on x, neurons on y, +1 and −1 spikes in two colours.

    Args:
        spikes: [T, N] or [T, N, ...] (the trailing dimensions are flattened into neurons);
            values in {−1, 0, 1}. Binary {0, 1} spikes work as well.
        ax: the Axes to draw on (``None``: a new figure).
        time_label, neuron_label, title: axis labels and title.
        ternary: show both signs in the legend (``None``: only when a −1 spike is present).
        boundary_every: draw a vertical line every this many time steps, e.g. ``T`` when the
            time axis is several tokens' micro-steps laid end to end.
        legend: draw the legend.

    Returns:
        The Axes. Each cell (t, neuron) is one spike or none, so zero spikes stay white.
    """
    matrix = _spike_matrix(spikes)
    if boundary_every is not None:
        if integer(boundary_every) is None:  # NumPy's ints too
            raise TypeError(f"boundary_every: expected an int or None, got {boundary_every!r}")
        boundary_every = integer(boundary_every)
        if boundary_every < 1:
            raise ValueError(f"boundary_every: expected an int >= 1, got {boundary_every}")
    ax = _check_ax(ax, (6.4, 4.8))
    n_steps, n_neurons = matrix.shape
    cmap = ListedColormap([NEG_COLOR, _ZERO_COLOR, POS_COLOR])
    norm = BoundaryNorm([-1.5, -0.5, 0.5, 1.5], cmap.N)
    ax.imshow(
        matrix.T,
        cmap=cmap,
        norm=norm,
        aspect="auto",
        interpolation="nearest",
        origin="lower",
        extent=(-0.5, n_steps - 0.5, -0.5, n_neurons - 0.5),
    )
    # A faint grid keeps individual micro-steps apart when there are few of them.
    if n_steps <= 64 and boundary_every is None:
        ax.set_xticks(np.arange(-0.5, n_steps, 1.0), minor=True)
        ax.grid(which="minor", axis="x", color=_GRID_COLOR, linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    if boundary_every is not None:
        for x in np.arange(boundary_every, n_steps, boundary_every):
            ax.axvline(x - 0.5, color="#404040", linewidth=0.6)
    if n_steps <= 16:
        ax.set_xticks(np.arange(n_steps))
    ax.set_xlabel(time_label)
    ax.set_ylabel(neuron_label)
    if title is not None:
        ax.set_title(title)
    if legend:
        show_neg = bool((matrix < 0).any()) if ternary is None else bool(ternary)
        handles = [Patch(facecolor=POS_COLOR, label="+1 spike")]
        if show_neg:
            handles.append(Patch(facecolor=NEG_COLOR, label="−1 spike"))
        ax.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
            frameon=False,
            fontsize="small",
        )
    return ax


# -- firing rates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FiringRates:
    """Per-neuron firing rates in spikes per micro-step, split by sign.

    ``rate_pos[i]``: fraction of samples (micro-steps, and batch entries when averaged) where
    neuron i fired +1; ``rate_neg[i]``: fired −1; ``rate_total = rate_pos + rate_neg``.
    ``n_samples`` is how many micro-steps (× batch entries) each rate averages over.
    """

    rate_pos: np.ndarray
    rate_neg: np.ndarray
    rate_total: np.ndarray
    n_samples: int

    @property
    def num_neurons(self) -> int:
        return int(self.rate_pos.shape[0])

    @property
    def mean_pos(self) -> float:
        """Mean +1 rate over neurons."""
        return float(self.rate_pos.mean())

    @property
    def mean_neg(self) -> float:
        """Mean −1 rate over neurons."""
        return float(self.rate_neg.mean())

    @property
    def mean_total(self) -> float:
        """Mean rate of non-zero spikes over neurons (1 − activation sparsity)."""
        return float(self.rate_total.mean())


def firing_rates(spikes: ArrayLike, *, batch_dims: int = 0) -> FiringRates:
    """Per-neuron firing rates, split into +1 and −1 spikes.

    Args:
        spikes: [T, N, ...] with values in {−1, 0, 1}. Dimension 0 is time.
        batch_dims: how many dimensions after time are averaged over as well. 0 (default):
            every non-time entry is its own neuron. 1: ``spikes`` [T, B, C, ...] gives rates per
            channel, averaged over the T micro-steps and the B batch entries (or tokens).

    Returns:
        :class:`FiringRates` with arrays over the (flattened) neurons.
    """
    return _firing_rates(spikes, "spikes", batch_dims)


def _firing_rates(spikes: ArrayLike, name: str, batch_dims: int = 0) -> FiringRates:
    matrix = _spike_matrix(spikes, name, batch_dims=batch_dims)
    rate_pos = (matrix > 0).mean(axis=0)
    rate_neg = (matrix < 0).mean(axis=0)
    return FiringRates(rate_pos, rate_neg, rate_pos + rate_neg, int(matrix.shape[0]))


def plot_firing_rates(
    rates: FiringRates | ArrayLike,
    ax: Axes | None = None,
    *,
    neuron_label: str = "neuron",
    title: str | None = None,
    horizontal: bool = False,
) -> Axes:
    """Per-neuron firing rates as bars: +1 rate upwards, −1 rate downwards.

    Args:
        rates: a :class:`FiringRates`, or spikes [T, N, ...] to compute it from.
        ax: the Axes to draw on (``None``: a new figure).
        horizontal: neurons on the y axis (+1 to the right, −1 to the left), which lines the
            bars up with a raster's neuron axis.
    """
    if not isinstance(rates, FiringRates):
        rates = _firing_rates(rates, "rates")
    ax = _check_ax(ax, (6.4, 3.2))
    idx = np.arange(rates.num_neurons)
    width = 0.85 if rates.num_neurons > 1 else 0.5
    bar = ax.barh if horizontal else ax.bar
    up, down = ("right", "left") if horizontal else ("up", "down")
    bar(idx, rates.rate_pos, width, color=POS_COLOR, label=f"+1 rate ({up})")
    bar(idx, -rates.rate_neg, width, color=NEG_COLOR, label=f"−1 rate ({down})")
    line = ax.axvline if horizontal else ax.axhline
    line(0.0, color="black", linewidth=0.6)
    rate_label = "firing rate (spikes / micro-step)"
    if horizontal:
        ax.set_ylabel(neuron_label)
        ax.set_xlabel(rate_label)
        ax.set_ylim(-0.5, rates.num_neurons - 0.5)
        ax.xaxis.set_major_formatter(_abs_formatter())
    else:
        ax.set_xlabel(neuron_label)
        ax.set_ylabel(rate_label)
        ax.set_xlim(-0.5, rates.num_neurons - 0.5)
        ax.yaxis.set_major_formatter(_abs_formatter())
    lim = max(float(rates.rate_pos.max()), float(rates.rate_neg.max()), 0.05) * 1.1
    (ax.set_xlim if horizontal else ax.set_ylim)(-lim, lim)
    ax.legend(loc="best", fontsize="small", frameon=False)
    if title is not None:
        ax.set_title(title)
    return ax


def _abs_formatter():
    from matplotlib.ticker import FuncFormatter

    # The −1 bars point down but a rate is never negative: label the axis with magnitudes.
    return FuncFormatter(lambda v, _pos: f"{abs(v):.2g}")


# -- per-layer rates through SpikingJelly's monitor ---------------------------------------------


def _default_spiking_types() -> tuple[type, ...]:
    from spikemar.neurons import ATMN

    return (ATMN,)


def layer_firing_rates(
    net: nn.Module,
    inputs: Any,
    *,
    instance: type | tuple[type, ...] | None = None,
    reset: bool = True,
) -> dict[str, FiringRates]:
    """Firing rates of every spiking neuron module of ``net``, per layer and channel.

    The spikes are recorded with SpikingJelly's own
    :class:`spikingjelly.activation_based.monitor.OutputMonitor` (the field's tool, so this
    works on any network SpikingJelly can monitor), while ``net(inputs)`` runs once under
    ``torch.no_grad()``.

    Args:
        net: the network; every module that is an instance of ``instance`` is recorded.
        inputs: what ``net`` is called with (a tensor, or a tuple of positional arguments).
        instance: the spiking module types to record (default: :class:`spikemar.neurons.ATMN`,
            which covers its subclasses ``BinaryMultiStep`` and ``TernarySingleStep``).
        reset: reset the network's membranes (``functional.reset_net``) before running it.

    Returns:
        ``{layer name: FiringRates}`` in module order. A module in step mode 'm' outputs
        [T, B…, C]; one in step mode 's' is recorded once per call of it and the calls are
        stacked as micro-steps. Rates are per channel (the last dimension), averaged over
        micro-steps and all batch/token dimensions.
    """
    from spikingjelly.activation_based import functional as sj_functional
    from spikingjelly.activation_based.monitor import OutputMonitor

    if not isinstance(net, nn.Module):
        raise TypeError(f"net: expected a torch.nn.Module, got {type(net).__name__}")
    if instance is not None and not (
        isinstance(instance, type)
        or (isinstance(instance, tuple) and instance and all(isinstance(t, type) for t in instance))
    ):
        raise TypeError(f"instance: expected a module type or a tuple of them, got {instance!r}")
    if not isinstance(reset, bool):
        raise TypeError(f"reset: expected a bool, got {reset!r}")
    types = _default_spiking_types() if instance is None else instance
    modules = dict(net.named_modules())
    if reset:
        sj_functional.reset_net(net)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with (
        OutputMonitor(net, types, function_on_output=lambda s: s.detach().cpu()) as monitor,
        torch.no_grad(),
    ):
        net(*args)
    if not monitor.monitored_layers:
        names = types.__name__ if isinstance(types, type) else [t.__name__ for t in types]
        raise ValueError(f"net: has no spiking modules of type {names} to record")
    rates: dict[str, FiringRates] = {}
    for name in monitor.monitored_layers:
        records = monitor[name]
        if not records:
            raise ValueError(f"net: layer {name!r} produced no output when called with inputs")
        if getattr(modules[name], "step_mode", "m") == "s":
            seq = torch.stack(records)
        else:
            seq = torch.cat(records, dim=0)
        if seq.dim() < 2:
            raise ValueError(
                f"net: layer {name!r} output shape {tuple(seq.shape)}; expected [T, ..., C]"
            )
        rates[name or "<net>"] = firing_rates(
            seq.reshape(seq.shape[0], -1, seq.shape[-1]), batch_dims=1
        )
    return rates


def plot_layer_firing_rates(
    layer_rates: dict[str, FiringRates] | Sequence[dict[str, FiringRates]],
    ax: Axes | None = None,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Axes:
    """Mean firing rate per layer as bars: +1 rate upwards, −1 rate downwards.

    Args:
        layer_rates: the output of :func:`layer_firing_rates`, or several of them (e.g. before
            and after training) to draw as groups of bars side by side.
        labels: a name for each set of rates (required with several sets).
    """
    sets = [layer_rates] if isinstance(layer_rates, dict) else list(layer_rates)
    if not sets or not all(
        isinstance(s, dict) and s and all(isinstance(r, FiringRates) for r in s.values())
        for s in sets
    ):
        raise ValueError(
            "layer_rates: expected a non-empty dict {layer: FiringRates} or a list of them"
        )
    layers = list(sets[0])
    for s in sets[1:]:
        if list(s) != layers:
            raise ValueError(f"layer_rates: the sets name different layers: {layers} vs {list(s)}")
    if labels is None:
        if len(sets) > 1:
            raise ValueError(f"labels: expected {len(sets)} names for the sets, got None")
        labels = [""]
    if len(labels) != len(sets):
        raise ValueError(f"labels: expected {len(sets)} names, got {len(labels)}")
    ax = _check_ax(ax, (6.4, 3.6))
    x = np.arange(len(layers))
    width = 0.8 / len(sets)
    hatches = ("", "//", "..", "xx")
    top = 0.05
    for k, (rates, label) in enumerate(zip(sets, labels, strict=True)):
        pos = np.array([rates[n].mean_pos for n in layers])
        neg = np.array([rates[n].mean_neg for n in layers])
        top = max(top, float(pos.max()), float(neg.max()))
        offset = (k - (len(sets) - 1) / 2) * width
        hatch = hatches[k % len(hatches)]
        suffix = f" ({label})" if label else ""
        ax.bar(
            x + offset,
            pos,
            width * 0.95,
            color=POS_COLOR,
            hatch=hatch,
            edgecolor="white",
            label=f"+1 rate, up{suffix}",
        )
        ax.bar(
            x + offset,
            -neg,
            width * 0.95,
            color=NEG_COLOR,
            hatch=hatch,
            edgecolor="white",
            label=f"−1 rate, down{suffix}",
        )
        for xi, p, n in zip(x + offset, pos, neg, strict=True):
            ax.annotate(
                f"Σ {p + n:.2f}",
                (xi, p),
                textcoords="offset points",
                xytext=(0, 2),
                ha="center",
                va="bottom",
                fontsize="x-small",
            )
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(x)
    crowded = sum(len(n) for n in layers) > 12 * len(layers)  # long names: slant them
    ax.set_xticklabels(layers, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_xlabel("spiking layer")
    ax.set_ylabel("mean firing rate (spikes / micro-step)")
    ax.yaxis.set_major_formatter(_abs_formatter())
    ax.set_ylim(-top * 1.25, top * 1.25)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small", frameon=False)
    if title is not None:
        ax.set_title(title)
    return ax


# -- membrane traces ----------------------------------------------------------------------------


def membrane_trace(
    neuron_or_arrays: nn.Module | ArrayLike,
    spikes: ArrayLike | None = None,
    *,
    x_seq: torch.Tensor | None = None,
    v_threshold: float | ArrayLike | None = None,
    neurons: Sequence[int] = (0,),
    neuron_names: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Membrane over micro-steps for a few neurons: pre-spike h_t, post-reset u_t, ±V, spikes.

    Each neuron's trace is a saw-tooth: at micro-step t the membrane reaches ``h_t`` (filled
    dot), fires if ``|h_t| ≥ V`` (a coloured triangle) and drops to ``u_t = h_t − V·s_t``
    (open dot); the line to ``h_{t+1}`` is the decay by τ plus the next input.

    Sources, in order of convenience:

    * an ATMN module (or subclass) and ``x_seq`` [T, N, …]: the neuron is reset and run on
      ``x_seq`` in multi-step mode with ``store_v_seq`` (its state is reset again afterwards);
    * an ATMN module that has just run in step mode 'm' with ``store_v_seq=True``, and the
      ``spikes`` it returned: its ``v_seq`` and ``v_threshold`` are used;
    * arrays: ``neuron_or_arrays`` is the post-reset membrane u [T, N, …], ``spikes`` the spikes
      [T, N, …] and ``v_threshold`` V (a float, or per channel over the last dimension).

    Args:
        neurons: indices into the flattened neurons (at most 6 traces fit one panel).
        neuron_names: legend names for the traces (default: "neuron i").

    With a per-channel V that differs between the chosen neurons, the traces are drawn in units
    of each neuron's own V, so the threshold lines are at ±1.
    """
    u, s, v = _membrane_source(neuron_or_arrays, spikes, x_seq, v_threshold)
    T = u.shape[0]
    u2, s2 = u.reshape(T, -1), s.reshape(T, -1)
    v2 = np.broadcast_to(v, u.shape).reshape(T, -1)[0]
    n_neurons = u2.shape[1]
    neurons = list(neurons)
    if not neurons or len(neurons) > len(_TRACE_COLORS):
        raise ValueError(
            f"neurons: expected 1 to {len(_TRACE_COLORS)} neuron indices, got {len(neurons)}"
        )
    for i in neurons:
        if integer(i) is None or not 0 <= i < n_neurons:
            raise ValueError(
                f"neurons: index {i!r} out of range for {n_neurons} neurons (membrane shape "
                f"{u.shape[1:]} flattened)"
            )
    if neuron_names is not None and len(neuron_names) != len(neurons):
        raise ValueError(
            f"neuron_names: expected {len(neurons)} names (one per neuron), got {len(neuron_names)}"
        )
    ax = _check_ax(ax, (6.4, 3.6))
    chosen_v = v2[neurons]
    normalise = not np.allclose(chosen_v, chosen_v[0])
    t = np.arange(T)
    for k, i in enumerate(neurons):
        scale = chosen_v[k] if normalise else 1.0
        h_i = (u2[:, i] + v2[i] * s2[:, i]) / scale
        u_i = u2[:, i] / scale
        color = _TRACE_COLORS[k]
        path_x = np.repeat(t, 2)
        path_y = np.column_stack([h_i, u_i]).reshape(-1)
        name = neuron_names[k] if neuron_names is not None else f"neuron {i}"
        ax.plot(path_x, path_y, color=color, linewidth=1.2, label=name)
        ax.plot(t, h_i, "o", color=color, markersize=5)
        ax.plot(t, u_i, "o", markerfacecolor="white", markeredgecolor=color, markersize=5)
        for sign, marker, spike_color, _ in _SPIKE_MARKERS:
            fired = s2[:, i] * sign > 0
            ax.plot(t[fired], h_i[fired], marker, color=spike_color, markersize=10,
                    markeredgecolor="black", markeredgewidth=0.5, zorder=3)  # fmt: skip
    level = 1.0 if normalise else float(chosen_v[0])
    for sign, color in ((1, POS_COLOR), (-1, NEG_COLOR)):
        ax.axhline(sign * level, color=color, linestyle="--", linewidth=1.0)
    ax.axhline(0.0, color="#A0A0A0", linewidth=0.5)
    if T <= 16:
        ax.set_xticks(t)
    ax.set_xlim(-0.5, T - 0.5)
    ax.set_xlabel("micro-step t")
    ax.set_ylabel("membrane / V" if normalise else "membrane")
    handles, _ = ax.get_legend_handles_labels()
    vlabel = "±V" if normalise else f"±V (V = {level:.3g})"
    handles += [
        Line2D([], [], marker="o", color="grey", linestyle="", label="pre-spike h_t"),
        Line2D(
            [],
            [],
            marker="o",
            color="grey",
            markerfacecolor="white",
            linestyle="",
            label="post-reset u_t",
        ),
        *(
            Line2D(
                [],
                [],
                marker=marker,
                color=color,
                markeredgecolor="black",
                linestyle="",
                markersize=8,
                label=label,
            )
            for _, marker, color, label in _SPIKE_MARKERS
        ),
        Line2D([], [], color="grey", linestyle="--", label=vlabel),
    ]
    ax.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        fontsize="small",
        frameon=False,
    )
    if title is not None:
        ax.set_title(title)
    return ax


def _membrane_source(
    source: nn.Module | ArrayLike,
    spikes: ArrayLike | None,
    x_seq: torch.Tensor | None,
    v_threshold: float | ArrayLike | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (u [T, N…], s [T, N…], V broadcastable to u) as float arrays."""
    if isinstance(source, nn.Module):
        if not (hasattr(source, "v_threshold") and hasattr(source, "store_v_seq")):
            raise TypeError(
                "neuron_or_arrays: expected an ATMN-style neuron (with v_threshold and "
                f"store_v_seq) or an array, got {type(source).__name__}"
            )
        if v_threshold is not None:
            raise ValueError("v_threshold: give it only with arrays; a neuron brings its own V")
        if x_seq is not None:
            if spikes is not None:
                raise ValueError(
                    "spikes: give either x_seq (to run the neuron) or spikes, not both"
                )
            spikes_t, v_seq = _run_neuron(source, x_seq)
        else:
            if spikes is None:
                raise ValueError(
                    "spikes: a neuron's v_seq holds only the post-reset membrane u_t; pass the "
                    "spikes it returned (or x_seq to run it) to recover h_t = u_t + V·s_t"
                )
            v_seq = getattr(source, "v_seq", None)
            if v_seq is None:
                raise ValueError(
                    "neuron_or_arrays: the neuron has no v_seq; run it in step_mode='m' with "
                    "store_v_seq=True first, or pass x_seq"
                )
            spikes_t = spikes
        u = _to_numpy(v_seq, "v_seq")
        v = _to_numpy(source.v_threshold, "v_threshold")
    else:
        if x_seq is not None:
            raise ValueError("x_seq: give it only with a neuron module, not with arrays")
        if spikes is None or v_threshold is None:
            raise ValueError(
                "spikes, v_threshold: with a membrane array both are needed "
                "(h_t = u_t + V·s_t), got "
                f"spikes={'None' if spikes is None else 'given'}, "
                f"v_threshold={'None' if v_threshold is None else 'given'}"
            )
        u = _to_numpy(source, "neuron_or_arrays")
        spikes_t = spikes
        v = _to_numpy(v_threshold, "v_threshold")
    if u.ndim < 2:
        raise ValueError(f"membrane: expected [T, N, ...] (time first), got shape {u.shape}")
    s = _to_numpy(spikes_t, "spikes")
    _spike_matrix(s)  # checks rank and values
    if s.shape != u.shape:
        raise ValueError(f"spikes: expected the membrane's shape {u.shape}, got {s.shape}")
    if v.ndim > 1 or (v.ndim == 1 and v.shape[0] != u.shape[-1]) or not np.all(v > 0):
        raise ValueError(
            f"v_threshold: expected V > 0, a scalar or one per channel ({u.shape[-1]}), "
            f"got shape {v.shape}"
        )
    return u, s, v


def _run_neuron(neuron: nn.Module, x_seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x_seq, torch.Tensor) or x_seq.dim() < 2:
        shape = tuple(x_seq.shape) if isinstance(x_seq, torch.Tensor) else type(x_seq).__name__
        raise ValueError(f"x_seq: expected a tensor [T, N, ...] (time first), got {shape}")
    saved = (neuron.step_mode, neuron.store_v_seq)
    try:
        neuron.step_mode, neuron.store_v_seq = "m", True
        neuron.reset()
        with torch.no_grad():
            spikes = neuron(x_seq)
        v_seq = neuron.v_seq
    finally:
        neuron.step_mode, neuron.store_v_seq = saved
        neuron.reset()
    return spikes, v_seq


# -- saving -------------------------------------------------------------------------------------


def save_figure(
    fig: Figure, path: str | os.PathLike[str], *, dpi: int = 150, name: str = "path"
) -> Path:
    """Write ``fig`` to ``path`` atomically and return the path.

    The image is written under a temporary name in the same folder and then moved into place
    with ``os.replace``, so a reader never sees a half-written file. Parent folders are created.
    The format follows the suffix (``.png``, ``.pdf``, ``.svg``, …). ``name`` is the argument
    that gave ``path`` (a command's ``--out``): a write that fails (a full disk) is one
    ``OSError("NAME: cannot write 'PATH' (reason)")`` with its errno.
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"fig: expected a matplotlib Figure, got {type(fig).__name__}")
    path = check_figure_path(path, name=name)
    with atomic_write(path, fsync=False, name=name) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower(), dpi=dpi)
    return path


def check_figure_path(path: str | os.PathLike[str], *, name: str = "path") -> Path:
    """Fail before any work if :func:`save_figure` could not write ``path``: no image suffix
    matplotlib writes (``.png``, ``.pdf``, ``.svg``, …), a folder, a parent that is a file, or
    a folder that is not writable; the error names ``name`` (a command's ``--out``). Creates
    the parent folders and returns the path."""
    from matplotlib.backend_bases import FigureCanvasBase

    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{name}: expected a file path (str or os.PathLike), got "
                        f"{type(path).__name__}")  # fmt: skip
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if path.is_dir():
        check_output_path(path, name=name)  # says it is a folder
    if not fmt:
        raise ValueError(
            f"{name}: expected a file name with a suffix such as .png, got {str(path)!r}"
        )
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(
            f"{name}: unsupported image suffix {path.suffix!r}; expected one of {sorted(supported)}"
        )
    return check_output_path(path, name=name)
