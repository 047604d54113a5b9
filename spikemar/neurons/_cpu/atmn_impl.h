/* ATMN forward and backward over T micro-steps for one element type (REAL, SUFFIX).
 * Included twice by atmn.c (float, double). The equations are those of
 * spikemar/neurons/functional.py; that file's PyTorch loop is the reference this must equal.
 *
 *   h_t = x_t + d·u_{t-1}   (d = 1/τ)      s_t = [h_t ≥ V] − tern·[h_t ≤ −V]      u_t = h_t − V·s_t
 *
 * Layout: x, spikes and their gradients are [T, N] contiguous; v0, v_last [N]. NULL v0 is a zero
 * membrane, NULL g_v0 is not wanted, NULL g_spikes / g_vlast / g_vseq are zero gradients.
 *
 * Element-major: a group of GW = GK·VL neighbouring neurons (GK SIMD vectors side by side, written
 * with GCC/Clang vector extensions so the same source builds for AVX2, AVX-512 or NEON) runs its
 * micro-steps with the membrane in registers, reading x_t and writing s_t as interleaved
 * sequential streams, at most TC micro-steps' rows at a time. The backward recomputes the
 * group's h (cheaper than storing it: only x is read again) into an L1 array when T ≤ TC, into a
 * block buffer in L2 beyond, and runs the reverse micro-steps in registers too. Against the
 * block-major kernel this replaced (a block of neurons stepped one micro-step at a time, with
 * membrane, h and dL/dV in L1/L2 buffers) it drops those buffer loads and stores from every
 * micro-step and about half of the backward's arithmetic (see vdsdh); T = 4, N = 2^20,
 * forward + backward on the 2-core EPYC of benchmarks/RESULTS.md: 7.1 → 4.9 ms, kernels alone,
 * cold caches.
 *
 * The blocks, groups, tails, threads and the forward's dispatch are the neuron-agnostic
 * multistep.h; this file is ATMN's micro-step (neuron_step), its backward and MAR's spike point.
 *
 * Threads take contiguous ranges of blocks of B neurons; B is a multiple of the channel count C
 * so that a per-channel threshold is one block-periodic buffer vb[B]. A block's last
 * len mod GW neurons run through the same vector code on zero-padded copies. */

/* s = [h ≥ V] − tern·[h ≤ −V], exactly as the reference (0/1 indicators, one subtraction) */
HOT VEC CAT(vspike_, SUFFIX)(VEC h, VEC V, const int tern) {
  const VEC one = VSPLAT(1);
  const VEC up = VSELECT(h >= V, one);
  return tern ? up - VSELECT(h <= -V, one) : up;
}

/* Surrogate pulses g(z) on vectors (pa, pb as fused.surrogate_code computes them):
 * rectangle 1/width on |z| < width/2 · triangle (1 − |z|/half)⁺/half · sigmoid α·σ(αz)(1 − σ(αz))
 * · atan (α/2)/(1 + (π/2·α·z)²). The sigmoid's exp runs lane by lane (no portable vector exp). */
HOT VEC CAT(vpulse_, SUFFIX)(const int kind, VEC z, REAL pa, REAL pb) {
  if (kind == 0) return VSELECT(VABS(z) < pa, VSPLAT(pb));
  if (kind == 1) { /* pa = half-width; divided as the reference divides (see vdsdh) */
    const VEC v = (REAL)1 - VABS(z) / pa;
    return VSELECT(v > 0, v) / pa;
  }
  if (kind == 2) {
    VEC sg;
    if (sizeof(REAL) == 4) {
      sg = (REAL)1 / ((REAL)1 + CAT(vexpf_, SUFFIX)(-pa * z));
    } else { /* double: the C library's exp, lane by lane */
      for (int k = 0; k < (int)VL; ++k) sg[k] = (REAL)1 / ((REAL)1 + EXP(-pa * z[k]));
    }
    return pa * sg * ((REAL)1 - sg);
  }
  const VEC kz = pa * z;
  return pb / ((REAL)1 + kz * kz);
}

