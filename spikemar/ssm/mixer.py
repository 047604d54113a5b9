r"""Token mixers as recurrent cells behind one interface: Mamba-2's selective mixer, Llamba's
discrete Mamba-2 mixer and a diagonal LTI cell (attention, the fourth kind, is in
:mod:`spikemar.models.mixers`).

**The interface.** A :class:`Mixer` maps ``[batch, L, d_model] → [batch, L, d_model]`` with
``forward`` (a whole sequence: the chunked scan, for training), ``init_state(batch, max_len)``
and ``step(u_t, state) → (out_t, state)`` (one token, O(1) state for the SSMs: generation),
``prefill(u, state) → (out, state)`` (a run of tokens continuing a state: a prompt, in one pass
for the SSMs), and names its spike points in ``spike_inputs``: each spike-point attribute and
the projections it feeds. ``spike_points()`` yields them, which is how ``MARLM.spike_points()``,
the energy counter, the chip report and the Lava export find MAR's spike points without knowing
the mixer's kind.
A new kind is one subclass and one registration in :data:`spikemar.models.mixers.MIXERS`::

    @register_mixer("my-kind")
    def _build(config, spikes):  # MARConfig, SpikeConfig | None
        return MyMixer(config.d_model, spike_in=spike_point(config.d_model, spikes))

``step`` chooses its fast path per operation: with autograd off, a selective or discrete
mixer runs the part between its projections in one C call
(:class:`spikemar.ssm.fast.MixerStep`, on torch's threads, in place for a state made with
``init_state(..., in_place=True)``); its submodules (spike points, projections, the norm)
are always entered through ``__call__``, so hooks registered on them fire on either path and no
caller needs to look for hooks.

**Selective mixer (Mamba-2).** For the input u_t of one token (after the pre-norm):

.. math::
    [z_t, \xi_t, \Delta^{raw}_t] &= W_{in} u_t, \qquad \xi_t = [x_t, B_t, C_t] \text{ after a causal
    depthwise convolution of width } k \text{ and SiLU} \\
    \Delta_t &= \mathrm{clamp}(\mathrm{softplus}(\Delta^{raw}_t + b_\Delta), \Delta_{min},
    \Delta_{max}), \qquad a_t = -\exp(A_{\log})\,\Delta_t \quad (\text{one decay per head}) \\
    h_t &= e^{a_t} h_{t-1} + (\Delta_t x_t) \otimes B_t, \qquad y_t = h_t C_t + D\,x_t \\
    o_t &= W_{out}\, \mathrm{RMSNorm}(y_t \odot \mathrm{SiLU}(z_t))

B and C come in ``n_groups`` groups of ``d_state`` (head h reads group h // (heads / groups)),
and the gated RMSNorm normalises each group's slice of the ``expand·d_model`` channels
separately, as mamba_ssm's ``RMSNormGated(group_size=d_inner / n_groups)`` does. (transformers'
``Mamba2ForCausalLM`` torch path normalises over all channels whatever ``n_groups``: the two agree
only for one group; spikemar follows mamba_ssm, the implementation the checkpoints were trained
with.) This is transformers' ``Mamba2Mixer`` with the same parameter names (``in_proj`` split
``[z | xBC | Δ]``, ``conv``, ``dt_bias``, ``A_log``, ``D``, ``norm``, ``out_proj``).

**Discrete Mamba-2 (Llamba).** Cartesia's ``DiscreteMamba2``: ``in_proj`` split
``[x | B | C | z | Δ]``, the convolution over x, B, C with no activation (by default), A = −1 so
the decay is ``exp(−softplus(Δ))``, the state input is x ⊗ B (x is divided by Δ before a scan
that multiplies by Δ), B and C in ``n_qk_heads`` groups, D on x, and the output
``W_out (y ⊙ SiLU(z + z_bias))`` with no norm.

In MAR's spiking form a spike point (``spikemar.models.SpikePoint``) sits before ``W_in`` and
before ``W_out`` of the SSM mixers.

**LTI diagonal cell.** A fixed per-channel decay and no input-dependent parameters:
``h_t = λ ⊙ h_{t−1} + b ⊙ u_t``, ``y_t = c ⊙ h_t + d ⊙ u_t`` with ``λ = exp(−exp(log_rate))``
∈ (0, 1). Each channel is a leaky integrator, the form that maps onto a Loihi neuron's
compartment; :class:`LTIMixer` puts a spike point before it.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..counting import counting_active, record_ops
from . import fast
from .linear import Linear
from .norm import RMSNorm
from .scan import check_decay, ssd_scan, ssd_step

__all__ = [
    "DiscreteMixer",
    "LTICell",
    "LTIMixer",
    "LTIState",
    "Mixer",
    "MixerState",
    "SelectiveMixer",
    "SpikeInputs",
    "SpikePointOwner",
    "SpikePointSite",
    "check_mixer_input",
]


# spike-point attribute → the projection attributes it feeds
SpikeInputs = dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class SpikePointSite:
    """A spike point and the projections it feeds: ``name`` (its path), ``module`` (a
    ``SpikePoint``, or ``nn.Identity`` where the model is dense there) and ``projections``
    (path → module, empty where it feeds no projection, e.g. an LTI cell)."""

    name: str
    module: nn.Module
    projections: dict[str, nn.Module]


class SpikePointOwner:
    """A module with spike points: ``spike_inputs`` maps each spike-point attribute to the
    projection attributes it feeds; :meth:`spike_points` yields them as
    :class:`SpikePointSite`. Mixers and FFNs declare their spike points this way once, and
    everything that needs them (the model's iterator, the chip report, the Lava export, the
    energy counter) reads the declaration."""

    spike_inputs: ClassVar[SpikeInputs] = {}

    def spike_points(self, prefix: str = "") -> Iterator[SpikePointSite]:
        """Each spike point with the projections it feeds, named from ``prefix``."""
        dot = f"{prefix}." if prefix else ""
        for point, projections in self.spike_inputs.items():
            yield SpikePointSite(
                f"{dot}{point}",
                getattr(self, point),
                {f"{dot}{p}": getattr(self, p) for p in projections},
            )


class Mixer(SpikePointOwner, nn.Module):
    """The token mixer of a MAR layer (see the module docstring).

    Subclasses implement ``forward(u [batch, L, d_model])``, ``init_state(batch, max_len)`` and
    ``step(u_t [batch, d_model], state) → (out_t, state)`` (``prefill`` defaults to a loop of
    ``step``; override it where a parallel pass can continue a state), and list their spike
    points in ``spike_inputs`` (attribute → the projection attributes it feeds).
    ``chip_reason``: why the mixer's own arithmetic (what is not a submodule) runs on a
    neuromorphic chip, or None when it stays on the host for ``host_reason``.
    """

    chip_reason: ClassVar[str | None] = None
    host_reason: ClassVar[str] = ""

    def init_state(self, batch: int, max_len: int | None = None, *, in_place: bool = False):
        """The state before the first token of ``batch`` sequences. ``in_place``: ``step`` may
        update this state in place instead of returning a new one (see :class:`MixerState`);
        a mixer whose state is always updated in place, or is too small to matter, ignores
        it."""
        raise NotImplementedError(f"{type(self).__name__} does not define init_state")

    def step(self, u_t: torch.Tensor, state):
        raise NotImplementedError(f"{type(self).__name__} does not define step")

    def prefill(self, u: torch.Tensor, state) -> tuple[torch.Tensor, object]:
        """A run of tokens ``u`` [batch, L, d_model] continuing ``state`` → (outputs [batch, L,
        d_model], the state after the last token): what L calls of ``step`` give. This default
        is those calls; the SSM mixers run their chunked scan instead (one pass over the
        weights for all L tokens)."""
        outs = []
        for t in range(u.shape[1]):
            out, state = self.step(u[:, t], state)
            outs.append(out)
        return torch.stack(outs, dim=1), state

    def check_room(self, state, tokens: int, where: str = "its") -> None:
        """Raise ValueError if ``state`` cannot take ``tokens`` more tokens (``where`` names it
        in the message). A mixer with an O(1) state (this default) always can; attention's KV
        cache holds ``max_len``."""

    @property
    def chip_neurons(self) -> int:
        """Neurons (compartments) of the mixer's own arithmetic where it runs on chip."""
        return 0


