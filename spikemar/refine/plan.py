"""Planning: which option each module takes, under an energy or a quality budget.

The problem is a multiple-choice knapsack: every module picks exactly one option (``'dense'``
included), the predicted KL and the energy saved add up over modules, and either

* ``energy_ratio=r``: minimise the summed KL subject to teacher / student energy >= r, or
* ``max_kl=k``: maximise the energy saved subject to the summed KL <= k.

**Method: exact Pareto dynamic programming** (Nemhauser–Ullmann), not a DP over a discretised
budget. Modules are added one at a time while keeping the set of (KL, saved) pairs that no other
reachable pair dominates (no more KL and no less saved); the answer to either budget is a point of
the final set, and the set itself is the whole Pareto front the plot draws. Discretising the
budget would round energies (measured in pJ with no natural unit) and so could miss the optimum
or violate the budget by the rounding; the Pareto DP has no rounding, gives both budget kinds and
every budget from one pass, and stays small in practice (its size is the number of non-dominated
sums, polynomial in expectation for measured costs). Should it exceed ``max_front`` pairs, the
front is thinned to a relative grid of 1e-9 in KL, which can no longer guarantee optimality: the
plan then says ``exact=False``.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._numbers import check_count, plain, real
from .measure import Measurements, Option

__all__ = ["Plan", "pareto_front", "pareto_plot", "plan", "random_schedule", "uniform_schedules"]

MAX_FRONT = 200_000


@dataclass(frozen=True)
class _Partial:
    kl: float
    saved: float
    picks: tuple[int, ...]  # option index per module added so far


def pareto_front(
    measurements: Measurements, max_front: int = MAX_FRONT
) -> tuple[list[_Partial], bool]:
    """All non-dominated schedules (KL ascending, saved ascending) and whether the front is
    exact (never thinned)."""
    front = [_Partial(0.0, 0.0, ())]
    exact = True
    for options in measurements.modules.values():
        merged = [
            _Partial(p.kl + o.kl, p.saved + o.energy_saved_pj, (*p.picks, i))
            for p in front
            for i, o in enumerate(options)
        ]
        # sort by KL, then most saved first; keep a pair only if it saves more than every pair
        # of lower KL (ties in KL: the most saved one)
        merged.sort(key=lambda p: (p.kl, -p.saved))
        front, best = [], -float("inf")
        for p in merged:
            if p.saved > best:
                front.append(p)
                best = p.saved
        if len(front) > max_front:
            exact = False
            thin, last = [], None
            for p in front:
                if last is None or p.kl > last * (1 + 1e-9) + 1e-12:
                    thin.append(p)
                    last = p.kl
            front = thin
    return front, exact


@dataclass
class Plan:
    """A chosen schedule: ``choice`` (module → Option), its ``predicted_kl``, predicted
    ``energy_ratio`` (teacher / student energy), the ``points`` config, the budget, and
    whether the optimisation was ``exact``."""

    choice: dict[str, Option]
    predicted_kl: float
    energy_saved_pj: float
    energy_ratio: float
    budget: dict[str, float]
    exact: bool
    front: list[tuple[float, float]] = field(default_factory=list)  # (energy ratio, KL)

    @property
    def points(self) -> dict[str, Any]:
        """The schedule as :func:`~spikemar.refine.build_student` takes it (every module
        named): ``MARConfig.points`` settings, and ``{'mixer': kind}`` for a replaced layer."""
        return {name: o.setting for name, o in self.choice.items()}

    def to_json(self) -> dict[str, Any]:
        return {"points": self.points, "predicted_kl": self.predicted_kl,
                "energy_saved_pj": self.energy_saved_pj, "energy_ratio": self.energy_ratio,
                "budget": self.budget, "exact": self.exact}  # fmt: skip

    def save(self, path: str | os.PathLike, *, name: str = "path") -> Path:
        """Write the plan as JSON to ``path``; ``name`` is the argument an error names (a full
        disk: '``name``: cannot write PATH (reason)')."""
        from .._io import atomic_write, check_output_path

        path = check_output_path(path, name=name)  # a folder at path named, not the temp file
        with atomic_write(path, name=name) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=1))
        return path


def _check_table(measurements: Any) -> None:
    """One error unless ``measurements`` is a table with at least one option per module."""
    if not isinstance(measurements, Measurements):
        raise TypeError(f"measurements: expected Measurements, got "
                        f"{type(measurements).__name__}")  # fmt: skip
    if not measurements.modules:
        raise ValueError("measurements: no modules were measured")
    empty = [name for name, options in measurements.modules.items() if not options]
    if empty:
        raise ValueError(f"measurements: modules {empty[:3]} have no options; expected at least "
                         "one each ('dense' first, as measure writes)")  # fmt: skip


def _check_number(name: str, value: Any, low: float) -> float:
    """``value`` as a Python float; one error naming ``name`` unless it is a real number
    >= ``low`` (NaN is not)."""
    converted = real(value)
    if converted is None or not converted >= low:
        raise ValueError(f"{name}: expected a number >= {low:g}, got {value!r}")
    return converted


def _ratio(m: Measurements, saved: float) -> float:
    left = m.teacher_energy_pj - saved
    return m.teacher_energy_pj / left if left > 0 else float("inf")


def plan(
    measurements: Measurements,
    energy_ratio: float | None = None,
    *,
    max_kl: float | None = None,
    max_front: int = MAX_FRONT,
) -> Plan:
    """The schedule of least predicted KL whose energy ratio is at least ``energy_ratio``, or of
    most energy saved whose predicted KL is at most ``max_kl`` (exactly one budget). Raises
    ``ValueError`` when no schedule meets the budget, naming the best reachable value."""
    _check_table(measurements)
    if (energy_ratio is None) == (max_kl is None):
        raise ValueError("energy_ratio, max_kl: give exactly one budget")
    front, exact = pareto_front(measurements, max_front)
    if energy_ratio is not None:
        ratio = _check_number("energy_ratio", energy_ratio, 1)
        need = measurements.teacher_energy_pj * (1 - 1 / ratio)
        ok = [p for p in front if p.saved >= need - 1e-9 * abs(need)]
        if not ok:
            best = _ratio(measurements, front[-1].saved)
            raise ValueError(f"energy_ratio: {plain(energy_ratio)} is out of reach; the "
                             f"measured options reach at most {best:.4g}x")  # fmt: skip
        chosen = ok[0]  # the front is KL-ascending: the first that saves enough
        budget = {"energy_ratio": ratio}
    else:
        kl = _check_number("max_kl", max_kl, 0)
        ok = [p for p in front if p.kl <= kl]
        if not ok:  # only where a module has no 'dense' option (KL 0)
            raise ValueError(f"max_kl: {plain(max_kl)} is out of reach; the measured options "
                             f"reach at least {front[0].kl:.4g}")  # fmt: skip
        chosen = ok[-1]  # saved ascends with KL along the front
        budget = {"max_kl": kl}
    names = list(measurements.modules)
    choice = {n: measurements.modules[n][i] for n, i in zip(names, chosen.picks, strict=True)}
    curve = [(_ratio(measurements, p.saved), p.kl) for p in front]
    return Plan(choice, chosen.kl, chosen.saved, _ratio(measurements, chosen.saved), budget,
                exact, curve)  # fmt: skip


def _mixer(setting: Any) -> bool:
    return isinstance(setting, dict) and "mixer" in setting


def uniform_schedules(measurements: Measurements) -> dict[str, dict[str, Option]]:
    """Every spiking setting applied at every spike point (the usual hand-made schedule), by
    the setting's label. Layer replacements (attention → SSM modules) stay as they are."""
    out: dict[str, dict[str, Option]] = {}
    mixer = {n for n, opts in measurements.modules.items()
             if all(o.setting == "dense" or _mixer(o.setting) for o in opts)}  # fmt: skip
    spike = [opts for n, opts in measurements.modules.items() if n not in mixer]
    for option in spike[0][1:] if spike else []:
        if isinstance(option.setting, dict) and "sparsify" in option.setting:
            continue
        label = option.label()
        picks = {n: measurements.modules[n][0] for n in mixer}
        for name, options in measurements.modules.items():
            match = [o for o in options if o.setting == option.setting]
            if match:
                picks[name] = match[0]
        if len(picks) == len(measurements.modules):
            out[label] = picks
    return out


