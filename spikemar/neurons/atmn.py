r"""Stateful ATMN modules that speak SpikingJelly's protocol.

:class:`ATMN` subclasses SpikingJelly 2.0's ``MemoryModule``: its membrane ``v`` is registered
with ``register_memory``, ``reset()`` restores it, and ``step_mode`` selects single-step ('s':
``x`` [N, …] → spikes [N, …], membrane kept until ``reset()``) or multi-step ('m': ``x_seq``
[T, N, …] → spikes [T, N, …]). So ``spikingjelly.activation_based.functional.reset_net``,
``set_step_mode``, the monitors and ``base.to_functional_forward`` work on networks that contain
it. The dynamics live in :mod:`spikemar.neurons.functional`; this module owns the threshold
parameter ``a`` (V = exp(a)) and the membrane, and calls the functions.

Baselines for the ablations run the same code: :class:`BinaryMultiStep` (spikes in {0, 1}, same
soft reset) and :class:`TernarySingleStep` (no membrane carried between micro-steps; with
δ-injection it is ATMN at T = 1).
"""

from __future__ import annotations

import math

import torch
from spikingjelly.activation_based import base
from torch import nn

from .._numbers import integer, real
from . import functional as F
from .backends import check_backend_name
from .surrogate import Surrogate, get_surrogate

__all__ = ["ATMN", "BinaryMultiStep", "MemoryModule", "TernarySingleStep"]


class MemoryModule(base.MemoryModule):
    """SpikingJelly 2.0's ``MemoryModule`` that torch's ``to_empty()`` can materialise: it
    passes ``recurse``, which SpikingJelly's ``_apply`` does not take, so a neuron built on the
    meta device could not be (spikemar's neurons hold no submodules: nothing to recurse into
    either way)."""

    def _apply(self, fn, recurse: bool = True):
        return super()._apply(fn)


