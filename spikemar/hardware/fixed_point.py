r"""Loihi's fixed-point arithmetic for spikemar networks, in PyTorch.

A network that can go on chip is an ``nn.Sequential`` of *blocks*, each
``[nn.Flatten] → nn.Linear | nn.Conv2d → [LTICell] → neuron`` with the neuron one of ATMN,
:class:`~spikemar.neurons.BinaryMultiStep`, :class:`~spikemar.neurons.TernarySingleStep` or
:class:`~spikemar.hardware.CUBALIF`. :func:`lower` reads such a model into :class:`Block` records
(naming the offending module's path when it cannot); :func:`quantize` turns them into a
:class:`FixedPointNetwork` that computes, step for step, what Lava's bit-accurate ProcessModels
(and so Loihi) compute. The conventions are Lava's own (``lava.proc.lif.models.
AbstractPyLifModelFixed``, ``lava.proc.dense.models.PyDenseModelBitAcc``):

* **weights**: 8-bit signed with Loihi's mixed-sign shift, i.e. even integers in [−256, 254]
  (``truncate_weights`` drops the lowest bit of mixed-sign 8-bit weights). Per block a scale S maps
  float to integer: ``w = 2·round(S·W/2)`` with ``S = 254 / max|W|``; netx's
  ``optimize_weight_bits`` then finds weight exponent 0, so its Dense computes exactly ``Σ w·s``.
* **dendritic input**: ``a = Σ_j w_ij s_j`` (+ an integer bias ``round(S·b)``), with graded spike
  payloads s ∈ {−1, 0, +1}; it enters a 24-bit state shifted left by 6 (``act_shift``).
* **thresholds**: an unsigned 17-bit mantissa ``round(S·ϑ)``, compared after ``<< 6``
  (``vth_shift``); a threshold that rounds to 0 is clamped to 1 and counted.
* **decays**: 12-bit, 4096 = 1.0; ``decay(x, m) = sign(x·m) · (|x·m| >> 12)`` (Lava's rounding
  towards zero). ATMN's carry ``u/τ`` uses ``m = round(4096/τ)``; CUBA keeps
  ``4096 − iDecay`` of its current and ``4096 − vDecay`` of its voltage.
* **state**: 24-bit signed. Loihi wraps an overflowing current around; this model raises
  :class:`FixedPointOverflowError` instead (naming the block, the variable and the step), so a
  network that passes here never wraps on chip. CUBA's voltage saturates on Loihi too (Lava
  clips it): those clamps are counted in :attr:`FixedPointNetwork.clamp_counts`.

The ATMN block in fixed point (x the input in state units)::

    h = x + decay(u, round(4096/τ));  s = +1 if h ≥ ϑ·2^6, −1 if h ≤ −ϑ·2^6 (ternary), else 0
    u = h − s·ϑ·2^6

The LTI cell (``h_t = λ h_{t−1} + b x_t``, ``y_t = c h_t + d x_t``) in fixed point, its output
going straight into the block's ATMN neuron (no second ``<< 6``)::

    h = decay(h, round(4096·λ)) + mul(b, x);  y = mul(c, h) + mul(d, x)
    mul(q, z) = sign(q'·z) · (|q'·z| >> 12) with q' = round(4096·q), a signed 16-bit value

Time: one step of these models is one Lava time step. Lava's synapses deliver a step later, so
the Lava network's outputs trail by one step per block; :func:`spikemar.hardware.run_lava`
shifts them back before returning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.mar import MARLM
from ..neurons import ATMN
from ..ssm.mixer import LTICell
from .formats import check_block_input
from .lif import CUBALIF
from .placement import mar_placement

__all__ = [
    "Block",
    "FixedBlock",
    "FixedPointNetwork",
    "FixedPointOverflowError",
    "UnsupportedModuleError",
    "check_block_shapes",
    "lower",
    "quantize_network",
    "quantize_weight",
    "simulate",
]

STATE_BITS = 24
STATE_LIMIT = 2 ** (STATE_BITS - 1)  # |state| < 2^23
DECAY_BITS = 12
DECAY_UNITY = 2**DECAY_BITS
ACT_SHIFT = 6  # synaptic input is MSB-aligned by 6 bits
VTH_SHIFT = 6  # so is the threshold mantissa
VTH_MANT_MAX = 2**17 - 1  # Loihi's threshold mantissa is unsigned 17-bit
WEIGHT_MAX = 254  # mixed-sign 8-bit weights: even integers in [-256, 254]
COEF_LIMIT = 2**15  # LTI coefficients b, c, d: signed 16-bit, 4096 = 1.0


class UnsupportedModuleError(ValueError):
    """A module that cannot be mapped to Loihi; the message names its path in the model."""


class FixedPointOverflowError(OverflowError):
    """A fixed-point value left its range; the message names the block, variable and step."""


@dataclass
class Block:
    """One on-chip layer in floating point: synapse, optional LTI cell, neuron.

    ``path`` is the neuron's path in the model; ``synapse`` 'dense' or 'conv' (weights in
    PyTorch's layout); ``neuron`` 'atmn' or 'cuba'. ATMN fields: ``tau`` (``math.inf`` for none),
    ``ternary``, ``v_threshold`` (0-d or per channel over the last dimension). CUBA fields:
    ``current_decay``, ``voltage_decay``, ``v_threshold``. LTI: ``lti`` = dict of λ, b, c, d.
    """

    path: str
    synapse: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    neuron: str
    v_threshold: torch.Tensor
    flatten: bool = False
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    tau: float = math.inf
    ternary: bool = True
    current_decay: float = 1.0
    voltage_decay: float = 0.0
    lti: dict[str, torch.Tensor] | None = None
    modules: dict[str, nn.Module] = field(default_factory=dict)  # path → module, for simulate()


def _leaves(module: nn.Module, prefix: str = ""):
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _leaves(child, path + ".")
        else:
            yield path, child


def lower(model: nn.Module) -> list[Block]:
    """Read an ``nn.Sequential`` of blocks (see the module docstring) into :class:`Block` records.

    Raises :class:`UnsupportedModuleError` naming the module's path and why it cannot go on chip.
    """
    if not isinstance(model, nn.Sequential):
        if isinstance(model, MARLM):
            first = mar_placement(model).first_host()
            raise UnsupportedModuleError(
                f"{first.path}: {first.why}; a MAR LM runs partly on the host: "
                "spikemar.hardware.chip_report(model) lists what can go on chip"
            )
        raise UnsupportedModuleError(
            f"model: expected an nn.Sequential of [Flatten] Linear|Conv2d [LTICell] neuron blocks, "
            f"got {type(model).__name__}"
        )
    blocks: list[Block] = []
    pending: dict = {}
    for path, m in _leaves(model):
        if isinstance(m, nn.Flatten):
            if pending:
                raise UnsupportedModuleError(f"{path}: Flatten must come before the Linear layer")
            if m.start_dim != 1 or m.end_dim != -1:
                raise UnsupportedModuleError(f"{path}: only Flatten(start_dim=1, end_dim=-1) maps")
            pending["flatten"] = True
        elif isinstance(m, nn.Linear | nn.Conv2d):
            if "synapse" in pending:
                raise UnsupportedModuleError(
                    f"{path}: two synaptic layers in a row; Loihi needs a neuron between them"
                )
            pending.update(_synapse(path, m))
        elif isinstance(m, LTICell):
            if pending.get("synapse") == "conv":
                raise UnsupportedModuleError(
                    f"{path}: an LTICell works on channels last and maps after a Linear only"
                )
            if "synapse" not in pending or "lti" in pending:
                raise UnsupportedModuleError(
                    f"{path}: an LTICell must follow a Linear/Conv2d and precede an ATMN neuron"
                )
            pending["lti"] = {
                "decay": m.decay.detach().clone(),
                "b": m.b.detach().clone(),
                "c": m.c.detach().clone(),
                "d": m.d.detach().clone(),
            }
            pending["modules"][path] = m
        elif isinstance(m, ATMN | CUBALIF):
            if "synapse" not in pending:
                raise UnsupportedModuleError(f"{path}: a neuron needs a Linear/Conv2d before it")
            blocks.append(_close_block(path, m, pending))
            pending = {}
        else:
            raise UnsupportedModuleError(
                f"{path}: {type(m).__name__} has no Loihi mapping (supported: Flatten, Linear, "
                "Conv2d, LTICell, ATMN, BinaryMultiStep, TernarySingleStep, CUBALIF)"
            )
    if pending:
        raise UnsupportedModuleError(
            f"{next(iter(pending['modules']), 'model')}: the model ends without a neuron "
            "after its last synaptic layer"
        )
    if not blocks:
        raise UnsupportedModuleError("model: no blocks (an empty nn.Sequential)")
    return blocks


def _synapse(path: str, m: nn.Module) -> dict:
    out = {
        "weight": m.weight.detach().clone(),
        "bias": None if m.bias is None else m.bias.detach().clone(),
        "modules": {path: m},
    }
    if isinstance(m, nn.Linear):
        return {**out, "synapse": "dense"}
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise UnsupportedModuleError(f"{path}: only numeric zero padding maps to Lava's Conv")
    return {
        **out,
        "synapse": "conv",
        "stride": tuple(m.stride),
        "padding": tuple(m.padding),
        "dilation": tuple(m.dilation),
        "groups": m.groups,
    }


def _close_block(path: str, m: nn.Module, pending: dict) -> Block:
    modules = {**pending.pop("modules"), path: m}
    if isinstance(m, CUBALIF):
        if pending.get("lti") is not None:
            raise UnsupportedModuleError(
                f"{path}: an LTICell must feed an ATMN neuron (Lava's LIF shifts its input again)"
            )
        if pending.get("bias") is not None:
            raise UnsupportedModuleError(
                f"{next(iter(modules))}: a Linear/Conv2d before a CUBALIF must have bias=False "
                "(Loihi's CUBA "
                "neuron adds its bias to the voltage, not to the current)"
            )
        return Block(
            path=path,
            neuron="cuba",
            v_threshold=torch.tensor(m.v_threshold),
            current_decay=m.current_decay,
            voltage_decay=m.voltage_decay,
            modules=modules,
            **pending,
        )
    return Block(
        path=path,
        neuron="atmn",
        v_threshold=m.v_threshold.detach().clone(),
        tau=m.tau,
        ternary=m.ternary,
        modules=modules,
        **pending,
    )


# -- quantisation -----------------------------------------------------------------------------


@dataclass
class FixedBlock:
    """A :class:`Block` in Loihi's integers (see the module docstring for the conventions)."""

    block: Block
    scale: float  # S: integer synaptic input = S × float synaptic input
    weight: torch.Tensor  # int64, even, in [-256, 254]
    bias: torch.Tensor | None  # int64, added to the dendritic input every step
    vth_mant: torch.Tensor  # int64, 17-bit unsigned (0-d or per channel)
    carry: int = 0  # ATMN: round(4096/τ)
    i_decay: int = DECAY_UNITY  # CUBA: netx's iDecay (4096 = all current lost per step)
    v_decay: int = 0  # CUBA: netx's vDecay
    lti: dict[str, torch.Tensor] | None = None  # int64: decay (12-bit), b, c, d (4096 = 1.0)
    threshold_clamps: int = 0

    @property
    def path(self) -> str:
        return self.block.path


