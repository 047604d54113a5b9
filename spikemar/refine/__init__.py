"""Module-aware refinement (MAR's "module-aware"): measure what refining each module costs in
quality and saves in energy, then plan which modules to refine under an energy or quality
budget.

* :func:`calibrate`: spike-point thresholds from activation statistics (a target firing rate,
  one or per point, or a quantisation error); :func:`firing_rates` per point;
* :func:`measure`: each spike point refined alone (spiking at a few T/τ/V, sparsified), and each
  attention layer replaced by its stage-1 SSM copy when a stage-1 student is given: KL to the
  teacher, loss, energy saved (:class:`Measurements`);
* :func:`plan`: the exact multiple-choice knapsack over modules (Pareto dynamic programming)
  for an energy ratio or a KL budget (:class:`Plan`, its ``points`` config), and
  :func:`pareto_plot`;
* ``spikemar refine`` (:mod:`spikemar.refine.cli`): measure → plan → SBDS stage 2 → evaluate.
"""

from .calibrate import calibrate, firing_rates, point_samples, quantisation_error
from .measure import (
    DEFAULT_OPTIONS,
    Measurements,
    Option,
    build_student,
    kl_and_loss,
    measure,
    replaceable_layers,
    schedule_kl,
)
from .plan import Plan, pareto_front, pareto_plot, plan, random_schedule, uniform_schedules

__all__ = [
    "DEFAULT_OPTIONS",
    "Measurements",
    "Option",
    "Plan",
    "build_student",
    "calibrate",
    "firing_rates",
    "kl_and_loss",
    "measure",
    "pareto_front",
    "pareto_plot",
    "plan",
    "point_samples",
    "quantisation_error",
    "random_schedule",
    "replaceable_layers",
    "schedule_kl",
    "uniform_schedules",
]
