"""Visual checks of spiking activity: ternary rasters, firing rates (+1/−1 split), per-layer rates
recorded with SpikingJelly's ``OutputMonitor``, and membrane traces against ±V.

Everything draws on matplotlib Axes through the object API (Agg canvas, no pyplot, no windows);
:func:`save_figure` writes a figure atomically. See :mod:`spikemar.viz.plots`.
"""

from .plots import (
    NEG_COLOR,
    POS_COLOR,
    FiringRates,
    firing_rates,
    layer_firing_rates,
    membrane_trace,
    new_figure,
    plot_firing_rates,
    plot_layer_firing_rates,
    raster,
    save_figure,
)

__all__ = [
    "NEG_COLOR",
    "POS_COLOR",
    "FiringRates",
    "firing_rates",
    "layer_firing_rates",
    "membrane_trace",
    "new_figure",
    "plot_firing_rates",
    "plot_layer_firing_rates",
    "raster",
    "save_figure",
]
