"""Time the energy counter against the plain forward pass and against SpikingJelly's op_counter.

The network is DESIGN.md §4's spiking MLP: ``Linear(W, W) → neuron → Linear(W, W)`` on a real
input [T, N, W] (W = 512, T = 4, N = 64 by default), with the neuron ATMN (ternary),
SpikingJelly's ``TernaryLIFNode`` (ternary) or its ``LIFNode`` (binary). In one run, on the same
input, with repetitions interleaved (rep 1 of every method, then rep 2, …) so that drift of a
shared machine hits all of them alike:

* ``plain``: ``net(x)`` under ``torch.no_grad()``;
* ``spikemar[auto]`` / ``spikemar[producer]``: the same call with an attached
  :class:`spikemar.energy.EnergyCounter` (hooks in place; nnz counting on; the counts of each
  rep are dropped with ``reset()`` outside the timed region);
* ``spikemar profile()``: the one-shot ``spikemar.energy.profile`` call, end to end (attach,
  forward, one device read-back, report with energies);
* ``sj SynOpCounter``: ``net(x)`` inside SpikingJelly 2.0's
  ``DispatchCounterMode([SynOpCounter()])``.

The counter always counts memory traffic too (weights, activations, spike trains, state: the
same hooks, a few more integers per event), so the ``spikemar`` rows include it.

``--student`` times the packaged student (``spikemar/assets/mar_shakespeare.pt``) the same way:
its forward on L characters of Tiny Shakespeare's validation split, plain and with a counter.
``--student-energy`` prints the energy tables of RESULTS.md instead (no timing): the packaged
student against its dense twin and against an int8 dense model of the same weights, per token,
compute-only and memory-inclusive at 45 nm, and the break-even firing rates of every spike point
beside the measured ones.

Neuron membranes are reset before every call, outside the timed region. Reported per row:
median and interquartile range in ms, the ratio of its median to ``plain``'s (overhead = ratio
− 1) and the median of the per-round ratios (each rep over the ``plain`` rep of the same round:
on a shared machine a burst of load hits both sides of a pair, so this one moves less); also
the ACs each counter found (SpikingJelly's is 0 on ternary spikes: it only knows {0, 1}).

    python benchmarks/bench_energy.py                    # W=512, T=4, N=64, 2 threads
    python benchmarks/bench_energy.py --neurons atmn --reps 400 --json out.json
    python benchmarks/bench_energy.py --quick            # seconds: a smoke run
    python benchmarks/bench_energy.py --student --reps 100    # the packaged student's forward
    python benchmarks/bench_energy.py --clock process --threads 1   # CPU time: a loaded machine
    python benchmarks/bench_energy.py --student-energy        # RESULTS.md's energy tables

The Markdown table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import layer
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based.op_counter import DispatchCounterMode, SynOpCounter
from torch import nn

from spikemar.energy import EnergyCounter, profile
from spikemar.neurons import ATMN

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _harness, run or imported by path
from _harness import load_average, timing_stats, write_json
from _harness import machine_info as _machine_info

NEURONS = {
    "atmn": lambda: ATMN(tau=2.0, v_threshold=1.0, step_mode="m"),
    "sj-lif": lambda: sj_neuron.LIFNode(tau=2.0, v_threshold=1.0, step_mode="m"),
    "sj-ternary": lambda: sj_neuron.TernaryLIFNode(
        tau=2.0, v_threshold=1.0, v_reset=None, step_mode="m"
    ),
}
PLAIN = "plain"
# the timer: wall clock by default; --clock process measures this process's CPU time, which a
# crowded shared machine disturbs far less than the wall clock (state which one with a number)
_CLOCK = [time.perf_counter]


def make_mlp(width: int, neuron: str) -> nn.Module:
    return nn.Sequential(
        layer.Linear(width, width, step_mode="m"),
        NEURONS[neuron](),
        layer.Linear(width, width, step_mode="m"),
    ).eval()


def methods(net: nn.Module, x: torch.Tensor) -> dict[str, tuple[Callable[[], object], Any]]:
    """name → (the timed call, the EnergyCounter attached around it or None)."""

    def forward():
        return net(x)

    def one_shot():
        return profile(net, x, reset_state=False)

    def sj():
        with DispatchCounterMode([SynOpCounter()]):
            return net(x)

    return {
        PLAIN: (forward, None),
        "spikemar[auto]": (forward, EnergyCounter(net, spike_detection="auto")),
        "spikemar[producer]": (forward, EnergyCounter(net, spike_detection="producer")),
        "spikemar profile()": (one_shot, None),
        "sj SynOpCounter": (sj, None),
    }


def acs_found(net: nn.Module, x: torch.Tensor) -> tuple[int, int, float]:
    """(our ACs, SpikingJelly SynOpCounter's, firing rate of the neuron)."""
    rep = profile(net, x)
    counter = SynOpCounter()
    sj_functional.reset_net(net)
    with torch.no_grad(), DispatchCounterMode([counter]):
        net(x)
    rate = rep.row("1").firing_rate or 0.0
    return rep.total_acs, counter.get_total(), rate


def bench(net: nn.Module, x: torch.Tensor, reps: int, warmup: int) -> dict[str, list[float]]:
    ms = methods(net, x)
    times: dict[str, list[float]] = {name: [] for name in ms}
    with torch.no_grad():
        for i in range(warmup + reps):
            for name, (fn, counter) in ms.items():
                sj_functional.reset_net(net)
                with counter if counter is not None else contextlib.nullcontext():
                    t0 = _CLOCK[0]()
                    fn()
                    t1 = _CLOCK[0]()
                if counter is not None:
                    counter.reset()  # drop this rep's pending counts (outside the timing)
                if i >= warmup:
                    times[name].append((t1 - t0) * 1e3)
    return times


def summarize(times: dict[str, list[float]]) -> list[dict[str, float | str]]:
    base = statistics.median(times[PLAIN])
    rows = []
    for name, ts in times.items():
        st = timing_stats(ts, method="exclusive")
        paired = statistics.median(t / p for t, p in zip(ts, times[PLAIN], strict=True))
        rows.append({"method": name, "median_ms": st.median, "iqr_ms": st.iqr,
                     "ratio": st.median / base, "paired_ratio": paired})  # fmt: skip
    return rows


def student_inputs(L: int) -> tuple[nn.Module, torch.Tensor, str]:
    """The packaged student, L characters of the validation split (the last 10 % of Tiny
    Shakespeare; random tokens when the text is not there) and where they came from."""
    from spikemar.energy.demo import packaged_student

    model, tokenizer = packaged_student()
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare"
    path = path / "input.txt"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        val = text[int(0.9 * len(text)) :]
        ids = torch.tensor([tokenizer.encode(val[:L])])
        return model, ids, f"the first {L} characters of the validation split of {path.name}"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tokenizer.vocab_size, (1, L), generator=g)
    return model, ids, f"{L} random tokens (no Tiny Shakespeare at {path})"