@dataclass
class MixerState:
    """The recurrent state of an SSM mixer: the last ``d_conv − 1`` convolution inputs
    [batch, channels, d_conv − 1] and the SSM state [batch, heads, head_dim, d_state].

    ``in_place``: ``step`` may write the next state over these tensors and return this object
    (with autograd off, where the C step runs), instead of new tensors per token. A state
    stepped from is then spent: only a caller that keeps no other use for it asks for this
    (``generate`` does, through ``init_state(..., in_place=True)``); False keeps ``step`` a pure
    function of its inputs."""

    conv: torch.Tensor
    ssm: torch.Tensor
    in_place: bool = False


def check_mixer_input(
    u: object, name: str, dims: int, width: int, width_name: str = "d_model"
) -> None:
    """Raise ValueError naming ``name`` unless ``u`` is a run of tokens [batch, L ≥ 1, width]
    (``dims`` 3: ``forward``, ``prefill``) or one token [batch, width] (``dims`` 2: ``step``):
    the check at every mixer's boundary (``width_name`` names the width in the message)."""
    if (
        isinstance(u, torch.Tensor)
        and u.dim() == dims
        and u.shape[-1] == width
        and (dims == 2 or u.shape[1] > 0)
    ):
        return
    want = f"[batch, L, {width_name}] with L >= 1" if dims == 3 else f"[batch, {width_name}]"
    got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
    raise ValueError(f"{name}: expected {want} ({width_name} = {width}), got {got}")


