/* Multi-step scaffolding of spikemar's CPU neuron kernels for one element type (REAL, SUFFIX),
 * neuron-agnostic: blocks of B neurons split among threads, groups of GW = GK·VL neighbouring
 * neurons stepped side by side with their membranes in registers, the padded tail of a block,
 * TC micro-steps' rows streamed at a time, the forward's value probe, and the dispatch to the
 * loops compiled per variant. Included per element type after simd.h by a neuron's _impl.h,
 * which first supplies its per-micro-step arithmetic:
 *
 *   typedef struct { ... } CAT(neuron_params_, SUFFIX);    what a micro-step reads, per call
 *   HOT VEC CAT(neuron_step_, SUFFIX)(VEC x, VEC *u, VEC V, const CAT(neuron_params_, SUFFIX) *p,
 *                                     const int variant, VEC *h);
 *       one micro-step of one vector: from the input x, the membrane *u (updated in place) and
 *       the threshold V, returns the spike and writes the pre-reset membrane h (which the
 *       backward's recomputation keeps); variant is 0 or 1, a constant the loops are compiled
 *       for (ATMN: binary or ternary)
 *   HOT int CAT(neuron_probes_input_, SUFFIX)(const CAT(neuron_params_, SUFFIX) *p);
 *       whether the forward's non-finite probe reads the input x (1) or the final membrane (0)
 *
 * It then gets: the job, group and view types; steps (micro-steps of a group, used by the forward
 * and by a backward's recomputation); the forward over a call (neuron_forward: threshold check,
 * threads, blocks, tails, probe); run (a worker over threads by blocks) for the neuron's own
 * backward; and the helpers a backward reuses (initial_u, load_v, group_at, block_view,
 * consts_of). A neuron's whole forward is therefore its step: see atmn_impl.h, and the test-only
 * second neuron in tests/test_neuron_seam.py. Layout as in atmn_impl.h: x, spikes and their
 * gradients [T, N] contiguous; v0, v_last [N]; vth [C] per channel (C = 0: one shared). */

#define TC 4 /* micro-steps whose rows are streamed side by side (see forward_worker) */
#define NOINLINE static __attribute__((noinline))
#define NPARAMS CAT(neuron_params_, SUFFIX)

typedef struct {
  const REAL *x, *v0, *vth, *g_spikes, *g_vlast, *g_vseq;
  REAL *spikes, *v_last, *v_seq, *g_x, *g_v0;
  double *g_vth_partial; /* a backward's [nthreads][B] per-slot threshold gradient */
  int64_t T, N, C, B;
  NPARAMS p;   /* the neuron's parameters */
  int variant; /* 0 or 1: which compiled variant of the loops runs */
  int64_t block_begin, block_end;
  int tid;
  int64_t nonfinite; /* forward: non-finite values this worker found in the probe */
} CAT(job_, SUFFIX);

/* The pointers of one group of GW = GK·VL neighbouring neurons: x-like arrays are [T][stride],
 * the others [GW]. A block's tail points them at zero-padded copies with stride GW. */
typedef struct {
  const REAL *x, *v0, *g_spikes, *g_vlast, *g_vseq;
  REAL *spikes, *v_seq, *v_last, *g_x, *g_v0;
  int64_t stride;
} CAT(group_, SUFFIX);

/* Micro-steps t0..t1−1 of one group from x [t][st], its membrane u in and out. Each micro-step is
 * a chain of about 16 cycles of latency per vector (h, s, u): GK independent vectors side by side
 * keep the core busy where one vector at a time would wait. Writes what is wanted (NULL: not):
 * the spikes and the membrane sequence [t][st] (the forward), h into hout [t][hstride] (the
 * backward's recomputation). */