/* ds/dh = (g(r − 1) + tern·g(−r − 1))/V with r = h/V; iv = 1/V, piv = pb/V (the rectangle's
 * height over V, so that its pulse is one AND). r and the triangle are divided as the reference
 * divides: a narrow pulse is steep (the triangle of width 0.25 has slope 64), and the ulp by which
 * h·(1/V) can differ from h/V then moves a gradient by more than 1e-5. When the two pulses
 * cannot overlap (rectangle or triangle no wider than 2, so at most one is non-zero for any r) it
 * is one pulse at |r| − 1: the same value bit for bit, since −r − 1 = |r| − 1 for r < 0. */
HOT VEC CAT(vdsdh_, SUFFIX)(
    const int kind, VEC r, VEC iv, VEC piv, const int tern, const int disjoint, REAL pa, REAL pb) {
  if (kind == 0) {
    const VEC g = VSELECT(VABS((tern && disjoint ? VABS(r) : r) - (REAL)1) < pa, piv);
    return tern && !disjoint ? g + VSELECT(VABS(-r - (REAL)1) < pa, piv) : g;
  }
  if (tern && disjoint) return CAT(vpulse_, SUFFIX)(kind, VABS(r) - (REAL)1, pa, pb) * iv;
  const VEC g = CAT(vpulse_, SUFFIX)(kind, r - (REAL)1, pa, pb);
  return (tern ? g + CAT(vpulse_, SUFFIX)(kind, -r - (REAL)1, pa, pb) : g) * iv;
}

/* What ATMN's micro-steps read (multistep.h's contract): the decay d = 1/τ; for the backward the
 * surrogate (kind, pa, pb as fused.surrogate_code computes them) and keep_reset (1 unless the
 * reset is detached) */
typedef struct {
  REAL d, pa, pb, keep_reset;
  int kind;
} CAT(neuron_params_, SUFFIX);

/* h = x + d·u, s = [h ≥ V] − tern·[h ≤ −V], u = h − V·s; variant = tern */
HOT VEC CAT(neuron_step_, SUFFIX)(VEC x, VEC *u, VEC V, const CAT(neuron_params_, SUFFIX) * p,
                                  const int tern, VEC *hout) {
  const VEC h = x + *u * p->d;
  const VEC s = CAT(vspike_, SUFFIX)(h, V, tern);
  *hout = h;
  *u = h - V * s;
  return s;
}

/* with d = 0 (τ = ∞) the membrane forgets a NaN: functional.check_values then probes x */
HOT int CAT(neuron_probes_input_, SUFFIX)(const CAT(neuron_params_, SUFFIX) * p) {
  return p->d == (REAL)0;
}

#define NEURON_BACKWARD /* multistep.h's backward loops, around neuron_reverse below */
#include "multistep.h"

/* Reverse micro-steps t1−1 down to t0 of one group, from h in hin [t][hstride]; gu = dL/du_t in
 * and out, gv += the dL/dV terms (per lane).
 *   gs = dL/ds_t (from the output) − V·dL/du_t (through the reset, unless detached)
 *   gh = dL/du_t + gs·g/V,   dL/dV += −dL/du_t·s_t − gs·(h/V)·g/V,   dL/dx_t = gh,
 *   dL/du_{t−1} = d·gh (+ the membrane-sequence gradient at t − 1)
 * With decode weights w (MAR's spike point, see quantize_group_backward) dL/ds_t is gdV·w_t
 * instead of a stream, and wsum += w_t·s_t. */
HOT void CAT(reverse_steps_, SUFFIX)(
    const CAT(group_, SUFFIX) * g, const REAL *hin, int64_t hstride, int64_t t0, int64_t t1,
    const VEC *V, const VEC *iv, const VEC *kV, REAL d, REAL pa, REAL pb, const int kind,
    const int tern, const int disjoint, VEC *gu, VEC *gv, const REAL *w, const VEC *gdV,
    VEC *wsum) {
  const int64_t st = g->stride;
  VEC piv[GK];
  for (int k = 0; k < GK; ++k) piv[k] = pb * iv[k];
  for (int64_t t = t1 - 1; t >= t0; --t) {
    for (int k = 0; k < GK; ++k) {
      const VEC h = VLOAD(hin + t * hstride + k * VL);
      const VEC r = h / V[k]; /* as the reference: h·(1/V) can differ by an ulp (see vdsdh) */
      const VEC s = CAT(vspike_, SUFFIX)(h, V[k], tern);
      const VEC dsdh = CAT(vdsdh_, SUFFIX)(kind, r, iv[k], piv[k], tern, disjoint, pa, pb);
      const VEC gst = w               ? gdV[k] * w[t]
                      : g->g_spikes ? VLOAD(g->g_spikes + t * st + k * VL)
                                    : VSPLAT(0);
      if (w) wsum[k] += w[t] * s;
      const VEC gs = gst - kV[k] * gu[k];
      const VEC q = gs * dsdh;
      const VEC gh = gu[k] + q;
      gv[k] -= gu[k] * s + q * r;
      VSTORE(g->g_x + t * st + k * VL, gh);
      gu[k] = gh * d;
      if (g->g_vseq && t > 0) gu[k] += VLOAD(g->g_vseq + (t - 1) * st + k * VL);
    }
  }
}

