r"""ATMN, the Adaptive Ternary Multi-step Neuron of MAR (arXiv 2601.21503), as pure functions.

For one activation over T micro-steps t = 0 … T−1, with membrane u₋₁ = u_init (0 by default):

.. math::
    h_t &= x_t + u_{t-1} / \tau                              \\
    s_t &= \begin{cases} +1 & h_t \ge V \\ -1 & h_t \le -V \\ 0 & \text{otherwise} \end{cases} \\
    u_t &= h_t - V s_t                                       \qquad\text{(signed soft reset)} \\
    V   &= \exp(a)

MAR feeds a static activation I by δ-injection: x_0 = I and x_t = 0 for t ≥ 1
(:func:`delta_inject`). Then, exactly,

.. math::
    I = V \sum_t \tau^t s_t + \tau^{T-1} u_{T-1},

so :func:`atmn_decode` (``V·Σ_t τ^t s_t``) returns I quantised; for τ = 1 it is a count code
with ``|I − decode| < V`` while ``|I| < (T+1)·V``.

The same code path gives the ablation baselines:

* ``ternary=False``: a binary (0/1) multi-step neuron with the same soft reset;
* ``tau=math.inf`` (no carry-over of the membrane): a ternary neuron without multi-step dynamics,
  which under δ-injection is ATMN at T = 1.

Shapes are time-first as in SpikingJelly: ``x_seq`` is [T, N, …]. The threshold V is a scalar
(shared) or a vector over the last dimension (per channel). Surrogate gradients flow to the input,
to the initial membrane and to V (so to ``a`` through ``V = exp(a)``); see
:mod:`spikemar.neurons.surrogate` for their shapes.

Functions here take explicit state and return it (norse's style); the stateful
:class:`spikemar.neurons.ATMN` only owns parameters and state and calls them. Each backend
implements :func:`atmn_multi_step` with the same signature; this file holds the PyTorch reference
that defines what is correct.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._numbers import integer, real
from .surrogate import Rectangle, Surrogate, get_surrogate

__all__ = [
    "ATMNParameters",
    "atmn_decode",
    "atmn_multi_step",
    "atmn_quantize",
    "atmn_step",
    "delta_inject",
    "spike_function",
]


class _ATMNFields(NamedTuple):
    v_threshold: torch.Tensor
    tau: float = 2.0
    ternary: bool = True
    surrogate: Surrogate = Rectangle()
    detach_reset: bool = False
    smooth: bool = False


class ATMNParameters(_ATMNFields):
    """Parameters of the ATMN dynamics, checked when built (``_replace`` skips the checks).

    v_threshold: V > 0, a 0-d tensor (shared) or a 1-d tensor over the last input dimension
        (a Python float becomes a 0-d float32 tensor). Its values are checked when it is used.
    tau: membrane time constant τ > 0; the carried membrane is divided by τ each micro-step.
        ``math.inf`` carries nothing over (the single-step baseline).
    ternary: spikes in {−1, 0, +1}; False gives the binary {0, 1} baseline.
    surrogate: the surrogate gradient of the firing function, an instance or one of the names
        'rectangle', 'triangle', 'sigmoid', 'atan'.
    detach_reset: stop the gradient through the reset term ``V·s_t`` (as SpikingJelly's option).
    smooth: replace the firing step by the surrogate's smooth primitive in the forward pass.
        Only for testing gradients (``gradcheck``); spikes are then not in {−1, 0, +1}.
    """

    __slots__ = ()

    def __new__(
        cls,
        v_threshold: torch.Tensor | float,
        tau: float = 2.0,
        ternary: bool = True,
        surrogate: Surrogate | str = "rectangle",
        detach_reset: bool = False,
        smooth: bool = False,
    ) -> ATMNParameters:
        # a bad surrogate or τ fails here, not in the backward pass of a later training step
        return super().__new__(
            cls,
            _threshold_tensor(v_threshold),
            check_tau(tau),
            bool(ternary),
            get_surrogate(surrogate),
            bool(detach_reset),
            bool(smooth),
        )


def _threshold_tensor(v_threshold: torch.Tensor | float, name: str = "v_threshold") -> torch.Tensor:
    """A threshold as the functions take it: a 0-d or 1-d tensor (a number becomes 0-d). A
    number is checked here (free, unlike a tensor's values, which cost a read back)."""
    value = real(v_threshold)
    if value is not None:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: expected finite values > 0, got [{value}]")
        return torch.tensor(value)
    if not isinstance(v_threshold, torch.Tensor):
        raise TypeError(
            f"{name}: expected a float or a 0-d / 1-d tensor, got {type(v_threshold).__name__}"
        )
    if v_threshold.dim() > 1 or not v_threshold.is_floating_point():
        raise ValueError(
            f"{name}: expected a floating-point scalar or 1-d per-channel tensor, got shape "
            f"{tuple(v_threshold.shape)} and dtype {v_threshold.dtype}"
        )
    check_channels(v_threshold, name)
    return v_threshold


def check_channels(v_threshold: torch.Tensor, name: str = "v_threshold") -> None:
    """Refuse a per-channel threshold of no channels: the fused kernels would take its
    0 channels for a shared V and read a value that is not there."""
    if v_threshold.dim() == 1 and v_threshold.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one per-channel value, got shape (0,)")


class _SpikeFn(torch.autograd.Function):
    """Firing function ``s = Θ(h/V − 1) − Θ(−h/V − 1)`` (ternary) or ``Θ(h/V − 1)`` (binary),
    with the surrogate derivative in the backward pass.

    With ``r = h/V`` and ``G = g(r − 1) + g(−r − 1)`` (the second term only when ternary):
    ``∂s/∂h = G / V`` and ``∂s/∂V = −r · G / V``.
    """

    @staticmethod
    def forward(ctx, h, v_threshold, surrogate, ternary):  # type: ignore[override]
        ctx.save_for_backward(h, v_threshold)
        ctx.surrogate = surrogate
        ctx.ternary = ternary
        s = (h >= v_threshold).to(h.dtype)
        if ternary:
            s = s - (h <= -v_threshold).to(h.dtype)
        return s

    @staticmethod
    def backward(ctx, grad_s):  # type: ignore[override]
        h, v_threshold = ctx.saved_tensors
        r = h / v_threshold
        g = ctx.surrogate.derivative(r - 1.0)
        if ctx.ternary:
            g = g + ctx.surrogate.derivative(-r - 1.0)
        grad_h = grad_s * g / v_threshold
        grad_v = None
        if ctx.needs_input_grad[1]:
            grad_v = (-(grad_h * r)).sum_to_size(v_threshold.shape)
        return grad_h, grad_v, None, None


def spike_function(h: torch.Tensor, p: ATMNParameters) -> torch.Tensor:
    """Fire on the pre-spike membrane ``h`` with the threshold and surrogate of ``p``."""
    if p.smooth:
        r = h / p.v_threshold
        s = p.surrogate.primitive(r - 1.0)
        return s - p.surrogate.primitive(-r - 1.0) if p.ternary else s
    return _SpikeFn.apply(h, p.v_threshold, p.surrogate, p.ternary)


def _decay(tau: float) -> float:
    return 0.0 if math.isinf(tau) else 1.0 / tau


def _atmn_multi_step_torch(
    x_seq: torch.Tensor, u: torch.Tensor | None, p: ATMNParameters, return_v_seq: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The reference: the equations above, one micro-step at a time, autograd for BPTT.
    ``u=None`` is a zero initial membrane."""
    decay = _decay(p.tau)
    spikes, v_seq = [], []
    for t in range(x_seq.shape[0]):
        h = x_seq[t] if u is None else x_seq[t] + u * decay
        s = spike_function(h, p)
        u = h - p.v_threshold * (s.detach() if p.detach_reset else s)
        spikes.append(s)
        if return_v_seq:
            v_seq.append(u)
    return torch.stack(spikes), u, torch.stack(v_seq) if return_v_seq else None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Membrane arithmetic runs in float32 for half types, in the input's type otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_tau(tau: float) -> float:
    """τ as a Python float; any real number > 0 (NumPy's too) or ``math.inf``."""
    value = real(tau)
    if value is None or math.isnan(value) or value <= 0:
        raise ValueError(f"tau: expected a float > 0 (math.inf for no carry-over), got {tau!r}")
    return value


def check_parameters(p: ATMNParameters) -> None:
    """Raise if a field of ``p`` has the wrong type or shape (values: :func:`check_values`)."""
    if not isinstance(p, ATMNParameters):
        raise TypeError(f"p: expected ATMNParameters, got {type(p).__name__}")
    check_tau(p.tau)
    if not isinstance(p.surrogate, Surrogate):
        raise TypeError(
            f"surrogate: expected a spikemar.neurons.surrogate.Surrogate (ATMNParameters takes "
            f"a name too), got {type(p.surrogate).__name__}"
        )
    v = p.v_threshold
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v_threshold: expected a tensor, got {type(v).__name__}")
    if v.dim() > 1:
        raise ValueError(
            "v_threshold: expected a scalar or a 1-d per-channel tensor, "
            f"got shape {tuple(v.shape)}"
        )
    check_channels(v)


def check_input(
    x: torch.Tensor, name: str, min_dim: int, p: ATMNParameters | None = None, context: str = ""
) -> None:
    """Check type, dtype, device and rank of an input and that a per-channel V matches its last
    dimension. ``min_dim`` is 1 for one step [N, …] and 2 for a sequence [T, N, …]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.device.type == "meta":
        # a meta tensor has a shape but no values to spike on; torch would fail deep inside
        raise ValueError(f"{name}: expected a tensor with data, got a meta tensor {tuple(x.shape)}")
    if x.dim() < min_dim:
        layout = "[N, ...]" if min_dim == 1 else "[T, N, ...] (time first)"
        raise ValueError(
            f"{name}: {context}expected at least {min_dim} dimensions {layout}, "
            f"got shape {tuple(x.shape)}"
        )
    if p is None:
        return
    v = p.v_threshold
    if v.dim() == 1 and x.shape[-1] != v.shape[0]:
        raise ValueError(
            f"{name}: last dimension {x.shape[-1]} does not match the {v.shape[0]} per-channel "
            f"thresholds (shape {tuple(x.shape)})"
        )


def check_membrane(v: torch.Tensor | None, x_seq: torch.Tensor) -> None:
    """The initial membrane: None, or a floating tensor of one step of ``x_seq`` on its device
    (the fused kernels read it by raw pointer: a wrong size would read out of bounds)."""
    if v is None:
        return
    if not isinstance(v, torch.Tensor) or not v.is_floating_point():
        what = f"dtype {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__
        raise TypeError(f"v: expected None or a floating-point tensor, got {what}")
    if v.shape != x_seq.shape[1:]:
        raise ValueError(
            f"v: expected the membrane shape {tuple(x_seq.shape[1:])} of one step of x_seq, "
            f"got {tuple(v.shape)} (call reset() after changing the batch size)"
        )
    if v.device != x_seq.device:
        raise ValueError(f"v: expected a membrane on x_seq's device {x_seq.device}, got {v.device}")


def check_values(x_seq: torch.Tensor, u_last: torch.Tensor, p: ATMNParameters, v0=None) -> None:
    """Raise if V is not finite and positive, or if the input held NaN or ±inf.

    With τ < ∞ a non-finite value anywhere in ``x_seq`` (or in the initial membrane) reaches the
    final membrane and stays there, so checking ``u_last`` (N values, not T·N) is enough. The
    extremes of V and of the membrane come back in one transfer, so a CUDA caller waits for the
    device once per call; ``aminmax`` finds NaN and ±inf (NaN propagates through min/max)
    without the temporaries of ``isfinite``, which cost more than a fused forward on large inputs.
    On CUDA, :func:`spikemar.neurons.value_checks` can defer these checks (no wait per call).
    """
    from .checks import deferred_cuda_check

    probe = (u_last if not math.isinf(p.tau) else x_seq).detach()
    # V as the membrane arithmetic sees it (float32 for half inputs: a V of 1e5 or 1e-8 is
    # valid there though float16 cannot hold it)
    dtype = compute_dtype(probe.dtype)
    extremes = [*torch.aminmax(p.v_threshold.detach().to(dtype))]
    if probe.numel():
        extremes += [e.to(dtype) for e in torch.aminmax(probe)]
    if deferred_cuda_check(probe, extremes):
        return
    v_lo, v_hi, *u_range = torch.stack(extremes).tolist()
    if not (math.isfinite(v_lo) and math.isfinite(v_hi) and v_lo > 0):
        raise bad_threshold_error(p.v_threshold)
    if not all(math.isfinite(u) for u in u_range):
        raise nonfinite_error(x_seq, v0, p)


NONFINITE_INPUT_MESSAGE = (
    "x_seq: expected finite values, but the input (or the initial membrane v) holds NaN or inf"
)


def nonfinite_error(x_seq: torch.Tensor, v0: torch.Tensor | None, p: ATMNParameters) -> ValueError:
    """The error for a membrane that ended non-finite: the input's fault when it holds NaN or
    ±inf, else an overflow of the membrane (τ < 1 multiplies it by 1/τ > 1 every micro-step).
    Scans the input, so call it only once something is known to be wrong."""
    inputs_finite = bool(torch.isfinite(x_seq).all()) and (
        v0 is None or bool(torch.isfinite(v0).all())
    )
    if inputs_finite:
        T, dtype = x_seq.shape[0], compute_dtype(x_seq.dtype)
        return ValueError(
            f"tau: the membrane overflowed {str(dtype).removeprefix('torch.')} over the T = {T} "
            f"micro-steps from finite inputs: tau = {p.tau:g} < 1 multiplies it by "
            f"1/tau = {1 / p.tau:g} every micro-step (use tau >= 1, fewer micro-steps, or float64)"
            if p.tau < 1
            else f"x_seq: the membrane overflowed {str(dtype).removeprefix('torch.')} over the "
            f"T = {T} micro-steps from finite inputs (inputs too large for the dtype)"
        )
    return ValueError(NONFINITE_INPUT_MESSAGE)


def for_argument(err: ValueError, name: str) -> ValueError:
    """``err``, raised about the sequence ``x_seq`` that a caller built from its argument
    ``name`` (one step, a δ-injected activation), reworded to name that argument; other errors
    as they are."""
    text = str(err)
    if name == "x_seq" or isinstance(err, ThresholdError) or not text.startswith("x_seq: "):
        return err
    return ValueError(name + text.removeprefix("x_seq"))


class ThresholdError(ValueError):
    """A threshold V that is not finite and positive (see :func:`bad_threshold_error`)."""


def bad_threshold_error(v_threshold: torch.Tensor) -> ThresholdError:
    """The error for a threshold that is not finite and positive, naming the offending values.
    A module whose threshold was checked when built (``ATMN``) catches it and says instead that
    the threshold became bad (:func:`diverged_threshold_message`)."""
    values = v_threshold.detach().flatten()
    bad = values[~torch.isfinite(values) | (values <= 0)][:4].tolist()
    return ThresholdError(f"v_threshold: expected finite values > 0, got {bad}")


def diverged_threshold_message(bad: list[float]) -> str:
    shown = bad[0] if len(bad) == 1 else bad
    return (
        f"v_threshold became {shown} during training (V = exp(a) left the finite positive "
        "range: a diverged update? check the learning rate and the loss for NaN/inf)"
    )


def atmn_multi_step(
    x_seq: torch.Tensor,
    v: torch.Tensor | None,
    p: ATMNParameters,
    *,
    backend: str = "auto",
    return_v_seq: bool = False,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ATMN over the micro-steps of ``x_seq`` [T, N, …].

    Returns ``(spikes, v)`` with spikes of ``x_seq``'s shape and dtype and the final membrane
    ``v`` [N, …] (float32 for half inputs), or ``(spikes, v, v_seq)`` with the membrane after every
    micro-step [T, N, …] when ``return_v_seq``. ``v=None`` starts from a zero membrane.
    Types, shapes and devices are always checked; ``validate=False`` skips only the scan of
    values (NaN / ±inf, V ≤ 0) after the run (a backend whose kernel checks the values on the
    fly, like 'cpu', still raises on them).
    """
    from .backends import select_backend

    check_parameters(p)
    check_input(x_seq, "x_seq", 2, p)
    if x_seq.shape[0] == 0:
        raise ValueError(
            f"x_seq: expected at least one micro-step (T >= 1), got shape {tuple(x_seq.shape)}"
        )
    check_membrane(v, x_seq)
    cdtype = compute_dtype(x_seq.dtype)
    backend_ = select_backend(backend, x_seq, p)
    # V on x's device: the fused kernels read it through a raw pointer. Built with ``_make``, not
    # ``_replace``: under torch.compile a ``_replace``d ATMNParameters that lives across a graph
    # break comes back empty (torch 2.13's dynamo), and the next ``p.tau`` fails
    p = p._make((p.v_threshold.to(device=x_seq.device, dtype=cdtype), *p[1:]))
    v = None if v is None else v.to(cdtype)
    # a backend that reads and writes a 16-bit x itself is spared the widening copy of x and the
    # narrowing copy of the spikes
    native = x_seq.dtype in backend_.native_dtypes
    spikes, v_last, v_seq = backend_.impl(x_seq if native else x_seq.to(cdtype), v, p, return_v_seq)
    # a backend whose kernel checks the values as it goes raises the same errors itself and
    # spares this extra pass over the membrane
    if validate and not backend_.checks_values:
        check_values(x_seq, v_last, p, v)
    spikes = spikes.to(x_seq.dtype)
    return (spikes, v_last, v_seq) if return_v_seq else (spikes, v_last)


def atmn_step(
    x: torch.Tensor, v: torch.Tensor | None, p: ATMNParameters, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-step: input ``x`` [N, …], membrane ``v`` [N, …] → ``(s, v)``."""
    check_parameters(p)
    check_input(x, "x", 1, p)
    try:
        spikes, v = atmn_multi_step(x.unsqueeze(0), v, p, backend=backend)
    except ValueError as err:
        raise for_argument(err, "x") from None
    return spikes[0], v


def delta_inject(activation: torch.Tensor, T: int) -> torch.Tensor:
    """δ-injection: a static activation [N, …] → [T, N, …] with x_0 = activation, x_t = 0 after."""
    T = check_micro_steps(T)
    if not isinstance(activation, torch.Tensor):
        raise TypeError(f"activation: expected a torch.Tensor, got {type(activation).__name__}")
    shape = (T, *activation.shape)
    try:
        x_seq = activation.new_zeros(shape)
    except (RuntimeError, OverflowError) as err:  # the allocator's or the size's own error
        gib = T * activation.numel() * activation.element_size() / 2**30
        raise ValueError(
            f"T: {T} micro-steps of an activation of shape {tuple(activation.shape)} need "
            f"{gib:.3g} GiB for the injected input alone; expected a T that fits in memory"
        ) from err
    x_seq[0] = activation
    return x_seq


def check_micro_steps(T: int) -> int:
    """T as a Python int; any integral number >= 1 (NumPy's too)."""
    steps = integer(T)
    if steps is None or steps < 1:
        raise ValueError(f"T: expected an int >= 1 (number of micro-steps), got {T!r}")
    return steps


def atmn_decode(
    spikes: torch.Tensor, v_threshold: torch.Tensor | float, tau: float
) -> torch.Tensor:
    """Decode a spike train [T, N, …] to ``V · Σ_t τ^t s_t`` [N, …].

    The τ-weights are what δ-injection makes exact: a spike at micro-step t stands for V·τ^t of
    the injected activation (the membrane is divided by τ every step before it is compared).
    ``tau=math.inf`` (no carry-over) decodes the first step only. ``v_threshold`` is a float, a
    0-d tensor or a per-channel [C] tensor over the last dimension. Nothing here waits for a
    CUDA device: the weights are made on the spikes' device.
    """
    if not isinstance(spikes, torch.Tensor) or spikes.dim() < 2:
        shape = tuple(spikes.shape) if isinstance(spikes, torch.Tensor) else type(spikes).__name__
        raise ValueError(f"spikes: expected [T, N, ...] with at least 2 dimensions, got {shape}")
    tau = check_tau(tau)
    v_threshold = _threshold_tensor(v_threshold)
    if v_threshold.dim() == 1 and v_threshold.shape[0] != spikes.shape[-1]:
        raise ValueError(
            f"v_threshold: {v_threshold.shape[0]} per-channel thresholds do not match the last "
            f"dimension of spikes {tuple(spikes.shape)}"
        )
    # τ^t overflows float16 from t = 16 at τ = 2: weight and sum in the compute dtype
    dtype = compute_dtype(spikes.dtype) if spikes.is_floating_point() else torch.float32
    weights = decode_weights(spikes.shape[0], tau, dtype, spikes.device)
    # autocast would round this contraction to 16 bits (τ = 2, T > 8 loses spikes' weight)
    with torch.autocast(spikes.device.type, enabled=False):
        weighted = torch.tensordot(weights, spikes.to(dtype), dims=([0], [0]))
    out_dtype = spikes.dtype if spikes.is_floating_point() else dtype
    return (v_threshold.to(device=spikes.device, dtype=dtype) * weighted).to(out_dtype)


def decode_weights(T: int, tau: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The decode's weights τ^t, t < T, made on ``device`` (nothing waits for it): the power in
    float64 (Python's ``tau**t``), rounded once to ``dtype``; τ = ∞ weighs the first step only."""
    steps = torch.arange(T, dtype=torch.float64, device=device)
    if math.isinf(tau):
        return (steps == 0).to(dtype)
    return torch.pow(tau, steps).to(dtype)


def spike_counts(spikes: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """The +1 and −1 spikes of a spike train [T, …, C], as int64: ``[C, 2]`` per channel of the
    last dimension (``per_channel``), else ``[2]``; ``[..., 0]`` counts +1 spikes, ``[..., 1]``
    −1 spikes, over all micro-steps and rows. So nnz = pos + neg and Σ s = pos − neg.

    The reference for the fused spike points' ``counts=True`` output, which gives the same
    numbers without materialising the spike train (an energy counter's input)."""
    if not isinstance(spikes, torch.Tensor):
        raise TypeError(f"spikes: expected a torch.Tensor [T, ..., C], got {type(spikes).__name__}")
    if spikes.dim() < 1:
        raise ValueError(f"spikes: expected a tensor [T, ..., C], got shape {tuple(spikes.shape)}")
    flat = spikes.reshape(-1, spikes.shape[-1] if per_channel else 1)
    counts = torch.stack([(flat > 0).sum(0), (flat < 0).sum(0)], dim=-1)
    return counts if per_channel else counts[0]


def atmn_quantize(
    activation: torch.Tensor, T: int, p: ATMNParameters, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAR's spike point: δ-inject a static activation, spike for T micro-steps from a zero
    membrane, decode. Returns ``(decoded, spikes)``, ``decoded`` of the activation's shape and
    ``spikes`` [T, *activation.shape]. Gradients reach the activation and V through the surrogate.
    """
    check_parameters(p)
    check_input(activation, "activation", 1, p)
    # in the membrane's dtype (float32 for half types; the spikes are the same): the decode's
    # gradient reaches a spike train scaled by V·τ^t, which overflows float16 (τ = 3, T = 17)
    # where the fused kernels, which stay in float32, give a finite gradient
    x = activation.to(compute_dtype(activation.dtype))
    try:
        spikes, _ = atmn_multi_step(delta_inject(x, T), None, p, backend=backend)
    except ValueError as err:
        raise for_argument(err, "activation") from None
    decoded = atmn_decode(spikes, p.v_threshold, p.tau)
    return decoded.to(activation.dtype), spikes.to(activation.dtype)
