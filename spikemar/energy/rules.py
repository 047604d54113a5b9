"""Counting rules: which module types the energy counter knows, and how it counts each.

A rule counts one call of one module, *its own computation only* (children have rules of their
own), through the :class:`~spikemar.energy.counter.CountContext` it is handed::

    def rule(ctx, module, args, output) -> None:
        ctx.synaptic(args[0], fan_out=..., dense_macs=...)   # a spike- or value-driven layer
        ctx.record(macs=..., elementwise_ops=...)             # anything else

A rule runs on every call of its module inside the forward pass, so the built-in ones keep what
the module's geometry fixes per input shape and do per call only what depends on the values::

    x = args[0]
    synapse = ctx.static.get(x.shape) or ctx.keep(x.shape, ctx.synapse(x, fan_out=..., ...))
    ctx.synaptic_call(x, synapse)                 # likewise ctx.add(ctx.event(...)) for counts

Built in:

* synaptic layers: ``nn.Linear`` (and SpikingJelly's ``layer.Linear``), ``nn.Conv1d/2d/3d``
  (stride, padding of any mode, dilation, groups; SpikingJelly's multi-step convs), and
  ``nn.Embedding`` (a lookup counted as the AC-equivalent of a one-hot input: ``embedding_dim``
  ACs per index);
* spiking neurons (:func:`register_neuron`): spikemar's ATMN family and SpikingJelly's
  ``BaseNode``/``SimpleBaseNode`` neurons (binary) and ``TernaryIFNode``/``TernaryLIFNode``;
  their output is tagged as spikes for the layers that consume it;
* spike-preserving modules (identity, flatten, dropout, max-pooling): their output stays spikes;
* element-wise modules (activations, normalisations, average pooling): one element-wise op per
  output element, whatever the op (a count of element-wise work, not of arithmetic).

Each rule also records the memory the module moves: its parameters (per call and per token
vector), the activations it reads and writes, spike trains and state (see
:mod:`spikemar.energy.counter`); pooled spikes are counted as values.

Users extend the table with :func:`register_rule` and :func:`register_neuron`. A module that has
no rule and computes something itself (it has parameters of its own, or it is a leaf) is listed
in the report as *uncounted*, never counted as zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _stats

if TYPE_CHECKING:
    from .counter import CountContext

__all__ = [
    "Rule",
    "find_rule",
    "register_neuron",
    "register_rule",
]

RuleFn = Callable[["CountContext", nn.Module, tuple[Any, ...], Any], None]


@dataclass(frozen=True)
class Rule:
    """A registered counting rule: ``kind`` names the row kind in reports."""

    kind: str
    fn: RuleFn


_RULES: dict[type, Rule] = {}
_NEURONS: dict[type, Callable[[nn.Module], bool]] = {}


def register_rule(module_type: type, rule: RuleFn, *, kind: str | None = None) -> None:
    """Count every module of ``module_type`` (and its subclasses, unless they have a rule of their
    own) with ``rule(ctx, module, args, output)``. ``kind`` labels its report rows."""
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"module_type: expected an nn.Module subclass, got {module_type!r}")
    if not callable(rule):
        raise TypeError(f"rule: expected a callable (ctx, module, args, output), got {rule!r}")
    _RULES[module_type] = Rule(kind or module_type.__name__.lower(), rule)


def register_neuron(module_type: type, *, ternary: bool | Callable[[nn.Module], bool]) -> None:
    """Declare ``module_type`` a spiking neuron: its output is a spike tensor, binary {0, 1} or
    ternary {−1, 0, +1} (``ternary`` may be a function of the module instance).

    Its rows count one neuron update per output element and report the output firing rate; the
    layers fed by its output count accumulates instead of multiply-accumulates.
    """
    if isinstance(ternary, bool):
        flag = bool(ternary)

        def is_ternary(_m: nn.Module) -> bool:
            return flag

    elif callable(ternary):
        is_ternary = ternary
    else:
        raise TypeError(f"ternary: expected a bool or a callable(module) -> bool, got {ternary!r}")
    _NEURONS[module_type] = is_ternary
    register_rule(module_type, _neuron_rule, kind="neuron")


def find_rule(module: nn.Module) -> Rule | None:
    """The rule of the most specific registered class of ``module``, or ``None``."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None


def neuron_is_ternary(module: nn.Module) -> bool:
    for cls in type(module).__mro__:
        fn = _NEURONS.get(cls)
        if fn is not None:
            return bool(fn(module))
    raise KeyError(type(module).__name__)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple | list):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