/* ATMN's reverse micro-steps for multistep.h's backward loops: FLAGS = 4·kind + 2·tern + disjoint
 * (the surrogate's code; binary or ternary; one pulse at a time, see vdsdh) */
HOT void CAT(neuron_reverse_, SUFFIX)(const CAT(group_, SUFFIX) * g, const REAL *hin,
                                      int64_t hstride, int64_t t0, int64_t t1, const VEC *V,
                                      const VEC *iv, const NPARAMS *p, const int flags, VEC *gu,
                                      VEC *gv) {
  VEC kV[GK]; /* V through the reset, 0 when it is detached */
  for (int k = 0; k < GK; ++k) kV[k] = p->keep_reset * V[k];
  CAT(reverse_steps_, SUFFIX)(g, hin, hstride, t0, t1, V, iv, kV, p->d, p->pa, p->pb, flags >> 2,
                              (flags >> 1) & 1, flags & 1, gu, gv, NULL, NULL, NULL);
}

/* binary; ternary with both pulses; ternary with one pulse (rectangle, triangle only) */
DEFINE_REVERSE_LOOP(rev_000_, 0, 0)
DEFINE_REVERSE_LOOP(rev_010_, 1, 2)
DEFINE_REVERSE_LOOP(rev_011_, 1, 3)
DEFINE_REVERSE_LOOP(rev_100_, 0, 4)
DEFINE_REVERSE_LOOP(rev_110_, 1, 6)
DEFINE_REVERSE_LOOP(rev_111_, 1, 7)
DEFINE_REVERSE_LOOP(rev_200_, 0, 8)
DEFINE_REVERSE_LOOP(rev_210_, 1, 10)
DEFINE_REVERSE_LOOP(rev_300_, 0, 12)
DEFINE_REVERSE_LOOP(rev_310_, 1, 14)
#undef DEFINE_REVERSE_LOOP

static CAT(rev_fn_, SUFFIX) CAT(neuron_reverse_for_, SUFFIX)(const NPARAMS *p, int tern) {
  const int kind = p->kind;
  /* pulses g(r − 1) and g(−r − 1) never both non-zero: half-width ≤ 1 (see vdsdh) */
  const int disjoint = kind <= 1 && p->pa <= (REAL)1;
  static const CAT(rev_fn_, SUFFIX) table[4][3] = {
      {CAT(rev_000_, SUFFIX), CAT(rev_010_, SUFFIX), CAT(rev_011_, SUFFIX)},
      {CAT(rev_100_, SUFFIX), CAT(rev_110_, SUFFIX), CAT(rev_111_, SUFFIX)},
      {CAT(rev_200_, SUFFIX), CAT(rev_210_, SUFFIX), CAT(rev_210_, SUFFIX)},
      {CAT(rev_300_, SUFFIX), CAT(rev_310_, SUFFIX), CAT(rev_310_, SUFFIX)}};
  return table[kind][tern ? 1 + (disjoint != 0) : 0];
}

/* Returns -1 if a threshold is not finite and > 0 (nothing computed), else the number of
 * non-finite values in what functional.check_values probes (the final membrane when decay > 0,
 * x when decay = 0), so that the caller raises as the reference's check does. */
