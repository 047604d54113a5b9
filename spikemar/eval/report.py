"""The evaluation table: one row per model, accuracy ± stderr per task, perplexity, and the
energy per token under every hardware profile, as MAR's Table 2 with an energy column.

    table = EvalTable([row_from_lm_eval(label, results, energy_report), ...])
    table.to_json(); table.to_markdown(); table.save_png("accuracy_vs_energy.png")

A row holds what lm_eval measured (its ``results["results"]``: for multiple-choice tasks
``acc`` and ``acc_norm`` with their standard errors, for rolling tasks ``word_perplexity``,
``byte_perplexity`` and ``bits_per_byte``, and any other metric, as a generation task's
``exact_match``) and what spikemar's energy counter counted on the
very forward passes that produced those scores: energy per token position under each profile
(:func:`spikemar.energy.available_profiles`) and the spike points' firing rates.

The average accuracy is the mean of the tasks' ``acc`` (a group that aggregates its tasks'
``acc``, as lm_eval's ``mmlu``, counts once, in place of its members); its standard error
treats the tasks as independent: sqrt(Σ se²) / n.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..energy import EnergyReport, available_profiles

__all__ = ["EvalRow", "EvalTable", "energy_summary", "row_from_lm_eval"]

ACCURACY = ("acc", "acc_norm")
# Markdown's energy columns unless told: compute only (MAR's convention), compute + memory
# traffic, and Loihi; every profile's figure is in the JSON
DEFAULT_COLUMNS = ("45nm-fp32", "45nm-fp32+mem", "loihi")
# a profile without a price for one of these leaves out real work: marked in the table
SYNAPTIC = ("acs", "macs")
PERPLEXITY = ("word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity")


def _metric(task_results: dict[str, Any], name: str) -> tuple[float | None, float | None]:
    """(value, stderr) of ``name`` in one task's lm_eval results (keys 'name,filter')."""
    value = stderr = None
    for key, v in task_results.items():
        if not isinstance(key, str) or "," not in key:
            continue
        metric, _filter = key.split(",", 1)
        if metric == name and _is_number(v):
            value = float(v)
        elif metric == f"{name}_stderr" and _is_number(v):
            stderr = float(v)
    return value, stderr


def _other_metrics(task_results: dict[str, Any]) -> dict[str, float]:
    """The task's metrics other than accuracy and perplexity (``exact_match`` of a generation
    task, ``f1``, ...) with their standard errors, under lm_eval's keys less a ``,none``
    filter (``exact_match``, ``exact_match_stderr``; ``exact_match,strict-match``)."""
    out = {}
    for key, v in task_results.items():
        if not isinstance(key, str) or "," not in key or not _is_number(v):
            continue
        metric, filt = key.split(",", 1)
        if metric in ACCURACY + PERPLEXITY or metric.endswith("_stderr"):
            continue
        tail = "" if filt == "none" else f",{filt}"
        out[metric + tail] = float(v)
        se = task_results.get(f"{metric}_stderr,{filt}")
        if _is_number(se) and math.isfinite(se):
            out[f"{metric}_stderr{tail}"] = float(se)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def energy_summary(report: EnergyReport, profiles: tuple[str, ...] | None = None) -> dict:
    """Energy per token under each profile and the spike points' firing rates of ``report``."""
    names = available_profiles() if profiles is None else profiles
    per_token = {}
    unpriced = {}
    for name in names:
        priced = report.with_hardware(name)
        per_token[name] = priced.per_token()["energy_pj"]
        if priced.unpriced:
            unpriced[name] = sorted(priced.unpriced)
    points = [r for r in report.rows if r.kind == "spike_point" and r.spike_elements]
    elements = sum(r.spike_elements for r in points)
    return {
        "energy_pj_per_token": per_token,
        "unpriced": unpriced,  # profile → count fields it has no price for (e.g. MACs on Loihi)
        "positions": report.tokens,
        "acs_per_token": report.total_acs / report.tokens,
        "macs_per_token": report.total_macs / report.tokens,
        "firing_rate": sum(r.spike_nnz for r in points) / elements if elements else None,
        "pos_rate": sum(r.spike_pos for r in points) / elements if elements else None,
        "neg_rate": sum(r.spike_neg for r in points) / elements if elements else None,
        "firing_rates": {r.name: r.firing_rate for r in points},
    }


