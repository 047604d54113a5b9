"""Loihi: a fixed-point model of spikemar networks, export to Lava (netx HDF5 plus an ATMN
Process) and to NIR, and a report of what of a MAR LM can go on chip.

The names are imported lazily so that the Lava side (:mod:`spikemar.hardware.lava`,
numpy and lava only) can import from this package without PyTorch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CUBALIF": "lif",
    "Block": "fixed_point",
    "FixedPointNetwork": "fixed_point",
    "FixedPointOverflowError": "fixed_point",
    "UnsupportedModuleError": "fixed_point",
    "lower": "fixed_point",
    "quantize": "chip",
    "quantize_weight": "fixed_point",
    "simulate": "fixed_point",
    "LavaUnavailableError": "lava_export",
    "export_lava": "lava_export",
    "lava_python": "lava_export",
    "run_lava": "lava_export",
    "export_nir": "nir_export",
    "import_nir": "nir_export",
    "ChipReport": "chip",
    "chip_report": "chip",
    "export_mar_lava": "mar_export",
    "mar_segments": "mar_export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