int64_t CAT(atmn_forward_, SUFFIX)(const REAL *x, const REAL *v0, const REAL *vth, int64_t T,
                                   int64_t N, int64_t C, int64_t B, REAL decay, int ternary,
                                   REAL *spikes, REAL *v_last, REAL *v_seq, int nthreads) {
  CAT(job_, SUFFIX) j = {0};
  j.x = x; j.v0 = v0; j.vth = vth; j.spikes = spikes; j.v_last = v_last; j.v_seq = v_seq;
  j.T = T; j.N = N; j.C = C; j.B = B; j.p.d = decay; j.variant = ternary != 0;
  return CAT(neuron_forward_, SUFFIX)(&j, nthreads);
}

/* g_vth_partial: caller-zeroed [nthreads][B] doubles; the caller folds them into V's shape. */
int CAT(atmn_backward_, SUFFIX)(const REAL *x, const REAL *v0, const REAL *vth, int64_t T,
                                int64_t N, int64_t C, int64_t B, REAL decay, int ternary,
                                int detach_reset, int surr_kind, REAL surr_pa, REAL surr_pb,
                                const REAL *g_spikes, const REAL *g_vlast, const REAL *g_vseq,
                                REAL *g_x, REAL *g_v0, double *g_vth_partial, int nthreads) {
  CAT(job_, SUFFIX) j = {0};
  j.x = x; j.v0 = v0; j.vth = vth; j.g_spikes = g_spikes; j.g_vlast = g_vlast;
  j.g_vseq = g_vseq; j.g_x = g_x; j.g_v0 = g_v0; j.g_vth_partial = g_vth_partial;
  j.T = T; j.N = N; j.C = C; j.B = B; j.variant = ternary != 0;
  j.p.d = decay; j.p.kind = surr_kind; j.p.pa = surr_pa; j.p.pb = surr_pb;
  j.p.keep_reset = (REAL)(detach_reset == 0);
  CAT(neuron_backward_, SUFFIX)(&j, nthreads);
  return 0;
}

/* The decode's weights w_t = τ^t as the reference computes them (Python's tau**t is C's pow in
 * double, then rounded to REAL); no weight when decay = 0 (τ = ∞) beyond the first. */
static void CAT(decode_weights_, SUFFIX)(REAL *w, int64_t T, double tau, REAL decay) {
  for (int64_t t = 0; t < T; ++t)
    w[t] = decay == (REAL)0 ? (REAL)(t == 0) : (REAL)pow(tau, (double)t);
}

/* One block of len ≤ BLK elements of MAR's spike point for inference, channel c0 first (see
 * atmn_quantize_decode). With COUNT (a constant: the loops without it are those of before), the
 * block's +1 and −1 spikes are added per channel to counts [2][max(C, 1)] (the +1 row, then the
 * −1 row). One sum per element serves both: under δ-injection all of an element's spikes have
 * its input's sign (after a +1 spike u = h − V ≥ 0, so h = d·u ≥ 0 with d = 1/τ ≥ 0 never
 * reaches −V; NaN never spikes), so Σ_t s_t is +(its +1 spikes) or −(its −1 spikes). Summed in
 * REAL (exact: at most T ≤ 64 per element), then split by sign: per channel into csum [2][C]
 * (REAL sums, which the caller moves into counts while they are exact: half the memory traffic
 * of adding each element to an int64 slot, which was all the counting cost) or, csum NULL,
 * straight into counts. With COUNT == 2 (τ = 1: every decode weight is 1) the decode's own sum
 * Σ_t w_t s_t is that sum, so the micro-steps count nothing. Returns the block's number of
 * non-finite probes. */
