"""The CPU kernels' scaffolding is neuron-agnostic: a second neuron is its micro-step forward and
backward, its entry points and a backend record.

This test writes a leaky integrate-and-fire neuron (SpikingJelly's ``LIFNode`` with
``decay_input=True``, ``v_reset=None`` soft reset, or a hard reset to 0) as the contract of
``_cpu/multistep.h`` asks: the C below is the whole neuron. Its reverse micro-step runs in the
same backward loops as ATMN's (recomputation of h, chunks, tails, per-channel dL/dV) and its
launches go through the same autograd Function (``fused.fused_multi_step``). It is built with
the backend's own ``build_library``, registered as a backend and compared with a PyTorch loop
of the same equations on fresh random inputs: spikes and membranes exactly, gradients (autograd
through the loop) to 1e-5; and with SpikingJelly's ``LIFNode`` itself.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spikemar.neurons import ATMNParameters, backends, cpu_backend, fused

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

#define NEURON_BACKWARD
#include "{dir}/multistep.h"

/* reverse micro-steps; surrogate ds/dh = 1 on |h − V| < 1/2. soft: u = h − V·s, hard: h·(1 − s) */
HOT void neuron_reverse_f32(const group_f32 *g, const REAL *hin, int64_t hstride, int64_t t0,
                            int64_t t1, const VEC *V, const VEC *iv, const neuron_params_f32 *p,
                            const int soft, VEC *gu, VEC *gv) {{
  (void)iv;
  const int64_t st = g->stride;
  for (int64_t t = t1 - 1; t >= t0; --t)
    for (int k = 0; k < GK; ++k) {{
      const VEC h = VLOAD(hin + t * hstride + k * VL);
      const VEC s = VSELECT(h >= V[k], VSPLAT(1));
      const VEC sg = VSELECT(VABS(h - V[k]) < (REAL)0.5, VSPLAT(1));
      const VEC gsp = g->g_spikes ? VLOAD(g->g_spikes + t * st + k * VL) : VSPLAT(0);
      const VEC gs = gsp - (soft ? V[k] : h) * gu[k];
      const VEC gh = (soft ? gu[k] : gu[k] * ((REAL)1 - s)) + gs * sg;
      gv[k] -= gs * sg + (soft ? gu[k] * s : VSPLAT(0));
      VSTORE(g->g_x + t * st + k * VL, gh / p->tau);
      gu[k] = gh - gh / p->tau;
      if (g->g_vseq && t > 0) gu[k] += VLOAD(g->g_vseq + (t - 1) * st + k * VL);
    }}
}}
DEFINE_REVERSE_LOOP(rev_hard_, 0, 0)
DEFINE_REVERSE_LOOP(rev_soft_, 1, 1)
static rev_fn_f32 neuron_reverse_for_f32(const neuron_params_f32 *p, int soft) {{
  (void)p;
  return soft ? rev_soft_f32 : rev_hard_f32;
}}

int64_t lif_forward_f32(const REAL *x, const REAL *v0, const REAL *vth, int64_t T, int64_t N,
                        int64_t C, int64_t B, REAL tau, int soft, REAL *spikes, REAL *v_last,
                        REAL *v_seq, int nthreads) {{
  job_f32 j = {{0}};
  j.x = x; j.v0 = v0; j.vth = vth; j.spikes = spikes; j.v_last = v_last; j.v_seq = v_seq;
  j.T = T; j.N = N; j.C = C; j.B = B; j.p.tau = tau; j.variant = soft != 0;
  return neuron_forward_f32(&j, nthreads);
}}

void lif_backward_f32(const REAL *x, const REAL *v0, const REAL *vth, int64_t T, int64_t N,
                      int64_t C, int64_t B, REAL tau, int soft, const REAL *g_spikes,
                      const REAL *g_vlast, const REAL *g_vseq, REAL *g_x, REAL *g_v0,
                      double *g_vth_partial, int nthreads) {{
  job_f32 j = {{0}};
  j.x = x; j.v0 = v0; j.vth = vth; j.g_spikes = g_spikes; j.g_vlast = g_vlast;
  j.g_vseq = g_vseq; j.g_x = g_x; j.g_v0 = g_v0; j.g_vth_partial = g_vth_partial;
  j.T = T; j.N = N; j.C = C; j.B = B; j.p.tau = tau; j.variant = soft != 0;
  neuron_backward_f32(&j, nthreads);
}}
"""


class LIFParameters(NamedTuple):
    v_threshold: torch.Tensor  # 0-d or [C] over the last dimension
    tau: float
    soft_reset: bool