def _identity(module: nn.Module | None) -> nn.Module:
    return nn.Identity() if module is None else module


def _causal_conv(conv: nn.Conv1d, xbc: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution over tokens [batch, L, channels]: padded on the left only,
    so it computes exactly L outputs, as the step form does."""
    return conv(F.pad(xbc.transpose(1, 2), (conv.kernel_size[0] - 1, 0))).transpose(1, 2)


def _conv_step(conv: nn.Conv1d, window: torch.Tensor) -> torch.Tensor:
    """One token of :func:`_causal_conv` from the window [batch, channels, d_conv]."""
    out = (window * conv.weight[:, 0]).sum(-1)
    return out if conv.bias is None else out + conv.bias


_FAST_DTYPES = (torch.float32, torch.float64)
# each SSM mixer's prepared C step (fast.MixerStep), kept beside the module rather than in it so
# that copying or pickling a module never copies raw pointers
_KERNELS: weakref.WeakKeyDictionary[nn.Module, fast.MixerStep] = weakref.WeakKeyDictionary()


class _StateSpaceMixer(Mixer):
    """What the selective and the discrete mixer share: the order of their operations (input
    projection, causal convolution, scan, output) in ``forward`` and ``step``, a
    :class:`MixerState` of ``conv_channels × (d_conv − 1)`` convolution inputs and
    ``state_heads × head_dim × d_state`` state values per sequence, and the C step between the
    projections. A subclass says what differs: its row layout (``_parts``), the scan's inputs
    (``_scan_inputs``), its output (``_output``, ``out_modules``), its counts
    (``_record_ops``), and its kernel's parameters and switches (``_kernel_params``,
    ``_kernel_options``)."""

    conv_name: ClassVar[str]  # the convolution's attribute (the checkpoints' name)
    conv_channels: int
    d_conv: int
    head_dim: int
    d_state: int
    state_heads: int
    chunk_size: int | None

    def _parts(self, zxbcdt: torch.Tensor):
        """The input projection's output → (z, ξ = xBC before the convolution, Δ_raw)."""
        raise NotImplementedError

    def _scan_inputs(self, xbc: torch.Tensor, dt_raw: torch.Tensor):
        """The convolution's output → (x, the scan's input, a, B, C) in the scan's layout
        ([..., heads, ...], B and C [..., groups, d_state])."""
        raise NotImplementedError

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # the modules that take the gated output [..., d_inner] to [..., d_model] (what follows the
    # C step), in order, by attribute name: read by _project_out and by the fused step
    # (spikemar.models.fused_step), which compiles them
    out_modules: ClassVar[tuple[str, ...]]

    def _project_out(self, gated: torch.Tensor) -> torch.Tensor:
        for name in self.out_modules:
            gated = self._modules[name](gated)
        return gated

    def _record_ops(self, tokens: int, conv: bool) -> None:
        raise NotImplementedError

    def _conv_bias_adds(self, conv: bool) -> int:
        """Per token, the convolution's bias adds where ``step`` computes it by hand (``conv``);
        in ``forward`` the counter's Conv1d rule counts them with the convolution."""
        if not conv or self._modules[self.conv_name].bias is None:
            return 0
        return self.conv_channels

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        self._check_input(u, "u", 3)
        return self._mix(u, None)[0]

    def _check_input(self, u: torch.Tensor, name: str, dims: int) -> None:
        check_mixer_input(u, name, dims, self.in_proj.in_features)

    def _check_state(self, state: MixerState, batch: int) -> None:
        """``state`` is a :class:`MixerState` of this mixer's shapes for ``batch`` sequences."""
        if not isinstance(state, MixerState):
            raise ValueError(f"state: expected the MixerState from init_state(), got "
                             f"{type(state).__name__}")  # fmt: skip
        conv = (batch, self.conv_channels, self.d_conv - 1)
        ssm = (batch, self.state_heads, self.head_dim, self.d_state)
        for name, shape in (("conv", conv), ("ssm", ssm)):
            got = getattr(state, name)
            if not isinstance(got, torch.Tensor) or got.shape != shape:
                have = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise ValueError(f"state.{name}: expected {shape} (this mixer's, batch {batch}), "
                                 f"got {have}")  # fmt: skip

    def _mix(
        self, u: torch.Tensor, state: MixerState | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mixer over ``u`` [batch, L, d_model] from ``state`` (None: zeros) → (output, the
        convolution's inputs [batch, k + L, channels] with the state's k before ``u``'s (None
        without a state), the SSM state after the last token)."""
        z, xbc, dt_raw = self._parts(self.in_proj(self.spike_in(u)))
        conv = self._modules[self.conv_name]
        if state is None:
            seen, h0, conv_out = None, None, _causal_conv(conv, xbc)
        else:  # the inputs the convolution sees: the state's last k, then the new ones
            seen = torch.cat([state.conv.to(xbc.dtype).transpose(1, 2), xbc], dim=1)
            h0, conv_out = state.ssm.to(xbc.dtype), conv(seen.transpose(1, 2)).transpose(1, 2)
        x, x_in, a, B, C = self._scan_inputs(conv_out, dt_raw)
        y, final = ssd_scan(x_in, a, B, C, h0, chunk_size=self.chunk_size)
        self._record_ops(u.shape[0] * u.shape[1], conv=False)
        return self._output(y, x, z), seen, final

    def prefill(self, u: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:
        """``forward`` continuing ``state``: the convolution reads the state's last inputs
        before ``u``'s, the chunked scan starts from its SSM state, and the state after the
        last token comes back (written over ``state``'s tensors where it is ``in_place`` and
        autograd is off, as ``step`` does). Equal to L calls of ``step`` to rounding."""
        if not isinstance(state, MixerState):
            raise ValueError(f"state: expected the MixerState from init_state(), got "
                             f"{type(state).__name__}")  # fmt: skip
        self._check_input(u, "u", 3)
        self._check_state(state, u.shape[0])
        k = self.d_conv - 1
        out, seen, ssm = self._mix(u, state)
        window = seen[:, seen.shape[1] - k :].transpose(1, 2)
        here = (state.in_place and not torch.is_grad_enabled()
                and not (state.conv.requires_grad or state.ssm.requires_grad))  # fmt: skip
        if here:
            state.conv.copy_(window)
            state.ssm.copy_(ssm)
            return out, state
        return out, MixerState(window.contiguous(), ssm, state.in_place)

    def step(self, u_t: torch.Tensor, state: MixerState) -> tuple[torch.Tensor, MixerState]:
        """One token ``u_t`` [batch, d_model] → ``([batch, d_model], new state)``.

        With autograd off, the part between the projections runs in one C call where it can
        (:class:`spikemar.ssm.fast.MixerStep`, equal to the operations below to rounding); the
        spike points, projections and norm run as modules on both paths."""
        self._check_input(u_t, "u_t", 2)
        self._check_state(state, u_t.shape[0])
        zxbcdt = self.in_proj(self.spike_in(u_t))
        if counting_active():  # the arithmetic of the counts costs µs per token otherwise
            self._record_ops(u_t.shape[0], conv=True)
        done = None if torch.is_grad_enabled() else self._fast_step(zxbcdt, state)
        if done is not None:
            return self._project_out(done[0]), done[1]
        z, xbc, dt_raw = self._parts(zxbcdt)
        window = torch.cat([state.conv, xbc[:, :, None]], dim=-1)  # [batch, channels, d_conv]
        conv = self._modules[self.conv_name]
        x, x_in, a, B, C = self._scan_inputs(_conv_step(conv, window), dt_raw)
        y, ssm = ssd_step(x_in, a, B, C, state.ssm)
        return self._output(y, x, z), MixerState(window[..., 1:], ssm, state.in_place)

    def init_state(
        self, batch: int, max_len: int | None = None, *, in_place: bool = False
    ) -> MixerState:
        """Zero state for ``batch`` sequences (``max_len`` is unused: the state is O(1));
        ``in_place``: see :class:`MixerState`."""
        p = self.in_proj.weight
        return MixerState(
            p.new_zeros(batch, self.conv_channels, self.d_conv - 1),
            p.new_zeros(batch, self.state_heads, self.head_dim, self.d_state),
            in_place,
        )

    def _kernel_params(self) -> tuple:
        """The six tensors of :class:`~spikemar.ssm.fast.MixerStep` in its order (conv weight,
        conv bias, Δ bias, A_log, D, z bias; None where the mixer has none), read through the
        parameter dicts: this runs per token, and ``Module.__getattr__`` costs more."""
        raise NotImplementedError

    def _kernel_options(self) -> dict:
        """MixerStep's keyword arguments besides head_dim and d_state."""
        raise NotImplementedError

    def step_kernel(self) -> fast.MixerStep | None:
        """The C step between the projections prepared for the current parameters (once per
        parameter set), or None where it cannot serve them (not float32/float64 CPU tensors, no
        compiler)."""
        params = self._kernel_params()
        kernel = _KERNELS.get(self)
        if kernel is None or not kernel.holds(*params):
            try:
                kernel = _KERNELS[self] = fast.MixerStep(
                    *params, head_dim=self.head_dim, d_state=self.d_state, **self._kernel_options()
                )
            except (ValueError, RuntimeError):  # unfit parameters, or no kernel library
                return None
        return kernel

    def _fast_step(
        self, zxbcdt: torch.Tensor, state: MixerState
    ) -> tuple[torch.Tensor, MixerState] | None:
        """The C step between the projections (autograd off): ``(gated [batch, d_inner], new
        state)``, or None where it cannot run these tensors (not float32/float64 CPU tensors of
        this mixer's shapes, no compiler: the caller runs its PyTorch operations, which raise
        what they raise). The kernel is prepared once per parameter set; an ``in_place`` state
        is written over where its tensors allow it (contiguous, outside any autograd graph)."""
        conv, ssm = state.conv, state.ssm
        if zxbcdt.dtype not in _FAST_DTYPES or not zxbcdt.is_cpu:  # CUDA, half: no C step
            return None
        if not (isinstance(conv, torch.Tensor) and isinstance(ssm, torch.Tensor)):
            return None
        kernel = self.step_kernel()
        if kernel is None:
            return None
        here = (state.in_place and conv.is_contiguous() and ssm.is_contiguous()
                and not (conv.requires_grad or ssm.requires_grad))  # fmt: skip
        try:
            gated, conv, ssm, a, bad = kernel(zxbcdt, conv, ssm, in_place=here)
        except ValueError:  # tensors it does not accept (it checks before it runs)
            return None
        if bad:  # counted in C; raise as ssd_step does
            check_decay(a, "a_t")
        return gated, (state if here else MixerState(conv, ssm, state.in_place))