HOT int64_t CAT(quantize_block_, SUFFIX)(const REAL *x, const REAL *vth, int64_t len, int64_t C,
                                         int64_t c0, int64_t T, const REAL *w, REAL decay,
                                         REAL tern, REAL *decoded, int64_t *counts, REAL *csum,
                                         const int COUNT) {
  enum { BLK = 256 };
  /* micro-steps outer and elements inner (the loops vectorise); the arithmetic per element is
   * that of the reference, in its order */
  REAL xb[BLK], vb[BLK], u[BLK], acc[BLK], ns[BLK]; /* ns: Σ_t s_t, with COUNT */
  int64_t c = c0;
  for (int64_t i = 0; i < len; ++i) { /* decoded may alias x: read x first */
    xb[i] = x[i];
    vb[i] = vth[c];
    if (C != 0 && ++c == C) c = 0;
  }
  for (int64_t i = 0; i < len; ++i) {
    const REAL h = xb[i], V = vb[i];
    const REAL up = (REAL)(h >= V), down = tern * (REAL)(h <= -V); /* the spike's two halves */
    const REAL s = up - down;
    u[i] = h - V * s;
    acc[i] = (REAL)0 + w[0] * s;
    if (COUNT == 1) ns[i] = s;
  }
  for (int64_t t = 1; t < T; ++t) {
    const REAL wt = w[t];
    for (int64_t i = 0; i < len; ++i) {
      const REAL h = (REAL)0 + u[i] * decay, V = vb[i];
      const REAL up = (REAL)(h >= V), down = tern * (REAL)(h <= -V);
      const REAL s = up - down;
      u[i] = h - V * s;
      acc[i] += wt * s;
      if (COUNT == 1) ns[i] += s;
    }
  }
  const REAL *probe = decay == (REAL)0 ? xb : u;
  int64_t bad = 0;
  for (int64_t i = 0; i < len; ++i) {
    decoded[i] = vb[i] * acc[i];
    bad += !isfinite(probe[i]);
  }
  if (COUNT) { /* runs of consecutive channels, so that the adds vectorise */
    const REAL *sum = COUNT == 2 ? acc : ns;
    for (int64_t i = 0, c1 = c0; i < len; c1 = 0) {
      const int64_t run = C == 0 ? len : (C - c1 < len - i ? C - c1 : len - i);
      if (C == 0) {
        int32_t a = 0, b = 0; /* at most BLK·T ≤ 2^14 */
        for (int64_t k = 0; k < run; ++k) {
          const int32_t n = (int32_t)sum[i + k];
          a += n > 0 ? n : 0, b += n < 0 ? -n : 0;
        }
        counts[0] += a, counts[1] += b;
      } else if (csum) {
        REAL *pos = csum + c1, *neg = csum + C + c1;
        for (int64_t k = 0; k < run; ++k) {
          const REAL n = sum[i + k];
          pos[k] += n > 0 ? n : 0, neg[k] += n < 0 ? -n : 0;
        }
      } else {
        int64_t *pos = counts + c1, *neg = counts + C + c1;
        for (int64_t k = 0; k < run; ++k) {
          const int32_t n = (int32_t)sum[i + k];
          pos[k] += n > 0 ? n : 0, neg[k] += n < 0 ? -n : 0;
        }
      }
      i += run;
    }
  }
  return bad;
}

/* MAR's spike point for inference: δ-inject x [N] (x_0 = x, x_t = 0 after) into a zero membrane,
 * spike for T micro-steps and write the decode V·Σ_t τ^t s_t [N], without materialising the
 * spikes. Single-threaded: it serves the small per-token activations of generation, where a
 * thread launch would cost more than the work (atmn_quantize_forward runs it on row ranges in
 * parallel for training). The τ-weights: decode_weights. x starts on channel 0.
 *
 * counts (NULL: not wanted): [2][max(C, 1)] int64, caller-zeroed; the +1 and −1 spikes of each
 * channel (of the one shared threshold when C = 0) over all micro-steps are added to it, so that
 * an energy counter needs no [T, N] spike train (functional.spike_counts is the reference).
 *
 * Returns -1 if a threshold is not finite and > 0 (checked first, as the reference does), else
 * the number of non-finite values in what the reference's check_values probes: the final
 * membrane when τ < ∞, the input when τ = ∞. So NaN and ±inf are counted, never swallowed. */
