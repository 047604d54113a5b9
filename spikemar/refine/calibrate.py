"""Threshold calibration from activation statistics: each spike point's V set on a few batches.

Two targets, per spike point and per channel (or per point when the threshold is shared):

* a **firing rate** (nonzero spikes per micro-step): :func:`spikemar.convert.calibrate_point_rate`
  (bisection on log V with the neuron's own kernel; the rate falls as V grows), with one rate
  for every point (:func:`spikemar.convert.calibrate_thresholds`) or a rate *per point* (as
  ``spikemar refine`` uses: each point's rate at its planned V, so that per-channel thresholds
  keep the plan's energy, since a point's ACs are its spike count times one fan-out);
* a **quantisation error**: the relative error ``‖decode(I) − I‖ / ‖I‖`` of the spike point's
  decode on the sampled activations I. It is not monotone in V (a small V saturates at T·V, a
  large one quantises coarsely), so V is the *largest* threshold on a log grid whose error is at
  most the target (the fewest spikes that meet it), refined between that candidate and the next
  larger one; where no V meets it, the V of least error. Larger V means fewer spikes, so this is
  the cheapest threshold of that quality.

Both take the activations the *dense* model produces at each point's place (hooks on the teacher,
one pass per batch), the usual post-training-quantisation choice: calibration is one pass, and
distillation trains V afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .._numbers import check_count, check_seed, real
from ..convert import calibrate_point_rate, calibrate_thresholds, point_rates, point_samples
from ..models import MARLM, SpikePoint
from ..neurons import atmn_quantize

__all__ = ["calibrate", "firing_rates", "point_samples", "quantisation_error"]

GRID = 48  # candidate thresholds per point in the quantisation-error search
ROUNDS = 3  # refinements of the bracket around the chosen candidate


def quantisation_error(x: torch.Tensor, point: SpikePoint, log_v: torch.Tensor) -> torch.Tensor:
    """Relative decode error ``‖decode(x) − x‖ / ‖x‖`` of ``point``'s neuron on samples
    x [n, C] under K candidate thresholds ``log_v`` [K, C] (per channel) or [K, 1] (shared):
    [K, C] or [K, 1] (a channel with x ≡ 0 has error 0)."""
    K, C = log_v.shape[0], x.shape[1]
    v = log_v.exp().expand(K, C).reshape(K * C).contiguous()
    params = point.neuron.parameters_tuple()._replace(v_threshold=v.to(x.dtype))
    decoded, _ = atmn_quantize(x.repeat(1, K), point.T, params)
    err = (decoded - x.repeat(1, K)).square().sum(0).reshape(K, C)
    ref = x.square().sum(0).expand(K, C)
    if log_v.shape[1] == 1:  # a shared threshold: one error over all channels
        err, ref = err.sum(1, keepdim=True), ref.sum(1, keepdim=True)
    return torch.where(ref > 0, (err / ref.clamp(min=1e-30)).sqrt(), torch.zeros_like(err))


def _largest_within(errors: torch.Tensor, grid: torch.Tensor, target: float) -> torch.Tensor:
    """Per column: the index of the largest grid value (grid ascending) whose error <= target,
    else the index of the least error."""
    ok = errors <= target
    idx = torch.arange(grid.shape[0])[:, None].expand_as(errors)
    best_ok = torch.where(ok, idx, torch.full_like(idx, -1)).amax(0)
    return torch.where(best_ok >= 0, best_ok, errors.argmin(0))


@torch.no_grad()
def _calibrate_error(point: SpikePoint, x: torch.Tensor, target: float) -> float:
    a = point.neuron.log_threshold
    shared = a.dim() == 0  # one V for the point ('layer' threshold sharing)
    top = x.abs().amax().reshape(1) if shared else x.abs().amax(dim=0)
    # from far above every |I| (no spikes, error 1) down to a resolution T·64 times finer
    hi = torch.log(top.clamp(min=1e-12)) + 1.0
    lo = hi - 1.0 - torch.log(torch.tensor(64.0 * point.T)) - 4.0
    steps = torch.linspace(0, 1, GRID, dtype=hi.dtype)[:, None]
    for _ in range(ROUNDS + 1):
        grid = lo + (hi - lo) * steps  # ascending [K, C']
        errors = quantisation_error(x, point, grid)
        pick = _largest_within(errors, grid, target)
        chosen = grid.gather(0, pick[None])[0]
        # the bracket: the chosen candidate and the next larger one
        upper = grid.gather(0, (pick + 1).clamp(max=GRID - 1)[None])[0]
        lo, hi = chosen, torch.maximum(upper, chosen)
    a.copy_(chosen.reshape(a.shape).to(a.dtype))
    final = quantisation_error(x, point, chosen[None])
    return float(final.mean())


@torch.no_grad()
def firing_rates(
    student: MARLM,
    teacher: MARLM,
    batches: Iterable[torch.Tensor],
    *,
    max_rows: int = 2048,
    seed: int = 0,
) -> dict[str, float]:
    """Per spike point of ``student``: its firing rate (nonzero spikes per micro-step) at its
    current thresholds on ``teacher``'s activations at its place (the samples calibration
    uses)."""
    max_rows, seed = check_count("max_rows", max_rows), check_seed(seed)
    samples = point_samples(student, teacher, list(batches), max_rows=max_rows, seed=seed)
    return {s.name: float(point_rates(s.module, samples[s.name]).mean())
            for s in student.spike_points()}  # fmt: skip


def calibrate(
    student: MARLM,
    teacher: MARLM,
    batches: Iterable[torch.Tensor],
    *,
    firing_rate: float | Mapping[str, float] | None = None,
    quant_error: float | None = None,
    max_rows: int = 2048,
    seed: int = 0,
) -> dict[str, float]:
    """Set the thresholds of every spike point of ``student`` from ``teacher``'s activations at
    their places on ``batches``: to ``firing_rate`` (nonzero spikes per micro-step) or to
    ``quant_error`` (relative decode error; the largest V that meets it). Exactly one target;
    ``firing_rate`` may name a rate per spike point (every point of ``student``, by name).

    Returns per spike point the firing rate (or the relative error) reached on the samples."""
    if not isinstance(student, MARLM) or not isinstance(teacher, nn.Module):
        raise TypeError(f"student, teacher: expected a MARLM and a model, got "
                        f"{type(student).__name__} and {type(teacher).__name__}")  # fmt: skip
    if (firing_rate is None) == (quant_error is None):
        raise ValueError("firing_rate, quant_error: give exactly one calibration target")
    max_rows, seed = check_count("max_rows", max_rows), check_seed(seed)
    if firing_rate is not None and not (
        isinstance(firing_rate, Mapping) or real(firing_rate) is not None
    ):
        raise ValueError(f"firing_rate: expected a fraction in (0, 1) or a rate per spike point, "
                         f"got {firing_rate!r}")  # fmt: skip
    batches = list(batches)
    if isinstance(firing_rate, Mapping):
        names = [s.name for s in student.spike_points()]
        if set(firing_rate) != set(names):
            raise ValueError(f"firing_rate: expected a rate for each spike point; missing "
                             f"{sorted(set(names) - set(firing_rate))[:3]}, unknown "
                             f"{sorted(set(firing_rate) - set(names))[:3]}")  # fmt: skip
        rates = {name: real(rate) for name, rate in firing_rate.items()}
        for name, rate in rates.items():
            if not (rate is not None and 0 <= rate <= 1):
                raise ValueError(f"firing_rate[{name!r}]: expected a fraction in [0, 1], "
                                 f"got {firing_rate[name]!r}")  # fmt: skip
        samples = point_samples(student, teacher, batches, max_rows=max_rows, seed=seed)
        return {
            s.name: calibrate_point_rate(s.module, samples[s.name], rates[s.name])
            for s in student.spike_points()
        }
    if firing_rate is not None:
        return calibrate_thresholds(
            student, teacher, batches, real(firing_rate), max_rows=max_rows, seed=seed
        )
    error = real(quant_error)
    if not (error is not None and 0 < error < 1):
        raise ValueError(f"quant_error: expected a relative error in (0, 1), got {quant_error!r}")
    samples = point_samples(student, teacher, batches, max_rows=max_rows, seed=seed)
    points = {s.name: s.module for s in student.spike_points()}
    return {name: _calibrate_error(points[name], x, error)
            for name, x in samples.items()}  # fmt: skip
