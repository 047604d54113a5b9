"""The CPU kernels' scaffolding is neuron-agnostic: a second neuron is its micro-step, an entry
point and a backend record.

This test writes a leaky integrate-and-fire neuron (SpikingJelly's ``LIFNode`` with
``decay_input=True``, ``v_reset=None`` soft reset, or a hard reset to 0) as that contract asks
(``_cpu/multistep.h``): the C below is the whole neuron. It is built with the backend's own
``build_library``, registered as a backend, and its forward compared with a PyTorch loop of the
same equations (spikes and membranes exactly) on fresh random inputs; blocks, padded tails,
threads, T > TC chunking and per-channel thresholds all come from the scaffolding ATMN uses.
Only the forward: a backward is the neuron's reverse micro-step, which ATMN writes in its own
_impl.h around the same group and block loops.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spikemar.neurons import backends, cpu_backend

pytestmark = pytest.mark.skipif(not cpu_backend.usable(), reason="no C compiler for the CPU kernel")

CPU_DIR = Path(cpu_backend.__file__).parent / "_cpu"
SCAFFOLDING = ("parallel.h", "simd.h", "multistep.h")

# the neuron: its parameters, its micro-step (variant 1: soft reset, 0: hard reset to 0), which
# value the non-finite probe reads, and an entry point that fills a job
LIF_C = r"""
#include "{dir}/parallel.h"
#define REAL float
#define SUFFIX f32
#include "{dir}/simd.h"

typedef struct {{ REAL tau; }} neuron_params_f32;

/* h = u + (x − u)/τ as SpikingJelly's LIFNode (decay_input, v_reset None); s = [h ≥ V] */
HOT VEC neuron_step_f32(VEC x, VEC *u, VEC V, const neuron_params_f32 *p, const int soft,
                        VEC *hout) {{
  const VEC h = *u + (x - *u) / p->tau;
  const VEC s = VSELECT(h >= V, VSPLAT(1));
  *hout = h;
  *u = soft ? h - V * s : VSELECT(h < V, h);
  return s;
}}
HOT int neuron_probes_input_f32(const neuron_params_f32 *p) {{ (void)p; return 0; }}

#include "{dir}/multistep.h"

int64_t lif_forward_f32(const REAL *x, const REAL *v0, const REAL *vth, int64_t T, int64_t N,
                        int64_t C, int64_t B, REAL tau, int soft, REAL *spikes, REAL *v_last,
                        REAL *v_seq, int nthreads) {{
  job_f32 j = {{0}};
  j.x = x; j.v0 = v0; j.vth = vth; j.spikes = spikes; j.v_last = v_last; j.v_seq = v_seq;
  j.T = T; j.N = N; j.C = C; j.B = B; j.p.tau = tau; j.variant = soft != 0;
  return neuron_forward_f32(&j, nthreads);
}}
"""


class LIFParameters(NamedTuple):
    v_threshold: torch.Tensor  # 0-d or [C] over the last dimension
    tau: float
    soft_reset: bool


def lif_reference(x_seq, v, p: LIFParameters, return_v_seq: bool):
    """The equations, one micro-step at a time (what the kernel must equal)."""
    u = torch.zeros_like(x_seq[0]) if v is None else v
    spikes, us = [], []
    for x in x_seq:
        h = u + (x - u) / p.tau
        s = (h >= p.v_threshold).to(x.dtype)
        u = h - p.v_threshold * s if p.soft_reset else torch.where(s > 0, torch.zeros_like(h), h)
        spikes.append(s)
        us.append(u)
    return torch.stack(spikes), u, (torch.stack(us) if return_v_seq else None)


@pytest.fixture(scope="module")
def lif_backend(tmp_path_factory):
    source = tmp_path_factory.mktemp("lif") / "lif.c"
    source.write_text(LIF_C.format(dir=CPU_DIR))
    lib = cpu_backend.build_library(source, tuple(CPU_DIR / name for name in SCAFFOLDING))
    fn = lib.lif_forward_f32
    p_, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    fn.argtypes = [p_, p_, p_, i64, i64, i64, i64, f32, i32, p_, p_, p_, i32]
    fn.restype = i64

    def lif_cpu(x_seq, v, p: LIFParameters, return_v_seq: bool):
        x = x_seq.contiguous()
        T, N = x.shape[0], x[0].numel()
        vth = p.v_threshold.to(x.dtype).contiguous()
        C = vth.numel() if vth.dim() == 1 else 0
        B = 2048 if C == 0 else C * max(1, 2048 // C)  # a block: whole rows of C channels
        spikes, v_last = torch.empty_like(x), torch.empty_like(x[0])
        v_seq = torch.empty_like(x) if return_v_seq else None
        ptr = [None if t is None else t.data_ptr() for t in (x, v, vth, spikes, v_last, v_seq)]
        bad = fn(ptr[0], ptr[1], ptr[2], T, N, C, B, p.tau, int(p.soft_reset), ptr[3], ptr[4],
                 ptr[5], 2)  # fmt: skip
        if bad:
            raise ValueError(f"x_seq: {bad} non-finite values or a bad threshold ({bad})")
        return spikes, v_last, v_seq

    def unusable(x, p):
        return None if x.dtype == torch.float32 and not x.requires_grad else "float32, no grad"

    record = backends.register_backend("lif-test", lif_cpu, unusable, device_type="cpu")
    yield record
    backends.unregister_backend("lif-test")


@settings(max_examples=30, deadline=None)
@given(
    T=st.integers(1, 11),
    shape=st.sampled_from([(1,), (7,), (33, 5), (3, 257), (2, 4099), (600, 16)]),
    tau=st.sampled_from([2.0, 1.5, 3.0, 10.0]),
    soft=st.booleans(),
    per_channel=st.booleans(),
    with_v0=st.booleans(),
    return_v_seq=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_second_neuron_on_the_scaffolding_equals_its_reference(
    lif_backend, T, shape, tau, soft, per_channel, with_v0, return_v_seq, seed
):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, *shape, generator=g) * 2
    V = torch.rand(shape[-1], generator=g) + 0.3 if per_channel else torch.tensor(0.7)
    v0 = torch.randn(*shape, generator=g) if with_v0 else None
    p = LIFParameters(V, tau, soft)
    impl = backends.select_backend("lif-test", x, p).impl
    out = impl(x, v0, p, return_v_seq)
    ref = lif_reference(x, v0, p, return_v_seq)
    assert torch.equal(out[0], ref[0])
    assert torch.equal(out[1], ref[1])
    if return_v_seq:
        assert torch.equal(out[2], ref[2])
    if x.numel() >= 200:
        assert out[0].sum() > 0  # the inputs do make it fire


def test_the_second_neuron_matches_spikingjelly_lifnode(lif_backend):
    """The real peer: SpikingJelly 2.0's LIFNode (soft reset, decay_input) on the same input."""
    neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
    x = torch.randn(6, 64, 100, generator=torch.Generator().manual_seed(1)) * 2
    peer = neuron.LIFNode(tau=2.0, v_threshold=0.7, v_reset=None, step_mode="m")
    with torch.no_grad():
        expected = peer(x)
    p = LIFParameters(torch.tensor(0.7), 2.0, True)
    spikes, _, _ = backends.select_backend("lif-test", x, p).impl(x, None, p, False)
    assert torch.equal(spikes, expected)


def test_a_backend_record_refuses_what_it_cannot_run(lif_backend):
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="lif-test"):
        backends.select_backend("lif-test", x, LIFParameters(torch.tensor(1.0), 2.0, True))
