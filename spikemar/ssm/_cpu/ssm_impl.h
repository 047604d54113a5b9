/* One token of the selective SSM mixer (spikemar/ssm/mixer.py), everything between the input
 * projection and the output norm, and RMSNorm over rows. Instantiated per element type (float,
 * double) by ssm.c through per_type.h, after simd.h's vectors of that type.
 *
 * Per sequence, with zxbcdt = W_in·u split into z [I], ξ [K] (K = I + 2GN) and Δ_raw [H]:
 *
 *   ξ' = SiLU(Σ_j w[:, j]·window[:, j] + b)      window = [conv state (k−1 columns), ξ]
 *   x, B, C = ξ'[:I] as [H, P], ξ'[I:I+GN] as [G, N], ξ'[I+GN:] as [G, N]
 *   Δ = clamp(softplus(Δ_raw + b_Δ), Δ_min, Δ_max),  a = −exp(A_log)·Δ
 *   h' = exp(a)·h + (Δ·x) ⊗ B_g,  y = h'·C_g + D·x,  out = y ⊙ SiLU(z)     (g = h / (H/G))
 *
 * Llamba's discrete Mamba-2 mixer is the same loop with its own row layout and four switches:
 * the offsets of ξ, z and Δ_raw in a row (Mamba-2's [z | ξ | Δ_raw]: I, 0, I + K; Llamba's
 * [ξ | z | Δ_raw]: 0, K, K + I), conv_silu = 0 (no activation after the convolution), dt_bias and
 * A_log NULL (b_Δ = 0, A = −1), dt_scales_x = 0 (the state's input is x ⊗ B), and z_bias (added to
 * z before the SiLU; NULL: none).
 *
 * softplus is PyTorch's (β = 1, linear above 20). Layout: zxbcdt [batch, I + K + H], conv_state
 * [batch, K, k−1], ssm_state [batch, H, P, N], all contiguous; the outputs gated [batch, I],
 * new_conv [batch, K, k−1], new_ssm [batch, H, P, N] and a [batch, H] are written whole.
 * new_conv may be conv_state and new_ssm ssm_state (the update in place: each value is read
 * before it is overwritten, by the same thread). Two parallel passes on torch's thread team
 * (parallel.h), nthreads workers each: the convolution over the batch's channels (into act
 * [batch, K]), then the scan over its heads; a head needs the B and C of its group, which another
 * worker's channels may hold, hence two passes. Returns the number of decays a that are not
 * finite and ≤ 0 (what ssd_step rejects). */

static inline REAL CAT(silu_, SUFFIX)(REAL v) { return v / ((REAL)1 + EXP(-v)); }

/* v ← v·σ(v) over n values. Float through simd.h's vector e^x in whole vectors, the ragged end
 * padded to one (so each value is computed alike wherever a worker's range starts: results do
 * not depend on the thread count); double value by value with exp. The scalar expf of each
 * SiLU was a fifth of the step. */
static void CAT(silu_run_, SUFFIX)(REAL *v, int64_t n) {
  if (sizeof(REAL) != sizeof(float)) {
    for (int64_t i = 0; i < n; ++i) v[i] = CAT(silu_, SUFFIX)(v[i]);
    return;
  }
  int64_t i = 0;
  for (; i + VL <= n; i += VL) {
    const VEC x = VLOAD(v + i);
    VSTORE(v + i, x / (VSPLAT(1) + CAT(vexpf_, SUFFIX)(-x)));
  }
  if (i < n) {
    REAL pad[VL];
    memset(pad, 0, sizeof pad);
    memcpy(pad, v + i, (size_t)(n - i) * sizeof(REAL));
    const VEC x = VLOAD(pad);
    VSTORE(pad, x / (VSPLAT(1) + CAT(vexpf_, SUFFIX)(-x)));
    memcpy(v + i, pad, (size_t)(n - i) * sizeof(REAL));
  }
}

static inline REAL CAT(softplus_, SUFFIX)(REAL v) {
  return v > (REAL)20 ? v : LOG1P(EXP(v));
}

/* one mixer's constants, prepared once (spikemar/ssm/fast.py's MixerStep mirrors this layout:
 * six pointers, eleven int64, two doubles) */
typedef struct {
  const REAL *conv_w, *conv_b, *dt_bias, *A_log, *D, *z_bias;
  int64_t I, N, G, H, P, k, xi_off, z_off, dt_off, conv_silu, dt_scales_x;
  double dt_min, dt_max;
} CAT(mixer_params_, SUFFIX);

/* what every worker of a call reads; act [batch, K] and gate [batch, I] are the first pass's
 * outputs (the convolution's, SiLU(z + z_bias)) */
