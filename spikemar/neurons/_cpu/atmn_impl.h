/* ATMN forward and backward over T micro-steps for one element type (REAL, SUFFIX).
 * Included twice by atmn.c (float, double). The equations are those of
 * spikemar/neurons/functional.py; that file's PyTorch loop is the reference this must equal.
 *
 *   h_t = x_t + d·u_{t-1}   (d = 1/τ)      s_t = [h_t ≥ V] − tern·[h_t ≤ −V]      u_t = h_t − V·s_t
 *
 * Layout: x, spikes and their gradients are [T, N] contiguous; v0, v_last [N]. NULL v0 is a zero
 * membrane, NULL g_v0 is not wanted, NULL g_spikes / g_vlast / g_vseq are zero gradients.
 * Work is split in blocks of B elements (B a multiple of the channel count C, so the threshold
 * expands into one block-periodic buffer vb[B]); a block's membrane and recomputed h stay in
 * L1/L2 while x, s and the gradients stream through once.
 *
 * Per-block scratch buffers sit SB = B + 16 elements apart: at exactly 4 KiB apart (B = 1024
 * floats) every load 4K-aliases the store just issued to the neighbouring buffer and the
 * backward ran 20x slower. Hot loops are small functions with restrict pointers so that they
 * vectorise. */

#define SB_OF(B) ((B) + 16)

static void CAT(fill_vb_, SUFFIX)(REAL *vb, const REAL *vth, int64_t C, int64_t B) {
  for (int64_t i = 0; i < B; ++i) vb[i] = vth[C == 0 ? 0 : i % C];
}

/* one forward micro-step over a block; h is kept when hout != NULL (backward recompute) */
static inline void CAT(step_, SUFFIX)(int64_t len, const REAL *restrict x,
                                      const REAL *restrict vb, REAL *restrict u,
                                      REAL *restrict s_or_h, REAL d, REAL tern, int write_h) {
  if (write_h) {
    for (int64_t i = 0; i < len; ++i) {
      const REAL h = x[i] + d * u[i];
      const REAL s = (REAL)(h >= vb[i]) - tern * (REAL)(h <= -vb[i]);
      s_or_h[i] = h;
      u[i] = h - vb[i] * s;
    }
  } else {
    for (int64_t i = 0; i < len; ++i) {
      const REAL h = x[i] + d * u[i];
      const REAL s = (REAL)(h >= vb[i]) - tern * (REAL)(h <= -vb[i]);
      s_or_h[i] = s;
      u[i] = h - vb[i] * s;
    }
  }
}

/* Surrogate pulses g(z), branch-free; pa, pb as fused.surrogate_code computes them */
static inline REAL CAT(g_rectangle_, SUFFIX)(REAL z, REAL half, REAL inv_width) {
  return (REAL)(z < half && z > -half) * inv_width;
}
static inline REAL CAT(g_triangle_, SUFFIX)(REAL z, REAL inv_half, REAL unused) {
  (void)unused;
  const REAL v = (REAL)1 - (z < 0 ? -z : z) * inv_half;
  return (v > 0 ? v : (REAL)0) * inv_half;
}
static inline REAL CAT(g_sigmoid_, SUFFIX)(REAL z, REAL alpha, REAL unused) {
  (void)unused;
  const REAL sg = (REAL)1 / ((REAL)1 + EXP(-alpha * z));
  return alpha * sg * ((REAL)1 - sg);
}
static inline REAL CAT(g_atan_, SUFFIX)(REAL z, REAL k, REAL half_alpha) {
  const REAL kz = k * z;
  return half_alpha / ((REAL)1 + kz * kz);
}

/* One reverse micro-step over a block. u holds dL/du_t on entry and dL/du_{t-1} on exit.
 *   gs = dL/ds_t (from the output) − V·dL/du_t (through the reset, unless detached)
 *   gh = dL/du_t + gs·g/V,   dL/dV += −dL/du_t·s_t − gs·(h/V)·g/V,   dL/dx_t = gh
 * The body is inlined with shared_v (one V for all: a register, not two block-long streams)
 * and has_gprev (a gradient of the membrane sequence to add) as constants: in the common case
 * the loop reads four streams instead of seven. */
