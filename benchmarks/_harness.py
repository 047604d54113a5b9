"""Helpers shared by the benchmark scripts in this folder (``bench_*.py``).

The scripts are run as ``python benchmarks/bench_X.py`` and imported by the tests from their path;
each puts its own folder on ``sys.path`` before ``import _harness``, so that this module is found
either way. Nothing here is part of the ``spikemar`` package.

What is here:

* the machine description printed above every table (:func:`machine_info`,
  :func:`header_lines`) and its parts (:func:`cpu_model`, :func:`cpu_count`,
  :func:`cpu_pressure`, :func:`load_average`, :func:`package_version`);
* the timing statistics (:func:`timing_stats`: median, quartiles and minimum) and the
  :class:`TimedRow` fields that hold them;
* table formatting (:func:`fmt`) and the text of a failed measurement (:func:`failure`);
* the Ctrl-C handling of a run (:func:`interruptible`, :func:`measure_rows`,
  :data:`INTERRUPTED_NOTE`, :func:`exit_code`), the optional JSON dump (:func:`write_json`) and
  the end of a run (:func:`finish`: the JSON of its rows, its exit status).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Literal, NamedTuple

import torch

INTERRUPTED_NOTE = "**Interrupted: partial results.**"
MISSING = "–"


# -- the machine ----------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what :mod:`platform` knows."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_pressure() -> str:
    """Share of the last 60 s in which runnable tasks waited for a CPU (Linux PSI), or '?'."""
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()
        return next(x.split("=")[1] for x in some if x.startswith("avg60=")) + "%"
    except (OSError, StopIteration, IndexError):
        return "?"


def load_average() -> float:
    """The 1-minute load average: other work on the machine shows here."""
    return os.getloadavg()[0]


def package_version(dist: str, missing: str = "not installed") -> str:
    """The installed version of distribution ``dist``, or ``missing``."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return missing


def command_line() -> str:
    """The command that started this run, shell-quoted, as ``python …``."""
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


def machine_info(
    threads: int,
    load_at_start: float | None = None,
    *,
    packages: Iterable[str] = (),
    with_cpu_pressure: bool = True,
    gpu: bool = False,
) -> dict[str, str]:
    """Where and when a run happened, as strings.

    Keys, in order: ``date``, ``cpu`` (model and visible cores), ``threads``, ``python``,
    ``torch``, one per name in ``packages`` (its version or 'not installed'), ``load`` (the
    1-minute load average, ``start → now`` when ``load_at_start`` is given), ``cpu_pressure``
    (if ``with_cpu_pressure``), ``gpu`` (if ``gpu`` and CUDA is available) and ``command``.
    """
    load = load_average()
    info = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": f"{cpu_model()} ({cpu_count()} cores visible)",
        "threads": str(threads),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for dist in packages:
        info[dist] = package_version(dist)
    info["load"] = f"{load:.2f}" if load_at_start is None else f"{load_at_start:.2f} → {load:.2f}"
    if with_cpu_pressure:
        info["cpu_pressure"] = cpu_pressure()
    if gpu and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["command"] = command_line()
    return info


def header_lines(info: dict[str, str], packages: Sequence[str] = ()) -> list[str]:
    """The lines above a Markdown report: one line describing the machine (the versions of
    ``packages`` among them; CPU pressure and GPU where ``info`` has them), then the command,
    each followed by a blank line."""
    line = (
        f"{info['date']} · {info['cpu']} · {info['threads']} threads · Python {info['python']} · "
        f"torch {info['torch']} · "
        + "".join(f"{dist} {info[dist]} · " for dist in packages)
        + f"load average {info['load']}"
    )
    if "cpu_pressure" in info:
        line += f" · CPU pressure (60 s) {info['cpu_pressure']}"
    if "gpu" in info:
        line += f" · {info['gpu']}"
    return [line, "", f"Command: `{info['command']}`", ""]


# -- statistics -----------------------------------------------------------------------------------