HOT void CAT(steps_, SUFFIX)(const REAL *x, int64_t st, int64_t t0, int64_t t1, const VEC *V,
                             const NPARAMS *params, const int variant, VEC *u, REAL *spikes,
                             REAL *v_seq, REAL *hout, int64_t hstride) {
  const NPARAMS p = *params; /* a local copy: no store below can alias it */
  for (int64_t t = t0; t < t1; ++t) {
    for (int k = 0; k < GK; ++k) {
      VEC h;
      const VEC xt = VLOAD(x + t * st + k * VL);
      const VEC s = CAT(neuron_step_, SUFFIX)(xt, &u[k], V[k], &p, variant, &h);
      if (spikes) VSTORE(spikes + t * st + k * VL, s);
      if (hout) VSTORE(hout + t * hstride + k * VL, h);
      if (v_seq) VSTORE(v_seq + t * st + k * VL, u[k]);
    }
  }
}

/* the membrane entering micro-step c0: v0 (or zero) at c0 = 0, else carried in ub */
HOT void CAT(initial_u_, SUFFIX)(const CAT(group_, SUFFIX) * g, int64_t c0, const REAL *ub,
                                 VEC *u) {
  for (int k = 0; k < GK; ++k)
    u[k] = c0 > 0 ? VLOAD(ub + k * VL) : g->v0 ? VLOAD(g->v0 + k * VL) : VSPLAT(0);
}

HOT void CAT(load_v_, SUFFIX)(VEC *V, const REAL *vb, VEC V0, const int shared_v) {
  for (int k = 0; k < GK; ++k) V[k] = shared_v ? V0 : VLOAD(vb + k * VL);
}

/* The group at offset q of a view (a group struct whose pointers sit at a block's start) */
HOT CAT(group_, SUFFIX) CAT(group_at_, SUFFIX)(const CAT(group_, SUFFIX) * view, int64_t q) {
  CAT(group_, SUFFIX) g = *view;
#define ADVANCE(p) g.p = g.p ? g.p + q : NULL
  ADVANCE(x);
  ADVANCE(v0);
  ADVANCE(g_spikes);
  ADVANCE(g_vlast);
  ADVANCE(g_vseq);
  ADVANCE(spikes);
  ADVANCE(v_seq);
  ADVANCE(v_last);
  ADVANCE(g_x);
  ADVANCE(g_v0);
#undef ADVANCE
  return g;
}

/* What a block's loops read besides the view: fixed for a whole call */
typedef struct {
  int64_t T;
  REAL V0; /* the shared threshold (shared_v) */
  int shared_v;
  NPARAMS p;
} CAT(consts_, SUFFIX);

/* The loops over a block's groups, compiled once per combination of their constant flags (the
 * variant here; a backward's own flags, atmn_impl.h) and called through pointers once per
 * block, or per block and chunk of micro-steps: inlining every combination into every caller
 * took the build from ~1 s to ~35 s, and a call per block costs nothing next to its work. Each
 * takes the groups q = 0, GW, … < len of the view; n_last is the number of live lanes of the
 * last group (GW but for a block's padded tail).
 *
 * forward: micro-steps c0..c1−1, the membrane from v0 (c0 = 0) or ub, to ub (c1 < T) or v_last;
 * returns the number of final membranes that are NaN or ±inf. */
typedef int64_t (*CAT(fwd_fn_, SUFFIX))(const CAT(group_, SUFFIX) *, const CAT(consts_, SUFFIX) *,
                                        const REAL *, REAL *, int64_t, int64_t, int64_t);
/* recompute: h of micro-steps c0..c1−1 into hbuf [t][hstride], the membrane carried in ub */
typedef void (*CAT(rec_fn_, SUFFIX))(const CAT(group_, SUFFIX) *, const CAT(consts_, SUFFIX) *,
                                     const REAL *, REAL *, REAL *, int64_t, int64_t, int64_t,
                                     int64_t);