def quantize_weight(weight: torch.Tensor, path: str = "weight") -> tuple[torch.Tensor, float]:
    """Loihi's mixed-sign 8-bit weights, the one rule for every on-chip projection: ``(w, S)``
    with ``w`` even integers in [−256, 254] (int64) and ``S = 254 / max|W|``, ``W ≈ w / S``.
    Raises ValueError (naming ``path``) when the weights are all zero or not finite."""
    w_max = float(weight.detach().abs().max())
    if w_max == 0.0 or not math.isfinite(w_max):
        raise ValueError(
            f"{path}: the weights are all zero or not finite (max |w| = {w_max}); nothing to "
            "quantise"
        )
    scale = WEIGHT_MAX / w_max
    return (weight.detach().double() * scale / 2).round().long() * 2, scale


def _quantize_block(b: Block) -> FixedBlock:
    w_max = float(b.weight.abs().max())
    if w_max == 0.0 or not math.isfinite(w_max):
        raise ValueError(
            f"{b.path}: the weights before this neuron are all zero or not finite "
            f"(max |w| = {w_max}); nothing to quantise"
        )
    weight, scale = quantize_weight(b.weight, b.path)
    synapse = next(iter(b.modules), b.path)
    values = {f"{synapse}: the bias": b.bias, f"{b.path}: v_threshold": b.v_threshold}
    lti_path = next((p for p, m in b.modules.items() if isinstance(m, LTICell)), None)
    if b.lti is not None:
        values.update({f"{lti_path}: LTI coefficient {k}": v for k, v in b.lti.items()})
    for what, value in values.items():  # NaN or inf rounds to a garbage int64
        if value is not None and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{what} holds NaN or inf; nothing to quantise")
    bias = None if b.bias is None else (b.bias.double() * scale).round().long()
    if bias is not None and int(bias.abs().max()) << ACT_SHIFT >= STATE_LIMIT:
        raise ValueError(
            f"{synapse}: the bias reaches {float(b.bias.abs().max()):.4g}, "
            f"{float(b.bias.abs().max()) / w_max:.4g} × the largest weight; as Loihi's integer "
            f"{int(bias.abs().max())} << {ACT_SHIFT} it alone leaves the 24-bit state "
            f"(|bias| < {STATE_LIMIT >> ACT_SHIFT} × (largest weight / {WEIGHT_MAX}))"
        )
    vth = (b.v_threshold.double() * scale).round().long()
    if int(vth.max()) > VTH_MANT_MAX:
        raise ValueError(
            f"{b.path}: v_threshold {float(b.v_threshold.max()):.4g} is "
            f"{float(b.v_threshold.max()) / w_max:.4g} × the largest weight; Loihi's 17-bit "
            f"threshold mantissa holds at most {VTH_MANT_MAX} × (largest weight / {WEIGHT_MAX})"
        )
    clamps = int((vth < 1).sum())
    vth = vth.clamp(min=1)
    fb = FixedBlock(block=b, scale=scale, weight=weight, bias=bias, vth_mant=vth)
    fb.threshold_clamps = clamps
    if b.neuron == "atmn":
        fb.carry = 0 if math.isinf(b.tau) else round(DECAY_UNITY / b.tau)
        if fb.carry > DECAY_UNITY:
            raise ValueError(
                f"{b.path}: tau = {b.tau} < 1 multiplies the membrane by 1/τ > 1; Loihi's 12-bit "
                "decay holds factors up to 1 (τ >= 1)"
            )
    else:
        fb.i_decay = round(b.current_decay * DECAY_UNITY)
        fb.v_decay = min(round(b.voltage_decay * DECAY_UNITY), DECAY_UNITY - 1)
    if b.lti is not None:
        q = {k: (b.lti[k].double() * DECAY_UNITY).round().long() for k in ("decay", "b", "c", "d")}
        for k in ("b", "c", "d"):
            if int(q[k].abs().max()) >= COEF_LIMIT:
                raise ValueError(
                    f"{lti_path}: LTI coefficient {k} reaches {float(b.lti[k].abs().max()):.4g}; "
                    f"the signed 16-bit fixed-point form (4096 = 1.0) holds |{k}| < 8"
                )
        fb.lti = q
    return fb


