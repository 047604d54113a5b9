"""State-space layers for spiking language models (Mamba-2 style).

:mod:`spikemar.ssm.scan` holds the selective scan: :func:`ssd_scan` (chunked, for training),
:func:`ssd_step` (one token, O(1) state, for generation) and :func:`ssd_scan_naive` (the
sequential reference that defines what is correct). :mod:`spikemar.ssm.mixer` holds the mixers
behind one interface (:class:`Mixer`): Mamba-2's selective mixer, Llamba's discrete Mamba-2
mixer and the LTI cell; :mod:`spikemar.ssm.fast` their CPU kernels for inference;
:mod:`spikemar.ssm.norm` the (grouped) RMSNorm; :mod:`spikemar.ssm.linear` the projections
(:class:`Linear`: ``nn.Linear`` with a CPU kernel for generation's few rows).
"""

from .linear import Linear
from .mixer import (
    DiscreteMixer,
    LTICell,
    LTIMixer,
    Mixer,
    MixerState,
    SelectiveMixer,
    SpikePointSite,
)
from .norm import RMSNorm
from .scan import default_chunk_size, ssd_scan, ssd_scan_naive, ssd_step

__all__ = [
    "DiscreteMixer",
    "LTICell",
    "LTIMixer",
    "Linear",
    "Mixer",
    "MixerState",
    "RMSNorm",
    "SelectiveMixer",
    "SpikePointSite",
    "default_chunk_size",
    "ssd_scan",
    "ssd_scan_naive",
    "ssd_step",
]