def student_energy(L: int) -> str:
    """RESULTS.md's tables: energy per token of the packaged student, its dense twin and an
    int8 dense model of the same weights; break-even rates per spike point."""
    from spikemar.checkpoint import dense_twin
    from spikemar.energy import break_even

    model, ids, source = student_inputs(L)
    student = profile(model, ids)
    twin = profile(dense_twin(model), ids)
    out = [f"Input: {source}; batch 1; per token; weights fetched once per token.", ""]
    out.append(
        "| model | priced as | compute only | compute + memory (packed spikes) | "
        "compute + memory (address-events) |"
    )
    out.append("| --- | --- | ---: | ---: | ---: |")
    rows = (
        ("spiking student", student, "fp32"),
        ("spiking student, int8 weights", student, "int8"),
        ("dense twin (same weights)", twin, "fp32"),
        ("int8 dense (same weights)", twin, "int8"),
    )
    for label, rep, dtype in rows:
        cells = []
        for suffix in ("", "+mem", "+mem+aer"):
            r = rep.with_hardware(f"45nm-{dtype}{suffix}")
            cells.append(_per_token(r.total_energy_pj / rep.tokens))
        out.append(f"| {label} | 45nm-{dtype} | " + " | ".join(cells) + " |")
    out.append("")
    names = [f"45nm-{d}{m}" for d in ("fp32", "int8") for m in ("", "+mem", "+mem+aer")]
    tables = [break_even(student.with_hardware(n)) for n in names]
    out.append(
        "Break-even firing rates (non-zero spikes per neuron and micro-step above which the "
        "spike point and the projections it feeds cost more than those projections fed real "
        "values, under the same profile) beside the measured rates:"
    )
    out.append("")
    out.append("| spike point | measured | " + " | ".join(names) + " |")
    out.append("| --- | ---: | " + " | ".join("---:" for _ in names) + " |")
    for k, p in enumerate((*tables[0].points, tables[0].model)):
        cells = []
        for t in tables:
            entry = (*t.points, t.model)[k]
            be = entry.break_even_rate
            cells.append("-" if be is None else f"{be:.3f}")
        out.append(f"| {p.name} | {p.firing_rate:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _per_token(pj: float) -> str:
    return f"{pj / 1e6:,.1f} µJ" if pj >= 1e6 else f"{pj / 1e3:,.1f} nJ"


def bench_student(L: int, reps: int, warmup: int) -> dict[str, list[float]]:
    """The packaged student's forward, plain and with a counter attached, interleaved.

    With a counter attached the spike points run the same fused decode kernel as the plain
    forward, asked for their spike counts as well (``counts=True``; the counter reads
    ``MARLM.spike_points()`` to know that counts suffice): ``spikemar[auto]``. For comparison,
    ``plain, spikes kept`` (every spike point's ``record`` on) is the reference path that
    materialises the [T, N] spike trains, and ``spikemar[auto], spike trains`` is the counter
    fed those trains (how it counted before the kernels gave counts). ``kernel counts only``
    attributes the overhead: the spike points' kernels count and hand the counts to a listener
    that drops them (no hooks, no counter logic)."""
    from spikemar import counting
    from spikemar.models import SpikePoint

    model, ids, _ = student_inputs(L)
    points = [m for m in model.modules() if isinstance(m, SpikePoint)]
    counter = EnergyCounter(model)
    kept, trains = "plain, spikes kept", "spikemar[auto], spike trains"
    only = "kernel counts only"
    counted = ("spikemar[auto]", trains)
    times: dict[str, list[float]] = {
        PLAIN: [], only: [], "spikemar[auto]": [], kept: [], trains: []
    }  # fmt: skip

    @contextlib.contextmanager
    def counts_dropped():
        token = counting.activate(_DropCounts())
        try:
            yield
        finally:
            counting.deactivate(token)

    def context(name: str):
        if name in counted:
            return counter
        return counts_dropped() if name == only else contextlib.nullcontext()

    with torch.no_grad():
        for i in range(warmup + reps):
            for name in times:
                for p in points:
                    p.record = name in (kept, trains)
                with context(name):
                    t0 = _CLOCK[0]()
                    model(ids)
                    t1 = _CLOCK[0]()
                counter.reset()
                if i >= warmup:
                    times[name].append((t1 - t0) * 1e3)
    for p in points:
        p.record = False
    return times


class _DropCounts:
    """A counting listener that takes spike counts and drops everything (see bench_student)."""

    def needs_spike_train(self, module: nn.Module | None) -> bool:
        return False

    def on_declare_spike_counts(self, *args: object) -> None:
        pass

    def on_declare_spikes(self, *args: object) -> None:
        pass

    def on_record_ops(self, *args: object) -> None:
        pass


def print_header(what: str, clock: str, info: dict[str, str]) -> None:
    print(f"Energy counting overhead, {what}, {clock} clock")
    print()
    print(" · ".join(f"{k}: {v}" for k, v in info.items()))
    print()


def machine_info(threads: int, load_at_start: float) -> dict[str, str]:
    """The machine, as in :func:`_harness.machine_info`, with the SpikingJelly version."""
    return _machine_info(
        threads, load_at_start, packages=("spikingjelly",), with_cpu_pressure=False
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--neurons", nargs="+", choices=sorted(NEURONS), default=["atmn", "sj-ternary", "sj-lif"]
    )
    p.add_argument("--input-scale", type=float, default=3.0, help="x = scale · randn (3.0)")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="few reps, to check that it runs")
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument(
        "--clock",
        choices=("wall", "process"),
        default="wall",
        help="wall clock (default) or this process's CPU time (steadier on a loaded machine)",
    )
    p.add_argument("--student", action="store_true", help="time the packaged student instead")
    p.add_argument(
        "--student-energy", action="store_true", help="print the energy tables of RESULTS.md"
    )
    p.add_argument("--L", type=int, default=256, help="student: characters per forward (256)")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = 10, 2
    torch.set_num_threads(args.threads)
    _CLOCK[0] = time.process_time if args.clock == "process" else time.perf_counter
    load = load_average()
    if args.student_energy:
        print(student_energy(args.L))
        return 0
    if args.student:
        rows = summarize(bench_student(args.L, args.reps, args.warmup))
        info = machine_info(args.threads, load)
        print_header(f"packaged student forward (batch 1, L={args.L}), no grad", args.clock, info)
        print("| method | median ms | IQR ms | × plain | × plain, paired |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for row in rows:
            print(f"| {row['method']} | {row['median_ms']:.3f} | {row['iqr_ms']:.3f} | "
                  f"{row['ratio']:.3f} | {row['paired_ratio']:.3f} |")  # fmt: skip
        write_json(args.json, {"machine": info, "L": args.L, "rows": rows}, indent=2)
        return 0
    results = []
    for neuron in args.neurons:
        torch.manual_seed(0)
        net = make_mlp(args.width, neuron)
        x = torch.randn(args.T, args.batch, args.width) * args.input_scale
        ours, sj, rate = acs_found(net, x)
        print(f"[{neuron}] timing {args.reps} interleaved reps …", file=sys.stderr)
        rows = summarize(bench(net, x, args.reps, args.warmup))
        results.append(
            {"neuron": neuron, "firing_rate": rate, "acs": ours, "sj_synops": sj, "rows": rows}
        )
    info = machine_info(args.threads, load)
    shape = f"W={args.width}, T={args.T}, N={args.batch}"
    what = f"spiking MLP Linear→neuron→Linear ({shape}), forward, no grad"
    print_header(what, args.clock, info)
    print("| neuron | method | median ms | IQR ms | × plain | × plain, paired | ACs counted |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for res in results:
        for row in res["rows"]:
            m = row["method"]
            acs = (
                f"{res['acs']:,}"
                if m.startswith("spikemar")
                else f"{res['sj_synops']:,}"
                if m.startswith("sj")
                else ""
            )
            print(
                f"| {res['neuron']} (rate {res['firing_rate']:.3f}) | {m} | "
                f"{row['median_ms']:.3f} | {row['iqr_ms']:.3f} | {row['ratio']:.3f} | "
                f"{row['paired_ratio']:.3f} | {acs} |"
            )
    write_json(args.json, {"machine": info, "shape": shape, "results": results}, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