class Stats(NamedTuple):
    """Summary of a list of timings, in the timings' unit."""

    median: float
    q25: float
    q75: float
    min: float

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25


def timing_stats(
    times: Sequence[float], method: Literal["inclusive", "exclusive"] = "inclusive"
) -> Stats:
    """Median, first and third quartile (``statistics.quantiles`` with ``method``) and minimum of
    ``times`` (not empty); a single timing is its own quartiles."""
    ts = sorted(times)
    q = statistics.quantiles(ts, n=4, method=method) if len(ts) > 1 else [ts[0]] * 3
    return Stats(statistics.median(ts), q[0], q[2], ts[0])


@dataclass(kw_only=True)
class TimedRow:
    """The timing fields of a report row (keyword-only, so that a subclass's own fields keep
    their positions in its constructor); :meth:`summarize_times` fills in the statistics."""

    times_ms: list[float] = field(default_factory=list)
    skipped: str | None = None
    median_ms: float | None = None
    q25_ms: float | None = None
    q75_ms: float | None = None
    min_ms: float | None = None

    def summarize_times(self) -> bool:
        """Set median, quartiles and minimum from ``times_ms``; False if there are none."""
        if not self.times_ms:
            return False
        self.median_ms, self.q25_ms, self.q75_ms, self.min_ms = timing_stats(self.times_ms)
        return True


# -- formatting -----------------------------------------------------------------------------------


def fmt(v: float | None, spec: str, suffix: str = "", *, nan_is_missing: bool = True) -> str:
    """``v`` formatted with ``spec`` and ``suffix``; '–' for None (and NaN, if
    ``nan_is_missing``)."""
    if v is None or (nan_is_missing and isinstance(v, float) and math.isnan(v)):
        return MISSING
    return f"{v:{spec}}{suffix}"


def failure(e: BaseException) -> str:
    """A table cell saying that a measurement raised ``e`` (its first line, escaped for
    Markdown)."""
    first_line = (str(e).splitlines() or [""])[0]
    return f"failed: {type(e).__name__}: {first_line[:160]}".replace("|", "\\|")


# -- running --------------------------------------------------------------------------------------


def interruptible(measure: Callable[..., object], *args: Any, **kwargs: Any) -> bool:
    """Call ``measure(*args, **kwargs)``; True if Ctrl-C stopped it. ``measure`` should record
    its results as it goes (into a list it was handed), so that what it measured survives."""
    try:
        measure(*args, **kwargs)
    except KeyboardInterrupt:
        return True
    return False


def measure_rows(
    measure: Callable[..., object], cfg: Any, threads: int, *extra: Any, rows: list | None = None
) -> tuple[list, bool]:
    """``measure(cfg, rows, *extra)`` on ``threads`` torch threads, appending to or filling in
    ``rows`` (a new list unless given); returns ``(rows, interrupted)``: after a Ctrl-C, the rows
    measured so far."""
    torch.set_num_threads(threads)
    rows = [] if rows is None else rows
    return rows, interruptible(measure, cfg, rows, *extra)


def exit_code(interrupted: bool) -> int:
    """The process's exit status: 130 (as after SIGINT) if the run was interrupted, else 0."""
    return 130 if interrupted else 0


def write_json(path: str | None, payload: dict[str, Any], indent: int = 1) -> None:
    """Write ``payload`` to ``path`` as JSON, if a path was given."""
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=indent)


def finish(
    json_path: str | None, info: dict[str, str], cfg: Any, rows: Sequence[Any], interrupted: bool,
    **extra: Any,
) -> int:  # fmt: skip
    """The end of a run whose table has been printed: the JSON (``machine``: ``info``,
    ``config``: the dataclass ``cfg``, the ``extra`` entries, ``interrupted``, ``rows``: the
    dataclass rows) written if a path was given; returns the exit status."""
    payload = {"machine": info, "config": asdict(cfg), **extra, "interrupted": interrupted}
    write_json(json_path, payload | {"rows": [asdict(r) for r in rows]})
    return exit_code(interrupted)