int64_t CAT(atmn_quantize_decode_, SUFFIX)(const REAL *x, const REAL *vth, int64_t N, int64_t C,
                                           int64_t T, double tau, REAL decay, int ternary,
                                           REAL *decoded, int64_t *counts) {
  enum { MAX_T = 64, BLK = 256, CSUM_MAX = 2048 };
  if (T < 1 || T > MAX_T) return -2;
  REAL w[MAX_T];
  CAT(decode_weights_, SUFFIX)(w, T, tau, decay);
  const int64_t nv = C == 0 ? 1 : C;
  for (int64_t c = 0; c < nv; ++c)
    if (!(isfinite(vth[c]) && vth[c] > 0)) return -1;
  const REAL tern = (REAL)(ternary != 0);
  int unit = 1; /* every decode weight 1 (τ = 1): the decode's sum counts the spikes too */
  for (int64_t t = 0; t < T; ++t) unit &= w[t] == (REAL)1;
  /* per channel, the blocks' counts are summed in REAL (for C ≤ CSUM_MAX: on the stack) and
   * moved into counts at the end, or before a slot could pass REAL's exact integers */
  REAL csum[2 * CSUM_MAX];
  REAL *cs = counts && C != 0 && C <= CSUM_MAX ? csum : NULL;
  if (cs) memset(cs, 0, sizeof(REAL) * 2 * C);
  const double exact = sizeof(REAL) == 4 ? 0x1p24 : 0x1p53;
  const double most_per_block = cs ? (double)((BLK + C - 1) / C * T) : 0;
  double most = 0; /* the most a slot of cs can hold */
  int64_t bad = 0;
  for (int64_t start = 0; start < N; start += BLK) {
    const int64_t len = start + BLK <= N ? BLK : N - start, c0 = C ? start % C : 0;
#define BLOCK(COUNTS, COUNT)                                                                     \
  CAT(quantize_block_, SUFFIX)(x + start, vth, len, C, c0, T, w, decay, tern, decoded + start,  \
                               COUNTS, cs, COUNT)
    bad += !counts ? BLOCK(NULL, 0) : unit ? BLOCK(counts, 2) : BLOCK(counts, 1);
#undef BLOCK
    if (cs && ((most += most_per_block) + most_per_block >= exact || start + BLK >= N)) {
      for (int64_t k = 0; k < 2 * C; ++k) counts[k] += (int64_t)cs[k], cs[k] = 0;
      most = 0;
    }
  }
  return bad;
}

/* -- MAR's spike point in training: δ-inject, T micro-steps, decode, and its backward ---------
 *
 * decoded = V·Σ_t w_t s_t with w_t = τ^t, for x_0 = x, x_t = 0 after and a zero membrane (the
 * forward is atmn_quantize_decode, run in parallel over whole rows of C channels). Its backward
 * recomputes h from x and runs the reverse micro-steps with dL/ds_t = (g·V)·w_t, which needs no
 * stream from memory: it reads x and g and writes dL/dx, against the [T, N] injected input,
 * spikes and their gradients that the unfused path materialises. dL/dV adds the decode's own
 * term g·Σ_t w_t s_t to the neuron's. */

typedef struct {
  const REAL *x, *vth, *g;
  REAL *out, *g_x;
  double *g_vth; /* [max(C, 1)] of this job, caller-zeroed */
  int64_t *counts; /* [2][max(C, 1)] of this job, caller-zeroed, or NULL */
  int64_t N, C, T, begin, end;
  double tau;
  REAL decay, pa, pb, keep_reset;
  int ternary, kind, disjoint;
  int64_t bad;
} CAT(qjob_, SUFFIX);

static void *CAT(quantize_forward_worker_, SUFFIX)(void *arg) {
  CAT(qjob_, SUFFIX) *j = arg;
  j->bad = CAT(atmn_quantize_decode_, SUFFIX)(j->x + j->begin, j->vth, j->end - j->begin, j->C,
                                               j->T, j->tau, j->decay, j->ternary,
                                               j->out + j->begin, j->counts);
  return NULL;
}

/* One group of GW neurons: x0, g0 its inputs and gradients, gx0 where dL/dx goes; gv receives
 * dL/dV. The group runs through the same steps as the forward and the reverse above: its
 * injected input is xs [GW] followed by zero rows (buf [T][GW]), its spike gradients are
 * dL/ds_t = (g·V)·w_t, and dL/dx is written with stride 0, so the micro-step written last, the
 * first, stays. */
