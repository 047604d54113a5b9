"""State-space layers for spiking language models (Mamba-2 style).

:mod:`spikemar.ssm.scan` holds the selective scan: :func:`ssd_scan` (chunked, for training),
:func:`ssd_step` (one token, O(1) state, for generation) and :func:`ssd_scan_naive` (the
sequential reference that defines what is correct).
"""

from .scan import default_chunk_size, ssd_scan, ssd_scan_naive, ssd_step

__all__ = ["default_chunk_size", "ssd_scan", "ssd_scan_naive", "ssd_step"]
