"""Parts the language models share: MAR's spike point, the SwiGLU FFN, input checks.

A **spike point** is where MAR turns an activation into ternary spikes: the activation I of each
channel is δ-injected into an ATMN neuron for T micro-steps from a fresh membrane, and the next
projection receives the decode ``V·Σ_t τ^t s_t``. By linearity ``W·decode = Σ_t τ^t V·(W s_t)``,
so computing ``W·decode`` is exactly what accumulating the spikes would give, at 1/T of the
training cost; :func:`spikemar.energy.declare_spikes` tells an energy counter that the next
layer's input is a spike train (ACs, not MACs). MAR places four per layer: before the mixer's
input and output projections and before the FFN's up and down projections.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .._numbers import integer, plain, real
from ..counting import (
    counting_active,
    declare_spike_counts,
    declare_spikes,
    record_ops,
    spike_train_needed,
)
from ..neurons import (
    ATMN,
    ATMNParameters,
    BinaryMultiStep,
    TernarySingleStep,
    ThresholdError,
    checks,
    cpu_backend,
    cupy_backend,
    fused,
)
from ..ssm.linear import Linear
from ..ssm.mixer import SpikeInputs, SpikePointOwner

__all__ = [
    "FFNS",
    "NEURONS",
    "FeedForward",
    "GradientCheckpointing",
    "LlamaMLP",
    "SpikeConfig",
    "SpikePoint",
    "check_tokens",
    "head_logits",
    "run_blocks",
]

# the neuron kinds of a spike point, by name (the CLI's --neuron choices read this table)
NEURONS = {"atmn": ATMN, "binary": BinaryMultiStep, "ternary-single": TernarySingleStep}


class SpikeConfig:
    """How a model spikes: micro-steps ``T``, ``tau``, initial threshold, threshold sharing
    ('channel' or 'layer'), the neuron kind ('atmn', 'binary', 'ternary-single') and backend.

    τ defaults to 1: under δ-injection that is a count code whose resolution is V and range T·V,
    so more micro-steps and a smaller threshold bring the student closer to the dense model.
    """

    def __init__(
        self,
        T: int = 4,
        tau: float = 1.0,
        v_threshold: float = 0.5,
        threshold: str = "channel",
        neuron: str = "atmn",
        backend: str = "auto",
    ) -> None:
        steps = integer(T)
        if steps is None or steps < 1:
            raise ValueError(f"T: expected an int >= 1 (micro-steps), got {T!r}")
        if threshold not in ("channel", "layer"):
            raise ValueError(f"threshold: expected 'channel' or 'layer', got {threshold!r}")
        if neuron not in NEURONS:
            raise ValueError(f"neuron: expected one of {sorted(NEURONS)}, got {neuron!r}")
        # tau only where the neuron has one: 'ternary-single' carries no membrane and ignores
        # it (a config, or an old checkpoint's, may hold any value there, as it always could)
        rate = real(tau)
        if neuron != "ternary-single" and (rate is None or math.isnan(rate) or rate <= 0):
            raise ValueError(f"tau: expected a float > 0 (math.inf for no carry-over), got {tau!r}")
        # a tensor threshold (a shared one for threshold='layer') is the neuron's to check when
        # the model is built, as it was before numbers were checked here
        v = real(v_threshold)
        if not isinstance(v_threshold, torch.Tensor) and not (
            v is not None and math.isfinite(v) and v > 0
        ):
            raise ValueError(f"v_threshold: expected a finite number > 0, got {v_threshold!r}")
        # NumPy scalars stored as Python numbers (an int stays an int), anything else as given:
        # a saved config is JSON and loads with torch.load(weights_only=True)
        self.T, self.tau, self.v_threshold = steps, plain(tau), plain(v_threshold)
        self.threshold, self.neuron, self.backend = threshold, neuron, backend

    def as_dict(self) -> dict:
        return dict(vars(self))

    def __repr__(self) -> str:
        return f"SpikeConfig({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class SpikePoint(nn.Module):
    """δ-inject, spike over T micro-steps, decode: ``[..., channels] → [..., channels]``.

    ``record = True`` keeps the last spike train in ``spikes`` [T, ..., channels] for rasters
    (``spikingjelly.activation_based.monitor.AttributeMonitor('spikes', False, net, SpikePoint)``
    collects it across a network).
    """

    def __init__(self, channels: int, config: SpikeConfig) -> None:
        super().__init__()
        self.T = config.T
        kind = NEURONS[config.neuron]
        per_channel = {"num_channels": channels} if config.threshold == "channel" else {}
        kwargs = {"backend": config.backend, **per_channel}
        if kind is TernarySingleStep:
            self.neuron = kind(config.v_threshold, **kwargs)
        else:
            self.neuron = kind(config.tau, config.v_threshold, **kwargs)
        self.ternary = kind is not BinaryMultiStep
        self.record = False
        self.spikes: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        neuron = self._modules["neuron"]
        # the fused paths stand in for neuron.quantize when nothing needs the spikes: the
        # inference kernel when autograd needs no graph, else the training kernel when the
        # neuron's surrogate is one the kernels implement (tests compare both with the reference)
        try:  # a threshold made non-finite by an update is reported as such (issue 14)
            if self._fused_ready(x, neuron):
                if not self._needs_graph(x, neuron):
                    p = self._inference_parameters(neuron)
                    return self._fused(cpu_backend.atmn_quantize_decode_cpu, x, p)
                p = neuron.parameters_tuple()
                if fused.unsupported_parameters(p) is None:
                    return self._fused(cpu_backend.atmn_quantize_train_cpu, x, p)
            if x.is_cuda and not (self.record or spike_train_needed(self)):
                # CUDA: δ-inject → ATMN → decode in one kernel each way (no [T, N] spike train)
                p = neuron.parameters_tuple()
                if cupy_backend.quantize_unusable_reason(x, self.T, p, neuron.backend) is None:
                    return self._fused(cupy_backend.atmn_quantize_cupy, x, p)
        except ThresholdError as err:
            raise neuron.diverged_threshold_error() from err
        decoded, spikes = neuron.quantize(x, self.T)
        if self.record:
            self.spikes = spikes.detach()
        return declare_spikes(self, decoded, spikes, ternary=self.ternary)

    def _fused(self, kernel, x: torch.Tensor, p: ATMNParameters) -> torch.Tensor:
        """One fused kernel call; under an energy counter (one that can do with spike counts:
        the callers checked) the kernel also counts the spikes, handed to the counter."""
        if not counting_active():
            return kernel(x, self.T, p)
        decoded, counts = kernel(x, self.T, p, counts=True)
        return declare_spike_counts(self, decoded, counts, self.T, ternary=self.ternary)

    def _needs_graph(self, x: torch.Tensor, neuron: ATMN) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or neuron.log_threshold.requires_grad)

    def _fused_ready(self, x: torch.Tensor, neuron: ATMN) -> bool:
        """What both fused paths need: no recording, no energy counter that needs the spike
        train (one that takes spike counts is fine), and what :meth:`kernel_fits` says. Written
        for speed (generation runs it for every spike point of every token): the cheap tests
        first."""
        if self.record or spike_train_needed(self):
            return False
        return self.kernel_fits(x, neuron)

    def kernel_fits(self, x: torch.Tensor, neuron: ATMN) -> bool:
        """Whether the CPU kernels (:func:`spikemar.neurons.cpu_backend.atmn_quantize_decode_cpu`
        and its training twin) serve this point on input ``x``: backend 'auto' or 'cpu', a
        float32/float64 CPU input the reference would accept, a threshold of one value or one
        per channel of ``x``, 1 ≤ T ≤ ``QUANTIZE_MAX_T`` and a built library (the fused step of
        :mod:`spikemar.models.fused_step` compiles a point by the same rule). ``is_cpu`` rather
        than ``device.type``: this runs per token."""
        if neuron.backend not in _FAST_BACKENDS:
            return False
        if not isinstance(x, torch.Tensor) or not x.is_cpu or x.dtype not in _FAST_DTYPES:
            return False
        a = neuron.log_threshold  # a fixed threshold is a buffer
        if (
            not a.is_cpu
            or x.dim() < 1
            or a.dim() > 1
            or (a.dim() == 1 and x.shape[-1] != a.shape[0])
        ):
            return False
        return 1 <= self.T <= cpu_backend.QUANTIZE_MAX_T and cpu_backend.usable()

    def _inference_parameters(self, neuron: ATMN) -> ATMNParameters:
        """The record that the inference kernel reads. ``parameters_tuple()`` costs more than
        the kernel (building the record validates its fields), so the record is kept with a copy
        of the ``a`` it was built from and rebuilt when ``a`` (compared by value: no way of
        changing it can leave a stale V), τ or the spike kind changes. V = exp(a) is computed by
        ``torch.exp`` as on the reference path, once: on the CPU that exp runs in MKL's threaded
        VML even for a few hundred values, and on a busy machine a call can wait milliseconds
        for its second thread."""
        a = neuron.log_threshold
        tau, ternary = neuron.tau, neuron.ternary
        cached = self.__dict__.get("_v_cache")
        if (
            cached is None
            or cached[2] != (tau, ternary)
            or cached[0].dtype != a.dtype
            or cached[0].shape != a.shape
            or not torch.equal(cached[0], a)
        ):
            with torch.no_grad():
                params = ATMNParameters(a.exp(), tau, ternary)
                cached = self.__dict__["_v_cache"] = (a.detach().clone(), params, (tau, ternary))
        return cached[1]

    def extra_repr(self) -> str:
        return f"T={self.T}"


_FAST_BACKENDS = ("auto", "cpu")
_FAST_DTYPES = (torch.float32, torch.float64)


def spike_point(channels: int, spikes: SpikeConfig | None) -> nn.Module:
    """A spike point, or the identity when the model is dense."""
    return nn.Identity() if spikes is None else SpikePoint(channels, spikes)


class FeedForward(SpikePointOwner, nn.Module):
    """SwiGLU FFN ``down(silu(gate(x)) · up(x))``, with MAR's spike points before the up/gate and
    the down projection when ``spikes`` is given. ``names``: the three projections' attribute
    names (gate, up, down), so that a checkpoint's names need no renaming (:class:`LlamaMLP`)."""

    names: ClassVar[tuple[str, str, str]] = ("gate", "up", "down")
    spike_inputs: ClassVar[SpikeInputs] = {"spike_in": ("gate", "up"), "spike_hidden": ("down",)}

    def __init__(
        self, d_model: int, hidden: int, spikes: SpikeConfig | None = None, bias: bool = False
    ) -> None:
        super().__init__()
        gate, up, down = self.names
        self.spike_in = spike_point(d_model, spikes)
        setattr(self, gate, Linear(d_model, hidden, bias=bias))
        setattr(self, up, Linear(d_model, hidden, bias=bias))
        self.spike_hidden = spike_point(hidden, spikes)
        setattr(self, down, Linear(hidden, d_model, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (self._modules[n] for n in self.names)
        x = self.spike_in(x)
        h = F.silu(gate(x)) * up(x)
        if counting_active():  # SiLU and the gate product are functional: no rule sees them
            n = h.numel()
            record_ops(self, kind="gating", elementwise_ops=2 * n, activation_reads=2 * n,
                       activation_writes=n)  # fmt: skip
        return down(self.spike_hidden(h))


class LlamaMLP(FeedForward):
    """Llama's MLP ``down_proj(silu(gate_proj(x)) · up_proj(x))`` under Llama's names (Llamba's
    FFN), with MAR's spike points as in :class:`FeedForward`."""

    names = ("gate_proj", "up_proj", "down_proj")
    spike_inputs: ClassVar[SpikeInputs] = {
        "spike_in": ("gate_proj", "up_proj"),
        "spike_hidden": ("down_proj",),
    }


# a layer's FFN kinds, by MARConfig.ffn: (d_model, hidden, spikes, bias) → module
FFNS = {"swiglu": FeedForward, "llama": LlamaMLP}


def run_blocks(
    x: torch.Tensor,
    blocks: nn.ModuleList,
    norm: nn.Module,
    head: nn.Module,
    return_hidden: bool,
    checkpointing: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """A language model's trunk after its embedding: the residual stream ``x`` through
    ``blocks``, then ``head(norm(·))``. Returns the logits, or with ``return_hidden`` (logits,
    the stream entering each block): the pre-norm features SBDS aligns (:mod:`spikemar.distill`),
    taken at the same place in the MAR student and its Transformer teacher.

    ``checkpointing`` (where autograd records): activation checkpointing per block
    (``torch.utils.checkpoint``, non-reentrant): only each block's input is kept for the
    backward, which runs the block's forward again; the same gradients, for one more forward."""
    hidden = []
    recompute = checkpointing and torch.is_grad_enabled()
    for block in blocks:
        hidden.append(x)
        if recompute:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    logits = head_logits(head, norm, x)
    return (logits, hidden) if return_hidden else logits


class GradientCheckpointing:
    """``gradient_checkpointing_enable()`` / ``gradient_checkpointing_disable()`` (transformers'
    names) and the ``gradient_checkpointing`` flag that the model's forward hands to
    :func:`run_blocks`: activation checkpointing per layer in training, for models whose
    activations do not fit (a long ``L``, a large vocabulary's logits beside them)."""

    gradient_checkpointing: bool = False
    supports_gradient_checkpointing = True

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Checkpoint every layer from now on. ``gradient_checkpointing_kwargs`` (transformers'
        argument) may only say ``use_reentrant=False``, what spikemar always uses."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", False) or kwargs:
            raise ValueError(
                "gradient_checkpointing_kwargs: spikemar checkpoints with use_reentrant=False "
                f"only, got {gradient_checkpointing_kwargs!r}"
            )
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.gradient_checkpointing


def head_logits(head: nn.Module, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``head(norm(x))``, the normalised stream cast to the head's dtype where they differ (a
    float32 residual stream of a 16-bit model, as transformers' Mamba2ForCausalLM casts before
    its ``lm_head``)."""
    h = norm(x)
    w = head.weight
    return head(h if h.dtype == w.dtype else h.to(w.dtype))


def check_tokens(
    tokens: torch.Tensor, vocab_size: int, name: str, rank: int = 2, max_len: int | None = None
) -> None:
    """Token ids: integer dtype, the expected rank, non-empty, inside the vocabulary."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of token ids, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):  # what nn.Embedding takes
        raise TypeError(
            f"{name}: expected integer token ids (int64/int32), got dtype {tokens.dtype}"
        )
    layout = "[batch, L]" if rank == 2 else "[batch]"
    if tokens.dim() != rank or tokens.numel() == 0:
        shape = tuple(tokens.shape)
        raise ValueError(f"{name}: expected non-empty token ids {layout}, got {shape}")
    if max_len is not None and tokens.shape[1] > max_len:
        raise ValueError(f"{name}: length {tokens.shape[1]} exceeds the model's max_len {max_len}")
    lo, hi = torch.aminmax(tokens)
    if tokens.is_cuda:  # the neurons' value-check mode (spikemar.neurons.checks) applies
        mode = checks.get_value_checks()
        if mode == "deferred":  # a device flag that raise_deferred_errors() reads: no sync
            message = (
                f"{name}: ids must lie in [0, {vocab_size}), but ids outside it reached the "
                f"model on {tokens.device} since the last raise_deferred_errors()"
            )
            checks.defer_error((lo < 0) | (hi >= vocab_size), message)
        if mode != "eager":
            return
    if lo.item() < 0 or hi.item() >= vocab_size:
        raise ValueError(
            f"{name}: ids must lie in [0, {vocab_size}), got values in [{lo.item()}, {hi.item()}]"
        )