#define DEFINE_FORWARD(VARIANT)                                                                    \
  NOINLINE int64_t CAT(fwd_##VARIANT##_, SUFFIX)(const CAT(group_, SUFFIX) * view_,                \
                                              const CAT(consts_, SUFFIX) * k_, const REAL *vb,     \
                                              REAL *ub, int64_t len, int64_t c0, int64_t c1) {     \
    const CAT(group_, SUFFIX) view = *view_; /* local copies: fields stay in registers */          \
    const CAT(consts_, SUFFIX) c = *k_;                                                            \
    const VEC V0 = VSPLAT(c.V0);                                                                   \
    MASK bad = (MASK){0};                                                                          \
    VEC V[GK], u[GK];                                                                              \
    for (int64_t q = 0; q < len; q += GW) {                                                        \
      const CAT(group_, SUFFIX) g = CAT(group_at_, SUFFIX)(&view, q);                              \
      CAT(load_v_, SUFFIX)(V, vb + q, V0, c.shared_v);                                             \
      CAT(initial_u_, SUFFIX)(&g, c0, ub + q, u);                                                  \
      CAT(steps_, SUFFIX)(g.x, g.stride, c0, c1, V, &c.p, VARIANT, u, g.spikes, g.v_seq, NULL, 0); \
      for (int k = 0; k < GK; ++k) {                                                               \
        if (c1 < c.T) {                                                                            \
          VSTORE(ub + q + k * VL, u[k]);                                                           \
        } else {                                                                                   \
          VSTORE(g.v_last + k * VL, u[k]);                                                         \
          bad -= (u[k] - u[k]) != (u[k] - u[k]); /* NaN or ±inf (u − u is NaN for both) */         \
        }                                                                                          \
      }                                                                                            \
    }                                                                                              \
    int64_t n = 0;                                                                                 \
    for (int k = 0; k < (int)VL; ++k) n += (int64_t)bad[k];                                        \
    return n;                                                                                      \
  }                                                                                                \
  NOINLINE void CAT(rec_##VARIANT##_, SUFFIX)(                                                     \
      const CAT(group_, SUFFIX) * view_, const CAT(consts_, SUFFIX) * k_, const REAL *vb,          \
      REAL *ub, REAL *hbuf, int64_t hstride, int64_t len, int64_t c0, int64_t c1) {                \
    const CAT(group_, SUFFIX) view = *view_;                                                       \
    const CAT(consts_, SUFFIX) c = *k_;                                                            \
    const VEC V0 = VSPLAT(c.V0);                                                                   \
    VEC V[GK], u[GK];                                                                              \
    for (int64_t q = 0; q < len; q += GW) {                                                        \
      const CAT(group_, SUFFIX) g = CAT(group_at_, SUFFIX)(&view, q);                              \
      CAT(load_v_, SUFFIX)(V, vb + q, V0, c.shared_v);                                             \
      CAT(initial_u_, SUFFIX)(&g, c0, ub + q, u);                                                  \
      CAT(steps_, SUFFIX)(g.x, g.stride, c0, c1, V, &c.p, VARIANT, u, NULL, NULL, hbuf + q,        \
                          hstride);                                                                \
      if (c1 < c.T)                                                                                \
        for (int k = 0; k < GK; ++k) VSTORE(ub + q + k * VL, u[k]);                                \
    }                                                                                              \
  }
DEFINE_FORWARD(0)
DEFINE_FORWARD(1)
#undef DEFINE_FORWARD

/* the view of a block at start (stride N) */
static CAT(group_, SUFFIX) CAT(block_view_, SUFFIX)(const CAT(job_, SUFFIX) * j, int64_t start) {
  const CAT(group_, SUFFIX) all = {
      .x = j->x, .v0 = j->v0, .g_spikes = j->g_spikes, .g_vlast = j->g_vlast,
      .g_vseq = j->g_vseq, .spikes = j->spikes, .v_seq = j->v_seq, .v_last = j->v_last,
      .g_x = j->g_x, .g_v0 = j->g_v0, .stride = j->N};
  return CAT(group_at_, SUFFIX)(&all, start);
}

static CAT(consts_, SUFFIX) CAT(consts_of_, SUFFIX)(const CAT(job_, SUFFIX) * j) {
  const CAT(consts_, SUFFIX) c = {.T = j->T, .V0 = j->vth[0], .shared_v = j->C == 0, .p = j->p};
  return c;
}

/* Forward over this worker's blocks. With T > TC the block runs TC micro-steps at a time (its
 * membrane in ub between them): more rows side by side than that and the reads and writes of
 * the T rows stop streaming (T = 16 ran 25 % slower than block-major code without it). A
 * block's tail runs all T micro-steps at once on zero-padded copies (padded lanes stay at 0). */