def random_schedule(
    measurements: Measurements, energy_ratio: float, seed: int = 0, tries: int = 200
) -> dict[str, Option]:
    """A random schedule whose predicted energy ratio is at least ``energy_ratio``, chosen
    without looking at KL: the baseline a planner has to beat.

    Each of ``tries`` draws picks a random option per module, then, while the draw saves too
    little, moves a random module to a random one of its options that saves more (pure draws
    almost never reach high ratios: at 8x on the packaged teacher none of 2,000 did); of the
    draws, the one closest above the target is returned."""
    _check_table(measurements)
    ratio = _check_number("energy_ratio", energy_ratio, 1)
    tries = check_count("tries", tries)
    rng = random.Random(plain(seed))  # random.Random refuses NumPy's ints
    need = measurements.teacher_energy_pj * (1 - 1 / ratio)
    most = sum(max(o.energy_saved_pj for o in opts) for opts in measurements.modules.values())
    if most < need - 1e-9 * abs(need):
        raise ValueError(f"energy_ratio: {plain(energy_ratio)} is out of reach; the measured "
                         f"options reach at most {_ratio(measurements, most):.4g}x")  # fmt: skip
    best, best_saved = None, float("inf")
    for _ in range(tries):
        pick = {n: rng.choice(opts) for n, opts in measurements.modules.items()}
        saved = sum(o.energy_saved_pj for o in pick.values())
        while saved < need - 1e-9 * abs(need):
            name = rng.choice([n for n, o in pick.items()
                               if any(x.energy_saved_pj > o.energy_saved_pj
                                      for x in measurements.modules[n])])  # fmt: skip
            more = [x for x in measurements.modules[name]
                    if x.energy_saved_pj > pick[name].energy_saved_pj]  # fmt: skip
            saved -= pick[name].energy_saved_pj
            pick[name] = rng.choice(more)
            saved += pick[name].energy_saved_pj
        if saved < best_saved:
            best, best_saved = pick, saved
    return best