def quantize_network(model: nn.Module) -> FixedPointNetwork:
    """:func:`quantize` for an ``nn.Sequential`` of blocks only (anything else raises
    :class:`UnsupportedModuleError` naming the module that cannot go on chip)."""
    return FixedPointNetwork([_quantize_block(b) for b in lower(model)])


def _decay(x: torch.Tensor, mult: int | torch.Tensor) -> torch.Tensor:
    """Lava's ``sign(x·m) · (|x·m| >> 12)``: multiply by m/4096, rounding towards zero."""
    p = x * mult
    return torch.sign(p) * (p.abs() >> DECAY_BITS)


def _check_range(x: torch.Tensor, what: str, path: str, t: int) -> None:
    worst = int(x.abs().max()) if x.numel() else 0
    if worst >= STATE_LIMIT:
        raise FixedPointOverflowError(
            f"{path}: {what} reached {worst} at step {t}, outside Loihi's 24-bit range "
            f"(|x| < {STATE_LIMIT}); lower the weights or raise the threshold"
        )


def check_block_shapes(
    blocks: list[Block], sample_shape: tuple[int, ...], *, name: str = "input_shape"
) -> tuple[int, ...]:
    """Whether one sample of shape ``sample_shape`` goes through every block in turn (a block's
    input is the previous block's output); returns the last block's output shape. Else a
    ValueError naming ``name``, the shape that reaches the block and the block's synapse, rather
    than a matmul's or conv2d's shape error from inside the export."""
    sample_shape = tuple(int(n) for n in sample_shape)
    x = torch.zeros(1, *sample_shape, dtype=torch.float64)
    for i, b in enumerate(blocks):
        here = tuple(x.shape[1:])
        try:
            check_block_input(b, here, name=name)
            try:
                x = synaptic_input(x, b, b.weight.double(), None)
            except RuntimeError as err:  # a conv kernel larger than its (padded) input
                synapse = next(iter(b.modules), b.path)
                raise ValueError(f"{name}: {here} does not fit {synapse} ({err})") from None
        except ValueError as err:
            if i == 0:
                raise
            why = str(err).removeprefix(f"{name}: {here}")
            raise ValueError(
                f"{name}: {sample_shape} becomes {here} at {blocks[i - 1].path}, which{why}"
            ) from None
    return tuple(x.shape[1:])