static void *CAT(forward_worker_, SUFFIX)(void *arg) {
  CAT(job_, SUFFIX) *j = arg;
  const int64_t T = j->T, N = j->N, B = j->B;
  /* the tail's padded copies: x-like [T][GW] ×5, the others [GW] ×3 */
  REAL *tail = CAT(tail_scratch_, SUFFIX)(5 * T + 3);
  REAL *vb = malloc(sizeof(REAL) * 2 * (B + GW)), *ub = vb + B + GW;
  CAT(fill_vb_, SUFFIX)(vb, j->vth, j->C, B + GW);
  const CAT(consts_, SUFFIX) c = CAT(consts_of_, SUFFIX)(j);
  const CAT(fwd_fn_, SUFFIX) forward = j->variant ? CAT(fwd_1_, SUFFIX) : CAT(fwd_0_, SUFFIX);
  const int probe_x = CAT(neuron_probes_input_, SUFFIX)(&j->p);
  int64_t bad_u = 0, bad_x = 0; /* non-finite final membranes; non-finite x */
  for (int64_t blk = j->block_begin; blk < j->block_end; ++blk) {
    const int64_t start = blk * B;
    const int64_t len = start + B <= N ? B : N - start, full = len - len % GW;
    const CAT(group_, SUFFIX) view = CAT(block_view_, SUFFIX)(j, start);
    for (int64_t c0 = 0; c0 < T && full > 0; c0 += TC)
      bad_u += forward(&view, &c, vb, ub, full, c0, c0 + TC < T ? c0 + TC : T);
    if (full < len) {
      const int64_t i = start + full, n = len - full;
      REAL *xs = tail, *ss = xs + T * GW, *vs = ss + T * GW, *v0s = vs + T * GW;
      REAL *vls = v0s + GW;
      CAT(pad_in_, SUFFIX)(xs, j->x, T, N, i, n);
      CAT(pad_in_, SUFFIX)(v0s, j->v0, 1, 0, i, n);
      const CAT(group_, SUFFIX) padded = {.x = xs, .v0 = j->v0 ? v0s : NULL, .spikes = ss,
                                          .v_seq = j->v_seq ? vs : NULL, .v_last = vls,
                                          .stride = GW};
      bad_u += forward(&padded, &c, vb + full, ub, GW, 0, T); /* ub unused: c0 = 0, c1 = T */
      CAT(pad_out_, SUFFIX)(j->spikes, ss, T, N, i, n);
      CAT(pad_out_, SUFFIX)(j->v_seq, vs, T, N, i, n);
      CAT(pad_out_, SUFFIX)(j->v_last, vls, 1, 0, i, n);
    }
    /* the probe of functional.check_values: a NaN or ±inf anywhere in x or v0 reaches the
     * final membrane (counted above) unless the neuron forgets it (ATMN with d = 0): then x */
    if (probe_x)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t k = 0; k < len; ++k) bad_x += !isfinite(j->x[t * N + start + k]);
  }
  j->nonfinite = probe_x ? bad_x : bad_u;
  free(vb);
  free(tail);
  return NULL;
}

static int64_t CAT(run_, SUFFIX)(CAT(job_, SUFFIX) * base, void *(*worker)(void *),
                                 int nthreads) {
  const int64_t nblocks = (base->N + base->B - 1) / base->B;
  int64_t begin[MAX_THREADS], end[MAX_THREADS];
  nthreads = plan_ranges(nblocks, 1, nblocks, nthreads, begin, end);
  CAT(job_, SUFFIX) jobs[MAX_THREADS];
  for (int k = 0; k < nthreads; ++k) {
    jobs[k] = *base;
    jobs[k].tid = k;
    jobs[k].block_begin = begin[k];
    jobs[k].block_end = end[k];
  }
  run_parallel(worker, jobs, sizeof jobs[0], nthreads);
  int64_t nonfinite = 0;
  for (int k = 0; k < nthreads; ++k) nonfinite += jobs[k].nonfinite;
  return nonfinite;
}