class SelectiveMixer(_StateSpaceMixer):
    """Mamba-2's selective SSM mixer ``[batch, L, d_model] → [batch, L, d_model]``.

    ``spike_in`` and ``spike_out`` are the modules applied before the input and output
    projections (MAR's spike points, or ``nn.Identity`` for the dense model). ``n_groups``: the
    groups of B and C; ``bias``: biases on the projections; ``conv_bias``: on the convolution;
    ``dt_limit``: Δ is clamped to it (transformers' ``time_step_limit``); ``norm_eps``: the
    gated norm's ε (None: the dtype's machine epsilon, spikemar's original choice).
    """

    spike_inputs: ClassVar[SpikeInputs] = {"spike_in": ("in_proj",), "spike_out": ("out_proj",)}
    host_reason = (
        "the selective scan: its decay exp(-exp(A_log)·Δ_t) and B_t, C_t depend on the input; "
        "a Loihi compartment's decay is fixed"
    )
    conv_name = "conv"
    out_modules = ("norm", "spike_out", "out_proj")  # the gated norm, then as any mixer

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        head_dim: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        chunk_size: int | None = None,
        n_groups: int = 1,
        bias: bool = False,
        conv_bias: bool = True,
        dt_limit: tuple[float, float] = (0.0, math.inf),
        norm_eps: float | None = None,
        spike_in: nn.Module | None = None,
        spike_out: nn.Module | None = None,
    ) -> None:
        super().__init__()
        d_inner = expand * d_model
        if d_inner % head_dim:
            raise ValueError(f"head_dim: {head_dim} does not divide expand·d_model = {d_inner}")
        n_heads = d_inner // head_dim
        if n_groups < 1 or n_heads % n_groups:
            raise ValueError(f"n_groups: expected a divisor of the {n_heads} heads, got {n_groups}")
        lo, hi = dt_limit
        if not 0 <= lo <= hi:
            raise ValueError(f"dt_limit: expected 0 <= min <= max, got {tuple(dt_limit)}")
        self.d_inner, self.d_state, self.head_dim = d_inner, d_state, head_dim
        self.n_heads, self.n_groups = n_heads, n_groups
        self.state_heads = n_heads
        self.d_conv, self.chunk_size = d_conv, chunk_size
        self.dt_limit = (float(lo), float(hi))
        self.conv_channels = d_inner + 2 * n_groups * d_state
        self.spike_in = _identity(spike_in)
        self.in_proj = Linear(d_model, d_inner + self.conv_channels + n_heads, bias=bias)
        self.conv = nn.Conv1d(
            self.conv_channels, self.conv_channels, d_conv, groups=self.conv_channels,
            bias=conv_bias,
        )  # fmt: skip
        # Mamba-2's initialisation: Δ spread log-uniformly over [1e-3, 1e-1], A over [1, 16]
        dt = torch.exp(torch.rand(n_heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        self.A_log = nn.Parameter(torch.log(torch.empty(n_heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(n_heads))
        self.norm = RMSNorm(d_inner, eps=norm_eps, groups=n_groups)
        self.spike_out = _identity(spike_out)
        self.out_proj = Linear(d_inner, d_model, bias=bias)

    def _parts(self, zxbcdt: torch.Tensor):
        return zxbcdt.split([self.d_inner, self.conv_channels, self.n_heads], dim=-1)

    def _scan_inputs(self, xbc: torch.Tensor, dt_raw: torch.Tensor):
        """SiLU after the convolution; the scan's input is Δ·x."""
        gn = self.n_groups * self.d_state
        x, B, C = F.silu(xbc).split([self.d_inner, gn, gn], dim=-1)
        dt = F.softplus(dt_raw + self.dt_bias)
        if self.dt_limit != (0.0, math.inf):
            dt = dt.clamp(*self.dt_limit)
        a = -torch.exp(self.A_log) * dt
        x = x.unflatten(-1, (self.n_heads, self.head_dim))
        groups = (self.n_groups, self.d_state)
        return x, x * dt[..., None], a, B.unflatten(-1, groups), C.unflatten(-1, groups)

    def _record_ops(self, tokens: int, conv: bool) -> None:
        """Per token, as the recurrent form computes it: the state update e^a·h + (Δx)⊗B and the
        readout h·C (3·head_dim·d_state MACs per head) and the D skip; SiLU, softplus, exp,
        gating and the norm as element-wise operations. ``conv``: also the depthwise
        convolution, which ``step`` computes by hand (in ``forward`` the counter sees the
        ``Conv1d`` module itself)."""
        per_head = 3 * self.head_dim * self.d_state + self.head_dim
        macs = self.n_heads * per_head + (self.conv_channels * self.d_conv if conv else 0)
        # memory per token: h read and written (and the convolution's window in step), dt_bias,
        # A_log, D (and the conv's taps in step) read, x·B·C, z, Δ read, the gated y written
        state = self.n_heads * self.head_dim * self.d_state
        window = self.conv_channels * (self.d_conv - 1) if conv else 0
        taps = self.conv_channels * (self.d_conv + 1) if conv else 0
        elementwise = self.conv_channels + 4 * self.d_inner + 3 * self.n_heads
        elementwise += self._conv_bias_adds(conv)
        record_ops(
            self,
            kind="ssm",
            macs=tokens * macs,
            elementwise_ops=tokens * elementwise,
            state_reads=tokens * (state + window),
            state_writes=tokens * (state + window),
            weight_reads=tokens * (3 * self.n_heads + taps),
            activation_reads=tokens * (self.conv_channels + self.d_inner + self.n_heads),
            activation_writes=tokens * self.d_inner,
        )

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = (y + self.D[:, None] * x).flatten(-2)
        return self._project_out(y * F.silu(z))

    def _kernel_params(self) -> tuple:
        p, c = self._parameters, self._modules[self.conv_name]._parameters
        return c["weight"], c["bias"], p["dt_bias"], p["A_log"], p["D"], None

    def _kernel_options(self) -> dict:
        return {"n_groups": self.n_groups, "dt_limit": self.dt_limit}


class DiscreteMixer(_StateSpaceMixer):
    """Llamba's discrete Mamba-2 mixer (Cartesia's ``DiscreteMamba2``, from goombalab/phi-mamba)
    ``[batch, L, d_model] → [batch, L, d_model]``, in the notation of the module docstring.

    Parameter names follow Cartesia's (``in_proj``, ``z_bias``, ``conv1d``, ``D``,
    ``out_proj``); ``n_v_heads`` heads of x (head_dim = expand·d_model / n_v_heads),
    ``n_qk_heads`` groups of B and C. ``activation``: 'identity' (Llamba's) or 'silu' after the
    convolution. ``z_bias`` exists only when ``bias`` is False, as in the original.
    """

    spike_inputs: ClassVar[SpikeInputs] = {"spike_in": ("in_proj",), "spike_out": ("out_proj",)}
    host_reason = (
        "the selective scan: its decay exp(-softplus(Δ_t)) and B_t, C_t depend on the input; "
        "a Loihi compartment's decay is fixed"
    )
    conv_name = "conv1d"
    out_modules = ("spike_out", "out_proj")  # no gated norm

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 64,
        n_qk_heads: int = 32,
        n_v_heads: int = 32,
        expand: int = 1,
        d_conv: int = 4,
        activation: str = "identity",
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int | None = None,
        spike_in: nn.Module | None = None,
        spike_out: nn.Module | None = None,
    ) -> None:
        super().__init__()
        d_inner = expand * d_model
        if n_v_heads < 1 or d_inner % n_v_heads:
            raise ValueError(f"n_v_heads: expected a divisor of {d_inner}, got {n_v_heads}")
        if n_qk_heads < 1 or n_v_heads % n_qk_heads:
            raise ValueError(
                f"n_qk_heads: expected a divisor of n_v_heads = {n_v_heads}, got {n_qk_heads}"
            )
        if activation not in ("identity", "silu"):
            raise ValueError(f"activation: expected 'identity' or 'silu', got {activation!r}")
        self.d_inner, self.d_state, self.d_conv = d_inner, d_state, d_conv
        self.n_v_heads, self.n_qk_heads = n_v_heads, n_qk_heads
        self.state_heads = n_v_heads
        self.head_dim = d_inner // n_v_heads
        self.activation, self.chunk_size = activation, chunk_size
        self.conv_channels = d_inner + 2 * n_qk_heads * d_state
        self.spike_in = _identity(spike_in)
        self.in_proj = Linear(d_model, self.conv_channels + d_inner + n_v_heads, bias=bias)
        self.z_bias = None if bias else nn.Parameter(torch.zeros(d_inner))
        self.conv1d = nn.Conv1d(
            self.conv_channels, self.conv_channels, d_conv, groups=self.conv_channels,
            bias=conv_bias,
        )  # fmt: skip
        self.D = nn.Parameter(torch.ones(n_v_heads))
        self.spike_out = _identity(spike_out)
        self.out_proj = Linear(d_inner, d_model, bias=bias)

    def _parts(self, proj: torch.Tensor):
        xbc, z, dt_raw = proj.split([self.conv_channels, self.d_inner, self.n_v_heads], dim=-1)
        return z, xbc, dt_raw

    def _scan_inputs(self, xbc: torch.Tensor, dt_raw: torch.Tensor):
        """a = −Δ (A = −1); the original divides x by Δ and scans Δ·(x/Δ): the scan's input is
        x itself."""
        if self.activation == "silu":
            xbc = F.silu(xbc)
        gn = self.n_qk_heads * self.d_state
        x, B, C = xbc.split([self.d_inner, gn, gn], dim=-1)
        dt = F.softplus(dt_raw)
        groups = (self.n_qk_heads, self.d_state)
        x = x.unflatten(-1, (self.n_v_heads, self.head_dim))
        return x, x, -dt, B.unflatten(-1, groups), C.unflatten(-1, groups)

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = (y + self.D[:, None] * x).flatten(-2)
        gate = z if self.z_bias is None else z + self.z_bias
        return self._project_out(y * F.silu(gate))

    def _record_ops(self, tokens: int, conv: bool) -> None:
        per_head = 3 * self.head_dim * self.d_state + self.head_dim
        macs = self.n_v_heads * per_head + (self.conv_channels * self.d_conv if conv else 0)
        # memory per token, as the selective mixer's: state (+ window), D (+ z_bias, taps)
        state = self.n_v_heads * self.head_dim * self.d_state
        window = self.conv_channels * (self.d_conv - 1) if conv else 0
        taps = self.conv_channels * (self.d_conv + 1) if conv else 0
        own = self.n_v_heads + (self.d_inner if self.z_bias is not None else 0)
        elementwise = 3 * self.d_inner + 3 * self.n_v_heads + self._conv_bias_adds(conv)
        record_ops(
            self,
            kind="ssm",
            macs=tokens * macs,
            elementwise_ops=tokens * elementwise,
            state_reads=tokens * (state + window),
            state_writes=tokens * (state + window),
            weight_reads=tokens * (own + taps),
            activation_reads=tokens * (self.conv_channels + self.d_inner + self.n_v_heads),
            activation_writes=tokens * self.d_inner,
        )

    def _kernel_params(self) -> tuple:
        p, c = self._parameters, self._modules[self.conv_name]._parameters
        return c["weight"], c["bias"], None, None, p["D"], p.get("z_bias")

    def _kernel_options(self) -> dict:
        return {"n_groups": self.n_qk_heads, "discrete": True,
                "conv_silu": self.activation == "silu"}  # fmt: skip


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
        self._check_input(u, "u", 3)
        return self._scan(u, None)[0]

    def _check_input(self, u: torch.Tensor, name: str, dims: int) -> None:
        check_mixer_input(u, name, dims, self.b.shape[0], "channels")

    def _check_state(self, state: LTIState, batch: int) -> None:
        channels = self.b.shape[0]
        if not isinstance(state, LTIState) or tuple(state.h.shape) != (batch, channels):
            raise ValueError(f"state: expected the LTIState from init_state({batch}) "
                             f"([{batch}, {channels}])")  # fmt: skip

    def _scan(self, u: torch.Tensor, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(outputs, the state after the last token) over ``u`` [batch, L, channels] from
        ``h0`` [batch, channels] (None: zeros)."""
        batch, L, channels = u.shape
        # each channel is a head of head_dim 1 and state 1, with a constant log decay
        a = (-torch.exp(self.log_rate)).expand(batch, L, channels)
        ones = u.new_ones(batch, L, channels, 1)
        h0 = None if h0 is None else h0.to(u.dtype)[..., None, None]
        h, last = ssd_scan((self.b * u)[..., None], a, ones, ones, h0)
        n = batch * L * channels  # b·u, λ·h, c·h, d·u; h read and written; λ, b, c, d read
        record_ops(self, kind="lti", macs=4 * n, state_reads=n, state_writes=n,
                   weight_reads=4 * n, activation_reads=n, activation_writes=n)  # fmt: skip
        return self.c * h[..., 0] + self.d * u, last[..., 0, 0]

    def init_state(self, batch: int) -> LTIState:
        return LTIState(self.b.new_zeros(batch, self.b.shape[0]))

    def prefill(self, u: torch.Tensor, state: LTIState) -> tuple[torch.Tensor, LTIState]:
        """``forward`` continuing ``state``: L tokens in one scan from ``state.h``, and the
        state after the last."""
        self._check_input(u, "u", 3)
        self._check_state(state, u.shape[0])
        out, last = self._scan(u, state.h)
        return out, LTIState(last)

    def step(self, u_t: torch.Tensor, state: LTIState) -> tuple[torch.Tensor, LTIState]:
        self._check_input(u_t, "u_t", 2)
        self._check_state(state, u_t.shape[0])
        h = self.decay * state.h + self.b * u_t
        n = u_t.numel()
        record_ops(self, kind="lti", macs=4 * n, state_reads=n, state_writes=n,
                   weight_reads=4 * n, activation_reads=n, activation_writes=n)  # fmt: skip
        return self.c * h + self.d * u_t, LTIState(h)


class LTIMixer(LTICell, Mixer):
    """The LTI cell as a layer's mixer, with the spike point before it (``spike_in``: MAR's
    spiking input, or ``nn.Identity``). The cell itself maps onto Loihi compartments."""

    spike_inputs: ClassVar[SpikeInputs] = {"spike_in": ()}
    chip_reason = "a fixed per-channel decay: one compartment per channel"

    def __init__(self, channels: int, *, spike_in: nn.Module | None = None, **kwargs) -> None:
        super().__init__(channels, **kwargs)
        self.spike_in = _identity(spike_in)

    @property
    def chip_neurons(self) -> int:
        return self.b.numel()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return LTICell.forward(self, self.spike_in(u))

    def init_state(
        self, batch: int, max_len: int | None = None, *, in_place: bool = False
    ) -> LTIState:
        return LTICell.init_state(self, batch)  # one value per channel: in_place saves nothing

    def step(self, u_t: torch.Tensor, state: LTIState) -> tuple[torch.Tensor, LTIState]:
        return LTICell.step(self, self.spike_in(u_t), state)

    def prefill(self, u: torch.Tensor, state: LTIState) -> tuple[torch.Tensor, LTIState]:
        return LTICell.prefill(self, self.spike_in(u), state)