class ATMN(MemoryModule):
    """Adaptive Ternary Multi-step Neuron (MAR): spikes in {−1, 0, +1}, signed soft reset,
    membrane divided by τ each micro-step, learnable threshold V = exp(a).

    Args:
        tau: τ > 0 (``math.inf``: no carry-over of the membrane). Numbers here may be NumPy
            scalars too (a sweep's ``np.linspace``); they are kept as Python floats and ints.
        v_threshold: initial V > 0, a float or a 1-d tensor of per-channel values.
        num_channels: with a float ``v_threshold``, make V per channel over the last input
            dimension, of this size (``None``: one V shared by all neurons).
        learnable_threshold: ``a`` is an ``nn.Parameter`` (True) or a buffer (False).
        surrogate: 'rectangle' (default: straight-through in a window around ±V), 'triangle',
            'sigmoid', 'atan', or a :class:`~spikemar.neurons.surrogate.Surrogate`.
        detach_reset: no gradient through the reset term.
        step_mode: 's' or 'm' (SpikingJelly semantics).
        backend: 'auto' (default: the fastest backend that can run the input, see
            :func:`spikemar.neurons.backends.resolve_backend`), 'torch' (the reference), or
            another name from :func:`spikemar.neurons.available_backends`.
        store_v_seq: keep the membrane after every micro-step in ``v_seq`` [T, N, …]: in 'm'
            mode the steps of the last call, in 's' mode every step since ``reset()`` (as
            SpikingJelly 2.0's neurons; the record restarts when the input's shape, dtype or
            device changes). ``reset()`` clears it and ``detach()`` detaches it.

    Attributes:
        v_threshold: the current V (a tensor, differentiable with respect to ``a``).
        log_threshold: ``a`` itself (read-only property): an ``nn.Parameter``, or a buffer when
            the threshold is fixed.
        ternary: whether spikes are ternary {−1, 0, +1} (read-only; False for the binary
            baseline).
        tau: τ.
        v: the membrane (a registered SpikingJelly memory; 0. until the first step).
    """

    _ternary = True

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float | torch.Tensor = 1.0,
        *,
        num_channels: int | None = None,
        learnable_threshold: bool = True,
        surrogate: str | Surrogate = "rectangle",
        detach_reset: bool = False,
        step_mode: str = "s",
        backend: str = "auto",
        store_v_seq: bool = False,
    ) -> None:
        super().__init__()
        self.tau = F.check_tau(tau)
        a = torch.log(_threshold_tensor(v_threshold, num_channels))
        if learnable_threshold:
            self.a = nn.Parameter(a)
        else:
            self.register_buffer("a", a)
        self.surrogate = surrogate  # checked by the setter
        self.detach_reset = bool(detach_reset)
        check_backend_name(backend)
        self.backend = backend
        self.store_v_seq = bool(store_v_seq)
        self.step_mode = step_mode
        self.register_memory("v", 0.0)
        self.v_seq: torch.Tensor | None = None

    @property
    def surrogate(self) -> Surrogate:
        """The surrogate gradient; set it to an instance or a name, as the constructor takes it."""
        return self._surrogate

    @surrogate.setter
    def surrogate(self, surrogate: str | Surrogate) -> None:
        # checked when set: a bad one would otherwise surface in a later backward pass
        self._surrogate = get_surrogate(surrogate)

    @property
    def v_threshold(self) -> torch.Tensor:
        """V = exp(a): 0-d when shared, [C] when per channel."""
        return self.a.exp()

    @property
    def log_threshold(self) -> torch.Tensor:
        """``a`` (V = exp(a)): the ``nn.Parameter``, or the buffer of a fixed threshold. Read
        straight from the module's dictionaries: spike points ask for it on every call, and
        ``nn.Module.__getattr__`` costs more than the small kernels they run."""
        a = self._parameters.get("a")
        return self._buffers["a"] if a is None else a

    @property
    def ternary(self) -> bool:
        """Whether spikes are ternary {−1, 0, +1} (False: the binary {0, 1} baseline)."""
        return self._ternary

    @property
    def num_channels(self) -> int | None:
        """C for a per-channel threshold [C], None for one shared V."""
        a = self.log_threshold
        return None if a.dim() == 0 else a.shape[0]

    def parameters_tuple(self, *, smooth: bool = False) -> F.ATMNParameters:
        """The functional parameters of this neuron (for :mod:`spikemar.neurons.functional`).
        Built without ``ATMNParameters``' checks: the fields were checked when the module was,
        and ``atmn_multi_step`` checks types and τ again (this runs on every call)."""
        fields = (self.v_threshold, self.tau, self._ternary, self.surrogate, self.detach_reset)
        return F.ATMNParameters._make((*fields, bool(smooth)))

    def extra_repr(self) -> str:
        v = self.v_threshold.detach()
        if v.dim() == 1:
            vs = f"per-channel[{v.shape[0]}]"
        else:  # a model built on the meta device has no value to print
            vs = "meta" if v.is_meta else f"{v.item():.4g}"
        return (
            f"tau={self.tau}, v_threshold={vs}, surrogate={self.surrogate}, "
            f"backend={self.backend!r}, {super().extra_repr()}"
        )

    # -- SpikingJelly's functional protocol: explicit state in, state out, no mutation --------

    def materialize_states(self, inputs, states, step_mode):
        v = states[0]
        if isinstance(v, torch.Tensor):
            return states
        if v == 0.0:  # a fresh membrane: the functions take None and skip reading zeros
            return (None, *states[1:])
        x = inputs[0]
        shape = x.shape if step_mode == "s" else x.shape[1:]
        dtype = F.compute_dtype(x.dtype) if x.is_floating_point() else torch.float32
        return (torch.full(shape, float(v), dtype=dtype, device=x.device), *states[1:])

    def _run(
        self,
        x_seq: torch.Tensor,
        v: torch.Tensor,
        return_v_seq: bool,
        p: F.ATMNParameters | None = None,
        name: str = "x_seq",
    ):
        p = self.parameters_tuple() if p is None else p
        try:
            return F.atmn_multi_step(x_seq, v, p, backend=self.backend, return_v_seq=return_v_seq)
        except F.ThresholdError as err:
            raise self.diverged_threshold_error() from err
        except ValueError as err:  # about x_seq, which one step built from its x
            raise F.for_argument(err, name) from None

    def diverged_threshold_error(self) -> ValueError:
        """The error for this neuron's V found not finite and positive (a ``ThresholdError``
        from a function it called): V was checked when the module was built, so an update (or a
        loaded state) made it so, not an argument. For callers of the fused kernels too."""
        v = self.v_threshold.detach().flatten()
        bad = v[~torch.isfinite(v) | (v <= 0)][:4].tolist()
        return ValueError(F.diverged_threshold_message(bad))

    def reset(self) -> None:
        """Restore the membrane to 0 and forget the recorded ``v_seq`` (SpikingJelly's reset)."""
        super().reset()
        self.v_seq = None

    def detach(self) -> None:
        """Detach the membrane and the recorded ``v_seq`` from the graph (TBPTT with
        ``functional.detach_net``)."""
        super().detach()
        if self.v_seq is not None:
            self.v_seq = self.v_seq.detach()

    def single_step_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        spikes = super().single_step_forward(x, *args, **kwargs)
        if self.store_v_seq:
            seq, v = self.v_seq, self.v
            same = seq is not None and (seq.shape[1:], seq.dtype, seq.device) == (
                v.shape, v.dtype, v.device
            )  # fmt: skip
            self.v_seq = torch.cat((seq, v[None])) if same else v[None].clone()
        return spikes

    def single_step_functional_forward(self, inputs, states, **kwargs):
        x = inputs[0]
        # the per-channel V is checked against x here, so that a mismatch names the argument
        # and the shape the caller gave, not the one-step sequence [1, N, …] built from it
        p = self.parameters_tuple()
        F.check_input(x, "x", 1, p, context="in step_mode='s' ")
        spikes, v = self._run(x.unsqueeze(0), states[0], False, p, "x")
        return (spikes[0],), (v,)

    def multi_step_functional_forward(self, inputs, states, **kwargs):
        F.check_input(inputs[0], "x_seq", 2, context="in step_mode='m' ")
        spikes, v = self._run(inputs[0], states[0], False)
        return (spikes,), (v,)

    def multi_step_forward(self, x_seq: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        F.check_input(x_seq, "x_seq", 2, context="in step_mode='m' ")
        (v,) = self.materialize_states((x_seq,), (self.v,), "m")
        spikes, v, v_seq = (
            self._run(x_seq, v, True)
            if self.store_v_seq
            else (
                *self._run(x_seq, v, False),
                None,
            )
        )
        self.v = v
        self.v_seq = v_seq
        return spikes

    # -- δ-injection (MAR's spike points) ------------------------------------------------------

    def decode(self, spikes: torch.Tensor) -> torch.Tensor:
        """``V · Σ_t τ^t s_t`` of a spike train [T, N, …] → [N, …]."""
        return F.atmn_decode(spikes, self.v_threshold, self.tau)

    def quantize(self, activation: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """δ-inject a static activation [N, …] over T micro-steps from a zero membrane and decode.

        Returns ``(decoded, spikes)``. Each activation is encoded on its own, so this neither reads
        nor changes the module's membrane ``v`` and does not depend on ``step_mode``.
        """
        F.check_input(activation, "activation", 1)
        try:
            return F.atmn_quantize(activation, T, self.parameters_tuple(), backend=self.backend)
        except F.ThresholdError as err:
            raise self.diverged_threshold_error() from err


class BinaryMultiStep(ATMN):
    """Ablation baseline: spikes in {0, 1} with ATMN's multi-step soft reset and learnable V.

    ``s_t = 1 if h_t ≥ V else 0``; negative activations never fire, which is the information
    that ternary spikes recover.
    """

    _ternary = False


class TernarySingleStep(ATMN):
    """Ablation baseline: a ternary threshold with no multi-step dynamics.

    No membrane is carried between steps (τ = ∞), so each step fires on its own input; under
    δ-injection only micro-step 0 can fire, which is ATMN at T = 1 (Ternary Spike's setting).
    """

    def __init__(self, v_threshold: float | torch.Tensor = 1.0, **kwargs) -> None:
        if "tau" in kwargs:
            raise TypeError("TernarySingleStep has no tau: it carries no membrane (τ = ∞)")
        super().__init__(math.inf, v_threshold, **kwargs)


def _threshold_tensor(v_threshold: float | torch.Tensor, num_channels: int | None) -> torch.Tensor:
    if isinstance(v_threshold, torch.Tensor):
        if num_channels is not None:
            raise ValueError("num_channels: give it only with a float v_threshold")
        v = v_threshold.detach().to(torch.float32).clone()
        if v.dim() > 1:
            raise ValueError(
                "v_threshold: expected a float or a 1-d per-channel tensor, "
                f"got shape {tuple(v.shape)}"
            )
        F.check_channels(v)
    elif (value := real(v_threshold)) is not None:
        channels = None if num_channels is None else integer(num_channels)
        if num_channels is not None and (channels is None or channels < 1):
            raise ValueError(f"num_channels: expected an int >= 1 or None, got {num_channels!r}")
        # checked on the number: a model built on the meta device still refuses it
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"v_threshold: expected finite values > 0, got [{value}]")
        v = torch.tensor(value)
        if channels is not None:
            v = v.expand(channels).clone()
    else:
        raise TypeError(
            f"v_threshold: expected a float or a tensor, got {type(v_threshold).__name__}"
        )
    if v.is_meta:
        # shapes only (a model built under torch.device('meta') to read its names and shapes):
        # no values to check; real ones arrive through load_state_dict or to_empty
        return v
    bad = ~torch.isfinite(v) | (v <= 0)
    if bool(bad.any()):
        raise ValueError(f"v_threshold: expected finite values > 0, got {v[bad][:4].tolist()}")
    return v