/* The forward of a call: -1 if a threshold is not finite and > 0 (nothing computed), else the
 * number of non-finite values the probe found (so that the caller raises as the reference's
 * check does). j holds the pointers, T, N, C, B, the parameters and the variant. */
static int64_t CAT(neuron_forward_, SUFFIX)(CAT(job_, SUFFIX) * j, int nthreads) {
  for (int64_t c = 0; c < (j->C == 0 ? 1 : j->C); ++c)
    if (!(isfinite(j->vth[c]) && j->vth[c] > 0)) return -1;
  return CAT(run_, SUFFIX)(j, CAT(forward_worker_, SUFFIX), nthreads);
}

/* -- the backward (when the neuron defines NEURON_BACKWARD) -------------------------------------
 *
 * The neuron then supplies, after including this file:
 *   HOT void CAT(neuron_reverse_, SUFFIX)(const CAT(group_, SUFFIX) *g, const REAL *hin,
 *       int64_t hstride, int64_t t0, int64_t t1, const VEC *V, const VEC *iv, const NPARAMS *p,
 *       const int flags, VEC *gu, VEC *gv);
 *       reverse micro-steps t1−1 down to t0 of one group from its recomputed h (hin
 *       [t][hstride]): reads g->g_spikes and g->g_vseq ([t][g->stride], NULL: zero), writes
 *       g->g_x; gu = dL/du_t carried in and out; gv += the lanes' dL/dV terms; iv = 1/V
 *   DEFINE_REVERSE_LOOP(NAME, VARIANT, FLAGS) once per compiled combination (NAME##SUFFIX the
 *       loop, VARIANT the forward's variant used for the recomputation, FLAGS an int constant
 *       passed to neuron_reverse_), and
 *   static CAT(rev_fn_, SUFFIX) CAT(neuron_reverse_for_, SUFFIX)(const NPARAMS *p, int variant);
 *       which loop runs a call.
 * It gets neuron_backward (threads, blocks, recomputation in chunks, tails, dL/dV per slot). */
#ifdef NEURON_BACKWARD
HOT void CAT(final_gu_, SUFFIX)(const CAT(group_, SUFFIX) * g, int64_t T, VEC *gu) {
  for (int k = 0; k < GK; ++k) {
    gu[k] = g->g_vlast ? VLOAD(g->g_vlast + k * VL) : VSPLAT(0);
    if (g->g_vseq) gu[k] += VLOAD(g->g_vseq + (T - 1) * g->stride + k * VL);
  }
}

/* add a group's dL/dV terms (n live lanes): shared V into the double accumulators, per-channel
 * V into its block slots (in double) */
HOT void CAT(add_gv_, SUFFIX)(const VEC *gv, DVEC *gshared, double *gvslots, int64_t n,
                              const int shared_v) {
  if (shared_v) {
    for (int k = 0; k < GK; ++k) CAT(vaccumulate_, SUFFIX)(gshared, gv[k]);
  } else if (n == GW) {
    for (int k = 0; k < GK; ++k) {
      DVEC acc[VL / 4];
      memcpy(acc, gvslots + k * VL, sizeof acc);
      CAT(vaccumulate_, SUFFIX)(acc, gv[k]);
      memcpy(gvslots + k * VL, acc, sizeof acc);
    }
  } else {
    for (int64_t m = 0; m < n; ++m) gvslots[m] += (double)gv[m / VL][m % VL];
  }
}

/* reverse: micro-steps c1−1..c0 from h in hbuf [t][hstride] (hstride 0: each group recomputes
 * its own h into hbuf first, all T micro-steps at once), dL/du from g_vlast / g_vseq (c1 = T) or
 * ub, to ub (c0 > 0) or g_v0; dL/dV into gvslots / gshared */
typedef void (*CAT(rev_fn_, SUFFIX))(const CAT(group_, SUFFIX) *, const CAT(consts_, SUFFIX) *,
                                     const REAL *, const REAL *, REAL *, REAL *, int64_t, int64_t,
                                     int64_t, int64_t, int64_t, double *, DVEC *);