HOT void CAT(quantize_group_backward_, SUFFIX)(const CAT(qjob_, SUFFIX) * j, const REAL *w,
                                               REAL *hs, REAL *buf, const REAL *x0,
                                               const REAL *g0, REAL *gx0, const VEC *V, VEC *gv,
                                               const int kind, const int tern,
                                               const int disjoint) {
  const int64_t T = j->T;
  const REAL d = j->decay;
  VEC iv[GK], kV[GK], u[GK], gu[GK], gd[GK], gdV[GK], wsum[GK];
  memcpy(buf, x0, sizeof(REAL) * GW); /* rows 1..T−1 stay zero: δ-injection */
  for (int k = 0; k < GK; ++k) {
    iv[k] = (REAL)1 / V[k], kV[k] = j->keep_reset * V[k];
    u[k] = VSPLAT(0), gu[k] = VSPLAT(0), gv[k] = VSPLAT(0), wsum[k] = VSPLAT(0);
    gd[k] = VLOAD(g0 + k * VL), gdV[k] = gd[k] * V[k];
  }
  const CAT(neuron_params_, SUFFIX) np = {.d = d};
  CAT(steps_, SUFFIX)(buf, GW, 0, T, V, &np, tern, u, NULL, NULL, hs, GW);
  const CAT(group_, SUFFIX) g = {.g_x = gx0, .stride = 0};
  CAT(reverse_steps_, SUFFIX)(&g, hs, GW, 0, T, V, iv, kV, d, j->pa, j->pb, kind, tern, disjoint,
                              gu, gv, w, gdV, wsum);
  for (int k = 0; k < GK; ++k) gv[k] += gd[k] * wsum[k]; /* the decode's own dL/dV term */
}

HOT void CAT(quantize_backward_range_, SUFFIX)(CAT(qjob_, SUFFIX) * j, const REAL *w, REAL *hs,
                                               REAL *buf, const int kind, const int tern,
                                               const int disjoint) {
  const int64_t C = j->C;
  REAL *pad = buf + j->T * GW; /* a tail's zero-padded x, g and dL/dx */
  VEC V[GK], gv[GK];
  double shared = 0;
  for (int64_t i = j->begin; i < j->end; i += GW) {
    const int64_t n = j->end - i < GW ? j->end - i : GW;
    int64_t c = C ? i % C : 0;
    for (int m = 0; m < GW; ++m) { /* the group's thresholds, channel by channel */
      ((REAL *)V)[m] = j->vth[C ? c : 0];
      if (C && ++c == C) c = 0;
    }
    if (n == GW) {
      CAT(quantize_group_backward_, SUFFIX)(j, w, hs, buf, j->x + i, j->g + i, j->g_x + i, V, gv,
                                            kind, tern, disjoint);
    } else { /* padded lanes have x = g = 0 and add nothing */
      memset(pad, 0, sizeof(REAL) * 2 * GW);
      memcpy(pad, j->x + i, sizeof(REAL) * n);
      memcpy(pad + GW, j->g + i, sizeof(REAL) * n);
      CAT(quantize_group_backward_, SUFFIX)(j, w, hs, buf, pad, pad + GW, pad + 2 * GW, V, gv,
                                            kind, tern, disjoint);
      memcpy(j->g_x + i, pad + 2 * GW, sizeof(REAL) * n);
    }
    c = C ? i % C : 0;
    for (int64_t m = 0; m < n; ++m) {
      const double term = (double)((const REAL *)gv)[m];
      if (C) {
        j->g_vth[c] += term;
        if (++c == C) c = 0;
      } else {
        shared += term;
      }
    }
  }
  if (!C) j->g_vth[0] += shared;
}

static void *CAT(quantize_backward_worker_, SUFFIX)(void *arg) {
  CAT(qjob_, SUFFIX) *j = arg;
  enum { MAX_T = 64 };
  REAL w[MAX_T];
  CAT(decode_weights_, SUFFIX)(w, j->T, j->tau, j->decay);
  const size_t rows = (size_t)(2 * j->T + 3); /* hs and the input [T][GW]; the tail's pad [3][GW] */
  REAL *hs = aligned_alloc(64, (rows * GW * sizeof(REAL) + 63) / 64 * 64);
  REAL *buf = hs + j->T * GW;
  memset(buf, 0, sizeof(REAL) * j->T * GW);
  const int kind = j->kind, tern = j->ternary != 0, disjoint = j->disjoint;
#define QB(K, TE, D) CAT(quantize_backward_range_, SUFFIX)(j, w, hs, buf, K, TE, D)
  if (kind == 0 && tern && disjoint) QB(0, 1, 1);
  else if (kind == 0 && tern) QB(0, 1, 0);
  else if (kind == 0) QB(0, 0, 0);
  else if (kind == 1 && tern && disjoint) QB(1, 1, 1);
  else if (kind == 1 && tern) QB(1, 1, 0);
  else if (kind == 1) QB(1, 0, 0);
  else if (kind == 2 && tern) QB(2, 1, 0);
  else if (kind == 2) QB(2, 0, 0);
  else if (tern) QB(3, 1, 0);
  else QB(3, 0, 0);
#undef QB
  free(hs);
  return NULL;
}