typedef struct {
  const CAT(mixer_params_, SUFFIX) * p;
  const REAL *zxbcdt, *conv_state, *ssm_state;
  REAL *gated, *new_conv, *new_ssm, *a_out, *act, *gate;
  int64_t K, width;
} CAT(mixer_call_, SUFFIX);

typedef struct {
  const CAT(mixer_call_, SUFFIX) * m;
  int64_t begin, end; /* units: (sequence, channel) in the first pass, (sequence, head) after */
  int64_t bad;
} CAT(mixer_job_, SUFFIX);

/* the convolution of the channels [begin, end) of the flattened [batch, K] (a sequence's run of
 * them at a time), and the gate SiLU(z + z_bias) of those among its first I */
static void *CAT(mixer_conv_worker_, SUFFIX)(void *arg) {
  CAT(mixer_job_, SUFFIX) *j = arg;
  const CAT(mixer_call_, SUFFIX) *m = j->m;
  const CAT(mixer_params_, SUFFIX) *p = m->p;
  const int64_t K = m->K, I = p->I, k = p->k, km1 = k - 1;
  for (int64_t u = j->begin; u < j->end;) {
    const int64_t b = u / K, c0 = u - b * K, c1 = j->end - b * K < K ? j->end - b * K : K;
    const REAL *row = m->zxbcdt + b * m->width, *xi = row + p->xi_off, *z = row + p->z_off;
    REAL *act = m->act + b * K;
    for (int64_t c = c0; c < c1; ++c) {
      const REAL *w = p->conv_w + c * k, *win = m->conv_state + (b * K + c) * km1;
      REAL *nc = m->new_conv + (b * K + c) * km1;
      REAL acc = 0;
      for (int64_t t = 0; t < km1; ++t) acc += win[t] * w[t];
      acc += xi[c] * w[km1];
      act[c] = p->conv_b ? acc + p->conv_b[c] : acc;
      for (int64_t t = 0; t + 1 < km1; ++t) nc[t] = win[t + 1]; /* ascending: safe in place */
      if (km1 > 0) nc[km1 - 1] = xi[c];
    }
    if (p->conv_silu) CAT(silu_run_, SUFFIX)(act + c0, c1 - c0);
    if (c0 < I) {
      REAL *gate = m->gate + b * I;
      const int64_t g1 = c1 < I ? c1 : I;
      for (int64_t c = c0; c < g1; ++c) gate[c] = p->z_bias ? z[c] + p->z_bias[c] : z[c];
      CAT(silu_run_, SUFFIX)(gate + c0, g1 - c0);
    }
    u = b * K + c1;
  }
  return NULL;
}

/* h' = decay·h + xd·B over one state row of N values (in place when hn is hs), returning h'·C.
 * Two vectors of partial sums: one running sum would chain every add of the row (~4 cycles
 * each), which was most of the step's time. */
HOT REAL CAT(state_row_, SUFFIX)(const REAL *hs, REAL *hn, const REAL *Bv, const REAL *Cv,
                                 int64_t N, REAL decay, REAL xd) {
  VEC acc = VSPLAT(0), acc2 = VSPLAT(0);
  const VEC vd = VSPLAT(decay), vx = VSPLAT(xd);
  int64_t n = 0;
  for (; n + 2 * VL <= N; n += 2 * VL) {
    const VEC v = vx * VLOAD(Bv + n) + vd * VLOAD(hs + n);
    const VEC w = vx * VLOAD(Bv + n + VL) + vd * VLOAD(hs + n + VL);
    VSTORE(hn + n, v);
    VSTORE(hn + n + VL, w);
    acc += v * VLOAD(Cv + n);
    acc2 += w * VLOAD(Cv + n + VL);
  }
  for (; n + VL <= N; n += VL) {
    const VEC v = vx * VLOAD(Bv + n) + vd * VLOAD(hs + n);
    VSTORE(hn + n, v);
    acc += v * VLOAD(Cv + n);
  }
  acc += acc2;
  REAL y = 0;
  for (int64_t l = 0; l < VL; ++l) y += acc[l];
  for (; n < N; ++n) {
    const REAL v = xd * Bv[n] + decay * hs[n];
    hn[n] = v;
    y += v * Cv[n];
  }
  return y;
}