def pareto_plot(
    measurements: Measurements,
    plans: list[Plan],
    path: str | os.PathLike,
    *,
    measured: dict[str, tuple[float, float]] | None = None,
) -> Path:
    """Energy ratio vs KL: the predicted Pareto front, each plan (predicted), the uniform
    schedules (predicted), and ``measured`` points (label → (energy ratio, measured KL))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..viz import save_figure

    if not isinstance(measurements, Measurements):
        raise TypeError(f"measurements: expected Measurements, got "
                        f"{type(measurements).__name__}")  # fmt: skip
    if not isinstance(plans, list | tuple) or not all(isinstance(p, Plan) for p in plans):
        raise TypeError(f"plans: expected a list of Plan, got {type(plans).__name__}")
    front, _ = pareto_front(measurements)
    # every point is named in the legend beside the axes (labels written at the points ran
    # into each other and off the figure: the uniform schedules sit close together)
    fig, ax = plt.subplots(figsize=(9.0, 4.4))
    xs = [_ratio(measurements, p.saved) for p in front]
    ax.step(xs, [p.kl for p in front], where="post", color="0.5", lw=1,
            label="predicted Pareto front (sum of per-module KL)")  # fmt: skip
    shapes = "sD^vP<>Xph"
    for n, (label, picks) in enumerate(uniform_schedules(measurements).items()):
        saved = sum(o.energy_saved_pj for o in picks.values())
        kl = sum(o.kl for o in picks.values())
        ax.scatter([_ratio(measurements, saved)], [kl], marker=shapes[n % len(shapes)],
                   color="tab:orange", zorder=3, label=f"uniform {label}, predicted")  # fmt: skip
    for p in plans:
        budget = ", ".join(f"{k}={v:g}" for k, v in p.budget.items())
        ax.scatter([p.energy_ratio], [p.predicted_kl], marker="*", s=120, color="tab:blue",
                   zorder=4, label=f"plan ({budget}), predicted")  # fmt: skip
    for n, (label, (ratio, kl)) in enumerate((measured or {}).items()):
        filled = n % 2 == 1  # before / after stage 2: open, then filled
        ax.scatter([ratio], [kl], marker="o", s=24 if filled else 70, zorder=5 + n,
                   edgecolors="tab:red",
                   facecolors="tab:red" if filled else "none",
                   label=f"{label}, measured")  # fmt: skip
    ax.set_xlabel(f"energy ratio teacher / student ({measurements.hardware})")
    ax.set_ylabel("KL(teacher ‖ student), nats/token")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return save_figure(fig, path)
