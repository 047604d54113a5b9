"""Smoke test of benchmarks/bench_export.py: its quick configuration runs in-process and fills
every row of the report (the Lava rows with the Lava environment). No timing assertions."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_export.py"


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("benchmarks/bench_export.py")


def test_quick_run_fills_the_report(bench, lava):
    results = bench.run(bench.QUICK)
    assert "lava_error" not in results, results.get("lava_error")
    assert results["lava_equal_samples"] == "1/1"
    assert 0.0 <= results["acc_fixed"] <= 1.0 and results["export_ms"] > 0
    for key in ("lava_fixed_steps_per_s", "lava_float_steps_per_s"):  # None: noise won
        assert results[key] is None or results[key] > 0
    info = {"date": "d", "cpu": "c", "threads": "1", "python": "3", "torch": "t", "load": "0"}
    text = bench.report(bench.QUICK, results, {**info, **bench.lava_versions(), "command": "x"})
    assert "bit for bit" in text and "steps/s" in text
