"""Visual checks of spiking activity: ternary rasters, firing rates (+1/−1 split), per-layer rates
recorded with SpikingJelly's ``OutputMonitor``, and membrane traces against ±V.

Everything draws on matplotlib Axes through the object API (Agg canvas, no pyplot, no windows);
:func:`save_figure` writes a figure atomically. See :mod:`spikemar.viz.plots`.
"""

from .plots import *  # noqa: F403  (the public names are those of plots.__all__)
from .plots import __all__ as __all__
