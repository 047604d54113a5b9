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

from .surrogate import Rectangle, Surrogate

__all__ = [
    "ATMNParameters",
    "atmn_decode",
    "atmn_multi_step",
    "atmn_quantize",
    "atmn_step",
    "delta_inject",
    "spike_function",
]


class ATMNParameters(NamedTuple):
    """Parameters of the ATMN dynamics.

    v_threshold: V > 0, a 0-d tensor (shared) or a 1-d tensor over the last input dimension.
    tau: membrane time constant τ > 0; the carried membrane is divided by τ each micro-step.
        ``math.inf`` carries nothing over (the single-step baseline).
    ternary: spikes in {−1, 0, +1}; False gives the binary {0, 1} baseline.
    surrogate: the surrogate gradient of the firing function.
    detach_reset: stop the gradient through the reset term ``V·s_t`` (as SpikingJelly's option).
    smooth: replace the firing step by the surrogate's smooth primitive in the forward pass.
        Only for testing gradients (``gradcheck``); spikes are then not in {−1, 0, +1}.
    """

    v_threshold: torch.Tensor
    tau: float = 2.0
    ternary: bool = True
    surrogate: Surrogate = Rectangle()
    detach_reset: bool = False
    smooth: bool = False


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
    if isinstance(tau, bool) or not isinstance(tau, int | float) or math.isnan(tau) or tau <= 0:
        raise ValueError(f"tau: expected a float > 0 (math.inf for no carry-over), got {tau!r}")
    return float(tau)


def check_parameters(p: ATMNParameters) -> None:
    """Raise if a field of ``p`` has the wrong type or shape (values: :func:`check_values`)."""
    check_tau(p.tau)
    v = p.v_threshold
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v_threshold: expected a tensor, got {type(v).__name__}")
    if v.dim() > 1:
        raise ValueError(
            "v_threshold: expected a scalar or a 1-d per-channel tensor, "
            f"got shape {tuple(v.shape)}"
        )


def check_input(
    x: torch.Tensor, name: str, min_dim: int, p: ATMNParameters | None = None, context: str = ""
) -> None:
    """Check type, dtype and rank of an input and that a per-channel V matches its last
    dimension. ``min_dim`` is 1 for one step [N, …] and 2 for a sequence [T, N, …]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
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


def check_values(x_seq: torch.Tensor, u_last: torch.Tensor, p: ATMNParameters) -> None:
    """Raise if V is not finite and positive, or if the input held NaN or ±inf.

    With τ < ∞ a non-finite value anywhere in ``x_seq`` (or in the initial membrane) reaches the
    final membrane and stays there, so checking ``u_last`` (N values, not T·N) is enough. The
    extremes of V and of the membrane come back in one transfer, so a CUDA caller waits for the
    device once per call; ``aminmax`` finds NaN and ±inf (NaN propagates through min/max)
    without the temporaries of ``isfinite``, which cost more than a fused forward on large inputs.
    """
    probe = (u_last if not math.isinf(p.tau) else x_seq).detach()
    v = p.v_threshold.detach().to(probe.dtype)
    extremes = [*torch.aminmax(v)]
    if probe.numel():
        extremes += [*torch.aminmax(probe)]
    v_lo, v_hi, *u_range = torch.stack(extremes).tolist()
    if not (math.isfinite(v_lo) and math.isfinite(v_hi) and v_lo > 0):
        raise bad_threshold_error(v)
    if not all(math.isfinite(u) for u in u_range):
        raise ValueError(NONFINITE_INPUT_MESSAGE)


NONFINITE_INPUT_MESSAGE = (
    "x_seq: expected finite values, but the input (or the initial membrane v) holds NaN or inf"
)


def bad_threshold_error(v_threshold: torch.Tensor) -> ValueError:
    """The error for a threshold that is not finite and positive, naming the offending values."""
    values = v_threshold.detach().flatten()
    bad = values[~torch.isfinite(values) | (values <= 0)]
    return ValueError(f"v_threshold: expected finite values > 0, got {bad[:4].tolist()}")


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
    ``validate=False`` skips the checks of types, shapes and values (a backend whose kernel
    checks the values on the fly, like 'cpu', still raises on NaN or ±inf).
    """
    from .backends import resolve_backend

    if validate:
        check_parameters(p)
        check_input(x_seq, "x_seq", 2, p)
        if x_seq.shape[0] == 0:
            raise ValueError(
                f"x_seq: expected at least one micro-step (T >= 1), got shape {tuple(x_seq.shape)}"
            )
    cdtype = compute_dtype(x_seq.dtype)
    if v is not None and validate and v.shape != x_seq.shape[1:]:
        raise ValueError(
            f"v: expected the membrane shape {tuple(x_seq.shape[1:])} of one step of x_seq, "
            f"got {tuple(v.shape)} (call reset() after changing the batch size)"
        )
    impl = resolve_backend(backend, x_seq, p)
    p = p._replace(v_threshold=p.v_threshold.to(cdtype))
    v = None if v is None else v.to(cdtype)
    # a backend that reads and writes a 16-bit x itself (``impl.native_dtypes``) is spared the
    # widening copy of x and the narrowing copy of the spikes
    native = x_seq.dtype in getattr(impl, "native_dtypes", ())
    spikes, v_last, v_seq = impl(x_seq if native else x_seq.to(cdtype), v, p, return_v_seq)
    # a backend whose kernel checks the values as it goes (``impl.checks_values``) raises the
    # same errors itself and spares this extra pass over the membrane
    if validate and not getattr(impl, "checks_values", False):
        check_values(x_seq, v_last, p)
    spikes = spikes.to(x_seq.dtype)
    return (spikes, v_last, v_seq) if return_v_seq else (spikes, v_last)


