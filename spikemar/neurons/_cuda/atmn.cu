// Fused CUDA kernels for ATMN, compiled by CuPy (spikemar/neurons/cupy_backend.py).
// The equations are those of spikemar/neurons/functional.py; the PyTorch loop there is the
// reference these must equal, and the C kernels in ../_cpu/atmn_impl.h are their CPU twin.
//
//   h_t = x_t + d*u_{t-1}  (d = 1/tau)   s_t = [h_t >= V] - tern*[h_t <= -V]   u_t = h_t - V*s_t
//
// Exactness: NVRTC and nvcc contract a + b*c into one FMA by default (--fmad=true), which rounds
// once where the reference rounds twice; for tau outside {1, 2, inf} a spike then flips wherever
// h lies within an ulp of +-V. And CuPy compiles every module with -ftz=true (appended after the
// caller's options; the last one wins), under which float32 arithmetic and comparisons flush
// subnormals to zero (__fadd_rn is add.rn.ftz.f32, h >= V setp.ge.ftz.f32): a subnormal input or
// decayed membrane became 0, and a subnormal V fired at h = 0. Every float32 operation of the
// membrane update, the spike and the decode is therefore inline PTX without .ftz (add_rn, ge,
// ...: never contracted, never flushed); the spike is an int; the probes test bits. float64 is
// never flushed and uses __dadd_rn etc. (tests/test_cuda_kernels.py fails if the forward's PTX,
// built with CuPy's options, holds an fma or a .ftz.) The backward's gradient arithmetic may
// contract and flush: it is compared to 1e-5, and its recomputed h and spikes use the same step.
//
// Layout: x, spikes and their gradients are [T, N] contiguous, N = rows * C; v0, v_last [N].
// Pointers arrive as integers; 0 means: v0 a zero membrane, g_* zero gradients, g_v0 and v_seq
// not wanted. A block is bx * by threads (bx * by = blockDim): threadIdx.x runs over bx
// consecutive channels, threadIdx.y over rows, so every thread has one channel and one
// threshold, and a warp reads consecutive addresses. A shared threshold is C = 1 (bx = 1). Rows
// are grid-strided over blockIdx.y. The backward reduces dL/dV of its channel over the block's
// rows in shared memory in a fixed order and writes one partial per (blockIdx.y, channel); the
// host sums the partials (no atomics: the result does not depend on scheduling).
//
// The backward recomputes h_t from x and v0 into a per-thread array of MAX_T entries (set at
// compile time), so the forward saves nothing. T > MAX_T runs in chunks of MAX_T micro-steps,
// last chunk first, each recomputed from v0 (the membrane is not stored): any T runs, at the
// cost of recomputation when T exceeds the largest bucket (see cupy_backend.py).
//
// Index type I: int when every integer computed here fits in 31 bits, else long long; the host
// picks (cupy_backend._Launch.of): the offsets t*N + n, the forward's running offset after its
// last micro-step, and a row index plus the rows' grid stride (gridDim.y * blockDim.y).
//
// Types: S is how x, the spikes and their gradients are stored (float, double, or the 16-bit
// half_t / bf16_t); R is the arithmetic type (float for the 16-bit types, as functional.py's
// compute_dtype), in which the membrane, its sequence, the threshold and their gradients are
// stored. A 16-bit x is widened exactly, so spikes and membranes equal the reference's (which
// widens x to float32 first); gradients are rounded to S once, round-to-nearest-even, as the
// reference's cast back does. The float16 conversions are one PTX cvt each, so that NVRTC needs
// no CUDA header; a host build of this file for testing (SPIKEMAR_CUDA_EMULATION) supplies
// half_to_float / float_to_half itself.

#ifndef MAX_T
#define MAX_T 8
#endif
#define BLOCK_THREADS 256  // bx * by of every launch (cupy_backend._THREADS)

typedef unsigned long long ptr_t;

struct half_t {
  unsigned short bits;
};
struct bf16_t {
  unsigned short bits;
};

#ifndef SPIKEMAR_CUDA_EMULATION
__device__ __forceinline__ float half_to_float(unsigned short bits) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
  return f;
}
__device__ __forceinline__ unsigned short float_to_half(float v) {
  unsigned short bits;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(v));
  return bits;
}
#endif

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(half_t v) { return half_to_float(v.bits); }
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
  h.bits = float_to_half(v);
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