class _Heaviside(torch.autograd.Function):
    """s = [z ≥ 0], ds/dz = 1 on |z| < 1/2 (the kernel's surrogate)."""

    @staticmethod
    def forward(ctx, z):  # type: ignore[override]
        ctx.save_for_backward(z)
        return (z >= 0).to(z.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return g * (z.abs() < 0.5).to(g.dtype)


def lif_reference(x_seq, v, p: LIFParameters, return_v_seq: bool):
    """The equations, one micro-step at a time, autograd for BPTT (what the kernels must equal)."""
    u = torch.zeros_like(x_seq[0]) if v is None else v
    spikes, us = [], []
    for x in x_seq:
        h = u + (x - u) / p.tau
        s = _Heaviside.apply(h - p.v_threshold)
        u = h - p.v_threshold * s if p.soft_reset else h * (1 - s)
        spikes.append(s)
        us.append(u)
    return torch.stack(spikes), u, (torch.stack(us) if return_v_seq else None)


class LIFKernels:
    """The launches of the C above, as ``fused.FusedKernels``: ``fused.fused_multi_step`` wraps
    them in the same autograd Function as ATMN's kernels (recomputation, nothing saved)."""

    dtypes = (torch.float32,)

    def __init__(self, lib: ctypes.CDLL) -> None:
        p_, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        self.fwd, self.bwd = lib.lif_forward_f32, lib.lif_backward_f32
        self.fwd.argtypes = [p_, p_, p_, i64, i64, i64, i64, f32, i32, p_, p_, p_, i32]
        self.fwd.restype = i64
        self.bwd.argtypes = [p_, p_, p_, i64, i64, i64, i64, f32, i32, *[p_] * 6, i32]
        self.bwd.restype = None

    @staticmethod
    def geometry(x, vth):
        T, N = x.shape[0], x[0].numel()
        C = vth.numel() if vth.dim() == 1 else 0
        B = 2048 if C == 0 else C * max(1, 2048 // C)  # a block: whole rows of C channels
        return T, N, C, B

    def forward(self, x, v0, vth, p, spikes, v_last, v_seq) -> None:
        T, N, C, B = self.geometry(x, vth)
        bad = self.fwd(_ptr(x), _ptr(v0), _ptr(vth), T, N, C, B, p.tau, int(p.soft_reset),
                       _ptr(spikes), _ptr(v_last), _ptr(v_seq), NTHREADS)  # fmt: skip
        if bad:
            raise ValueError(f"x_seq: non-finite values or a bad threshold (code {bad})")

    def backward(self, x, v0, vth, p, g_spikes, g_vlast, g_vseq, g_x, g_v0) -> torch.Tensor:
        T, N, C, B = self.geometry(x, vth)
        partial = torch.zeros(NTHREADS, B, dtype=torch.float64)  # per thread, per block slot
        self.bwd(_ptr(x), _ptr(v0), _ptr(vth), T, N, C, B, p.tau, int(p.soft_reset),
                 _ptr(g_spikes), _ptr(g_vlast), _ptr(g_vseq), _ptr(g_x), _ptr(g_v0),
                 _ptr(partial), NTHREADS)  # fmt: skip
        per_slot = partial.sum(0)
        return per_slot.sum() if C == 0 else per_slot.view(-1, C).sum(0)


NTHREADS = 2


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


@pytest.fixture(scope="module")
def lif_backend(tmp_path_factory):
    source = tmp_path_factory.mktemp("lif") / "lif.c"
    source.write_text(LIF_C.format(dir=CPU_DIR))
    lib = cpu_backend.build_library(source, tuple(CPU_DIR / name for name in SCAFFOLDING))
    kernels = LIFKernels(lib)

    def lif_cpu(x_seq, v, p: LIFParameters, return_v_seq: bool):
        return fused.fused_multi_step(kernels, x_seq, v, p, return_v_seq)

    def unusable(x, p):
        return None if x.dtype == torch.float32 and x.device.type == "cpu" else "float32 CPU"

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
    """Spikes and membranes exactly; gradients to x, v0 and V to 1e-5 (float32)."""
    g = torch.Generator().manual_seed(seed)
    # h = u + (x − u)/τ: inputs scaled with τ, so that a single micro-step at τ = 10 can reach V
    x = (torch.randn(T, *shape, generator=g) * 2 * tau).requires_grad_()
    V = torch.rand(shape[-1], generator=g) + 0.3 if per_channel else torch.tensor(0.7)
    V = V.requires_grad_()
    v0 = torch.randn(*shape, generator=g).requires_grad_() if with_v0 else None
    p = LIFParameters(V, tau, soft)
    weights = [torch.randn(t.shape, generator=g) for t in (x, x[0], x)]
    impl = backends.select_backend("lif-test", x, p).impl
    results = []
    for run in (impl, lif_reference):
        out = run(x, v0, p, return_v_seq)
        loss = sum((o * w).sum() for o, w in zip(out, weights, strict=False) if o is not None)
        inputs = [t for t in (x, v0, V) if t is not None]
        results.append((out, torch.autograd.grad(loss, inputs)))
    (out, grads), (ref, ref_grads) = results
    assert torch.equal(out[0], ref[0])
    assert torch.equal(out[1], ref[1])
    if return_v_seq:
        assert torch.equal(out[2], ref[2])
    if x.numel() >= 200:
        assert out[0].sum() > 0  # the inputs do make it fire
    for a, b in zip(grads, ref_grads, strict=True):
        tol = 1e-5 * max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=tol)


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
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="lif-test"):
        backends.select_backend("lif-test", x, LIFParameters(torch.tensor(1.0), 2.0, True))


def test_kernels_built_from_a_folder_equal_the_loaded_ones(tmp_path):
    """``build_kernels_from`` (what a before/after benchmark loads side by side) on this
    checkout's sources gives the library ``load_library`` gives; a folder without sources is
    named in the error."""
    lib = cpu_backend.build_kernels_from(CPU_DIR)
    x = torch.randn(3, 1000)
    vth = torch.tensor(0.5)
    out = [torch.empty_like(x), torch.empty(1000)]
    lib.atmn_forward_f32(x.data_ptr(), None, vth.data_ptr(), 3, 1000, 0, 2048, 0.5, 1,
                         out[0].data_ptr(), out[1].data_ptr(), None, 1)  # fmt: skip
    ref, v, _ = cpu_backend.atmn_multi_step_cpu(x, None, ATMNParameters(vth), False)
    assert torch.equal(out[0], ref) and torch.equal(out[1], v)
    with pytest.raises(FileNotFoundError, match="source_dir"):
        cpu_backend.build_kernels_from(tmp_path)
