"""RMSNorm for spikemar's models: ``nn.RMSNorm`` (same parameter, same result) that can
normalise groups of channels separately, with a C fast path for inference.

``RMSNorm(width, eps, groups)`` normalises each of ``groups`` equal slices of the last
dimension by its own root mean square (mamba_ssm's gated norm with ``group_size = width /
groups``; one group is ``nn.RMSNorm``), then multiplies by ``weight`` [width]. ``eps`` None is
the input dtype's machine epsilon, as in ``nn.RMSNorm``.

With autograd off, a float32/float64 CPU input of at most ``FAST_MAX_VALUES`` values (a token's
activations in generation) is normalised in one C call (:func:`spikemar.ssm.fast.rms_norm_cpu`),
equal to the PyTorch operations to rounding: the composite ``F.rms_norm`` costs ~40 µs on a
[1, 128] tensor, the call a few. Larger inputs and training take PyTorch's operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._numbers import integer, plain
from . import fast

__all__ = ["FAST_MAX_VALUES", "RMSNorm"]

FAST_MAX_VALUES = 1 << 15  # the C norm is single-threaded


class RMSNorm(nn.RMSNorm):
    def __init__(self, width: int, eps: float | None = None, groups: int = 1) -> None:
        # NumPy's numbers kept as Python's (nn.RMSNorm keeps what it is given)
        super().__init__(plain(width), eps=plain(eps))
        if integer(groups) is None or groups < 1 or width % groups:  # NumPy's ints as Python's
            raise ValueError(f"groups: expected a divisor of width {width}, got {groups!r}")
        self.groups = integer(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            not torch.is_grad_enabled()
            and x.dtype in (torch.float32, torch.float64)
            and x.is_cpu
            and 0 < x.numel() <= FAST_MAX_VALUES
            and x.shape[-1] == self.normalized_shape[0]
            and (w is None or (w.dtype == x.dtype and w.is_cpu))
            and fast.usable()
        ):
            eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
            return fast.rms_norm_cpu(x, w, eps, self.groups)
        if w is not None and w.dtype != x.dtype:  # a float32 stream, 16-bit weight: promoted
            dtype = torch.promote_types(x.dtype, w.dtype)  # (transformers' Mamba2RMSNorm too)
            x, w = x.to(dtype), w.to(dtype)
        if self.groups == 1:
            return F.rms_norm(x, self.normalized_shape, w, self.eps)
        group = self.normalized_shape[0] // self.groups
        y = F.rms_norm(x.unflatten(-1, (self.groups, group)), (group,), None, self.eps)
        return y.flatten(-2) if w is None else y.flatten(-2) * w

    def extra_repr(self) -> str:
        groups = f", groups={self.groups}" if self.groups > 1 else ""
        return super().extra_repr() + groups
