r"""State-space mixers as recurrent cells: Mamba-2's selective mixer and a diagonal LTI cell.

**Selective mixer (Mamba-2).** For the input u_t of one token (after the pre-norm):

.. math::
    [z_t, \xi_t, \Delta^{raw}_t] &= W_{in} u_t, \qquad \xi_t = [x_t, B_t, C_t] \text{ after a causal
    depthwise convolution of width } k \text{ and SiLU} \\
    \Delta_t &= \mathrm{softplus}(\Delta^{raw}_t + b_\Delta), \qquad a_t = -\exp(A_{\log})\,\Delta_t
    \quad (\text{one decay per head}) \\
    h_t &= e^{a_t} h_{t-1} + (\Delta_t x_t) \otimes B_t, \qquad y_t = h_t C_t + D\,x_t \\
    o_t &= W_{out}\, \mathrm{RMSNorm}(y_t \odot \mathrm{SiLU}(z_t))

In MAR's spiking form a spike point (``spikemar.models.SpikePoint``) sits before ``W_in`` and
before ``W_out``. ``forward`` runs the chunked scan (:func:`spikemar.ssm.ssd_scan`) over a whole
sequence; ``step`` runs one token with O(1) state (the last k−1 convolution inputs and h), which
is what generation uses. Both compute the same function.

**LTI diagonal cell.** A fixed per-channel decay and no input-dependent parameters:
``h_t = λ ⊙ h_{t−1} + b ⊙ u_t``, ``y_t = c ⊙ h_t + d ⊙ u_t`` with ``λ = exp(−exp(log_rate))``
∈ (0, 1). Each channel is a leaky integrator, the form that maps onto a Loihi neuron's
compartment later.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..counting import record_ops
from ..neurons import cpu_backend
from .scan import check_decay, ssd_scan, ssd_step

__all__ = [
    "LTICell",
    "LTIState",
    "MixerState",
    "SelectiveMixer",
    "fused_norm_ready",
    "norm_then",
    "rms_norm_inference",
]


def rms_norm_inference(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    """``norm(x)`` bit for bit, for float32/float64 inputs, as the four operations that
    ``F.rms_norm`` itself runs on the CPU for them (x·rsqrt(mean(x²) + ε), then the weight): the
    composite entry point costs ~40 µs on a [1, 128] tensor, these ~15 µs. The tests check the
    equality."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _eps(norm, x))
    return y if norm.weight is None else y * norm.weight


def fused_norm_ready(x: torch.Tensor, norm: nn.RMSNorm) -> bool:
    """Whether the C kernel ``cpu_backend.rms_norm_quantize_decode_cpu`` can run ``norm`` on
    ``x``: a float32/float64 CPU tensor normalised over its last dimension, a weight like it."""
    w = norm.weight
    return (
        x.dtype in _FUSED_DTYPES
        and x.device.type == "cpu"
        and x.dim() >= 1
        and norm.normalized_shape == (x.shape[-1],)
        and (w is None or (w.shape == (x.shape[-1],) and w.dtype == x.dtype and w.is_cpu))
        and cpu_backend.usable()
    )


def norm_then(x: torch.Tensor, norm: nn.RMSNorm, point: nn.Module) -> torch.Tensor:
    """``point(norm(x))`` on an inference path (autograd off, no counter, no hooks): a spike
    point with ``_forward_normed`` (MAR's) fuses the two into one C call, the identity of a dense
    model runs the norm alone in C, anything else its ``forward`` after :func:`rms_norm_inference`.
    The C norm equals ``nn.RMSNorm`` to rounding."""
    fused = getattr(point, "_forward_normed", None)
    if fused is not None:
        return fused(x, norm)
    if isinstance(point, nn.Identity):
        if fused_norm_ready(x, norm):
            return cpu_backend.rms_norm_quantize_decode_cpu(x, norm.weight, _eps(norm, x), 0, None)
        return rms_norm_inference(x, norm)
    return point.forward(rms_norm_inference(x, norm))


def _eps(norm: nn.RMSNorm, x: torch.Tensor) -> float:
    return torch.finfo(x.dtype).eps if norm.eps is None else norm.eps


@dataclass
class MixerState:
    """The recurrent state of a :class:`SelectiveMixer`: the last ``d_conv − 1`` convolution
    inputs [batch, channels, d_conv − 1] and the SSM state [batch, heads, head_dim, d_state]."""

    conv: torch.Tensor
    ssm: torch.Tensor


