"""Issue 18's GPU path checked from outside without a GPU: what the other CUDA test files do
not cover (benchmarks' GPU settings)."""

from __future__ import annotations

import dataclasses


def test_bench_neuron_copies_at_least_a_gibibyte_on_cuda(load_script, monkeypatch):
    """The '% of copy' column divides by a copy bandwidth measured with the host's clock around
    a synchronised copy: on a GPU a 64 MiB copy lasts some tens of µs, its launch and
    synchronisation a sizeable part, which lowered the copy bandwidth (and flattered every
    row). On CUDA the copy moves at least 1 GiB; the CPU keeps its 64 MiB."""
    bench = load_script("benchmarks/bench_neuron.py")
    copied = {}

    def copy_bandwidth(nbytes, device, repeats, warmup):
        copied[device] = nbytes
        return 1.0

    monkeypatch.setattr(bench, "copy_bandwidth", copy_bandwidth)
    monkeypatch.setattr(bench, "_measure_case", lambda *args: None)
    cfg = dataclasses.replace(bench.QUICK, devices=("cpu", "cuda"), progress=False)
    bench.measure(cfg, [], {})
    assert copied == {"cpu": cfg.copy_bytes, "cuda": 2**30}