@dataclass
class EvalRow:
    """One model's scores and energy."""

    label: str
    source: str  # checkpoint path, or a description
    tasks: dict[str, dict[str, Any]]  # task → {metric: value, metric_stderr: value}
    energy: dict[str, Any] | None = None  # energy_summary(), or None when not counted
    seconds: float | None = None
    samples: dict[str, int] = field(default_factory=dict)  # task → documents scored
    groups: dict[str, list[str]] = field(default_factory=dict)  # group → its tasks (lm_eval's)
    shots: dict[str, int] = field(default_factory=dict)  # task → few-shot examples (0: zero-shot)

    def accuracy(self, task: str) -> tuple[float | None, float | None]:
        m = self.tasks.get(task, {})
        return m.get("acc"), m.get("acc_stderr")

    def average_accuracy(self) -> tuple[float | None, float | None]:
        """Mean ``acc`` over the tasks, a group with its own ``acc`` (lm_eval's aggregate, as
        ``mmlu``'s) counting as one task in place of its members."""
        summarised = {t for g, members in self.groups.items() if self.accuracy(g)[0] is not None
                      for t in members}  # fmt: skip
        accs = [self.accuracy(t) for t in self.tasks
                if t not in summarised and self.accuracy(t)[0] is not None]  # fmt: skip
        if not accs:
            return None, None
        mean = sum(a for a, _ in accs) / len(accs)
        if any(se is None for _, se in accs):
            return mean, None
        return mean, math.sqrt(sum(se * se for _, se in accs)) / len(accs)


def row_from_lm_eval(
    label: str,
    source: str,
    results: dict[str, Any],
    energy: EnergyReport | None = None,
    *,
    seconds: float | None = None,
    profiles: tuple[str, ...] | None = None,
) -> EvalRow:
    """An :class:`EvalRow` from lm_eval's ``simple_evaluate`` output and the energy report of
    the same passes."""
    if not isinstance(results, dict) or "results" not in results:
        raise ValueError("results: expected the dict lm_eval.simple_evaluate returns")
    tasks: dict[str, dict[str, Any]] = {}
    for task, res in results["results"].items():
        metrics: dict[str, Any] = {}
        for name in ACCURACY + PERPLEXITY:
            value, stderr = _metric(res, name)
            if value is not None:
                metrics[name] = value
                if stderr is not None and math.isfinite(stderr):
                    metrics[f"{name}_stderr"] = stderr
        metrics.update(_other_metrics(res))
        if metrics:
            tasks[task] = metrics
    samples = {}
    for task, n in (results.get("n-samples") or {}).items():
        if isinstance(n, dict) and "effective" in n:
            samples[task] = int(n["effective"])
    shots = {str(t): int(k) for t, k in (results.get("n-shot") or {}).items() if _is_number(k)}
    subtasks = results.get("group_subtasks") or {}
    groups = {str(g): [str(t) for t in members] for g, members in subtasks.items() if members}
    return EvalRow(
        label=label,
        source=source,
        tasks=tasks,
        energy=None if energy is None else energy_summary(energy, profiles),
        seconds=seconds,
        samples=samples,
        groups=groups,
        shots=shots,
    )


def _stderr_key(metric: str) -> str:
    """``exact_match`` → ``exact_match_stderr``; ``exact_match,strict-match`` →
    ``exact_match_stderr,strict-match``."""
    name, sep, filt = metric.partition(",")
    return f"{name}_stderr{sep}{filt}"


def _pm(value: float | None, stderr: float | None, scale: float = 100.0) -> str:
    if value is None:
        return "–"
    if stderr is None:
        return f"{value * scale:.2f}"
    return f"{value * scale:.2f} ± {stderr * scale:.2f}"


def _pj(value: float) -> str:
    for unit, factor in (("µJ", 1e6), ("nJ", 1e3)):
        if value >= factor:
            return f"{value / factor:.3g} {unit}"
    return f"{value:.3g} pJ"