# -- built-in rules ---------------------------------------------------------------------------


# The synaptic and element-wise rules run for every call of every layer: what a layer's
# geometry fixes is computed once per input shape and kept in ``ctx.static`` (see CountContext).


def _linear_rule(ctx: CountContext, module: nn.Linear, args: tuple[Any, ...], out: Any) -> None:
    x = args[0]
    synapse = ctx.static.get(x.shape) or ctx.keep(x.shape, _linear_synapse(ctx, module, x, out))
    ctx.synaptic_call(x, synapse)


def _linear_synapse(ctx: CountContext, module: nn.Linear, x: torch.Tensor, out: torch.Tensor):
    bias_adds = out.numel() if module.bias is not None else 0
    return ctx.synapse(
        x,
        fan_out=module.out_features,
        dense_macs=x.numel() * module.out_features,
        weights=ctx.parameters(module),  # weight and bias
        vectors=x.numel() // max(1, module.in_features),
        features=module.in_features,
        elementwise_ops=bias_adds,
        activation_writes=out.numel(),
        bias_reads=bias_adds,  # each bias add reads its bias
    )


def _conv_rule(ctx: CountContext, module: nn.modules.conv._ConvNd, args: tuple[Any, ...], out):
    x = args[0]
    key = (x.shape, out.shape)
    synapse, weighted_acs = ctx.static.get(key) or ctx.keep(key, _conv_synapse(ctx, module, x, out))
    ctx.synaptic_call(x, synapse, weighted_acs)


