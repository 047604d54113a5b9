// Fused CUDA kernels for ATMN, compiled by CuPy (spikemar/neurons/cupy_backend.py).
// The equations are those of spikemar/neurons/functional.py; the PyTorch loop there is the
// reference these must equal, and the C kernels in ../_cpu/atmn_impl.h are their CPU twin.
//
//   h_t = x_t + d*u_{t-1}  (d = 1/tau)   s_t = [h_t >= V] - tern*[h_t <= -V]   u_t = h_t - V*s_t
//
// One thread per neuron (grid-stride). x, spikes and gradients are [T, N] contiguous; v0, v_last
// [N]. Pointers arrive as integers; 0 means: v0 a zero membrane, g_* zero gradients, g_v0 and
// v_seq not wanted. The backward recomputes h_t into a per-thread array of MAX_T entries (set at
// compile time, >= T) from x and v0, so the forward saves nothing.
//
// Types: S is how x, the spikes and their gradients are stored (float, double, or the 16-bit
// half_t / bf16_t); R is the arithmetic type (float for the 16-bit types, as functional.py's
// compute_dtype), in which the membrane, its sequence, the threshold and their gradients are
// stored. A 16-bit x is widened exactly, so spikes and membranes equal the reference's (which
// widens x to float32 first); gradients are rounded to S once, round-to-nearest-even, as the
// reference's cast back does. The 16-bit conversions are written out (bit operations and one PTX
// cvt) so that NVRTC needs no CUDA header.

typedef unsigned long long ptr_t;

struct half_t {
  unsigned short bits;
};
struct bf16_t {
  unsigned short bits;
};

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(half_t v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
}
__device__ __forceinline__ float widen(bf16_t v) {
  return __uint_as_float(((unsigned int)v.bits) << 16);
}

template <typename S>
__device__ __forceinline__ S narrow(float v);
template <typename S>
__device__ __forceinline__ S narrow(double v);
template <>
__device__ __forceinline__ float narrow<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double narrow<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ half_t narrow<half_t>(float v) {
  half_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
  return h;
}
template <>
__device__ __forceinline__ bf16_t narrow<bf16_t>(float v) {
  // round to nearest even on the upper 16 bits; NaN stays a (quiet) NaN
  const unsigned int u = __float_as_uint(v);
  bf16_t b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.bits = (unsigned short)((u >> 16) | 0x0040u);
  } else {
    b.bits = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return b;
}

// pa, pb: the surrogate's parameters as spikemar/neurons/fused.py surrogate_code computes them
template <typename R>
__device__ __forceinline__ R surrogate(R z, int kind, R pa, R pb) {
  switch (kind) {
    case 0:  // rectangle: pa = width/2, pb = 1/width
      return (z < pa && z > -pa) ? pb : R(0);
    case 1: {  // triangle: pa = half-width, divided as the reference divides
      R v = R(1) - fabs(z) / pa;
      return v > R(0) ? v / pa : R(0);
    }
    case 2: {  // sigmoid: pa = alpha
      R sg = R(1) / (R(1) + exp(-pa * z));
      return pa * sg * (R(1) - sg);
    }
    default: {  // atan: pa = pi/2*alpha, pb = alpha/2
      R kz = pa * z;
      return pb / (R(1) + kz * kz);
    }
  }
}

template <typename S, typename R>
__device__ __forceinline__ void forward_impl(ptr_t x_, ptr_t v0_, ptr_t vth_, long long T,
                                             long long N, long long C, R d, int ternary,
                                             ptr_t s_, ptr_t vlast_, ptr_t vseq_) {
  const S* __restrict__ x = reinterpret_cast<const S*>(x_);
  const R* __restrict__ v0 = reinterpret_cast<const R*>(v0_);
  const R* __restrict__ vth = reinterpret_cast<const R*>(vth_);
  S* __restrict__ spikes = reinterpret_cast<S*>(s_);
  R* __restrict__ v_last = reinterpret_cast<R*>(vlast_);
  R* __restrict__ v_seq = reinterpret_cast<R*>(vseq_);
  const R tern = ternary ? R(1) : R(0);
  for (long long n = blockIdx.x * (long long)blockDim.x + threadIdx.x; n < N;
       n += (long long)blockDim.x * gridDim.x) {
    const R V = vth[C == 0 ? 0 : n % C];
    R u = v0 ? v0[n] : R(0);
    for (long long t = 0; t < T; ++t) {
      const R h = R(widen(x[t * N + n])) + d * u;
      const R s = R(h >= V) - tern * R(h <= -V);
      spikes[t * N + n] = narrow<S>(s);
      u = h - V * s;
      if (v_seq) v_seq[t * N + n] = u;
    }
    v_last[n] = u;
  }
}