// IEEE round-to-nearest arithmetic and comparisons that the compiler may neither contract into
// an FMA nor flush to zero (see the top). ge/le: 1 or 0.
#ifdef SPIKEMAR_CUDA_EMULATION
// the host build (cuda_emulation.py): its __f*_rn are out of line, so never contracted
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ int ge(float a, float b) { return a >= b; }
__device__ __forceinline__ int le(float a, float b) { return a <= b; }
#else
__device__ __forceinline__ float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float sub_rn(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ int ge(float a, float b) {
  int r;
  asm("{ .reg .pred p; setp.ge.f32 p, %1, %2; selp.s32 %0, 1, 0, p; }" : "=r"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ int le(float a, float b) {
  int r;
  asm("{ .reg .pred p; setp.le.f32 p, %1, %2; selp.s32 %0, 1, 0, p; }" : "=r"(r) : "f"(a), "f"(b));
  return r;
}
#endif
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ int ge(double a, double b) { return a >= b; }
__device__ __forceinline__ int le(double a, double b) { return a <= b; }

// v is neither NaN nor ±inf: its exponent bits are not all ones (bits: no flush, no header)
__device__ __forceinline__ bool finite_value(float v) {
  return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}
__device__ __forceinline__ bool finite_value(double v) { return (v - v) == 0.0; }
// v is ±0 (a subnormal is not)
__device__ __forceinline__ bool is_zero(float v) { return (__float_as_uint(v) << 1) == 0u; }
__device__ __forceinline__ bool is_zero(double v) { return v == 0.0; }

// The spike of h: [h >= V] - ternary*[h <= -V], as an int (-V as 0 - V: no flush)
template <typename R>
__device__ __forceinline__ int spike_of(R h, R V, int ternary) {
  return ge(h, V) - (ternary & le(h, sub_rn(R(0), V)));
}

// One micro-step: h from the input and the carried membrane, the spike k, the reset membrane.
// The forward and the backward's recomputation both run this, so their h agree bit for bit.
template <typename R>
__device__ __forceinline__ R atmn_step(R x, R d, R V, int ternary, R& u, int& k) {
  const R h = add_rn(x, mul_rn(d, u));
  k = spike_of(h, V, ternary);
  u = sub_rn(h, mul_rn(V, R(k)));
  return h;
}

// The block's rows of channel c summed in a fixed tree order over threadIdx.y (red: the
// kernel's shared buffer of BLOCK_THREADS), one partial per (blockIdx.y, channel) written.
template <typename I>
__device__ __forceinline__ void store_channel_partial(double* red, double acc, double* partial,
                                                      I C, I c) {
  const unsigned lane = threadIdx.y * blockDim.x + threadIdx.x;
  red[lane] = acc;
  __syncthreads();
  for (unsigned half = blockDim.y / 2; half > 0; half >>= 1) {
    if (threadIdx.y < half) red[lane] += red[lane + half * blockDim.x];
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < C) partial[(I)blockIdx.y * C + c] = red[threadIdx.x];
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

// A pointer argument: the host passes an integer (0: not given); the kernels at the end hand
// each one to their *_impl typed.
template <typename T>
__device__ __forceinline__ T* typed(ptr_t p) {
  return reinterpret_cast<T*>(p);
}

// This thread's channel: threadIdx.x runs over blockDim.x consecutive channels.
template <typename I>
__device__ __forceinline__ I this_channel() {
  return (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x;
}

// body(n) for each neuron n = r * C + c of channel c on this thread's rows: threadIdx.y's row of
// each row block, row blocks grid-strided over blockIdx.y.
template <typename I, typename Body>
__device__ __forceinline__ void for_each_row(I rows, I C, I c, Body body) {
  const I row_stride = (I)gridDim.y * (I)blockDim.y;
  for (I r = (I)blockIdx.y * (I)blockDim.y + (I)threadIdx.y; r < rows; r += row_stride) {
    body(r * C + c);
  }
}

// The backward of one channel's neurons, shared by the neuron's and the spike point's kernels:
// h recomputed by the forward's own step, then the reverse micro-steps through the surrogate.
template <typename R>
struct Reverse {
  R d, V, iv, keep_reset;
  int ternary, kind;
  R pa, pb;

  __device__ __forceinline__ Reverse(R d_, R V_, int ternary_, int detach_reset, int kind_, R pa_,
                                     R pb_)
      : d(d_),
        V(V_),
        iv(R(1) / V_),
        keep_reset(detach_reset ? R(0) : R(1)),
        ternary(ternary_ ? 1 : 0),
        kind(kind_),
        pa(pa_),
        pb(pb_) {}

  __device__ __forceinline__ R spike(R h) const { return R(spike_of(h, V, ternary)); }

  // visit(t, h_t) for t = T-1 down to 0, h_t recomputed from the initial membrane u0 and the
  // inputs x_t = input(t) in chunks of MAX_T micro-steps, the last chunk first (the membrane is
  // not stored: a chunk replays the micro-steps before it)
  template <typename I, typename Input, typename Visit>
  __device__ __forceinline__ void replay_backwards(I T, R u0, Input input, Visit visit) const {
    R h[MAX_T];
    for (I end = T; end > 0;) {
      const I start = end > (I)MAX_T ? end - (I)MAX_T : (I)0;
      R u = u0;
      int s;
      for (I t = 0; t < start; ++t) atmn_step<R>(input(t), d, V, ternary, u, s);
      for (I t = start; t < end; ++t) h[t - start] = atmn_step<R>(input(t), d, V, ternary, u, s);
      for (I t = end - 1; t >= start; --t) visit(t, h[t - start]);
      end = start;
    }
  }

  // dL/dh_t from gu = dL/du_t and g_s = dL/ds_t from outside the neuron; adds the micro-step's
  // dL/dV to gv
  __device__ __forceinline__ R step(R ht, R gu, R g_s, R& gv) const {
    const R r_ = ht / V;  // as the reference: h*(1/V) can differ by an ulp
    const R g = surrogate<R>(r_ - R(1), kind, pa, pb) +
                R(ternary) * surrogate<R>(-r_ - R(1), kind, pa, pb);
    const R dsdh = g * iv;
    const R gs = g_s - keep_reset * V * gu;
    gv += -gu * spike(ht) - gs * r_ * dsdh;
    return gu + gs * dsdh;
  }
};

// The forward also does functional.check_values' probe as it goes: with d > 0 a NaN or ±inf
// anywhere in x or v0 reaches the final membrane, with d = 0 (tau = inf) x itself is looked at;
// any non-finite probe sets *bad (one atomic per offending thread, none when all is well).
template <typename S, typename R, typename I>
__device__ __forceinline__ void forward_impl(const S* __restrict__ x, const R* __restrict__ v0,
                                             const R* __restrict__ vth, I T, I rows, I C, R d,
                                             int ternary, S* __restrict__ spikes,
                                             R* __restrict__ v_last, R* __restrict__ v_seq,
                                             int* bad) {
  ternary = ternary ? 1 : 0;
  const bool no_carry = is_zero(d);  // tau = inf
  const I N = rows * C;
  const I c = this_channel<I>();
  if (c >= C) return;  // no barrier in the forward: idle lanes may leave
  bool ok = true;
  const R V = vth[c];
  for_each_row(rows, C, c, [&](I n) {
    R u = v0 ? v0[n] : R(0);
    I at = n;  // t * N + n
    for (I t = 0; t < T; ++t, at += N) {
      int s;
      const R xt = R(widen(x[at]));
      if (no_carry) ok = ok && finite_value(xt);
      atmn_step<R>(xt, d, V, ternary, u, s);
      spikes[at] = narrow<S>(R(s));
      if (v_seq) v_seq[at] = u;
    }
    v_last[n] = u;
    if (!no_carry) ok = ok && finite_value(u);
  });
  if (!ok) atomicOr(bad, 1);
}

template <typename S, typename R, typename I>
__device__ __forceinline__ void backward_impl(const S* __restrict__ x, const R* __restrict__ v0,
                                              const R* __restrict__ vth, I T, I rows, I C, R d,
                                              int ternary, int detach_reset, int kind, R pa, R pb,
                                              const S* __restrict__ g_spikes,
                                              const R* __restrict__ g_vlast,
                                              const R* __restrict__ g_vseq, S* __restrict__ g_x,
                                              R* __restrict__ g_v0, double* partial) {
  const I N = rows * C;
  const I c = this_channel<I>();
  double acc = 0.0;  // dL/dV of channel c over this thread's rows
  if (c < C) {       // idle lanes still reach the barriers below
    const Reverse<R> k(d, vth[c], ternary, detach_reset, kind, pa, pb);
    for_each_row(rows, C, c, [&](I n) {
      // gu = dL/du_t, from the returned final membrane (and the membrane sequence) backwards
      R gu = (g_vlast ? g_vlast[n] : R(0)) + (g_vseq ? g_vseq[(T - 1) * N + n] : R(0));
      R gv = R(0);
      const auto input = [&](I t) { return R(widen(x[t * N + n])); };
      k.replay_backwards(T, v0 ? v0[n] : R(0), input, [&](I t, R ht) {
        const R gh = k.step(ht, gu, g_spikes ? R(widen(g_spikes[t * N + n])) : R(0), gv);
        g_x[t * N + n] = narrow<S>(gh);
        gu = gh * d + ((g_vseq && t > 0) ? g_vseq[(t - 1) * N + n] : R(0));
      });
      if (g_v0) g_v0[n] = gu;
      acc += (double)gv;
    });
  }
  __shared__ double red[BLOCK_THREADS];
  store_channel_partial(red, acc, partial, C, c);
}

// MAR's spike point in one kernel each way: δ-inject the activation x [N] (x_0 = x, x_t = 0
// after), spike for T micro-steps from a zero membrane, decode V·Σ_t w_t s_t into out [N]
// (w_t = τ^t as functional.atmn_decode computes them, [T] in R, made on the device by the host),
// without the [T, N] input or spike train. The backward recomputes h and runs the reverse
// micro-steps with dL/ds_t = g·V·w_t, adding the decode's own dL/dV = g·Σ_t w_t s_t.
// counts (0: not wanted) [C][2] unsigned 64-bit, zeroed by the host: the +1 and −1 spikes of
// each channel over all micro-steps (functional.spike_counts' layout), for an energy counter
// that then needs no spike train. Each thread adds its own tallies with one atomic per sign:
// integer sums, so the result does not depend on the order.
template <typename S, typename R, typename I>
__device__ __forceinline__ void quantize_forward_impl(const S* __restrict__ x,
                                                      const R* __restrict__ vth,
                                                      const R* __restrict__ w, I T, I rows, I C,
                                                      R d, int ternary, S* __restrict__ out,
                                                      int* bad, unsigned long long* counts) {
  ternary = ternary ? 1 : 0;
  const bool no_carry = is_zero(d);
  const I c = this_channel<I>();
  if (c >= C) return;
  bool ok = true;  // the probe of the forward above: the final membrane, or x when d = 0
  const R V = vth[c];
  unsigned long long pos = 0, neg = 0;
  for_each_row(rows, C, c, [&](I n) {
    R u = R(0), acc = R(0);
    int s;
    const R x0 = R(widen(x[n]));
    for (I t = 0; t < T; ++t) {
      atmn_step<R>(t == 0 ? x0 : R(0), d, V, ternary, u, s);
      acc = add_rn(acc, mul_rn(w[t], R(s)));  // the decode's sum, micro-step by micro-step
      pos += s > 0;
      neg += s < 0;
    }
    out[n] = narrow<S>(mul_rn(V, acc));
    ok = ok && finite_value(no_carry ? x0 : u);
  });
  if (!ok) atomicOr(bad, 1);
  if (counts) {
    if (pos) atomicAdd(counts + 2 * c, pos);
    if (neg) atomicAdd(counts + 2 * c + 1, neg);
  }
}

template <typename S, typename R, typename I>
__device__ __forceinline__ void quantize_backward_impl(const S* __restrict__ x,
                                                       const R* __restrict__ vth,
                                                       const R* __restrict__ w, I T, I rows, I C,
                                                       R d, int ternary, int detach_reset,
                                                       int kind, R pa, R pb,
                                                       const S* __restrict__ g_out,
                                                       S* __restrict__ g_x, double* partial) {
  const I c = this_channel<I>();
  double acc = 0.0;
  if (c < C) {
    const Reverse<R> k(d, vth[c], ternary, detach_reset, kind, pa, pb);
    for_each_row(rows, C, c, [&](I n) {
      const R g = R(widen(g_out[n]));
      const R gV = g * k.V;
      const R x0 = R(widen(x[n]));
      R gu = R(0), gv = R(0), gh = R(0), wsum = R(0);
      const auto input = [&](I t) { return t == 0 ? x0 : R(0); };
      k.replay_backwards(T, R(0), input, [&](I t, R ht) {
        gh = k.step(ht, gu, gV * w[t], gv);
        wsum += w[t] * k.spike(ht);
        gu = gh * d;
      });
      g_x[n] = narrow<S>(gh);  // dL/dh_0 = dL/dx: only x_0 is the activation
      acc += (double)(gv + g * wsum);
    });
  }
  __shared__ double red[BLOCK_THREADS];
  store_channel_partial(red, acc, partial, C, c);
}

#define ATMN_KERNELS(S, R, I, SUFFIX)                                                          \
  extern "C" __global__ void atmn_forward_##SUFFIX(ptr_t x, ptr_t v0, ptr_t vth, I T, I rows,  \
                                                   I C, R d, int ternary, ptr_t s,             \
                                                   ptr_t vlast, ptr_t vseq, ptr_t bad) {       \
    forward_impl<S, R, I>(typed<S>(x), typed<R>(v0), typed<R>(vth), T, rows, C, d, ternary,    \
                          typed<S>(s), typed<R>(vlast), typed<R>(vseq), typed<int>(bad));      \
  }                                                                                            \
  extern "C" __global__ void atmn_backward_##SUFFIX(                                           \
      ptr_t x, ptr_t v0, ptr_t vth, I T, I rows, I C, R d, int ternary, int detach_reset,      \
      int kind, R pa, R pb, ptr_t gs, ptr_t gvlast, ptr_t gvseq, ptr_t gx, ptr_t gv0,          \
      ptr_t partial) {                                                                         \
    backward_impl<S, R, I>(typed<S>(x), typed<R>(v0), typed<R>(vth), T, rows, C, d, ternary,   \
                           detach_reset, kind, pa, pb, typed<S>(gs), typed<R>(gvlast),         \
                           typed<R>(gvseq), typed<S>(gx), typed<R>(gv0),                       \
                           typed<double>(partial));                                            \
  }                                                                                            \
  extern "C" __global__ void atmn_quantize_forward_##SUFFIX(                                   \
      ptr_t x, ptr_t vth, ptr_t w, I T, I rows, I C, R d, int ternary, ptr_t out, ptr_t bad,   \
      ptr_t counts) {                                                                          \
    quantize_forward_impl<S, R, I>(typed<S>(x), typed<R>(vth), typed<R>(w), T, rows, C, d,     \
                                   ternary, typed<S>(out), typed<int>(bad),                    \
                                   typed<unsigned long long>(counts));                         \
  }                                                                                            \
  extern "C" __global__ void atmn_quantize_backward_##SUFFIX(                                  \
      ptr_t x, ptr_t vth, ptr_t w, I T, I rows, I C, R d, int ternary, int detach_reset,       \
      int kind, R pa, R pb, ptr_t g, ptr_t gx, ptr_t partial) {                                \
    quantize_backward_impl<S, R, I>(typed<S>(x), typed<R>(vth), typed<R>(w), T, rows, C, d,    \
                                    ternary, detach_reset, kind, pa, pb, typed<S>(g),          \
                                    typed<S>(gx), typed<double>(partial));                     \
  }

ATMN_KERNELS(float, float, int, f32_i32)
ATMN_KERNELS(double, double, int, f64_i32)
ATMN_KERNELS(half_t, float, int, f16_i32)
ATMN_KERNELS(bf16_t, float, int, bf16_i32)
ATMN_KERNELS(float, float, long long, f32_i64)
ATMN_KERNELS(double, double, long long, f64_i64)
ATMN_KERNELS(half_t, float, long long, f16_i64)
ATMN_KERNELS(bf16_t, float, long long, bf16_i64)