#define DEFINE_REVERSE_LOOP(NAME, VARIANT, FLAGS)                                                  \
  NOINLINE void CAT(NAME, SUFFIX)(                                                                 \
      const CAT(group_, SUFFIX) * view_, const CAT(consts_, SUFFIX) * k_, const REAL *vb,          \
      const REAL *ivb, REAL *ub, REAL *hbuf, int64_t hstride, int64_t len, int64_t n_last,         \
      int64_t c0, int64_t c1, double *gvslots, DVEC *gshared) {                                    \
    const CAT(group_, SUFFIX) view = *view_;                                                       \
    const CAT(consts_, SUFFIX) c = *k_;                                                            \
    const VEC V0 = VSPLAT(c.V0), iV0 = VSPLAT((REAL)1 / c.V0);                                     \
    VEC V[GK], iv[GK], u[GK], gu[GK], gv[GK];                                                      \
    for (int64_t q = 0; q < len; q += GW) {                                                        \
      const CAT(group_, SUFFIX) g = CAT(group_at_, SUFFIX)(&view, q);                              \
      CAT(load_v_, SUFFIX)(V, vb + q, V0, c.shared_v);                                             \
      CAT(load_v_, SUFFIX)(iv, ivb + q, iV0, c.shared_v);                                          \
      for (int k = 0; k < GK; ++k) gv[k] = VSPLAT(0);                                              \
      const REAL *h = hbuf + q;                                                                    \
      int64_t hs = hstride;                                                                        \
      if (hstride == 0) { /* the group's own h, all micro-steps */                                 \
        CAT(initial_u_, SUFFIX)(&g, 0, NULL, u);                                                   \
        CAT(steps_, SUFFIX)(g.x, g.stride, 0, c.T, V, &c.p, VARIANT, u, NULL, NULL, hbuf, GW);     \
        h = hbuf, hs = GW;                                                                         \
      }                                                                                            \
      if (c1 == c.T) {                                                                             \
        CAT(final_gu_, SUFFIX)(&g, c.T, gu);                                                       \
      } else {                                                                                     \
        for (int k = 0; k < GK; ++k) gu[k] = VLOAD(ub + q + k * VL);                               \
      }                                                                                            \
      CAT(neuron_reverse_, SUFFIX)(&g, h, hs, c0, c1, V, iv, &c.p, FLAGS, gu, gv);                 \
      for (int k = 0; k < GK; ++k) {                                                               \
        if (c0 > 0) VSTORE(ub + q + k * VL, gu[k]);                                                \
        else if (g.g_v0) VSTORE(g.g_v0 + k * VL, gu[k]);                                           \
      }                                                                                            \
      CAT(add_gv_, SUFFIX)(gv, gshared, gvslots + q, q + GW < len ? GW : n_last, c.shared_v);      \
    }                                                                                              \
  }

static CAT(rev_fn_, SUFFIX) CAT(neuron_reverse_for_, SUFFIX)(const NPARAMS *p, int variant);

/* Backward over this worker's blocks; dL/dV per block slot (per channel) or, shared, in slot 0 of
 * this worker's row, summed in double across groups and blocks, in REAL within a group's run of
 * micro-steps. T ≤ TC: each group recomputes its h into the L1 array hs and reverses at once.
 * T > TC: the block's h is recomputed TC micro-steps at a time into hbuf [T][B] (L2), then
 * reversed TC micro-steps at a time, dL/du carried in ub between them. A block's tail runs all
 * T micro-steps at once on zero-padded copies, whose padded lanes have x, v0 and every incoming
 * gradient 0 and so add nothing to dL/dV. */
