"""The ATMN module as a SpikingJelly / norse user drives it from outside: edge cases found by
probing the public API (each test failed before its fix)."""

import pytest
import torch

from spikemar.neurons import ATMN


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_torch_compile_runs_the_module_as_eager(backend):
    # a graph break inside atmn_multi_step (the backend's call, the value check's .tolist())
    # once handed the rest of the function an empty ATMNParameters: IndexError on p.tau
    torch._dynamo.reset()
    x_seq = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    eager = ATMN(v_threshold=0.4, num_channels=5, step_mode="m", backend=backend)
    compiled = ATMN(v_threshold=0.4, num_channels=5, step_mode="m", backend=backend)
    xe, xc = x_seq.clone().requires_grad_(), x_seq.clone().requires_grad_()
    weights = torch.arange(x_seq.numel(), dtype=torch.float32).view_as(x_seq)
    se, sc = eager(xe), torch.compile(compiled, backend="eager")(xc)
    (se * weights).sum().backward()
    (sc * weights).sum().backward()
    assert torch.equal(se, sc)
    assert torch.equal(eager.v, compiled.v)
    torch.testing.assert_close(xe.grad, xc.grad)
    torch.testing.assert_close(eager.a.grad, compiled.a.grad)