def energy_cells(energy: dict | None, profiles: list[str], notes: set[str]) -> list[str]:
    """Markdown cells of an :func:`energy_summary`: energy per token under each of
    ``profiles`` (marked ``*``, and the profile added to ``notes``, where it leaves synaptic
    work unpriced), then the firing rate."""
    energy = energy or {}
    cells = []
    for p in profiles:
        v = energy.get("energy_pj_per_token", {}).get(p)
        missing = set(energy.get("unpriced", {}).get(p, ())) & set(SYNAPTIC)
        if missing:
            notes.add(p)
        cells.append("–" if v is None else _pj(v) + ("*" if missing else ""))
    rate = energy.get("firing_rate")
    cells.append("–" if rate is None else f"{rate:.3f}")
    return cells


def unpriced_note(notes: set[str]) -> str:
    """The footnote of the profiles :func:`energy_cells` marked (empty without any)."""
    if not notes:
        return ""
    return (
        f"\n\\* {', '.join(sorted(notes))}: synaptic operations this profile has no price for "
        "(MACs on Loihi) are left out of the figure.\n"
    )


@dataclass
class EvalTable:
    """Rows of :class:`EvalRow`, rendered as JSON, Markdown and an accuracy-vs-energy PNG."""

    rows: list[EvalRow]
    columns: list[str] | None = None  # the profiles shown in Markdown (JSON keeps every one)

    def __post_init__(self) -> None:
        if not self.rows:
            raise ValueError("rows: expected at least one evaluated model")

    def _tasks(self, kind: tuple[str, ...]) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            for task, metrics in row.tasks.items():
                if any(k in metrics for k in kind):
                    seen.setdefault(task)
        return list(seen)

    def _other_columns(self) -> list[tuple[str, str]]:
        """``(task, metric)`` of every metric that is neither accuracy nor perplexity (nor a
        standard error), in the order the rows hold them."""
        seen: dict[tuple[str, str], None] = {}
        for row in self.rows:
            for task, metrics in row.tasks.items():
                for m in metrics:
                    name = m.split(",", 1)[0]
                    if name not in ACCURACY + PERPLEXITY and not name.endswith("_stderr"):
                        seen.setdefault((task, m))
        return list(seen)

    def _profiles(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            for name in (row.energy or {}).get("energy_pj_per_token", {}):
                seen.setdefault(name)
        if self.columns is not None:
            return [p for p in self.columns if p in seen]
        preferred = [p for p in DEFAULT_COLUMNS if p in seen]
        return preferred or list(seen)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "spikemar-eval-1", "rows": [asdict(r) for r in self.rows]}

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self) -> str:
        """Accuracy (%) ± stderr per task and on average, rolling perplexity (bits/byte),
        energy per token under each profile, the spike points' firing rate."""
        acc_tasks = self._tasks(ACCURACY)
        ppl_tasks = self._tasks(PERPLEXITY)
        others = self._other_columns()
        profiles = self._profiles()
        head = ["model", *acc_tasks]
        if acc_tasks:
            head.append("avg acc")
        head += [f"{t} (bits/byte)" for t in ppl_tasks]
        head += [f"{t} ({m})" for t, m in others]
        head += [f"E/token {p}" for p in profiles]
        head.append("firing rate")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        notes = set()
        for row in self.rows:
            cells = [row.label]
            cells += [_pm(*row.accuracy(t)) for t in acc_tasks]
            if acc_tasks:
                cells.append(_pm(*row.average_accuracy()))
            for t in ppl_tasks:
                m = row.tasks.get(t, {})
                key = "bits_per_byte" if "bits_per_byte" in m else "perplexity"
                v = m.get(key)
                cells.append("–" if v is None else f"{v:.4f}" + ("" if key == "bits_per_byte"
                                                                 else " (ppl)"))  # fmt: skip
            for t, m in others:
                metrics = row.tasks.get(t, {})
                v, se = metrics.get(m), metrics.get(_stderr_key(m))
                cells.append("–" if v is None else f"{v:.4g}" + ("" if se is None
                                                                 else f" ± {se:.2g}"))  # fmt: skip
            cells += energy_cells(row.energy, profiles, notes)
            lines.append("| " + " | ".join(cells) + " |")
        out = "\n".join(lines) + "\n"
        few = sorted({(t, k) for row in self.rows for t, k in row.shots.items() if k})
        if few:  # the table reads as zero-shot unless it says otherwise
            listed = ", ".join(f"{t} {k}" for t, k in few)
            out += f"\nFew-shot examples per task: {listed} (tasks not listed: zero-shot).\n"
        out += (
            "\nAccuracy in %, ± one standard error (lm_eval's); average over the accuracy tasks "
            "(stderr √Σse²/n). Energy per token position of the scored forward passes, counted by "
            "spikemar.energy (ACs for spike-fed layers, MACs otherwise; memory traffic in the "
            "+mem profiles) and priced by each profile (terms a profile has no price for are "
            "listed under `unpriced` in the JSON); firing rate: non-zero spikes per neuron per "
            "micro-step over all spike points.\n"
        )
        return out + unpriced_note(notes)

    def bits_per_byte(self, row: EvalRow) -> float | None:
        """Mean bits per byte over ``row``'s rolling (perplexity) tasks; None without one."""
        values = [m["bits_per_byte"] for m in row.tasks.values() if "bits_per_byte" in m]
        return sum(values) / len(values) if values else None

    def save_png(self, path: str | Path, *, hardware: str | None = None, dpi: int = 120) -> Path:
        """Against energy per token under ``hardware`` (default the first profile of the rows),
        one labelled point per model: average accuracy (± stderr) where there are accuracy
        tasks, and beside it rolling bits per byte where there are perplexity tasks."""
        from matplotlib.figure import Figure

        profiles = self._profiles()
        if not profiles:
            raise ValueError("rows: no energy was counted (count_energy off); nothing to plot")
        hw = hardware or profiles[0]
        if hw not in profiles:
            raise ValueError(f"hardware: expected one of {profiles}, got {hw!r}")
        acc_points, bpb_points = [], []
        for row in self.rows:
            energy = (row.energy or {}).get("energy_pj_per_token", {}).get(hw)
            if energy is None:
                continue
            acc, se = row.average_accuracy()
            if acc is not None:
                acc_points.append((row.label, energy, acc * 100, None if se is None else se * 100))
            bpb = self.bits_per_byte(row)
            if bpb is not None:
                bpb_points.append((row.label, energy, bpb, None))
        panels = [p for p in (acc_points, bpb_points) if p]
        if not panels:
            raise ValueError("rows: no row has both a scored task and an energy figure")
        fig = Figure(figsize=(6.4 * len(panels), 4.4))
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        n = 0
        if acc_points:
            tasks = ", ".join(self._tasks(("acc",)))
            _energy_panel(axes[n], acc_points, hw, "average accuracy (%)",
                          f"Accuracy vs energy ({tasks})", from_zero=True)  # fmt: skip
            n += 1
        if bpb_points:
            tasks = ", ".join(self._tasks(("bits_per_byte",)))
            _energy_panel(axes[n], bpb_points, hw, "bits per byte (lower is better)",
                          f"Perplexity vs energy ({tasks})", from_zero=False)  # fmt: skip
        fig.tight_layout()
        from ..viz import save_figure

        return save_figure(fig, path, dpi=dpi)  # atomic: an interrupted run leaves no half PNG


def _energy_panel(ax, points: list[tuple], hw: str, ylabel: str, title: str, *,
                  from_zero: bool) -> None:  # fmt: skip
    """One labelled point per ``(label, energy_pj, value, stderr or None)``, energy on a log
    axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for label, energy, value, se in points:
        ax.errorbar(energy, value, yerr=se, fmt="o", capsize=3, label=label)
    if from_zero:
        ax.set_ylim(0, max(10.0, ax.get_ylim()[1] * 1.1))  # accuracy from 0: gaps read true
    energies = [e for _, e, _, _ in points]
    ax.set_xlim(min(energies) / 2, max(energies) * 2)  # room for the markers at the edges
    ax.legend(fontsize=8, loc="lower right" if from_zero else "upper right")
    ax.set_xscale("log")
    # ticks in pJ/nJ/µJ; within less than two decades (a student beside its teacher: the
    # usual case) one power of ten or none would be labelled, so 2× and 5× are labelled too
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _pj(v)))
    lo, hi = ax.get_xlim()
    if hi / lo < 100:
        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: _pj(v)))
    else:
        ax.xaxis.set_minor_formatter(NullFormatter())  # labels on 2, 5 × 10^k would overlap
    ax.set_xlabel(f"energy per token ({hw})")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
