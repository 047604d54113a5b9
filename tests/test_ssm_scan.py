"""The selective scan: chunked SSD == one-step loop == naive recurrence, values and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spikemar.ssm import default_chunk_size, ssd_scan, ssd_scan_naive, ssd_step

F64 = torch.float64


def make_inputs(
    batch: int = 2,
    L: int = 37,
    heads: int = 4,
    head_dim: int = 5,
    state: int = 3,
    groups: int | None = None,
    dtype: torch.dtype = F64,
    decay: float = 0.5,
    initial_state: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """Random inputs in Mamba-2's shapes; head_dim ≠ state so that a transposed state shows."""
    g = torch.Generator().manual_seed(seed)
    groups = heads if groups is None else groups
    a = -decay * torch.rand(batch, L, heads, generator=g, dtype=F64) * 2
    out = {
        "x": torch.randn(batch, L, heads, head_dim, generator=g, dtype=F64),
        "a": a,
        "B": torch.randn(batch, L, groups, state, generator=g, dtype=F64),
        "C": torch.randn(batch, L, groups, state, generator=g, dtype=F64),
        "initial_state": torch.randn(batch, heads, head_dim, state, generator=g, dtype=F64)
        if initial_state
        else None,
    }
    return {k: None if v is None else v.to(dtype) for k, v in out.items()}


def step_loop(x, a, B, C, initial_state=None):
    state, ys = initial_state, []
    for t in range(x.shape[1]):
        y_t, state = ssd_step(x[:, t], a[:, t], B[:, t], C[:, t], state)
        ys.append(y_t)
    return torch.stack(ys, 1), state


def grads(fn, inputs, weights, **kw):
    """Gradients of <y, wy> + <final, wf> w.r.t. every tensor input (a random weighted sum)."""
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if v is not None}
    y, final = fn(**leaves, **kw)
    loss = (y * weights[0]).sum() + (final * weights[1]).sum()
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))