template <typename S, typename R>
__device__ __forceinline__ void backward_impl(ptr_t x_, ptr_t v0_, ptr_t vth_, long long T,
                                              long long N, long long C, R d, int ternary,
                                              int detach_reset, int kind, R pa, R pb,
                                              ptr_t gs_, ptr_t gvlast_, ptr_t gvseq_, ptr_t gx_,
                                              ptr_t gv0_, ptr_t gvth_) {
  const S* __restrict__ x = reinterpret_cast<const S*>(x_);
  const R* __restrict__ v0 = reinterpret_cast<const R*>(v0_);
  const R* __restrict__ vth = reinterpret_cast<const R*>(vth_);
  const S* __restrict__ g_spikes = reinterpret_cast<const S*>(gs_);
  const R* __restrict__ g_vlast = reinterpret_cast<const R*>(gvlast_);
  const R* __restrict__ g_vseq = reinterpret_cast<const R*>(gvseq_);
  S* __restrict__ g_x = reinterpret_cast<S*>(gx_);
  R* __restrict__ g_v0 = reinterpret_cast<R*>(gv0_);
  double* g_vth = reinterpret_cast<double*>(gvth_);
  const R tern = ternary ? R(1) : R(0);
  const R keep_reset = detach_reset ? R(0) : R(1);
  double shared_acc = 0.0;  // dL/dV of a shared threshold, summed over this thread's neurons
  for (long long n = blockIdx.x * (long long)blockDim.x + threadIdx.x; n < N;
       n += (long long)blockDim.x * gridDim.x) {
    const R V = vth[C == 0 ? 0 : n % C];
    const R iv = R(1) / V;
    R h[MAX_T];
    R u = v0 ? v0[n] : R(0);
    for (long long t = 0; t < T; ++t) {
      h[t] = R(widen(x[t * N + n])) + d * u;
      const R s = R(h[t] >= V) - tern * R(h[t] <= -V);
      u = h[t] - V * s;
    }
    // gu = dL/du_t, from the returned final membrane (and the membrane sequence) backwards
    R gu = (g_vlast ? g_vlast[n] : R(0)) + (g_vseq ? g_vseq[(T - 1) * N + n] : R(0));
    R gv = R(0);
    for (long long t = T - 1; t >= 0; --t) {
      const R r = h[t] / V;  // as the reference: h*(1/V) can differ by an ulp
      const R s = R(h[t] >= V) - tern * R(h[t] <= -V);
      const R g = surrogate<R>(r - R(1), kind, pa, pb) + tern * surrogate<R>(-r - R(1), kind, pa, pb);
      const R dsdh = g * iv;
      const R gs = (g_spikes ? R(widen(g_spikes[t * N + n])) : R(0)) - keep_reset * V * gu;
      const R gh = gu + gs * dsdh;
      gv += -gu * s - gs * r * dsdh;
      g_x[t * N + n] = narrow<S>(gh);
      gu = gh * d + ((g_vseq && t > 0) ? g_vseq[(t - 1) * N + n] : R(0));
    }
    if (g_v0) g_v0[n] = gu;
    if (C == 0) shared_acc += (double)gv;
    else atomicAdd(&g_vth[n % C], (double)gv);
  }
  if (C == 0) {  // one atomic per warp: every lane reaches this point (blockDim % 32 == 0)
    for (int offset = 16; offset > 0; offset >>= 1)
      shared_acc += __shfl_down_sync(0xffffffffu, shared_acc, offset);
    if ((threadIdx.x & 31) == 0) atomicAdd(g_vth, shared_acc);
  }
}

#define ATMN_KERNELS(S, R, SUFFIX)                                                             \
  extern "C" __global__ void atmn_forward_##SUFFIX(ptr_t x, ptr_t v0, ptr_t vth, long long T,  \
                                                   long long N, long long C, R d, int ternary, \
                                                   ptr_t s, ptr_t vlast, ptr_t vseq) {         \
    forward_impl<S, R>(x, v0, vth, T, N, C, d, ternary, s, vlast, vseq);                       \
  }                                                                                            \
  extern "C" __global__ void atmn_backward_##SUFFIX(                                           \
      ptr_t x, ptr_t v0, ptr_t vth, long long T, long long N, long long C, R d, int ternary,   \
      int detach_reset, int kind, R pa, R pb, ptr_t gs, ptr_t gvlast, ptr_t gvseq, ptr_t gx,   \
      ptr_t gv0, ptr_t gvth) {                                                                 \
    backward_impl<S, R>(x, v0, vth, T, N, C, d, ternary, detach_reset, kind, pa, pb, gs,       \
                        gvlast, gvseq, gx, gv0, gvth);                                         \
  }

ATMN_KERNELS(float, float, f32)
ATMN_KERNELS(double, double, f64)
ATMN_KERNELS(half_t, float, f16)
ATMN_KERNELS(bf16_t, float, bf16)
