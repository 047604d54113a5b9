"""Spike counts from the fused spike points (``counts=True``) equal counting the materialised spike
train of the reference ``atmn_quantize``, exactly, ties at ±V included; the CUDA kernel's twin is
checked in tests/test_cuda_kernels.py (emulation)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spikemar.neurons import ATMNParameters, atmn_quantize, cpu_backend, spike_counts

pytestmark = pytest.mark.skipif(not cpu_backend.usable(), reason="no C compiler for the CPU kernel")


def inputs_with_ties(rows: int, C: int, shared: bool, dtype: torch.dtype, seed: int):
    """Random activations where some values sit exactly on +V and −V (the spike condition's
    ties) and some at ±V·τ^k (ties reached in later micro-steps)."""
    g = torch.Generator().manual_seed(seed)
    V = (
        torch.tensor(0.75, dtype=dtype)
        if shared
        else (torch.rand(C, generator=g, dtype=dtype) + 0.25)
    )
    x = torch.randn(rows, C, generator=g, dtype=dtype) * 2.5
    pick = torch.randint(0, 5, (rows, C), generator=g)
    Vb = V.expand(rows, C)
    x = torch.where(pick == 0, Vb, x)
    x = torch.where(pick == 1, -Vb, x)
    x = torch.where(pick == 2, 1.5 * Vb, x)  # u_0 = 0.5·V, so h_1 = V exactly at τ = 0.5
    return x, V


def test_spike_counts_reference_counts_signs_per_channel_and_in_all():
    s = torch.tensor([[[1.0, -1.0, 0.0], [1.0, 1.0, -1.0]], [[0.0, -1.0, -1.0], [1.0, 0.0, 0.0]]])
    per_channel = spike_counts(s)
    assert per_channel.dtype == torch.int64
    assert per_channel.tolist() == [[3, 0], [1, 2], [0, 2]]
    assert spike_counts(s, per_channel=False).tolist() == [4, 4]
    assert spike_counts(s, per_channel=False).sum() == torch.count_nonzero(s)


def test_spike_counts_refuses_a_non_tensor():
    with pytest.raises(TypeError, match="spikes"):
        spike_counts([1, 0, -1])


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 70),
    C=st.integers(1, 40),
    T=st.integers(1, 12),
    tau=st.sampled_from([1.0, 2.0, 0.5, 3.0, float("inf")]),
    ternary=st.booleans(),
    shared=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_counts_equal_the_reference_spike_trains(
    rows, C, T, tau, ternary, shared, dtype, seed
):
    x, V = inputs_with_ties(rows, C, shared, dtype, seed)
    p = ATMNParameters(V, tau=tau, ternary=ternary)
    ref_decoded, spikes = atmn_quantize(x, T, p, backend="torch")
    expected = spike_counts(spikes, per_channel=not shared)
    decoded, counts = cpu_backend.atmn_quantize_decode_cpu(x, T, p, counts=True)
    assert counts.dtype == torch.int64 and counts.shape == (*V.shape, 2)
    assert torch.equal(counts, expected)
    assert torch.equal(decoded, ref_decoded)
    # the training kernel: the same counts, not differentiable, and the decode keeps its graph
    xg = x.clone().requires_grad_()
    decoded_t, counts_t = cpu_backend.atmn_quantize_train_cpu(xg, T, p, counts=True)
    assert torch.equal(counts_t, expected) and not counts_t.requires_grad
    assert torch.equal(decoded_t.detach(), ref_decoded)
    (g,) = torch.autograd.grad(decoded_t.sum(), xg)
    assert torch.isfinite(g).all()


def test_counts_are_summed_over_threads_on_a_large_input():
    # large enough that the kernel splits it across threads (one tally row per thread)
    torch.manual_seed(3)
    x = torch.randn(96, 1024) * 2
    p = ATMNParameters(torch.rand(1024) + 0.3, tau=2.0)
    _, counts = cpu_backend.atmn_quantize_decode_cpu(x, 4, p, counts=True)
    _, spikes = atmn_quantize(x, 4, p, backend="torch")
    assert torch.equal(counts, spike_counts(spikes))


def test_without_counts_the_functions_return_the_decode_alone():
    x = torch.randn(4, 8)
    p = ATMNParameters(torch.full((8,), 0.5))
    assert isinstance(cpu_backend.atmn_quantize_decode_cpu(x, 4, p), torch.Tensor)
    assert isinstance(cpu_backend.atmn_quantize_train_cpu(x.requires_grad_(), 4, p), torch.Tensor)