/* the scan of the heads [begin, end) of the flattened [batch, H] */
static void *CAT(mixer_scan_worker_, SUFFIX)(void *arg) {
  CAT(mixer_job_, SUFFIX) *j = arg;
  const CAT(mixer_call_, SUFFIX) *m = j->m;
  const CAT(mixer_params_, SUFFIX) *p = m->p;
  const int64_t I = p->I, N = p->N, G = p->G, H = p->H, P = p->P, K = m->K;
  const int64_t heads_per_group = H / G;
  const int clamp_lo = p->dt_min > 0, clamp_hi = !isinf(p->dt_max);
  int64_t bad = 0;
  for (int64_t u = j->begin; u < j->end; ++u) {
    const int64_t b = u / H, h = u - b * H, g = h / heads_per_group;
    const REAL *row = m->zxbcdt + b * m->width, *act = m->act + b * K, *gate = m->gate + b * I;
    const REAL *x = act, *Bv = act + I + g * N, *Cv = act + I + (G + g) * N;
    const REAL dt_raw = row[p->dt_off + h];
    REAL dt = CAT(softplus_, SUFFIX)(p->dt_bias ? dt_raw + p->dt_bias[h] : dt_raw);
    if (clamp_lo && dt < (REAL)p->dt_min) dt = (REAL)p->dt_min;
    if (clamp_hi && dt > (REAL)p->dt_max) dt = (REAL)p->dt_max;
    const REAL a = p->A_log ? -EXP(p->A_log[h]) * dt : -dt;
    m->a_out[u] = a;
    bad += !(a <= 0 && a > -(REAL)INFINITY);
    const REAL decay = EXP(a);
    for (int64_t q = 0; q < P; ++q) {
      const int64_t i = h * P + q, r = (u * P + q) * N;
      const REAL xd = p->dt_scales_x ? x[i] * dt : x[i];
      const REAL y = CAT(state_row_, SUFFIX)(m->ssm_state + r, m->new_ssm + r, Bv, Cv, N, decay,
                                             xd);
      m->gated[b * I + i] = (y + p->D[h] * x[i]) * gate[i];
    }
  }
  j->bad = bad;
  return NULL;
}

/* cuts `units` into nthreads ranges and runs worker on each (in the calling thread for one) */
static int64_t CAT(mixer_pass_, SUFFIX)(const CAT(mixer_call_, SUFFIX) * m,
                                        void *(*worker)(void *), int64_t units, int nthreads) {
  CAT(mixer_job_, SUFFIX) jobs[MAX_THREADS];
  int64_t begin[MAX_THREADS], end[MAX_THREADS];
  const int n = plan_ranges(units, 1, units, nthreads, begin, end);
  for (int t = 0; t < n; ++t) jobs[t] = (CAT(mixer_job_, SUFFIX)){m, begin[t], end[t], 0};
  if (n == 1) worker(jobs);
  else run_parallel(worker, jobs, sizeof jobs[0], n);
  int64_t bad = 0;
  for (int t = 0; t < n; ++t) bad += jobs[t].bad;
  return bad;
}

/* One token of `batch` sequences with the mixer p on nthreads workers. Returns the number of bad
 * decays, or −1 when the convolution's outputs could not be allocated. */
int64_t CAT(mixer_step_, SUFFIX)(const CAT(mixer_params_, SUFFIX) * p, const REAL *zxbcdt,
                                 const REAL *conv_state, const REAL *ssm_state, REAL *new_conv,
                                 REAL *new_ssm, REAL *gated, REAL *a_out, int64_t batch,
                                 int nthreads) {
  const int64_t K = p->I + 2 * p->G * p->N;
  REAL *act = malloc((size_t)(batch * (K + p->I)) * sizeof(REAL));
  if (!act) return -1;
  const CAT(mixer_call_, SUFFIX) m = {p, zxbcdt, conv_state, ssm_state, gated, new_conv, new_ssm,
                                      a_out, act, act + batch * K, K, p->I + K + p->H};
  CAT(mixer_pass_, SUFFIX)(&m, CAT(mixer_conv_worker_, SUFFIX), batch * K, nthreads);
  const int64_t bad = CAT(mixer_pass_, SUFFIX)(&m, CAT(mixer_scan_worker_, SUFFIX), batch * p->H,
                                               nthreads);
  free(act);
  return bad;
}

/* RMSNorm over groups of D consecutive values (rows · groups of them): y = x / √(mean(x²) + ε)
 * · w, w indexed over the whole row of groups · D (NULL: no weight). The sum of squares is taken
 * in double, so the result equals PyTorch's to rounding, not bit for bit. */
void CAT(rms_norm_, SUFFIX)(const REAL *x, int64_t rows, int64_t groups, int64_t D,
                            const REAL *w, double eps, REAL *out) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const REAL *xr = x + (r * groups + g) * D;
      REAL *yr = out + (r * groups + g) * D;
      const REAL *wg = w ? w + g * D : 0;
      double ss = 0;
      for (int64_t i = 0; i < D; ++i) ss += (double)xr[i] * (double)xr[i];
      const REAL mean = (REAL)(ss / (double)D);
      const REAL scale = (REAL)1 / (REAL)sqrt((double)(mean + (REAL)eps));
      if (wg) for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * scale * wg[i];
      else for (int64_t i = 0; i < D; ++i) yr[i] = xr[i] * scale;
    }
  }
}
