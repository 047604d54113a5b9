"""Smoke test of benchmarks/bench_neuron.py: its quick configuration runs in-process and yields a
row for every spikemar backend, 'auto' and each peer. No timing assertions: speed lives in
benchmarks/, never in a timed test."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_neuron.py"


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("benchmarks/bench_neuron.py")


def test_quick_config_yields_every_backend_and_peer(bench):
    from spikemar.neurons import available_backends

    cfg = dataclasses.replace(bench.QUICK, progress=False)
    rows, copy_gbps, interrupted = bench.run(cfg)

    assert not interrupted
    assert copy_gbps["cpu"] > 0
    for mode in bench.MODES:
        by_impl = {r.impl: r for r in rows if r.mode == mode}
        for backend in available_backends():
            row = by_impl[f"ATMN[{backend}]"]
            # a backend that cannot run on the CPU (cupy) says why instead of timing; a crash fails
            if row.skipped:
                assert not row.skipped.startswith("failed"), row.skipped
            else:
                assert row.median_ms > 0, row
        measured = [
            "ATMN[torch]",
            next(name for name in by_impl if name.startswith("ATMN[auto")),
            "sj.LIFNode",
            "sj.TernaryLIFNode",
            "norse.LIF",
        ]
        for name in measured:
            row = by_impl[name]
            assert row.skipped is None, row
            assert len(row.times_ms) == cfg.repeats
            assert all(t > 0 for t in row.times_ms)
            assert row.median_ms > 0 and row.gb_per_s > 0
            assert 0.0 <= row.spike_rate <= 1.0
        assert by_impl["ATMN[torch]"].speedup_vs_reference == pytest.approx(1.0)
        assert by_impl["sj.LIFNode"].speedup_vs_lif == pytest.approx(1.0)


def test_markdown_table_has_a_line_per_row(bench):
    cfg = dataclasses.replace(bench.QUICK, progress=False, repeats=1, warmup=0)
    rows, copy_gbps, _ = bench.run(cfg)
    text = bench.markdown(rows, bench.machine_info(cfg), copy_gbps)
    table = [line for line in text.splitlines() if line.startswith("| cpu |")]
    assert len(table) == len(rows)


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("bench_scan.py", ["--quick", "--no-reference", "--no-progress"]),
        ("bench_energy.py", ["--quick"]),
    ],
)
def test_other_benchmarks_run_their_smoke_configuration(script, args):
    import subprocess

    path = BENCH.parent / script
    done = subprocess.run(
        [sys.executable, str(path), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "|" in done.stdout  # a Markdown table was printed


def test_bench_generate_runs_its_smoke_configuration():
    import subprocess

    path = BENCH.parent / "bench_generate.py"
    # one thread: a second OpenMP thread on a busy 2-core machine slows every step many times over
    args = ["--quick", "--threads", "1", "--no-progress"]
    done = subprocess.run(
        [sys.executable, str(path), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| MAR spiking |")]
    assert len(table) == 4, done.stdout  # batch 1 and 2 at contexts 4 and 16
    assert "| Transformer |" in done.stdout and "| MAR dense twin |" in done.stdout


def test_train_step_benchmark_quick_config_times_every_backend_and_the_dense_twin(load_script):
    module = load_script("benchmarks/bench_train_step.py")
    cfg = dataclasses.replace(module.QUICK, progress=False)
    rows, interrupted = module.run(cfg)
    from spikemar.neurons import available_backends

    assert not interrupted
    by = {(r.model, r.backend): r for r in rows}
    for backend in [*available_backends(), "auto"]:
        row = by[("MAR spiking", backend)]
        if row.skipped:  # cupy on the CPU says why; a crash fails
            assert "cannot run here" in row.skipped, row.skipped
            continue
        assert len(row.times_ms) == cfg.steps and row.median_ms > 0 and row.tokens_per_s > 0
    dense = by[("MAR dense twin", None)]
    assert dense.skipped is None and dense.median_ms > 0
    assert by[("MAR spiking", "torch")].speedup_vs_reference == pytest.approx(1.0)


def test_checkpointing_benchmark_quick_config_keeps_less(load_script, capsys):
    """Every model row (transformers, spikemar dense and student) with a checkpointed step
    that keeps a fraction of the bytes."""
    module = load_script("benchmarks/bench_checkpointing.py")
    assert module.main(["--quick"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| transformers", "| spikemar"))]  # fmt: skip
    assert len(rows) == 3
    for row in rows:
        assert 0 < float(row[7]) < 0.5  # memory ratio
