r"""The selective state-space scan of Mamba-2 (SSD), chunked for training, one step for generation.

For every batch element and head, with the state h_t a [head_dim, state] matrix:

.. math::
    h_t = e^{a_t} h_{t-1} + x_t \otimes B_t, \qquad y_t = h_t C_t, \qquad h_{-1} = h_0,

with x_t ∈ ℝ^P (``head_dim``), B_t, C_t ∈ ℝ^N (``state``), and a_t ≤ 0 the log decay
(Mamba-2's ``A·Δt``). Shapes follow Mamba-2: ``x`` [batch, L, heads, P], ``a`` [batch, L, heads],
``B``, ``C`` [batch, L, heads, N]; ``y`` [batch, L, heads, P]; states [batch, heads, P, N].

**Chunked form** (the SSD algorithm, Dao & Gu 2024, as in their ``ssd_minimal_discrete``). Cut
the sequence into chunks of Q tokens. Inside chunk k, let A_t = a_{kQ} + … + a_t (log decay from
the chunk start), Ā_k the value at the chunk's end, and H_k the state entering the chunk. Then

.. math::
    y_t = \underbrace{\sum_{s \le t} (C_t \cdot B_s)\, e^{A_t - A_s} x_s}_{\text{intra-chunk}}
        + \underbrace{e^{A_t} H_k C_t}_{\text{from the state}},

which is four steps, all batched matrix products over (chunk, batch, head):

1. intra-chunk: Y = (C Bᵀ ∘ Λ) X with Λ_ts = e^{A_t − A_s} for s ≤ t and 0 above the diagonal
   (the "segment sum" decay matrix, Q × Q);
2. chunk states: S_k = Xᵀ diag(w) B with w_s = e^{Ā_k − A_s}, what chunk k adds to the state;
3. inter-chunk recurrence: H_{k+1} = e^{Ā_k} H_k + S_k, H_0 = ``initial_state``; the final state
   is H_K;
4. state to output: Y += diag(e^{A}) C H_kᵀ.

The work is O(L·(Q·(N + P) + N·P)), more than the O(L·N·P) of the recurrence, but it is done in
matrix products of size Q, which is what a CPU or GPU runs fast, and only the L/Q chunk states are
stepped one after the other.

**Numerics.** Every exponent is a log decay over a forward stretch of time, so it is ≤ 0: no
exp of a positive number is ever formed and nothing overflows, whatever the decay (a = −30 or a
million tokens; a < −1000 counts as −1000, whose exponential is 0 in every float format). Λ is
built as e^{min(A_t − A_s, 0)} and then masked to the lower triangle. The
in-chunk cumulative sums are taken in float64 and, for float32 inputs, carried as a float32
pair (hi + lo) so that the differences A_t − A_s lose nothing to cancellation when |A| is large
(a strong decay early in a chunk and a weak one later): Λ is then correct to float32 rounding.

**Backward** is written by hand (one custom autograd function) as the same products reversed;
the inter-chunk recurrence runs backwards, G_K = ∂ℓ/∂h_final, G_k = (∂ℓ/∂H_k)_local + e^{Ā_k}
G_{k+1}. The gradient with respect to the decays needs no Q × Q work at all, because shifting
the cumulative decay A_t (over the whole sequence) by ε scales every output at t by e^ε and every
input at t by e^{−ε}:

.. math::
    \frac{\partial \ell}{\partial A_t} = \langle \bar y_t, y_t \rangle - \langle x_t, \bar x_t
    \rangle + [t = L-1]\, \langle \bar h_{\text{final}}, h_{\text{final}} \rangle, \qquad
    \frac{\partial \ell}{\partial a_t} = \sum_{u \ge t} \frac{\partial \ell}{\partial A_u},

with ȳ, x̄ the gradients of y and x. The reverse cumulative sum is taken in float64. Gradients are
first order only: a backward with ``create_graph=True`` raises; :func:`ssd_scan_naive` is
differentiable to any order.

**Groups.** ``B`` and ``C`` may have fewer heads than ``x`` (Mamba-2's ``ngroups``):
[batch, L, groups, N] with heads % groups == 0, head i using group i // (heads // groups), as in
Mamba-2. They are broadcast to the heads (no saving in compute).

:func:`ssd_scan_naive` is the definition of correct: the recurrence above, one token at a time.
:func:`ssd_step` is one token of it with O(1) state, for generation.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .._numbers import integer
from ..neurons import checks

__all__ = ["default_chunk_size", "ssd_scan", "ssd_scan_naive", "ssd_step"]

# float16 and bfloat16 are computed in float32 and cast back
_LOW_PRECISION = (torch.float16, torch.bfloat16)


# -- the definition -------------------------------------------------------------------------------


def ssd_scan_naive(
    x: Tensor, a: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The scan one token at a time, exactly as the equations read: the reference.

    Same arguments and results as :func:`ssd_scan`. O(L) sequential steps: use it for tests and
    for double backward, not for training.
    """
    _check_inputs(x, a, B, C, initial_state, step=False)
    B, C = _broadcast_groups(B, x.shape[2]), _broadcast_groups(C, x.shape[2])
    batch, L, heads, head_dim = x.shape
    h = initial_state
    if h is None:
        h = x.new_zeros(batch, heads, head_dim, B.shape[-1])
    ys = []
    for t in range(L):
        # h_t = exp(a_t) h_{t-1} + x_t ⊗ B_t;  y_t = h_t C_t
        h = torch.exp(a[:, t])[..., None, None] * h + x[:, t, :, :, None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    return torch.stack(ys, dim=1), h


def ssd_step(
    x_t: Tensor, a_t: Tensor, B_t: Tensor, C_t: Tensor, state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One token of the scan, for generation: O(1) state.

    Args:
        x_t: [batch, heads, head_dim].
        a_t: [batch, heads], log decay ≤ 0.
        B_t, C_t: [batch, heads, state] or [batch, groups, state] with heads % groups == 0.
        state: [batch, heads, head_dim, state], the state after the previous token (the
            ``final_state`` of :func:`ssd_scan` on the prompt), or None for zeros.

    Returns:
        (y_t [batch, heads, head_dim], the new state). Feeding a sequence token by token gives
        the same ``y`` and final state as :func:`ssd_scan` on the whole of it.
    """
    _check_inputs(x_t, a_t, B_t, C_t, state, step=True)
    heads = x_t.shape[1]
    B_t, C_t = _broadcast_groups(B_t, heads, dim=1), _broadcast_groups(C_t, heads, dim=1)
    new_state = x_t[..., :, None] * B_t[..., None, :]
    if state is not None:
        new_state = torch.addcmul(new_state, torch.exp(a_t)[..., None, None], state)
    y_t = torch.einsum("bhpn,bhn->bhp", new_state, C_t)
    return y_t, new_state


# -- the fast path --------------------------------------------------------------------------------


def default_chunk_size(head_dim: int, state: int) -> int:
    """The chunk size Q that :func:`ssd_scan` uses unless told: √(head_dim·state) as a power of
    two, within [4, 128].

    Per token the Q × Q work grows like Q·(head_dim + state) and the chunk-state work (the state
    tensors, the sequential steps) like head_dim·state/Q; Q ≈ √(head_dim·state) balances them.
    Measured (benchmarks/bench_scan.py --chunk-sizes …, batch 4, L 1024, 2 CPU threads, forward
    + backward), the fastest Q within noise: head_dim = state = 1: 2–4 (64 is 6× slower);
    16: 8–32; 64: 32–64; 128: 64–128.
    """
    q = 2 ** round(math.log2(max(1.0, math.sqrt(head_dim * state))))
    return min(128, max(4, q))


def ssd_scan(
    x: Tensor,
    a: Tensor,
    B: Tensor,
    C: Tensor,
    initial_state: Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The selective scan h_t = exp(a_t)·h_{t−1} + x_t ⊗ B_t, y_t = h_t·C_t, chunked (SSD).

    Args:
        x: [batch, L, heads, head_dim], L ≥ 1, any length (not only multiples of the chunk).
        a: [batch, L, heads], log decay per token and head; must be ≤ 0 and finite (raises
            otherwise: a positive value would make the state grow without bound).
        B: [batch, L, heads, state], or [batch, L, groups, state] with heads % groups == 0
            (broadcast to the heads as in Mamba-2's ``ngroups``).
        C: like ``B``.
        initial_state: [batch, heads, head_dim, state] or None (zeros): h_{−1}.
        chunk_size: tokens per chunk Q (capped at L); None: :func:`default_chunk_size` (64 for
            head_dim = state = 64). Results do not depend on it beyond rounding; speed does.

    Returns:
        (y [batch, L, heads, head_dim], final_state [batch, heads, head_dim, state]).
        ``final_state`` is h_{L−1}: pass it as ``initial_state`` of the next segment, or as the
        ``state`` of :func:`ssd_step`, to continue the sequence.

    float32 and float64 are computed in their own precision; float16 and bfloat16 in float32, cast
    back. All inputs must share one dtype and device. Differentiable (first order; a backward
    with ``create_graph=True`` raises) with respect to every input, including ``initial_state``.
    Under autocast (where projections hand over bfloat16 beside float32) the scan runs with
    autocast off in the widest of the inputs' dtypes and float32, as Mamba's does.
    """
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type):
        given = [t for t in (x, a, B, C, initial_state) if isinstance(t, Tensor)]
        wide = functools.reduce(torch.promote_types, (t.dtype for t in given), torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            x, a, B, C, initial_state = (
                t.to(wide) if isinstance(t, Tensor) else t for t in (x, a, B, C, initial_state)
            )
            return ssd_scan(x, a, B, C, initial_state, chunk_size=chunk_size)
    _check_inputs(x, a, B, C, initial_state, step=False)
    if chunk_size is None:
        chunk_size = default_chunk_size(x.shape[3], B.shape[3])
    if integer(chunk_size) is None or chunk_size < 1:  # NumPy's ints as Python's
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    chunk_size = integer(chunk_size)
    heads = x.shape[2]
    B, C = _broadcast_groups(B, heads), _broadcast_groups(C, heads)
    dtype = x.dtype
    if dtype in _LOW_PRECISION:
        x, a, B, C = (t.float() for t in (x, a, B, C))
        initial_state = None if initial_state is None else initial_state.float()
    y, final_state = _ChunkedScan.apply(x, a, B, C, initial_state, min(chunk_size, x.shape[1]))
    return y.to(dtype), final_state.to(dtype)


def _to_chunks(t: Tensor, Q: int, n_chunks: int) -> Tensor:
    """[batch, L, heads, *rest] → [chunks, batch, heads, Q, *rest], contiguous, zero-padded."""
    batch, L, heads, *rest = t.shape
    out = t.new_empty(n_chunks, batch, heads, Q, *rest)
    perm = (1, 0, 3, 2, *range(4, 4 + len(rest)))
    full = L // Q
    if full:
        out[:full].copy_(t[:, : full * Q].unflatten(1, (full, Q)).permute(perm))
    if L > full * Q:
        tail = L - full * Q
        out[full, :, :, tail:].zero_()
        out[full, :, :, :tail].copy_(t[:, full * Q :].transpose(1, 2))
    return out


def _from_chunks(t: Tensor, L: int) -> Tensor:
    """Inverse of :func:`_to_chunks`: [chunks, batch, heads, Q, *rest] → [batch, L, heads, *rest]"""
    _, batch, heads, Q, *rest = t.shape
    out = t.new_empty(batch, L, heads, *rest)
    perm = (1, 0, 3, 2, *range(4, 4 + len(rest)))
    full = L // Q
    if full:
        out[:, : full * Q].unflatten(1, (full, Q)).copy_(t[:full].permute(perm))
    if L > full * Q:
        out[:, full * Q :].transpose(1, 2).copy_(t[full, :, :, : L - full * Q])
    return out


def _mats(t: Tensor) -> Tensor:
    """Flatten the leading (chunk, batch, head) dims: a batch of matrices for ``torch.bmm``."""
    return t.view(-1, *t.shape[-2:])


def _segsum_exp(a_chunks: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Λ_ts = exp(A_t − A_s) for s ≤ t else 0, and A, from the chunked log decays [..., Q]."""
    Q = a_chunks.shape[-1]
    # e^-1000 is 0 in every float format: a below −1000 acts as −1000, so that Q·a stays finite
    cum = a_chunks.to(torch.float64).clamp_min_(-1000.0).cumsum(-1)
    hi = cum.to(dtype)
    Lam = hi[..., :, None] - hi[..., None, :]
    if dtype != torch.float64:  # add back what rounding the cumulative sums to float32 dropped
        lo = (cum - hi.to(torch.float64)).to(dtype)
        Lam.add_(lo[..., :, None]).sub_(lo[..., None, :])
    # above the diagonal A_t − A_s ≥ 0: clamp so that exp never sees a positive number, then mask
    Lam.clamp_max_(0.0).exp_()
    Lam.view(-1, Q, Q).tril_()
    return Lam, cum


class _ChunkedScan(torch.autograd.Function):
    """SSD forward and its hand-written backward, on validated float32/float64 inputs."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, x: Tensor, a: Tensor, B: Tensor, C: Tensor, h0: Tensor | None, Q: int
    ) -> tuple[Tensor, Tensor]:
        batch, L, heads, P = x.shape
        N = B.shape[-1]
        K = -(-L // Q)  # chunks
        ctx.set_materialize_grads(False)
        xs, Bs, Cs = _to_chunks(x, Q, K), _to_chunks(B, Q, K), _to_chunks(C, Q, K)
        Lam, cum = _segsum_exp(_to_chunks(a, Q, K), x.dtype)  # [K, b, h, Q, Q], [K, b, h, Q]
        decay_in = torch.exp(cum).to(x.dtype)  # e^{A_t}: from the chunk start to t
        decay_out = torch.exp(cum[..., -1:] - cum).to(x.dtype)  # w_s = e^{Ā − A_s}: s to the end
        decay_chunk = torch.exp(cum[..., -1]).to(x.dtype)  # e^{Ā_k}  [K, b, h]

        # 1. intra-chunk mixing matrix M = C Bᵀ ∘ Λ
        M = torch.bmm(_mats(Cs), _mats(Bs).transpose(1, 2)).mul_(_mats(Lam))
        # 2. chunk states S_k = Xᵀ diag(w) B, written straight into H[1:]
        H = x.new_empty(K + 1, batch, heads, P, N)  # H[k]: state entering chunk k; H[K]: final
        Bw = Bs * decay_out[..., None]
        torch.bmm(_mats(xs).transpose(1, 2), _mats(Bw), out=_mats(H[1:]))
        del Bw
        # 3. inter-chunk recurrence H_{k+1} = e^{Ā_k} H_k + S_k, in place
        if h0 is None:
            H[0].zero_()
        else:
            H[0].copy_(h0)
        for k in range(K):
            H[k + 1].addcmul_(H[k], decay_chunk[k, :, :, None, None])
        # 4. state to output, plus the intra-chunk part: Y = diag(e^A) C H_kᵀ + M X
        Y = torch.bmm(_mats(Cs), _mats(H[:K]).transpose(1, 2))
        Y.mul_(decay_in.view(-1, Q, 1)).baddbmm_(M, _mats(xs))
        y = _from_chunks(Y.view(K, batch, heads, Q, P), L)
        ctx.L = L
        final = H[K].clone()

        ctx.save_for_backward(xs, Bs, Cs, Lam, M, H, Y, decay_in, decay_out, decay_chunk)
        return y, final

    @staticmethod
    def backward(
        ctx: FunctionCtx, dy: Tensor | None, dfinal: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: refuse rather than return a constant
            raise RuntimeError(
                "ssd_scan is differentiable once (its backward is hand-written); for higher-order "
                "gradients use spikemar.ssm.ssd_scan_naive"
            )
        xs, Bs, Cs, Lam, M, H, Y, decay_in, decay_out, decay_chunk = ctx.saved_tensors
        need_x, need_a, need_B, need_C, need_h0, _ = ctx.needs_input_grad
        K, batch, heads, Q, P = xs.shape
        N, L = Bs.shape[-1], ctx.L
        if dy is None:
            dY = torch.zeros_like(Y)
        else:
            dY = _mats(_to_chunks(dy, Q, K))

        # 4. Y_off = diag(e^A) C Hᵀ  →  dC, and the local gradient of each chunk's entering state
        dC = torch.bmm(dY, _mats(H[:K])).mul_(decay_in.view(-1, Q, 1)) if need_C else None
        G = torch.empty_like(H)  # G[k] = ∂ℓ/∂H_k, so dS_k = G[k + 1]
        dY_in = dY * decay_in.view(-1, Q, 1)
        torch.bmm(dY_in.transpose(1, 2), _mats(Cs), out=_mats(G[:K]))
        del dY_in
        # 3. the recurrence backwards: G_k = (∂ℓ/∂H_k)_local + e^{Ā_k} G_{k+1}, G_K = ∂ℓ/∂final
        if dfinal is None:
            G[K].zero_()
        else:
            G[K].copy_(dfinal)
        for k in range(K - 1, -1, -1):
            G[k].addcmul_(G[k + 1], decay_chunk[k, :, :, None, None])
        dS = _mats(G[1:])
        w = decay_out.view(-1, Q, 1)
        # 2. S = Xᵀ diag(w) B
        dB = torch.bmm(_mats(xs), dS).mul_(w) if need_B else None
        dX = None
        if need_x or need_a:
            dX = torch.bmm(_mats(Bs), dS.transpose(1, 2)).mul_(w)
            # 1. Y_diag = M X
            dX.baddbmm_(M.transpose(1, 2), dY)
        if need_B or need_C:
            dG = torch.bmm(dY, _mats(xs).transpose(1, 2)).mul_(_mats(Lam))  # ∂ℓ/∂(C Bᵀ)
            if need_C:
                dC.baddbmm_(dG, _mats(Bs))
            if need_B:
                dB.baddbmm_(dG.transpose(1, 2), _mats(Cs))
            del dG

        grad_x = grad_a = grad_B = grad_C = grad_h0 = None
        if need_x:
            grad_x = _from_chunks(dX.view(K, batch, heads, Q, P), L)
        if need_a:
            # ∂ℓ/∂A_t = <ȳ_t, y_t> − <x_t, x̄_t> (+ <h̄_final, h_final> at the end), then a = ΔA;
            # dY and dX are spent: multiply in place
            dA = dY.mul_(Y).sum(-1).to(torch.float64)
            dA -= dX.mul_(_mats(xs)).sum(-1)
            dA = _from_chunks(dA.view(K, batch, heads, Q), L)
            if dfinal is not None:
                dA[:, -1] += torch.linalg.vecdot(dfinal.flatten(-2), H[K].flatten(-2))
            grad_a = dA.flip(1).cumsum(1).flip(1).to(xs.dtype)
        if need_B:
            grad_B = _from_chunks(dB.view(K, batch, heads, Q, N), L)
        if need_C:
            grad_C = _from_chunks(dC.view(K, batch, heads, Q, N), L)
        if need_h0:
            grad_h0 = G[0].clone()
        return grad_x, grad_a, grad_B, grad_C, grad_h0, None


# -- checks ---------------------------------------------------------------------------------------


def _broadcast_groups(t: Tensor, heads: int, dim: int = 2) -> Tensor:
    """B or C with `groups` heads → `heads` heads (a view); head i reads group i // (heads/g)."""
    groups = t.shape[dim]
    if groups == heads:
        return t
    t = t.unsqueeze(dim + 1)
    shape = list(t.shape)
    shape[dim + 1] = heads // groups
    return t.expand(shape).flatten(dim, dim + 1)


def _check_inputs(
    x: Tensor, a: Tensor, B: Tensor, C: Tensor, state: Tensor | None, *, step: bool
) -> None:
    """The scan's arguments (``step=False``: [batch, L, …], the state is ``initial_state``) or one
    step's (``step=True``: [batch, …], names ``x_t``, ``a_t``, …, the state is ``state``): one set
    of rules, so that the scan and its step accept the same inputs token for token. Only the
    scan scans x, B and C for NaN/inf: a step runs once per generated token, and that value
    check (a reduction and a host sync) would cost on every one."""
    if step:
        suffix, state_name, lead_names = "_t", "state", "batch"
    else:
        suffix, state_name, lead_names = "", "initial_state", "batch, L"
    names = [name + suffix for name in "xaBC"]
    _check_tensors(**dict(zip(names, (x, a, B, C), strict=True)), **{state_name: state})
    n_lead = 1 if step else 2
    bc_dims = f"[{lead_names}, heads or groups, state]"
    for name, t, rank, dims in (
        ("x", x, n_lead + 2, f"[{lead_names}, heads, head_dim]"),
        ("a", a, n_lead + 1, f"[{lead_names}, heads]"),
        ("B", B, n_lead + 2, bc_dims),
        ("C", C, n_lead + 2, bc_dims),
    ):
        if t.dim() != rank:
            raise ValueError(f"{name}{suffix} must be {rank}-d {dims}, got shape {tuple(t.shape)}")
    lead, (heads, head_dim) = tuple(x.shape[:n_lead]), x.shape[n_lead:]
    if heads == 0 or head_dim == 0 or B.shape[-1] == 0:
        raise ValueError(
            f"x{suffix} {tuple(x.shape)} and B{suffix} {tuple(B.shape)}: heads, head_dim and "
            "state must be >= 1"
        )
    if not step and x.shape[1] == 0:
        raise ValueError(f"x has length L = 0 (shape {tuple(x.shape)}); the scan needs L ≥ 1")
    if a.shape != (*lead, heads):
        raise ValueError(
            f"a{suffix} must have shape [{lead_names}, heads] = {(*lead, heads)} to match "
            f"x{suffix} {tuple(x.shape)}, got {tuple(a.shape)}"
        )
    _check_bc(B, C, lead, heads, bc_dims, x, suffix=suffix)
    if state is not None:
        want = (lead[0], heads, head_dim, B.shape[-1])
        if state.shape != want:
            raise ValueError(
                f"{state_name} must have shape [batch, heads, head_dim, state] = {want}, "
                f"got {tuple(state.shape)}"
            )
    check_decay(a, "a" + suffix)
    if not step:
        check_finite(x=x, B=B, C=C)


def check_finite(**tensors: Tensor) -> None:
    """Each tensor finite: one reduction per tensor and one host sync when all is well (the
    scan would spread a NaN over the rest of the sequence and every later state)."""
    flags = torch.stack([torch.isfinite(t).all() for t in tensors.values()])
    first = next(iter(tensors.values()))
    if first.is_cuda and _deferred(~flags.all(), f"{', '.join(tensors)} must be finite, but NaN or "
                                   f"inf reached the scan on {first.device} since the last "
                                   "raise_deferred_errors()"):  # fmt: skip
        return
    if bool(flags.all()):
        return
    for (name, t), ok in zip(tensors.items(), flags.tolist(), strict=True):
        if not ok:
            index = tuple((~torch.isfinite(t)).nonzero()[0].tolist())
            raise ValueError(
                f"{name} must be finite, but {name}[{', '.join(map(str, index))}] = "
                f"{float(t[index])} (shape {tuple(t.shape)})"
            )


def _deferred(bad: Tensor, message: str) -> bool:
    """For a check of CUDA values: True when the value-check mode takes it (deferred into a
    device flag, or off), False when the caller checks at once ('eager')."""
    mode = checks.get_value_checks()
    if mode == "eager":
        return False
    if mode == "deferred":
        checks.defer_error(bad, message)
    return True


def _check_tensors(**tensors: Tensor | None) -> None:
    """Tensors, floating, one dtype, one device; the first named is the reference."""
    ref_name, ref = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t is None and name in ("initial_state", "state"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor (float32 or float64), got {t.dtype}"
            )
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_bc(
    B: Tensor, C: Tensor, lead: tuple[int, ...], heads: int, dims: str, x: Tensor, suffix: str = ""
) -> None:
    x_name = "x" + suffix
    for name, t in (("B" + suffix, B), ("C" + suffix, C)):
        nl = len(lead)
        if tuple(t.shape[:nl]) != lead:
            raise ValueError(
                f"{name} {dims} has shape {tuple(t.shape)}; its leading dims must match "
                f"{x_name} {tuple(x.shape)}: {lead}"
            )
        groups = t.shape[nl]
        if groups < 1 or heads % groups:
            raise ValueError(
                f"{name} has {groups} heads/groups (shape {tuple(t.shape)}) but {x_name} has "
                f"{heads} heads; the number of groups must divide the number of heads"
            )
    if B.shape != C.shape:
        raise ValueError(
            f"B{suffix} and C{suffix} must have the same shape, got {tuple(B.shape)} and "
            f"{tuple(C.shape)}"
        )


def check_decay(a: Tensor, name: str = "a") -> None:
    """a ≤ 0 and finite (NaN fails ``a <= 0``): one reduction and one host sync when all is well.
    On CUDA the neurons' value-check mode applies (:mod:`spikemar.neurons.checks`): 'deferred'
    folds the outcome into a device flag that ``raise_deferred_errors()`` reads (no sync here),
    'off' skips the check."""
    bad = ~((a <= 0) & (a > float("-inf")))
    if a.is_cuda and _deferred(bad.any(), f"{name} (log decay) must be finite and ≤ 0, but "
                               f"values that are not reached the scan on {a.device} since the "
                               "last raise_deferred_errors()"):  # fmt: skip
        return
    if bool(bad.any()):
        index = tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"{name} (log decay) must be finite and ≤ 0, but {int(bad.sum())} of {a.numel()} "
            f"values are not, e.g. {name}[{', '.join(map(str, index))}] = {a[index].item()}. "
            "Use a = A·Δt with A < 0 and Δt > 0, e.g. a = −softplus(·)"
        )
