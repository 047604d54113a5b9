"""Tensor-level counting for the energy counter: spike counts, the spike value test, conv fan-out.

Everything here returns 0-d tensors on the input's device and never calls ``.item()``: the counter
collects them and reads them back once, when a report is built, so counting does not stall the
forward pass with a device sync per layer.

Exactness: spike counts are sums of values in {−1, 0, +1}. A float32 sum (or dot product) of
such values is exact whatever the summation order as long as every partial sum is an integer
below 2^24, which holds when the tensor has fewer than 2^24 elements; larger tensors, and half
precision ones, are summed in float64 (exact below 2^53).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = [
    "conv_fan_out_map",
    "spatial_spike_map",
    "surely_not_spikes",
    "unit_spike_counts",
    "value_test",
]

_EXACT_FP32 = 2**24
_EXACT_FP64 = 2**53


def _exact_native(x: torch.Tensor, n: int) -> bool:
    return (x.dtype == torch.float32 and n < _EXACT_FP32) or (
        x.dtype == torch.float64 and n < _EXACT_FP64
    )


def unit_spike_counts(
    x: torch.Tensor, ternary: bool, *, unit: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(nnz, Σ s)`` of a spike tensor: the number of non-zero spikes and, when ``ternary``,
    the signed sum (positives − negatives; ``None`` for binary spikes, where positives = nnz).

    ``unit``: the values are known to lie in {−1, 0, +1} ({0, 1} for binary), so nnz is Σ s²
    (ternary) or Σ s (binary): one fused reduction. Otherwise (spikes scaled by a dropout, say)
    the signs are taken first.
    """
    if x.dtype == torch.bool:
        return x.sum(), None
    if not unit:
        x = torch.sign(x)
    if not x.is_floating_point():
        # integer spikes: integer sums are exact
        return (x.abs().sum(), x.sum()) if ternary else (x.sum(), None)
    n = x.numel()
    if _exact_native(x, n):
        flat = x.reshape(-1)
        if ternary:
            return torch.dot(flat, flat), flat.sum()
        return flat.sum(), None
    acc = torch.float64
    if ternary:
        return x.abs().sum(dtype=acc), x.sum(dtype=acc)
    return x.sum(dtype=acc), None


def value_test(x: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: every value of ``x`` is −1, 0 or +1.

    Exact, element by element: x·(|x| − 1) is zero exactly for x ∈ {−1, 0, +1} (no rounding
    can make it zero otherwise: |x| − 1 is exact near 1 and the product of a nonzero x by a
    nonzero factor of magnitude ≥ 2^−24 does not underflow), and NaN or ±inf make the extrema
    non-zero. Four passes over ``x`` and no sync.
    """
    if x.dtype == torch.bool or x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    d = x.abs()
    d.sub_(1)
    d.mul_(x)
    lo, hi = torch.aminmax(d)
    return (lo == 0) & (hi == 0)


_PROBE = 16  # values read: a real activation has one outside {-1, 0, 1} among the first few
_SPIKE_VALUES = frozenset((-1.0, 0.0, 1.0))


def surely_not_spikes(x: torch.Tensor) -> bool:
    """True when a few leading values of a CPU tensor already prove it is not a spike tensor.

    One value outside {−1, 0, +1} is proof (NaN included: it equals nothing), so the answer is
    exact when True; False means "not decided" (run :func:`value_test`). Reading values is free
    of any stall on the CPU, where tensors are computed synchronously; on an accelerator it would
    stall the stream, so there it is not tried. Real-valued activations are decided from their
    first values, which spares them the four full passes of :func:`value_test`.
    """
    if not x.is_cpu or x.dtype == torch.bool or x.numel() == 0:
        return False
    # the first vector along the last dimension: a view, so a strided input (a convolution's
    # transposed slice) is not copied whole just to read a few values
    probe = x
    while probe.dim() > 1:
        probe = probe[0]
    return not _SPIKE_VALUES.issuperset(probe[:_PROBE].tolist())


def spatial_spike_map(x: torch.Tensor, n_spatial: int, ternary: bool) -> torch.Tensor:
    """Non-zero spikes of ``x`` [..., C, *spatial] counted per spatial position → [*spatial]."""
    dims = tuple(range(x.dim() - n_spatial))
    if x.dtype == torch.bool:
        return x.sum(dim=dims)
    per_position = x.numel() // max(1, math.prod(x.shape[x.dim() - n_spatial :]))
    mag = x.abs() if ternary else x
    if x.is_floating_point() and not _exact_native(x, per_position):
        return mag.sum(dim=dims, dtype=torch.float64)
    return mag.sum(dim=dims)


@functools.lru_cache(maxsize=256)
def _fan_out_1d(
    length_in: int, kernel: int, stride: int, pad_left: int, dilation: int, length_out: int
) -> tuple[int, ...]:
    """How many (output position, kernel tap) pairs read input position i, for each i."""
    counts = [0] * length_in
    for o in range(length_out):
        start = o * stride - pad_left
        for k in range(kernel):
            i = start + k * dilation
            if 0 <= i < length_in:
                counts[i] += 1
    return tuple(counts)


def conv_fan_out_map(
    spatial_in: tuple[int, ...],
    spatial_out: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    pad_left: tuple[int, ...],
    dilation: tuple[int, ...],
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Per input position, the number of output positions × kernel taps that read it [*spatial].

    A spike at that position of one input channel drives that many accumulates in each of the
    ``C_out / groups`` output channels of its group. Separable over the spatial dimensions.
    """
    result: torch.Tensor | None = None
    for d in range(len(spatial_in)):
        c = torch.tensor(
            _fan_out_1d(
                spatial_in[d], kernel[d], stride[d], pad_left[d], dilation[d], spatial_out[d]
            ),
            dtype=dtype,
            device=device,
        )
        result = c if result is None else result.unsqueeze(-1) * c
    assert result is not None
    return result


def pad_spike_map(spike_map: torch.Tensor, padding: list[int], mode: str) -> torch.Tensor:
    """Pad a per-position spike-count map the way a conv with ``padding_mode`` pads its input:
    a reflected, replicated or wrapped spike is read again from the padding."""
    n = spike_map.dim()
    padded = F.pad(spike_map.reshape(1, 1, *spike_map.shape), padding, mode=mode)
    return padded.reshape(padded.shape[-n:])