static void *CAT(backward_worker_, SUFFIX)(void *arg) {
  const CAT(job_, SUFFIX) *j = arg;
  const int64_t T = j->T, N = j->N, B = j->B;
  /* the tail's padded copies: x-like [T][GW] ×5, the others [GW] ×3 */
  REAL *tail = CAT(tail_scratch_, SUFFIX)(5 * T + 3);
  REAL *hs = aligned_alloc(64, (size_t)(TC * GW * sizeof(REAL) + 63) / 64 * 64);
  REAL *hbuf = T > TC ? malloc(sizeof(REAL) * T * B) : NULL;
  REAL *vb = malloc(sizeof(REAL) * 3 * (B + GW)), *ivb = vb + B + GW, *ub = ivb + B + GW;
  CAT(fill_vb_, SUFFIX)(vb, j->vth, j->C, B + GW);
  for (int64_t i = 0; i < B + GW; ++i) ivb[i] = (REAL)1 / vb[i];
  const CAT(consts_, SUFFIX) c = CAT(consts_of_, SUFFIX)(j);
  const CAT(rec_fn_, SUFFIX) recompute = j->variant ? CAT(rec_1_, SUFFIX) : CAT(rec_0_, SUFFIX);
  const CAT(rev_fn_, SUFFIX) reverse = CAT(neuron_reverse_for_, SUFFIX)(&j->p, j->variant);
  double *gvrow = j->g_vth_partial + (int64_t)j->tid * B;
  DVEC gshared[VL / 4] = {{0}};
  for (int64_t blk = j->block_begin; blk < j->block_end; ++blk) {
    const int64_t start = blk * B;
    const int64_t len = start + B <= N ? B : N - start, full = len - len % GW;
    const CAT(group_, SUFFIX) view = CAT(block_view_, SUFFIX)(j, start);
    if (full > 0 && T <= TC) {
      reverse(&view, &c, vb, ivb, ub, hs, 0, full, GW, 0, T, gvrow, gshared);
    } else if (full > 0) {
      for (int64_t c0 = 0; c0 < T; c0 += TC)
        recompute(&view, &c, vb, ub, hbuf, B, full, c0, c0 + TC < T ? c0 + TC : T);
      for (int64_t c1 = T; c1 > 0;) {
        const int64_t c0 = (c1 - 1) / TC * TC;
        reverse(&view, &c, vb, ivb, ub, hbuf, B, full, GW, c0, c1, gvrow, gshared);
        c1 = c0;
      }
    }
    if (full < len) {
      const int64_t i = start + full, n = len - full;
      REAL *xs = tail, *gss = xs + T * GW, *gqs = gss + T * GW, *gxs = gqs + T * GW;
      REAL *hts = gxs + T * GW, *v0s = hts + T * GW, *gls = v0s + GW, *g0s = gls + GW;
      CAT(pad_in_, SUFFIX)(xs, j->x, T, N, i, n);
      CAT(pad_in_, SUFFIX)(gss, j->g_spikes, T, N, i, n);
      CAT(pad_in_, SUFFIX)(gqs, j->g_vseq, T, N, i, n);
      CAT(pad_in_, SUFFIX)(v0s, j->v0, 1, 0, i, n);
      CAT(pad_in_, SUFFIX)(gls, j->g_vlast, 1, 0, i, n);
      const CAT(group_, SUFFIX) padded = {
          .x = xs, .v0 = j->v0 ? v0s : NULL, .g_spikes = j->g_spikes ? gss : NULL,
          .g_vlast = j->g_vlast ? gls : NULL, .g_vseq = j->g_vseq ? gqs : NULL, .g_x = gxs,
          .g_v0 = j->g_v0 ? g0s : NULL, .stride = GW};
      reverse(&padded, &c, vb + full, ivb + full, ub, hts, 0, GW, n, 0, T, gvrow + full,
              gshared);
      CAT(pad_out_, SUFFIX)(j->g_x, gxs, T, N, i, n);
      CAT(pad_out_, SUFFIX)(j->g_v0, g0s, 1, 0, i, n);
    }
  }
  if (c.shared_v)
    for (int k = 0; k < (int)VL; ++k) gvrow[0] += gshared[k / 4][k % 4];
  free(vb);
  free(hbuf);
  free(hs);
  free(tail);
  return NULL;
}

/* The backward of a call: j holds the pointers (g_vth_partial: caller-zeroed [nthreads][B]
 * doubles, which the caller folds into V's shape), T, N, C, B, the parameters and the variant. */
static void CAT(neuron_backward_, SUFFIX)(CAT(job_, SUFFIX) * j, int nthreads) {
  CAT(run_, SUFFIX)(j, CAT(backward_worker_, SUFFIX), nthreads);
}
#endif /* NEURON_BACKWARD */
