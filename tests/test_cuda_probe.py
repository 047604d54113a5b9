"""Issue 18's GPU path checked from outside without a GPU: what the other CUDA test files do
not cover (benchmarks' GPU settings)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spikemar.neurons import ATMNParameters, cupy_backend


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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.zeros(4, 5), 4, torch.ones(3)), "3 per-channel thresholds"),  # 5 in x
        ((torch.zeros(4, 5), 0, torch.tensor(1.0)), "T: expected an int >= 1"),
        ((torch.zeros(4, 5, dtype=torch.int32), 4, torch.tensor(1.0)), "activation: "),
    ],
)
def test_the_fused_cuda_quantize_checks_its_arguments_before_the_kernel(args, message):
    # a per-channel V of another width returned values the kernel never wrote; T = 0 zeros
    activation, T, v = args
    p = ATMNParameters(v, tau=2.0)
    with pytest.raises((ValueError, TypeError), match=message):
        cupy_backend.atmn_quantize_cupy(activation, T, p)