def atmn_step(
    x: torch.Tensor, v: torch.Tensor | None, p: ATMNParameters, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-step: input ``x`` [N, …], membrane ``v`` [N, …] → ``(s, v)``."""
    check_input(x, "x", 1)
    spikes, v = atmn_multi_step(x.unsqueeze(0), v, p, backend=backend)
    return spikes[0], v


def delta_inject(activation: torch.Tensor, T: int) -> torch.Tensor:
    """δ-injection: a static activation [N, …] → [T, N, …] with x_0 = activation, x_t = 0 after."""
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T: expected an int >= 1 (number of micro-steps), got {T!r}")
    if not isinstance(activation, torch.Tensor):
        raise TypeError(f"activation: expected a torch.Tensor, got {type(activation).__name__}")
    x_seq = activation.new_zeros((T, *activation.shape))
    x_seq[0] = activation
    return x_seq


def atmn_decode(spikes: torch.Tensor, v_threshold: torch.Tensor, tau: float) -> torch.Tensor:
    """Decode a spike train [T, N, …] to ``V · Σ_t τ^t s_t`` [N, …].

    The τ-weights are what δ-injection makes exact: a spike at micro-step t stands for V·τ^t of
    the injected activation (the membrane is divided by τ every step before it is compared).
    ``tau=math.inf`` (no carry-over) decodes the first step only.
    """
    if not isinstance(spikes, torch.Tensor) or spikes.dim() < 2:
        shape = tuple(spikes.shape) if isinstance(spikes, torch.Tensor) else type(spikes).__name__
        raise ValueError(f"spikes: expected [T, N, ...] with at least 2 dimensions, got {shape}")
    T = spikes.shape[0]
    # τ^t overflows float16 from t = 16 at τ = 2: weight and sum in the compute dtype
    dtype = compute_dtype(spikes.dtype)
    if math.isinf(tau):
        weights = torch.zeros(T, dtype=dtype, device=spikes.device)
        weights[0] = 1.0
    else:
        weights = torch.tensor([tau**t for t in range(T)], dtype=dtype, device=spikes.device)
    weighted = torch.tensordot(weights, spikes.to(dtype), dims=([0], [0]))
    return (v_threshold.to(dtype) * weighted).to(spikes.dtype)


def atmn_quantize(
    activation: torch.Tensor, T: int, p: ATMNParameters, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAR's spike point: δ-inject a static activation, spike for T micro-steps from a zero
    membrane, decode. Returns ``(decoded, spikes)``, ``decoded`` of the activation's shape and
    ``spikes`` [T, *activation.shape]. Gradients reach the activation and V through the surrogate.
    """
    spikes, _ = atmn_multi_step(delta_inject(activation, T), None, p, backend=backend)
    return atmn_decode(spikes, p.v_threshold, p.tau).to(activation.dtype), spikes