class SelectiveMixer(nn.Module):
    """Mamba-2-style selective SSM mixer ``[batch, L, d_model] → [batch, L, d_model]``.

    ``spike_in`` and ``spike_out`` are the modules applied before the input and output
    projections (MAR's spike points, or ``nn.Identity`` for the dense model).
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        head_dim: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        chunk_size: int | None = None,
        spike_in: nn.Module | None = None,
        spike_out: nn.Module | None = None,
    ) -> None:
        super().__init__()
        d_inner = expand * d_model
        if d_inner % head_dim:
            raise ValueError(f"head_dim: {head_dim} does not divide expand·d_model = {d_inner}")
        self.d_inner, self.d_state, self.head_dim = d_inner, d_state, head_dim
        self.n_heads = d_inner // head_dim
        self.d_conv, self.chunk_size = d_conv, chunk_size
        self.conv_channels = d_inner + 2 * d_state
        self.spike_in = spike_in if spike_in is not None else nn.Identity()
        self.in_proj = nn.Linear(d_model, d_inner + self.conv_channels + self.n_heads, bias=False)
        # causal: the input is padded on the left only (in forward), so the convolution computes
        # exactly L outputs, as step() does, and an energy count of forward and step agrees
        self.conv = nn.Conv1d(
            self.conv_channels, self.conv_channels, d_conv, groups=self.conv_channels
        )
        # Mamba-2's initialisation: Δ spread log-uniformly over [1e-3, 1e-1], A over [1, 16]
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        self.A_log = nn.Parameter(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = nn.RMSNorm(d_inner)
        self.spike_out = spike_out if spike_out is not None else nn.Identity()
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def _split(self, zxbcdt: torch.Tensor):
        return zxbcdt.split([self.d_inner, self.conv_channels, self.n_heads], dim=-1)

    def _scan_inputs(self, xbc: torch.Tensor, dt_raw: torch.Tensor):
        """Post-convolution channels → (x, a, B, C, Δ) in the scan's layout ([..., heads, ...])."""
        x, B, C = xbc.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt_raw + self.dt_bias)
        a = -torch.exp(self.A_log) * dt
        x = x.unflatten(-1, (self.n_heads, self.head_dim))
        return x, a, B.unsqueeze(-2), C.unsqueeze(-2), dt

    def _record_ops(self, tokens: int, conv: bool) -> None:
        """Per token, as the recurrent form computes it: the state update e^a·h + (Δx)⊗B and the
        readout h·C (3·head_dim·d_state MACs per head) and the D skip; SiLU, softplus, exp,
        gating and the norm as element-wise operations. ``conv``: also the depthwise
        convolution, which ``step`` computes by hand (in ``forward`` the counter sees the
        ``Conv1d`` module itself)."""
        per_head = 3 * self.head_dim * self.d_state + self.head_dim
        macs = self.n_heads * per_head + (self.conv_channels * self.d_conv if conv else 0)
        record_ops(
            self,
            kind="ssm",
            macs=tokens * macs,
            elementwise_ops=tokens * (self.conv_channels + 4 * self.d_inner + 3 * self.n_heads),
        )

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = (y + self.D[:, None] * x).flatten(-2)
        return self.out_proj(self.spike_out(self.norm(y * F.silu(z))))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        L = u.shape[1]
        z, xbc, dt_raw = self._split(self.in_proj(self.spike_in(u)))
        xbc = F.silu(self.conv(F.pad(xbc.transpose(1, 2), (self.d_conv - 1, 0))).transpose(1, 2))
        x, a, B, C, dt = self._scan_inputs(xbc, dt_raw)
        y, _ = ssd_scan(x * dt[..., None], a, B, C, chunk_size=self.chunk_size)
        self._record_ops(u.shape[0] * L, conv=False)
        return self._output(y, x, z)

    def init_state(self, batch: int) -> MixerState:
        p = self.in_proj.weight
        return MixerState(
            p.new_zeros(batch, self.conv_channels, self.d_conv - 1),
            p.new_zeros(batch, self.n_heads, self.head_dim, self.d_state),
        )

    def step(self, u_t: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:
        """One token ``u_t`` [batch, d_model] → ``([batch, d_model], new state)``."""
        z, xbc, dt_raw = self._split(self.in_proj(self.spike_in(u_t)))
        window = torch.cat([state.conv, xbc[:, :, None]], dim=-1)  # [batch, channels, d_conv]
        conv_out = (window * self.conv.weight[:, 0]).sum(-1) + self.conv.bias
        x, a, B, C, dt = self._scan_inputs(F.silu(conv_out), dt_raw)
        y, ssm = ssd_step(x * dt[..., None], a, B, C, state.ssm)
        self._record_ops(u_t.shape[0], conv=True)
        return self._output(y, x, z), MixerState(window[..., 1:], ssm)

    def _step_inference(
        self, u_t: torch.Tensor, state: MixerState, norm: nn.RMSNorm | None = None
    ) -> tuple[torch.Tensor, MixerState]:
        """:meth:`step` for generation, without what only training, counting or a direct caller
        needs: for a caller that has made sure that autograd is off, no energy counter is active
        and no module has hooks (``MARLM.step``; submodules are entered through ``forward``).
        Between the projections one C call (``cpu_backend.mixer_step_cpu``) does the
        convolution, the scan step and the gate, and the norm and the spike point after it are
        one more (:func:`norm_then`), equal to :meth:`step` to rounding; where the kernels cannot
        run, the operations of :meth:`step`. ``norm``: ``u_t`` is the layer's input before its
        pre-norm, which runs here fused with the input spike point."""
        u_t = self.spike_in.forward(u_t) if norm is None else norm_then(u_t, norm, self.spike_in)
        zxbcdt = F.linear(u_t, self.in_proj.weight, self.in_proj.bias)
        tensors = self._fused_step_ready(zxbcdt, state)
        if tensors is not None:
            gated, conv, ssm, a, bad = cpu_backend.mixer_step_cpu(zxbcdt, *tensors)
            if bad:  # counted in C; raise as ssd_step does
                check_decay(a, "a_t")
            gated = norm_then(gated, self.norm, self.spike_out)
            out = F.linear(gated, self.out_proj.weight, self.out_proj.bias)
            return out, MixerState(conv, ssm)
        z, xbc, dt_raw = self._split(zxbcdt)
        window = torch.cat([state.conv, xbc[:, :, None]], dim=-1)
        conv_out = (window * self.conv.weight[:, 0]).sum(-1) + self.conv.bias
        x, a, B, C, dt = self._scan_inputs(F.silu(conv_out), dt_raw)
        y, ssm = ssd_step(x * dt[..., None], a, B, C, state.ssm)
        y = (y + self.D[:, None] * x).flatten(-2)
        gated = norm_then(y * F.silu(z), self.norm, self.spike_out)
        out = F.linear(gated, self.out_proj.weight, self.out_proj.bias)
        return out, MixerState(window[..., 1:], ssm)

    def _fused_step_ready(self, zxbcdt: torch.Tensor, state: MixerState) -> tuple | None:
        """The mixer's tensors for the C kernel of :meth:`_step_inference`, or None where it
        cannot run them: it needs CPU tensors of one float32/float64 dtype, a state of this
        mixer's shape, and few enough state values for one thread (generation's batches; larger
        ones take the PyTorch operations). Read through the parameter dicts: this runs per
        token, and ``Module.__getattr__`` costs more than the checks."""
        dtype = zxbcdt.dtype
        if dtype not in _FUSED_DTYPES or not zxbcdt.is_cpu or zxbcdt.dim() != 2:
            return None
        conv, ssm = state.conv, state.ssm
        if not (isinstance(conv, torch.Tensor) and isinstance(ssm, torch.Tensor)):
            return None
        batch, K, H = zxbcdt.shape[0], self.conv_channels, self.n_heads
        if zxbcdt.shape[1] != self.d_inner + K + H or ssm.numel() > _FUSED_MAX_STATE:
            return None
        p, c = self._parameters, self._modules["conv"]._parameters
        # the kernel trusts every shape: a tensor that differs takes the PyTorch operations
        tensors = (conv, ssm, c["weight"], c["bias"], p["dt_bias"], p["A_log"], p["D"])
        shapes = ((batch, K, self.d_conv - 1), (batch, H, self.head_dim, self.d_state),
                  (K, 1, self.d_conv), (K,), (H,), (H,), (H,))  # fmt: skip
        for t, shape in zip(tensors, shapes, strict=True):
            if t is None or t.dtype != dtype or not t.is_cpu or t.shape != shape:
                return None
        return tensors if cpu_backend.usable() else None


_FUSED_DTYPES = (torch.float32, torch.float64)
# the fused mixer step is single-threaded: above this many state values per call (batch ·
# heads · head_dim · d_state) PyTorch's threaded operations take over
_FUSED_MAX_STATE = 1 << 18


@dataclass
class LTIState:
    h: torch.Tensor  # [batch, channels]


class LTICell(nn.Module):
    """Diagonal linear time-invariant SSM over channels ``[batch, L, channels]``."""

    def __init__(self, channels: int, *, min_decay: float = 0.5, max_decay: float = 0.99) -> None:
        super().__init__()
        if not 0 < min_decay <= max_decay < 1:
            raise ValueError(
                f"min_decay, max_decay: expected 0 < min_decay <= max_decay < 1, "
                f"got {min_decay}, {max_decay}"
            )
        decay = torch.empty(channels).uniform_(min_decay, max_decay)
        self.log_rate = nn.Parameter(torch.log(-torch.log(decay)))  # λ = exp(−exp(log_rate))
        self.b = nn.Parameter(torch.ones(channels))
        self.c = nn.Parameter(torch.ones(channels) / math.sqrt(channels))
        self.d = nn.Parameter(torch.zeros(channels))

    @property
    def decay(self) -> torch.Tensor:
        """λ per channel, in (0, 1)."""
        return torch.exp(-torch.exp(self.log_rate))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        batch, L, channels = u.shape
        # each channel is a head of head_dim 1 and state 1, with a constant log decay
        a = (-torch.exp(self.log_rate)).expand(batch, L, channels)
        ones = u.new_ones(batch, L, channels, 1)
        h, _ = ssd_scan((self.b * u)[..., None], a, ones, ones)
        record_ops(self, kind="lti", macs=4 * batch * L * channels)  # b·u, λ·h, c·h, d·u
        return self.c * h[..., 0] + self.d * u

    def init_state(self, batch: int) -> LTIState:
        return LTIState(self.b.new_zeros(batch, self.b.shape[0]))

    def step(self, u_t: torch.Tensor, state: LTIState) -> tuple[torch.Tensor, LTIState]:
        h = self.decay * state.h + self.b * u_t
        record_ops(self, kind="lti", macs=4 * u_t.numel())
        return self.c * h + self.d * u_t, LTIState(h)
