"""Module-aware refinement (MAR's "module-aware"): measure what refining each module costs in
quality and saves in energy, then plan which modules to refine under an energy or quality
budget.

* :func:`calibrate`: spike-point thresholds from activation statistics (a target firing rate or
  quantisation error);
"""

from .calibrate import calibrate, point_samples, quantisation_error

__all__ = ["calibrate", "point_samples", "quantisation_error"]