def synaptic_input(x: torch.Tensor, b: Block, weight: torch.Tensor, bias) -> torch.Tensor:
    """``W·x (+ bias)`` for one step ``x`` [N, …] of a block, in the weight's dtype."""
    if b.flatten:
        x = x.flatten(1)
    x = x.to(weight.dtype)
    if b.synapse == "dense":
        a = x @ weight.T
    else:
        a = nn.functional.conv2d(x, weight, None, b.stride, b.padding, b.dilation, b.groups)
    if bias is not None:
        a = a + (bias if b.synapse == "dense" else bias[:, None, None])
    return a


class FixedPointNetwork(nn.Module):
    """The fixed-point network: ``net(inputs)`` with integer spikes [T, N, …] (payloads such as
    {−1, 0, 1}) returns the last block's spikes [T, N, …] as float, computed in int64.

    Attributes:
        blocks: the :class:`FixedBlock` records (scales, integer weights, thresholds, decays).
        clamp_counts: per block path, how often CUBA voltages saturated at ±(2^23 − 1) in the
            last call, and how many thresholds were clamped to 1 when quantising.
        last_states: per block, its integer state after the last call (``u``, and ``v`` for
            CUBA, ``h`` for an LTI cell).
    """

    def __init__(self, blocks: list[FixedBlock]) -> None:
        super().__init__()
        self.blocks = blocks
        self.clamp_counts: dict[str, dict[str, int]] = {
            fb.path: {"threshold": fb.threshold_clamps, "voltage": 0} for fb in blocks
        }
        self.last_states: list[dict[str, torch.Tensor]] = []

    def forward(self, inputs: torch.Tensor, *, record: bool = False):
        """``record=True`` also returns every block's spikes (a list of [T, N, …] tensors)."""
        if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
            raise ValueError("inputs: expected a tensor [T, N, ...] of integer spike payloads")
        as_int = inputs.round().long() if inputs.is_floating_point() else inputs.long()
        if inputs.is_floating_point() and not torch.equal(as_int.to(inputs.dtype), inputs):
            raise ValueError("inputs: Loihi takes integer spike payloads; got fractional values")
        if self.blocks:  # one step of one sample: [T, N, *input_shape]
            check_block_shapes([fb.block for fb in self.blocks], inputs.shape[2:], name="inputs")
        for counts in self.clamp_counts.values():
            counts["voltage"] = 0
        states: list[dict] = [{} for _ in self.blocks]
        outputs: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        for t in range(as_int.shape[0]):
            x = as_int[t]
            for i, fb in enumerate(self.blocks):
                x = self._block_step(fb, x, states[i], t)
                outputs[i].append(x)
        self.last_states = states
        spikes = [torch.stack(o).float() for o in outputs]
        return (spikes[-1], spikes) if record else spikes[-1]

    def _block_step(self, fb: FixedBlock, x: torch.Tensor, st: dict, t: int) -> torch.Tensor:
        b = fb.block
        # float64 holds these integer sums exactly (|a| < 2^53); conv2d has no int64 kernel
        a = synaptic_input(x, b, fb.weight.double(), fb.bias).round().long()
        _check_range(a, "the dendritic input", fb.path, t)
        inp = a << ACT_SHIFT
        _check_range(inp, "the dendritic input << 6", fb.path, t)
        if fb.lti is not None:
            q = fb.lti
            h = _decay(st.get("h", torch.zeros_like(inp)), q["decay"]) + _decay(inp, q["b"])
            _check_range(h, "the LTI state h", fb.path, t)
            st["h"] = h
            inp = _decay(h, q["c"]) + _decay(inp, q["d"])
            _check_range(inp, "the LTI output y", fb.path, t)
        vth = fb.vth_mant << VTH_SHIFT
        if b.neuron == "atmn":
            u = st.get("u")
            h = inp if u is None else inp + _decay(u, fb.carry)
            _check_range(h, "the ATMN membrane", fb.path, t)
            s = (h >= vth).long()
            if b.ternary:
                s = s - (h <= -vth).long()
            st["u"] = h - s * vth
            return s
        u = _decay(st.get("u", torch.zeros_like(inp)), DECAY_UNITY - fb.i_decay) + inp
        _check_range(u, "the CUBA current", fb.path, t)
        v = _decay(st.get("v", torch.zeros_like(inp)), DECAY_UNITY - fb.v_decay) + u
        limit = STATE_LIMIT - 1
        self.clamp_counts[fb.path]["voltage"] += int((v.abs() > limit).sum())
        v = v.clamp(-limit, limit)
        s = (v > vth).long()
        st["u"], st["v"] = u, v * (1 - s)
        return s