def _conv_synapse(ctx: CountContext, module: nn.modules.conv._ConvNd, x: torch.Tensor, out):
    """(the synapse, its weighted_acs) of a conv's calls with these input and output shapes."""
    n_sp = len(module.kernel_size)
    spatial_in = tuple(x.shape[-n_sp:])
    spatial_out = tuple(out.shape[-n_sp:])
    groups = module.groups
    c_out_per_group = module.out_channels // groups
    dense_macs = out.numel() * (module.in_channels // groups) * math.prod(module.kernel_size)
    # F.pad order: last spatial dim first, (left, right) pairs.
    rp = list(module._reversed_padding_repeated_twice)
    zeros = module.padding_mode == "zeros"
    if zeros:
        pad_left = tuple(rp[2 * (n_sp - 1 - d)] for d in range(n_sp))
        size_in = spatial_in
    else:
        # the module pads its input with F.pad(mode) and runs the conv unpadded
        pad_left = (0,) * n_sp
        size_in = tuple(
            s + rp[2 * (n_sp - 1 - d)] + rp[2 * (n_sp - 1 - d) + 1]
            for d, s in enumerate(spatial_in)
        )

    def weighted_acs(spikes: torch.Tensor, ternary: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # spikes per input position [*spatial] · (outputs × taps reading that position); the
        # map is small, so it is weighted in float64, where the sum stays an exact integer
        spike_map = _stats.spatial_spike_map(spikes, n_sp, ternary)
        nnz = spike_map.sum()
        spike_map = spike_map.to(torch.float64)
        if not zeros:
            spike_map = _stats.pad_spike_map(spike_map, rp, module.padding_mode)
        fan = ctx.cached(
            ("conv_fan_out", size_in, spatial_out, spike_map.device),
            lambda: _stats.conv_fan_out_map(
                size_in,
                spatial_out,
                tuple(module.kernel_size),
                tuple(module.stride),
                pad_left,
                tuple(module.dilation),
                device=spike_map.device,
                dtype=torch.float64,
            ),
        )
        return (spike_map * fan).sum(), nnz

    # each spike at a position drives fan-out(position) accumulates in each of the C_out / groups
    # output channels of its group; a spike's address names its channel and position
    per_sample = module.in_channels * math.prod(spatial_in)
    bias_adds = out.numel() if module.bias is not None else 0
    synapse = ctx.synapse(
        x,
        fan_out=c_out_per_group,
        dense_macs=dense_macs,
        weights=ctx.parameters(module),
        vectors=x.numel() // max(1, per_sample),
        features=per_sample,
        elementwise_ops=bias_adds,
        activation_writes=out.numel(),
        bias_reads=bias_adds,  # each bias add reads its bias
    )
    return synapse, weighted_acs


def _embedding_rule(ctx: CountContext, module: nn.Embedding, args: tuple[Any, ...], out) -> None:
    idx = args[0]
    ctx.lookup(idx, acs=idx.numel() * module.embedding_dim)  # reads the rows it looks up
    ctx.record(activation_writes=out.numel())


def _neuron_rule(ctx: CountContext, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
    spikes = _first_tensor(out)
    if spikes is None:
        return
    x = _first_tensor(args)
    inputs = x.numel() if x is not None else 0
    width = spikes.shape[-1] if spikes.dim() else 1
    ctx.spikes_out(
        spikes,
        ternary=neuron_is_ternary(module),
        inputs=inputs,
        weights=ctx.parameters(module),
        vectors=spikes.numel() // max(1, width),
        state=_neuron_state(module, x),
    )


def _neuron_state(module: nn.Module, x: torch.Tensor | None) -> int | None:
    """State elements a SpikingJelly-style neuron reads and writes in one call: every tensor it
    keeps as a memory (the membrane, and an Izhikevich neuron's recovery variable, say), once
    per step (None: no memories to read, one membrane per spike element)."""
    memories = getattr(module, "memories", None)
    if not callable(memories):
        return None
    per_step = sum(m.numel() for m in memories() if isinstance(m, torch.Tensor))
    multi = getattr(module, "step_mode", "s") == "m" and x is not None and x.dim() > 0
    return per_step * (x.shape[0] if multi else 1) or None


def _passthrough_rule(ctx: CountContext, module: nn.Module, args: tuple[Any, ...], out) -> None:
    x = _first_tensor(args)
    y = _first_tensor(out)
    if x is None or y is None:
        return
    # a training-mode dropout scales the surviving spikes by 1/(1 - p): still spikes, not ±1
    scaled = isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0
    ctx.propagate(x, y, unit=not scaled)


def _maxpool_rule(ctx: CountContext, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
    _passthrough_rule(ctx, module, args, out)
    _elementwise_rule(ctx, module, args, out)


def _elementwise_rule(ctx: CountContext, module: nn.Module, args: tuple[Any, ...], out) -> None:
    y = out if isinstance(out, torch.Tensor) else _first_tensor(out)
    if y is None:
        return
    x = args[0] if args and isinstance(args[0], torch.Tensor) else _first_tensor(args)
    key = (y.shape, None if x is None else x.shape)
    ctx.add(ctx.static.get(key) or ctx.keep(key, _elementwise_event(ctx, module, x, y)))


def _elementwise_event(ctx: CountContext, module: nn.Module, x: torch.Tensor | None, y):
    # memory: reads its input, writes its output (as real values), reads its parameters (a
    # norm's weight) once per vector
    width = y.shape[-1] if y.dim() else 1
    vectors = y.numel() // max(1, width)
    event = ctx.event(
        elementwise_ops=y.numel(),
        activation_reads=x.numel() if x is not None else 0,
        activation_writes=y.numel(),
        weight_reads=ctx.parameters(module) * vectors,
        weight_reads_call=ctx.parameters(module),
    )
    event.vectors = vectors
    return event


def _register_builtins() -> None:
    register_rule(nn.Linear, _linear_rule, kind="linear")
    register_rule(nn.Conv1d, _conv_rule, kind="conv1d")
    register_rule(nn.Conv2d, _conv_rule, kind="conv2d")
    register_rule(nn.Conv3d, _conv_rule, kind="conv3d")
    register_rule(nn.Embedding, _embedding_rule, kind="embedding")

    for cls in (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd):
        register_rule(cls, _passthrough_rule, kind="passthrough")
    for cls in (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd):
        register_rule(cls, _maxpool_rule, kind="maxpool")
    elementwise = (
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
        nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus,
        nn.Softmax, nn.LogSoftmax, nn.GLU,
        nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.LocalResponseNorm,
        nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
        nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
    )  # fmt: skip
    for cls in elementwise:
        register_rule(cls, _elementwise_rule, kind="elementwise")

    from spikemar.neurons import ATMN

    register_neuron(ATMN, ternary=lambda m: m.ternary)

    from spikingjelly.activation_based import neuron as sj_neuron

    for name in ("BaseNode", "SimpleBaseNode"):
        cls = getattr(sj_neuron, name, None)
        if cls is not None:
            register_neuron(cls, ternary=False)
    for name in ("TernaryIFNode", "TernaryLIFNode"):
        cls = getattr(sj_neuron, name, None)
        if cls is not None:
            register_neuron(cls, ternary=True)


_register_builtins()
