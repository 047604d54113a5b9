"""spikemar.ssm.Linear's CPU kernel against F.linear on fresh random inputs: the fast path must
be invisible but for rounding, and everything it does not take must be F.linear itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spikemar.ssm import linear as lin
from spikemar.ssm.linear import MAX_FAST_ROWS, Linear, linear_cpu

pytestmark = pytest.mark.skipif(
    not lin._LIBRARY.usable(), reason="no C compiler for the CPU kernel"
)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 2 * MAX_FAST_ROWS + 3),
    k=st.integers(1, 70),
    n=st.integers(1, 45),
    bias=st.booleans(),
    double=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_kernel_equals_f_linear(rows, k, n, bias, double, seed):
    """Every shape: the vector body, K's tail, N's tail (not a multiple of 4), odd rows."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    x = torch.randn(rows, k, generator=g, dtype=dtype)
    w = torch.randn(n, k, generator=g, dtype=dtype)
    b = torch.randn(n, generator=g, dtype=dtype) if bias else None
    torch.testing.assert_close(linear_cpu(x, w, b), F.linear(x, w, b), **TOL[dtype])


@pytest.mark.parametrize("shape", [(1, 768, 3352), (8, 1536, 768), (3, 64, 50288 // 16)])
def test_model_shapes_across_threads(shape):
    """The 130 M Mamba-2's projection shapes; each output is one thread's sum in a fixed order,
    so the result is the same bits at any thread count."""
    m, k, n = shape
    x, w, b = torch.randn(m, k), torch.randn(n, k) / k**0.5, torch.randn(n)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear_cpu(x, w, b)
        torch.set_num_threads(2)
        two = linear_cpu(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    torch.testing.assert_close(two, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("double", [False, True])
def test_grouping_of_rows_does_not_change_a_bit(double, rows):
    """Each thread reads four parts of its share side by side (a row of each in one call):
    every output keeps its own order of sums, so the whole matrix at 1, 2 and 3 threads and each
    row of it alone give the same bits (K = 811: the vector body, one vector and 3 scalars of
    tail; N = 2053 rows: chunks of unequal length, parts that run out at different times; 3
    rows of x: a pair and an odd one)."""
    dtype = torch.float64 if double else torch.float32
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, 811, generator=g, dtype=dtype)
    w = torch.randn(2053, 811, generator=g, dtype=dtype) / 811**0.5
    b = torch.randn(2053, generator=g, dtype=dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(linear_cpu(x, w, b))
    finally:
        torch.set_num_threads(threads)
    alone = torch.cat([linear_cpu(x, w[i : i + 1], b[i : i + 1]) for i in range(0, 2053, 97)], 1)
    for r in results[1:]:
        assert torch.equal(r, results[0])
    assert torch.equal(results[0][:, ::97], alone)
    torch.testing.assert_close(results[0], F.linear(x, w, b), **TOL[dtype])


def test_module_is_nn_linear_with_its_state_dict():
    torch.manual_seed(0)
    ours = Linear(5, 7)
    ref = nn.Linear(5, 7)
    ref.load_state_dict(ours.state_dict())
    assert isinstance(ours, nn.Linear) and ours.state_dict().keys() == ref.state_dict().keys()
    for shape in ((1, 5), (3, 5), (MAX_FAST_ROWS, 5), (MAX_FAST_ROWS + 1, 5), (2, 3, 5)):
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def test_autograd_takes_f_linear():
    """With autograd recording the module is F.linear: gradients as nn.Linear's, to the bit."""
    torch.manual_seed(1)
    ours, ref = Linear(6, 4), nn.Linear(6, 4)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ours(x).square().sum().backward()
    ref(x2).square().sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(ours.weight.grad, ref.weight.grad)


def test_hooks_run_on_the_fast_path():
    seen = []
    m = Linear(3, 2)
    m.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        m(torch.randn(1, 3))
    assert seen == [(1, 2)]


def test_other_inputs_fall_back():
    """Non-contiguous input, bfloat16, mixed dtypes: the module gives F.linear's answer."""
    m = Linear(4, 3).double()
    x = torch.randn(4, 2, dtype=torch.float64).t()  # [2, 4], not contiguous
    with torch.no_grad():
        torch.testing.assert_close(m(x), F.linear(x, m.weight, m.bias))
        mb = Linear(4, 3).to(torch.bfloat16)
        xb = torch.randn(1, 4, dtype=torch.bfloat16)
        assert torch.equal(mb(xb), F.linear(xb, mb.weight, mb.bias))
        with pytest.raises(RuntimeError):  # F.linear's own dtype error, as nn.Linear gives
            Linear(4, 3)(torch.randn(1, 4, dtype=torch.float64))


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(2, 3), torch.randn(4, 5)), r"weight: expected shape \[N, 3\]"),
        ((torch.randn(2, 3), torch.randn(4, 3), torch.randn(5)), r"bias: expected shape \(4,\)"),
        ((torch.randn(2, 3).half(), torch.randn(4, 3)), "x: expected a float32/float64 CPU"),
        ((torch.randn(2, 3), torch.randn(4, 3).double()), "weight: dtype torch.float64 differs"),
        (([1.0, 2.0], torch.randn(4, 3)), "x: expected a float32/float64 CPU tensor, got list"),
    ],
)
def test_linear_cpu_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        linear_cpu(*args)


def test_benchmark_prints_a_row_per_row_count(load_script, capsys):
    """benchmarks/bench_linear.py's quick configuration runs in-process: one Markdown row per
    row count, every cell a number. No timing assertions: speed lives in benchmarks/."""
    bench = load_script("benchmarks/bench_linear.py")
    assert bench.main(["--quick", "--rows", "1", "3", "--threads", "1"]) == 0
    rows = [
        line for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and "---" not in line
    ][1:]  # fmt: skip
    assert [r.split(" | ")[0] for r in rows] == ["| 1", "| 3"]
    for row in rows:
        cells = [c.strip() for c in row.strip("| ").split(" | ")]
        assert len(cells) == 9 and all(float(c) > 0 for c in cells)