# -- the float reference ----------------------------------------------------------------------


@torch.no_grad()
def simulate(model: nn.Module, inputs: torch.Tensor, *, record: bool = False):
    """Run the float ``model`` (an ``nn.Sequential`` of blocks) one time step at a time on
    ``inputs`` [T, N, …], with its own modules (neurons in single-step mode, LTI cells through
    ``step``), from fresh state. Returns the output spikes [T, N, …] (and every block's with
    ``record``). This is the PyTorch float model that Lava's floating-point run is checked
    against; the neurons' step modes are restored afterwards."""
    blocks = lower(model)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        raise ValueError("inputs: expected a tensor [T, N, ...] of spike payloads")
    check_block_shapes(blocks, inputs.shape[2:], name="inputs")
    neurons = [b.modules[b.path] for b in blocks]
    modes = [n.step_mode for n in neurons]
    try:
        for n in neurons:
            n.step_mode = "s"
            n.reset()
        states: list = [None] * len(blocks)
        outputs: list[list[torch.Tensor]] = [[] for _ in blocks]
        for t in range(inputs.shape[0]):
            x = inputs[t]
            for i, b in enumerate(blocks):
                synapse = next(
                    m for m in b.modules.values() if isinstance(m, nn.Linear | nn.Conv2d)
                )
                x = synapse(x.flatten(1) if b.flatten else x)
                if b.lti is not None:
                    cell = next(m for m in b.modules.values() if isinstance(m, LTICell))
                    if states[i] is None:
                        states[i] = cell.init_state(x.shape[0])
                    x, states[i] = cell.step(x, states[i])
                x = neurons[i](x)
                outputs[i].append(x)
        spikes = [torch.stack(o) for o in outputs]
    finally:
        for n, mode in zip(neurons, modes, strict=True):
            n.reset()
            n.step_mode = mode
    return (spikes[-1], spikes) if record else spikes[-1]