def weights_for(inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, B = inputs["x"], inputs["B"]
    wy = torch.randn(x.shape, generator=g, dtype=F64).to(x.dtype)
    b, _, h, p = x.shape
    wf = torch.randn(b, h, p, B.shape[-1], generator=g, dtype=F64).to(x.dtype)
    return wy, wf


def assert_close(actual, expected, rtol=1e-10, atol=1e-10):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# -- values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [1, 7, 64, 65, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_step_loop_equals_naive(L, with_state):
    inputs = make_inputs(L=L, initial_state=with_state)
    y_ref, h_ref = ssd_scan_naive(**inputs)
    y_step, h_step = step_loop(**inputs)
    assert_close(y_step, y_ref)
    assert_close(h_step, h_ref)
    for chunk_size in (1, 5, 16, 64, 200):
        y, h = ssd_scan(**inputs, chunk_size=chunk_size)
        assert y.shape == inputs["x"].shape and y.is_contiguous()
        assert h.shape == h_ref.shape
        assert_close(y, y_ref)
        assert_close(h, h_ref)


@pytest.mark.parametrize(
    "head_dim, state, expected",
    [(1, 1, 4), (16, 16, 16), (64, 64, 64), (64, 16, 32), (512, 512, 128)],
)
def test_default_chunk_size(head_dim, state, expected):
    assert default_chunk_size(head_dim, state) == expected


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    L=st.integers(1, 80),
    heads_groups=st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (6, 3)]),
    head_dim=st.integers(1, 6),
    state=st.integers(1, 6),
    chunk_size=st.integers(1, 40),
    with_state=st.booleans(),
    decay=st.sampled_from([0.01, 0.5, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_naive_property(
    batch, L, heads_groups, head_dim, state, chunk_size, with_state, decay, seed
):
    heads, groups = heads_groups
    inputs = make_inputs(
        batch, L, heads, head_dim, state, groups, decay=decay, initial_state=with_state, seed=seed
    )
    y_ref, h_ref = ssd_scan_naive(**inputs)
    y, h = ssd_scan(**inputs, chunk_size=chunk_size)
    assert_close(y, y_ref)
    assert_close(h, h_ref)


def test_groups_broadcast_like_mamba2():
    """B, C with g groups == the same B, C repeated so that head i reads group i // (heads / g)."""
    inputs = make_inputs(heads=6, groups=2, initial_state=True)
    y, h = ssd_scan(**inputs, chunk_size=8)
    per_head = dict(inputs)
    per_head["B"] = inputs["B"].repeat_interleave(3, dim=2)
    per_head["C"] = inputs["C"].repeat_interleave(3, dim=2)
    y2, h2 = ssd_scan(**per_head, chunk_size=8)
    assert_close(y, y2)
    assert_close(h, h2)
    y_step, h_step = step_loop(**inputs)
    assert_close(y_step, y)
    assert_close(h_step, h)


@pytest.mark.parametrize("split", [1, 16, 30, 63])
def test_carrying_final_state_splits_a_sequence(split):
    inputs = make_inputs(L=64, initial_state=True)
    y, h = ssd_scan(**inputs, chunk_size=16)
    first = {k: v[:, :split] for k, v in inputs.items() if k != "initial_state"}
    second = {k: v[:, split:] for k, v in inputs.items() if k != "initial_state"}
    y1, h1 = ssd_scan(**first, initial_state=inputs["initial_state"], chunk_size=16)
    y2, h2 = ssd_scan(**second, initial_state=h1, chunk_size=16)
    assert_close(torch.cat([y1, y2], 1), y)
    assert_close(h2, h)


def test_step_continues_a_prompt():
    """Generation: scan a prompt, then step token by token from its final state."""
    inputs = make_inputs(L=40)
    y, h = ssd_scan(**inputs, chunk_size=16)
    _, state = ssd_scan(**{k: v[:, :25] if v is not None else v for k, v in inputs.items()})
    for t in range(25, 40):
        y_t, state = ssd_step(*(inputs[k][:, t] for k in "xaBC"), state)
        assert_close(y_t, y[:, t])
    assert_close(state, h)


def test_step_from_none_equals_step_from_zeros():
    inputs = make_inputs(L=1)
    x, a, B, C = (inputs[k][:, 0] for k in "xaBC")
    zeros = x.new_zeros(*x.shape, B.shape[-1])
    for got, want in zip(ssd_step(x, a, B, C, None), ssd_step(x, a, B, C, zeros), strict=True):
        assert_close(got, want)


def test_non_contiguous_inputs():
    inputs = make_inputs(L=33, heads=4, head_dim=5, initial_state=True)
    # the same values behind other strides: a transposed copy read back through a transpose
    odd = {k: v.transpose(0, -1).contiguous().transpose(0, -1) for k, v in inputs.items()}
    odd["x"] = torch.cat([inputs["x"], inputs["x"]], dim=-1)[..., :5]
    assert not odd["x"].is_contiguous() and not odd["B"].is_contiguous()
    for got, want in zip(ssd_scan(**odd, chunk_size=8), ssd_scan_naive(**inputs), strict=True):
        assert_close(got, want)


# -- gradients -------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [1, 7, 64, 65, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_gradients_equal_naive(L, with_state):
    inputs = make_inputs(L=L, initial_state=with_state, groups=2)
    w = weights_for(inputs)
    ref = grads(ssd_scan_naive, inputs, w)
    for chunk_size in (4, 64):
        got = grads(ssd_scan, inputs, w, chunk_size=chunk_size)
        assert got.keys() == ref.keys()
        for name in ref:
            assert_close(got[name], ref[name], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("needs", [("x",), ("a",), ("B",), ("C",), ("initial_state",), ("a", "C")])
def test_gradients_of_some_inputs_only(needs):
    inputs = make_inputs(L=21, initial_state=True)
    w = weights_for(inputs)
    ref = grads(ssd_scan_naive, inputs, w)
    leaves = {k: v.detach().requires_grad_(k in needs) for k, v in inputs.items()}
    y, h = ssd_scan(**leaves, chunk_size=8)
    got = torch.autograd.grad((y * w[0]).sum() + (h * w[1]).sum(), [leaves[k] for k in needs])
    for name, g in zip(needs, got, strict=True):
        assert_close(g, ref[name], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("use", ["y", "final_state"])
def test_gradients_through_one_output_only(use):
    inputs = make_inputs(L=19, initial_state=True)
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    results = []
    for fn, kw in ((ssd_scan_naive, {}), (ssd_scan, {"chunk_size": 8})):
        y, h = fn(**leaves, **kw)
        out = y if use == "y" else h
        # the final state does not depend on C: no gradient (naive) or a zero one (chunked)
        g = torch.autograd.grad(out.pow(2).sum(), list(leaves.values()), allow_unused=True)
        results.append(
            [
                torch.zeros_like(v) if d is None else d
                for v, d in zip(leaves.values(), g, strict=True)
            ]
        )
    for got, want in zip(results[1], results[0], strict=True):
        assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_gradcheck_tiny():
    inputs = make_inputs(batch=1, L=5, heads=2, head_dim=3, state=2, initial_state=True)
    inputs["a"] = inputs["a"] - 0.1  # stay ≤ 0 under gradcheck's perturbations
    names = list(inputs)
    leaves = [inputs[k].detach().requires_grad_() for k in names]

    def fn(*args):
        return ssd_scan(**dict(zip(names, args, strict=True)), chunk_size=2)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6)


def test_double_backward_is_refused_clearly():
    leaves = {k: v.requires_grad_() for k, v in make_inputs(L=9).items() if v is not None}
    y, _ = ssd_scan(**leaves)
    with pytest.raises(RuntimeError, match=r"differentiable once.*ssd_scan_naive"):
        torch.autograd.grad(y.sum(), leaves["x"], create_graph=True)
    # the reference is differentiable twice
    y, _ = ssd_scan_naive(**leaves)
    (gx,) = torch.autograd.grad((y**2).sum(), leaves["x"], create_graph=True)
    assert gx.requires_grad


# -- float32, numerics -----------------------------------------------------------------------------


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("pattern", ["uniform", "strong_then_weak"])
def test_float32_close_to_float64_naive(pattern):
    inputs = make_inputs(L=200, heads=2, head_dim=8, state=8, initial_state=True)
    if pattern == "strong_then_weak":
        # a strong decay at each chunk start, then almost none: large |A| with small differences,
        # the case where plain float32 cumulative sums would lose digits
        a = -0.001 * torch.rand_like(inputs["a"])
        a[:, ::64] = -30.0
        a[:, 1::64] = -5.0
        inputs["a"] = a
    w = weights_for(inputs)
    y64, h64 = ssd_scan_naive(**inputs)
    g64 = grads(ssd_scan_naive, inputs, w)
    inputs32 = {k: v.float() for k, v in inputs.items()}
    y, h = ssd_scan(**inputs32, chunk_size=64)
    assert y.dtype == h.dtype == torch.float32
    assert rel_err(y, y64) < 2e-6
    assert rel_err(h, h64) < 2e-6
    g32 = grads(ssd_scan, inputs32, (w[0].float(), w[1].float()), chunk_size=64)
    for name in g64:
        # ∂/∂a sums many terms that cancel (see the module docstring): a looser bound
        assert rel_err(g32[name], g64[name]) < (1e-4 if name == "a" else 1e-5), name


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_strong_decay_long_sequence_is_finite(dtype):
    inputs = make_inputs(
        batch=1, L=3000, heads=2, head_dim=4, state=4, dtype=dtype, initial_state=True
    )
    inputs["a"] = torch.full_like(inputs["a"], -30.0)
    inputs["a"][:, 1000:2000] = -1e-4  # strong, then almost none, then strong again
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    y, h = ssd_scan(**leaves)
    (y.sum() + h.sum()).backward()
    for t in (y, h, *(v.grad for v in leaves.values())):
        assert torch.isfinite(t).all()
    # with e^-30 ≈ 1e-13 the state forgets at once: y_t ≈ (C_t·B_t) x_t
    inputs = {k: v.detach() for k, v in inputs.items()}
    y = y.detach()
    CB = (inputs["C"] * inputs["B"]).sum(-1, keepdim=True)
    torch.testing.assert_close(y[:, :1000], (CB * inputs["x"])[:, :1000], rtol=1e-5, atol=1e-5)
    y_ref, _ = ssd_scan_naive(**{k: v.double() for k, v in inputs.items()})
    assert rel_err(y, y_ref) < (1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_huge_finite_decay_forgets_at_once(dtype):
    inputs = make_inputs(L=70, initial_state=True, dtype=dtype)
    inputs["a"][:, ::3] = -torch.finfo(dtype).max  # finite, but Q·a would overflow
    y, h = ssd_scan(**inputs, chunk_size=16)
    y_ref, h_ref = ssd_scan_naive(**inputs)
    # float64 has no hi/lo pair: A_t − A_s next to a −1000 step loses ~1000·Q·ε (relative 1e-11)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(h, h_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_in_float32(dtype):
    inputs = make_inputs(L=50, initial_state=True)
    y32, h32 = ssd_scan(**{k: v.to(dtype).float() for k, v in inputs.items()})
    y, h = ssd_scan(**{k: v.to(dtype) for k, v in inputs.items()})
    assert y.dtype == h.dtype == dtype
    assert_close(y, y32.to(dtype), rtol=0, atol=0)
    assert_close(h, h32.to(dtype), rtol=0, atol=0)


def test_autocast_runs_the_scan_in_float32_or_wider_and_keeps_gradients():
    inputs = make_inputs(L=40, initial_state=True, dtype=torch.float32)
    inputs["B"] = inputs["B"].bfloat16()  # what a projection hands over under autocast
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = ssd_scan(**leaves)
    assert y.dtype == h.dtype == torch.float32
    y_ref, h_ref = ssd_scan(**{k: v.float() for k, v in inputs.items()})
    assert_close(y, y_ref, rtol=0, atol=0)
    assert_close(h, h_ref, rtol=0, atol=0)
    (y.sum() + h.sum()).backward()
    assert leaves["B"].grad.dtype == torch.bfloat16 and leaves["x"].grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ssd_scan(**make_inputs(L=5))[0].dtype == torch.float64  # never narrower


# -- bad inputs ------------------------------------------------------------------------------------


def call_with(**changes):
    inputs = make_inputs(L=6, heads=4, groups=2, initial_state=True)
    inputs.update(changes)
    return ssd_scan(**inputs)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (
            {"x": torch.zeros(2, 6, 4, dtype=F64)},
            ValueError,
            r"x must be 4-d .* got shape \(2, 6, 4\)",
        ),
        ({"a": torch.zeros(2, 6, 4, 1, dtype=F64)}, ValueError, r"a must be 3-d"),
        ({"B": torch.zeros(2, 6, 3, dtype=F64)}, ValueError, r"B must be 4-d"),
        ({"a": torch.zeros(3, 6, 4, dtype=F64)}, ValueError, r"a must have shape .*\(2, 6, 4\)"),
        ({"a": torch.zeros(2, 5, 4, dtype=F64)}, ValueError, r"a must have shape"),
        ({"a": torch.zeros(2, 6, 3, dtype=F64)}, ValueError, r"a must have shape"),
        ({"B": torch.zeros(1, 6, 2, 3, dtype=F64)}, ValueError, r"B .* leading dims must match"),
        ({"C": torch.zeros(2, 7, 2, 3, dtype=F64)}, ValueError, r"C .* leading dims must match"),
        ({"B": torch.zeros(2, 6, 3, 3, dtype=F64)}, ValueError, r"B has 3 heads/groups.*4 heads"),
        ({"C": torch.zeros(2, 6, 2, 4, dtype=F64)}, ValueError, r"B and C must have the same"),
        (
            {"initial_state": torch.zeros(2, 4, 5, 4, dtype=F64)},
            ValueError,
            r"initial_state must have shape .*\(2, 4, 5, 3\).* got \(2, 4, 5, 4\)",
        ),
        ({"x": torch.zeros(2, 6, 4, 5, dtype=torch.int64)}, TypeError, r"x must be a floating"),
        ({"a": torch.zeros(2, 6, 4, dtype=torch.int32)}, TypeError, r"a must be a floating"),
        ({"B": torch.zeros(2, 6, 2, 3, dtype=torch.float32)}, TypeError, r"B has dtype"),
        ({"C": [[0.0]]}, TypeError, r"C must be a torch.Tensor"),
        (
            {
                k: torch.zeros(s, dtype=F64)
                for k, s in [("x", (2, 0, 4, 5)), ("a", (2, 0, 4)), ("B", (2, 0, 2, 3))]
            }
            | {"C": torch.zeros(2, 0, 2, 3, dtype=F64)},
            ValueError,
            r"L = 0",
        ),
    ],
)
def test_bad_inputs_name_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        call_with(**changes)


@pytest.mark.parametrize("value", [0.5, float("nan"), float("-inf"), float("inf")])
def test_decay_must_be_finite_and_not_positive(value):
    a = make_inputs(L=6, heads=4, groups=2)["a"]
    a[1, 3, 2] = value
    with pytest.raises(
        ValueError, match=r"a \(log decay\) must be finite and ≤ 0, but 1 of 48 .* a\[1, 3, 2\] = "
    ):
        call_with(a=a)
    inputs = make_inputs(L=6, heads=4, groups=2)
    with pytest.raises(ValueError, match=r"a \(log decay\)"):
        ssd_scan_naive(**(inputs | {"a": a}))
    with pytest.raises(ValueError, match=r"a_t \(log decay\)"):
        ssd_step(inputs["x"][:, 3], a[:, 3], inputs["B"][:, 3], inputs["C"][:, 3], None)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None"):
        ssd_scan(**make_inputs(L=6), chunk_size=chunk_size)


def test_step_bad_inputs_name_the_argument():
    inputs = make_inputs(L=1, heads=4, groups=2)
    x, a, B, C = (inputs[k][:, 0] for k in "xaBC")
    with pytest.raises(ValueError, match=r"x_t must be 3-d"):
        ssd_step(x[0], a, B, C, None)
    with pytest.raises(ValueError, match=r"a_t must have shape"):
        ssd_step(x, a[:, :3], B, C, None)
    with pytest.raises(ValueError, match=r"C_t has 3 heads/groups"):
        ssd_step(x, a, B, C.new_zeros(2, 3, 3), None)
    with pytest.raises(ValueError, match=r"state must have shape .*\(2, 4, 5, 3\)"):
        ssd_step(x, a, B, C, x.new_zeros(2, 4, 3, 5))
    with pytest.raises(TypeError, match=r"state has dtype"):
        ssd_step(x, a, B, C, torch.zeros(2, 4, 5, 3))


# -- other devices ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    inputs = make_inputs(L=130, heads=4, head_dim=16, state=8, initial_state=True)
    w = weights_for(inputs)
    ref = grads(ssd_scan, inputs, w, chunk_size=32)
    cuda = {k: v.cuda() for k, v in inputs.items()}
    got = grads(ssd_scan, cuda, (w[0].cuda(), w[1].cuda()), chunk_size=32)
    for name in ref:
        assert_close(got[name].cpu(), ref[name])
    for got_t, want_t in zip(ssd_scan(**cuda), ssd_scan_naive(**inputs), strict=True):
        assert_close(got_t.cpu(), want_t)