#define DEFINE_BACKWARD_STEP(KIND)                                                           \
  static inline __attribute__((always_inline)) void CAT(bstep_body_##KIND##_, SUFFIX)(       \
      int64_t len, const REAL *restrict ht, const REAL *restrict vb,                         \
      const REAL *restrict ivb, REAL *restrict u, const REAL *restrict gst,                  \
      const REAL *restrict gprev, REAL *restrict gvb, REAL *restrict gxt, REAL d, REAL tern, \
      REAL keep_reset, REAL pa, REAL pb, const int shared_v, const int has_gprev) {          \
    for (int64_t i = 0; i < len; ++i) {                                                      \
      const REAL h = ht[i], gu = u[i];                                                       \
      const REAL V = shared_v ? vb[0] : vb[i], iv = shared_v ? ivb[0] : ivb[i];              \
      const REAL r = h * iv;                                                                 \
      const REAL s = (REAL)(h >= V) - tern * (REAL)(h <= -V);                                \
      const REAL g = CAT(g_##KIND##_, SUFFIX)(r - (REAL)1, pa, pb) +                         \
                     tern * CAT(g_##KIND##_, SUFFIX)(-r - (REAL)1, pa, pb);                  \
      const REAL dsdh = g * iv;                                                              \
      const REAL gs = gst[i] - keep_reset * V * gu;                                          \
      const REAL gh = gu + gs * dsdh;                                                        \
      gvb[i] += -gu * s - gs * r * dsdh;                                                     \
      gxt[i] = gh;                                                                           \
      u[i] = has_gprev ? gh * d + gprev[i] : gh * d;                                         \
    }                                                                                        \
  }                                                                                          \
  static void CAT(bstep_##KIND##_, SUFFIX)(                                                  \
      int64_t len, const REAL *ht, const REAL *vb, const REAL *ivb, REAL *u,                 \
      const REAL *gst, const REAL *gprev, REAL *gvb, REAL *gxt, REAL d, REAL tern,           \
      REAL keep_reset, REAL pa, REAL pb, int shared_v, int has_gprev) {                      \
    if (shared_v && !has_gprev)                                                              \
      CAT(bstep_body_##KIND##_, SUFFIX)(len, ht, vb, ivb, u, gst, gprev, gvb, gxt, d, tern,  \
                                        keep_reset, pa, pb, 1, 0);                           \
    else if (shared_v)                                                                       \
      CAT(bstep_body_##KIND##_, SUFFIX)(len, ht, vb, ivb, u, gst, gprev, gvb, gxt, d, tern,  \
                                        keep_reset, pa, pb, 1, 1);                           \
    else if (!has_gprev)                                                                     \
      CAT(bstep_body_##KIND##_, SUFFIX)(len, ht, vb, ivb, u, gst, gprev, gvb, gxt, d, tern,  \
                                        keep_reset, pa, pb, 0, 0);                           \
    else                                                                                     \
      CAT(bstep_body_##KIND##_, SUFFIX)(len, ht, vb, ivb, u, gst, gprev, gvb, gxt, d, tern,  \
                                        keep_reset, pa, pb, 0, 1);                           \
  }
DEFINE_BACKWARD_STEP(rectangle)
DEFINE_BACKWARD_STEP(triangle)
DEFINE_BACKWARD_STEP(sigmoid)
DEFINE_BACKWARD_STEP(atan)
#undef DEFINE_BACKWARD_STEP

typedef struct {
  const REAL *x, *v0, *vth, *g_spikes, *g_vlast, *g_vseq;
  REAL *spikes, *v_last, *v_seq, *g_x, *g_v0;
  double *g_vth_partial; /* [nthreads][B] */
  int64_t T, N, C, B;
  REAL decay;
  int ternary, detach_reset, surr_kind;
  REAL surr_pa, surr_pb; /* the surrogate's parameters, precomputed by spikemar/neurons/fused.py */
  int64_t block_begin, block_end;
  int tid;
  int64_t nonfinite; /* forward: non-finite values this worker found in the probe */
} CAT(job_, SUFFIX);

static void *CAT(forward_worker_, SUFFIX)(void *arg) {
  CAT(job_, SUFFIX) *j = arg;
  const int64_t T = j->T, N = j->N, B = j->B, SB = SB_OF(B);
  REAL *scratch = malloc(sizeof(REAL) * 2 * SB);
  REAL *u = scratch, *vb = scratch + SB;
  CAT(fill_vb_, SUFFIX)(vb, j->vth, j->C, B);
  const REAL d = j->decay, tern = (REAL)(j->ternary != 0);
  int64_t nonfinite = 0;
  for (int64_t blk = j->block_begin; blk < j->block_end; ++blk) {
    const int64_t start = blk * B;
    const int64_t len = start + B <= N ? B : N - start;
    if (j->v0) memcpy(u, j->v0 + start, sizeof(REAL) * len);
    else memset(u, 0, sizeof(REAL) * len);
    for (int64_t t = 0; t < T; ++t) {
      CAT(step_, SUFFIX)(len, j->x + t * N + start, vb, u, j->spikes + t * N + start, d, tern, 0);
      if (j->v_seq) memcpy(j->v_seq + t * N + start, u, sizeof(REAL) * len);
    }
    memcpy(j->v_last + start, u, sizeof(REAL) * len);
    /* the probe of functional.check_values, while the block is in cache: with d > 0 a NaN or
     * ±inf anywhere in x or v0 reaches the final membrane; with d = 0 look at x itself */
    if (d != (REAL)0) {
      for (int64_t i = 0; i < len; ++i) nonfinite += !isfinite(u[i]);
    } else {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < len; ++i) nonfinite += !isfinite(j->x[t * N + start + i]);
    }
  }
  j->nonfinite = nonfinite;
  free(scratch);
  return NULL;
}

static void *CAT(backward_worker_, SUFFIX)(void *arg) {
  const CAT(job_, SUFFIX) *j = arg;
  const int64_t T = j->T, N = j->N, B = j->B, SB = SB_OF(B);
  /* h of every micro-step of one block is recomputed (cheaper than storing it) */
  REAL *scratch = malloc(sizeof(REAL) * (T + 5) * SB);
  REAL *hbuf = scratch, *u = scratch + T * SB, *vb = u + SB, *ivb = vb + SB, *gvb = ivb + SB;
  REAL *zeros = gvb + SB;
  double *gv = j->g_vth_partial + (int64_t)j->tid * B;
  CAT(fill_vb_, SUFFIX)(vb, j->vth, j->C, B);
  for (int64_t i = 0; i < B; ++i) ivb[i] = (REAL)1 / vb[i];
  memset(zeros, 0, sizeof(REAL) * B);
  const REAL d = j->decay, pa = j->surr_pa, pb = j->surr_pb;
  const REAL tern = (REAL)(j->ternary != 0), keep_reset = (REAL)(j->detach_reset == 0);
  const int shared_v = j->C == 0;
  for (int64_t blk = j->block_begin; blk < j->block_end; ++blk) {
    const int64_t start = blk * B;
    const int64_t len = start + B <= N ? B : N - start;
    if (j->v0) memcpy(u, j->v0 + start, sizeof(REAL) * len);
    else memset(u, 0, sizeof(REAL) * len);
    for (int64_t t = 0; t < T; ++t)
      CAT(step_, SUFFIX)(len, j->x + t * N + start, vb, u, hbuf + t * SB, d, tern, 1);
    /* from here u holds dL/du_t, starting with the gradient of the returned final membrane */
    for (int64_t i = 0; i < len; ++i) {
      REAL g = j->g_vlast ? j->g_vlast[start + i] : (REAL)0;
      if (j->g_vseq) g += j->g_vseq[(T - 1) * N + start + i];
      u[i] = g;
    }
    memset(gvb, 0, sizeof(REAL) * len);
    for (int64_t t = T - 1; t >= 0; --t) {
      const REAL *ht = hbuf + t * SB;
      const REAL *gst = j->g_spikes ? j->g_spikes + t * N + start : zeros;
      const REAL *gprev = (j->g_vseq && t > 0) ? j->g_vseq + (t - 1) * N + start : zeros;
      const int has_gprev = gprev != zeros;
      REAL *gxt = j->g_x + t * N + start;
      switch (j->surr_kind) {
        case 0:
          CAT(bstep_rectangle_, SUFFIX)(len, ht, vb, ivb, u, gst, gprev, gvb, gxt, d, tern,
                                        keep_reset, pa, pb, shared_v, has_gprev);
          break;
        case 1:
          CAT(bstep_triangle_, SUFFIX)(len, ht, vb, ivb, u, gst, gprev, gvb, gxt, d, tern,
                                       keep_reset, pa, pb, shared_v, has_gprev);
          break;
        case 2:
          CAT(bstep_sigmoid_, SUFFIX)(len, ht, vb, ivb, u, gst, gprev, gvb, gxt, d, tern,
                                      keep_reset, pa, pb, shared_v, has_gprev);
          break;
        default:
          CAT(bstep_atan_, SUFFIX)(len, ht, vb, ivb, u, gst, gprev, gvb, gxt, d, tern,
                                   keep_reset, pa, pb, shared_v, has_gprev);
      }
    }
    /* a block's T terms are summed in REAL, blocks in double */
    for (int64_t i = 0; i < len; ++i) gv[i] += (double)gvb[i];
    if (j->g_v0) memcpy(j->g_v0 + start, u, sizeof(REAL) * len);
  }
  free(scratch);
  return NULL;
}

static int64_t CAT(run_, SUFFIX)(CAT(job_, SUFFIX) * base, void *(*worker)(void *),
                                 int nthreads) {
  enum { MAX_THREADS = 64 };
  const int64_t nblocks = (base->N + base->B - 1) / base->B;
  if (nthreads > nblocks) nthreads = (int)(nblocks > 0 ? nblocks : 1);
  if (nthreads < 1) nthreads = 1;
  if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
  CAT(job_, SUFFIX) jobs[MAX_THREADS];
  pthread_t threads[MAX_THREADS];
  for (int k = 0; k < nthreads; ++k) {
    jobs[k] = *base;
    jobs[k].tid = k;
    jobs[k].block_begin = nblocks * k / nthreads;
    jobs[k].block_end = nblocks * (k + 1) / nthreads;
  }
  for (int k = 1; k < nthreads; ++k) pthread_create(&threads[k], NULL, worker, &jobs[k]);
  worker(&jobs[0]);
  for (int k = 1; k < nthreads; ++k) pthread_join(threads[k], NULL);
  int64_t nonfinite = 0;
  for (int k = 0; k < nthreads; ++k) nonfinite += jobs[k].nonfinite;
  return nonfinite;
}

/* Returns -1 if a threshold is not finite and > 0 (nothing computed), else the number of
 * non-finite values in what functional.check_values probes (the final membrane when decay > 0,
 * x when decay = 0), so that the caller raises as the reference's check does. */
int64_t CAT(atmn_forward_, SUFFIX)(const REAL *x, const REAL *v0, const REAL *vth, int64_t T,
                                   int64_t N, int64_t C, int64_t B, REAL decay, int ternary,
                                   REAL *spikes, REAL *v_last, REAL *v_seq, int nthreads) {
  for (int64_t c = 0; c < (C == 0 ? 1 : C); ++c)
    if (!(isfinite(vth[c]) && vth[c] > 0)) return -1;
  CAT(job_, SUFFIX) j = {0};
  j.x = x; j.v0 = v0; j.vth = vth; j.spikes = spikes; j.v_last = v_last; j.v_seq = v_seq;
  j.T = T; j.N = N; j.C = C; j.B = B; j.decay = decay; j.ternary = ternary;
  return CAT(run_, SUFFIX)(&j, CAT(forward_worker_, SUFFIX), nthreads);
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
  j.T = T; j.N = N; j.C = C; j.B = B; j.decay = decay; j.ternary = ternary;
  j.detach_reset = detach_reset; j.surr_kind = surr_kind;
  j.surr_pa = surr_pa; j.surr_pb = surr_pb;
  CAT(run_, SUFFIX)(&j, CAT(backward_worker_, SUFFIX), nthreads);
  return 0;
}

/* MAR's spike point for inference: δ-inject x [N] (x_0 = x, x_t = 0 after) into a zero membrane,
 * spike for T micro-steps and write the decode V·Σ_t τ^t s_t [N], without materialising the
 * spikes. Single-threaded: it serves the small per-token activations of generation, where a
 * thread launch would cost more than the work. The τ-weights are computed as the reference does
 * (Python's tau**t is C's pow in double, then rounded to REAL); no weight when decay = 0 (τ = ∞)
 * beyond the first.
 *
 * Returns -1 if a threshold is not finite and > 0 (checked first, as the reference does), else
 * the number of non-finite values in what the reference's check_values probes: the final
 * membrane when τ < ∞, the input when τ = ∞. So NaN and ±inf are counted, never swallowed. */
int64_t CAT(atmn_quantize_decode_, SUFFIX)(const REAL *x, const REAL *vth, int64_t N, int64_t C,
                                           int64_t T, double tau, REAL decay, int ternary,
                                           REAL *decoded) {
  enum { MAX_T = 64, BLK = 256 };
  if (T < 1 || T > MAX_T) return -2;
  REAL w[MAX_T];
  for (int64_t t = 0; t < T; ++t) w[t] = decay == (REAL)0 ? (REAL)(t == 0) : (REAL)pow(tau, (double)t);
  const int64_t nv = C == 0 ? 1 : C;
  for (int64_t c = 0; c < nv; ++c)
    if (!(isfinite(vth[c]) && vth[c] > 0)) return -1;
  const REAL tern = (REAL)(ternary != 0);
  int64_t bad = 0;
  /* blocks of BLK elements, micro-steps outer and elements inner (the loops vectorise); the
   * arithmetic per element is that of the reference, in its order */
  REAL xb[BLK], vb[BLK], u[BLK], acc[BLK];
  int64_t c = 0;
  for (int64_t start = 0; start < N; start += BLK) {
    const int64_t len = start + BLK <= N ? BLK : N - start;
    for (int64_t i = 0; i < len; ++i) { /* decoded may alias x: read x first */
      xb[i] = x[start + i];
      vb[i] = vth[c];
      if (C != 0 && ++c == C) c = 0;
    }
    for (int64_t i = 0; i < len; ++i) {
      const REAL h = xb[i], V = vb[i];
      const REAL s = (REAL)(h >= V) - tern * (REAL)(h <= -V);
      u[i] = h - V * s;
      acc[i] = (REAL)0 + w[0] * s;
    }
    for (int64_t t = 1; t < T; ++t) {
      const REAL wt = w[t];
      for (int64_t i = 0; i < len; ++i) {
        const REAL h = (REAL)0 + u[i] * decay, V = vb[i];
        const REAL s = (REAL)(h >= V) - tern * (REAL)(h <= -V);
        u[i] = h - V * s;
        acc[i] += wt * s;
      }
    }
    const REAL *probe = decay == (REAL)0 ? xb : u;
    for (int64_t i = 0; i < len; ++i) {
      decoded[start + i] = vb[i] * acc[i];
      bad += !isfinite(probe[i]);
    }
  }
  return bad;
}

/* RMSNorm, then (T >= 1) MAR's spike point, over rows of D values: for each row
 * y = x·rsqrt(mean(x²) + eps)·w (w NULL: no weight), then the decode of y as
 * atmn_quantize_decode computes it, written to out [rows, D]; T = 0 writes y. The sum of squares
 * is accumulated in double: equal to PyTorch's nn.RMSNorm to rounding, not bit for bit.
 * Returns as atmn_quantize_decode (T = 0: 0). */
int64_t CAT(rms_norm_quantize_decode_, SUFFIX)(const REAL *x, int64_t rows, int64_t D,
                                               const REAL *w, double eps, const REAL *vth,
                                               int64_t C, int64_t T, double tau, REAL decay,
                                               int ternary, REAL *out) {
  for (int64_t r = 0; r < rows; ++r) {
    const REAL *xr = x + r * D;
    REAL *yr = out + r * D;
    double ss = 0;
    for (int64_t i = 0; i < D; ++i) ss += (double)xr[i] * (double)xr[i];
    const REAL mean = (REAL)(ss / (double)D);
    const REAL scale = (REAL)1 / (REAL)sqrt((double)(mean + (REAL)eps));
    if (w) for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * scale * w[i];
    else for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * scale;
  }
  if (T == 0) return 0;
  return CAT(atmn_quantize_decode_, SUFFIX)(out, vth, rows * D, C, T, tau, decay, ternary, out);
}

#undef SB_OF