/* Splits [0, N) into up to nthreads ranges that start on a whole row of C channels (so that the
 * forward kernel's channel count starts at 0) and a whole group (GW) */
static int CAT(quantize_ranges_, SUFFIX)(CAT(qjob_, SUFFIX) * jobs, const CAT(qjob_, SUFFIX) * base,
                                         int nthreads) {
  const int64_t N = base->N, C = base->C ? base->C : 1;
  int64_t unit = C;
  while (unit % GW) unit += C; /* a multiple of both C and GW */
  int64_t begin[MAX_THREADS], end[MAX_THREADS];
  nthreads = plan_ranges((N + unit - 1) / unit, unit, N, nthreads, begin, end);
  for (int k = 0; k < nthreads; ++k) {
    jobs[k] = *base;
    jobs[k].begin = begin[k];
    jobs[k].end = end[k];
    jobs[k].g_vth = base->g_vth ? base->g_vth + (int64_t)k * C : NULL;
    jobs[k].counts = base->counts ? base->counts + (int64_t)k * 2 * C : NULL;
  }
  return nthreads;
}

/* The forward of the training path: atmn_quantize_decode over row ranges in parallel; returns
 * as that function does (-1 bad threshold, -2 bad T, else the count of non-finite probes).
 * counts (NULL: not wanted): [nthreads][2][max(C, 1)] int64, caller-zeroed, one row per thread
 * used (the caller sums the rows). */
int64_t CAT(atmn_quantize_forward_, SUFFIX)(const REAL *x, const REAL *vth, int64_t N, int64_t C,
                                            int64_t T, double tau, REAL decay, int ternary,
                                            REAL *decoded, int64_t *counts, int nthreads) {
  CAT(qjob_, SUFFIX) base = {0}, jobs[MAX_THREADS];
  base.x = x, base.vth = vth, base.out = decoded, base.N = N, base.C = C, base.T = T;
  base.counts = counts;
  base.tau = tau, base.decay = decay, base.ternary = ternary;
  const int n = CAT(quantize_ranges_, SUFFIX)(jobs, &base, nthreads);
  run_parallel(CAT(quantize_forward_worker_, SUFFIX), jobs, sizeof jobs[0], n);
  int64_t bad = 0;
  for (int k = 0; k < n; ++k) {
    if (jobs[k].bad < 0) return jobs[k].bad;
    bad += jobs[k].bad;
  }
  return bad;
}

/* Its backward: g_x [N] from g [N]; g_vth_partial [nthreads][max(C, 1)] doubles, caller-zeroed
 * (the caller sums the rows). Returns the number of threads used (rows written). */
int CAT(atmn_quantize_backward_, SUFFIX)(const REAL *x, const REAL *vth, int64_t N, int64_t C,
                                         int64_t T, double tau, REAL decay, int ternary,
                                         int detach_reset, int kind, REAL pa, REAL pb,
                                         const REAL *g, REAL *g_x, double *g_vth_partial,
                                         int nthreads) {
  CAT(qjob_, SUFFIX) base = {0}, jobs[MAX_THREADS];
  base.x = x, base.vth = vth, base.g = g, base.g_x = g_x, base.g_vth = g_vth_partial;
  base.N = N, base.C = C, base.T = T, base.tau = tau, base.decay = decay, base.pa = pa;
  base.pb = pb, base.keep_reset = (REAL)(detach_reset == 0), base.ternary = ternary;
  base.kind = kind, base.disjoint = kind <= 1 && pa <= (REAL)1;
  const int n = CAT(quantize_ranges_, SUFFIX)(jobs, &base, nthreads);
  run_parallel(CAT(quantize_backward_worker_, SUFFIX), jobs, sizeof jobs[0], n);
  return n;
}

#undef VL
#undef GW
#undef TC
#undef VEC
#undef LANE_INT
#undef VBYTES
#undef NOINLINE
#undef MASK
#undef DVEC
#undef QVEC
#undef VLOAD
#undef VSTORE
#undef VSPLAT
#undef VSELECT
#undef VABS
#undef SIGN_CLEAR
