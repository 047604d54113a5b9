/* A whole generated token of a spikemar SSM language model in one call: a list of operations
 * (embedding, RMSNorm, projection, the mixer's middle, spike point, SwiGLU gate, residual add)
 * that spikemar/models/fused_step.py compiles from a model's modules once, run here in order.
 * Instantiated per element type (float, double) by program.c through per_type.h, after
 * ssm_impl.h (the mixer step, RMSNorm) and linear_impl.h (the projection) of the same type,
 * whose functions every operation calls: each operation computes what the module it stands for
 * computes on its fast path, with the same kernel, so a step here equals the modules' step.
 *
 * Why: one token of the ~130 M Mamba-2 is ~100 module calls whose Python costs ~100 µs per layer
 * (~2.5 ms of a ~20 ms token) beside reading the weights; here it is one call. Buffers are the
 * caller's (fixed per batch size); the layers' recurrent states are given per call. */

#ifndef PROGRAM_OPS /* once for both types */
#define PROGRAM_OPS
enum {
  OP_EMBED,  /* p0 table [vocab, D] → p1 [M, D]; n0 D, n1 vocab, n2 M; the tokens of the call */
  OP_NORM,   /* RMSNorm: p0 x → p2, weight p1 (NULL: none); n0 rows, n1 groups, n2 D; f0 ε */
  OP_LINEAR, /* p0 x [M, K] · p1 W [N, K]ᵀ (+ p2 b) → p3; n0 M, n1 K, n2 N */
  OP_MIXER,  /* p0 mixer_params, p1 zxbcdt → p2 gated, p3 a (scratch); n0 layer, n1 M */
  OP_SPIKE,  /* p0 atmn_quantize_forward, p1 x, p2 V → p3; n0 values, n1 C, n2 T, n3 ternary;
                f0 τ, f1 1/τ */
  OP_SWIGLU, /* p2 = SiLU(p0) · p1 over n0 values */
  OP_ADD,    /* p0 += p1 over n0 values; n1: p0 rounded to float first (residual_in_fp32) */
};
#endif

/* one operation (spikemar/models/fused_step.py's _Op mirrors this layout) */
typedef struct {
  int64_t kind, nthreads;
  void *p[4];
  int64_t n[4];
  double f[2];
} CAT(step_op_, SUFFIX);

typedef int64_t (*CAT(spike_fn_, SUFFIX))(const REAL *, const REAL *, int64_t, int64_t, int64_t,
                                           double, REAL, int, REAL *, int64_t *, int);

/* Runs ops[0, n) for the tokens [M] (int64) with the layers' states (states[2·l] the conv
 * state, states[2·l + 1] the SSM state of layer l, updated in place). Returns 0, or 1 + the index
 * of the operation that failed with its code in *code: a token outside [0, vocab) (code: its
 * position), a decay that is not finite and ≤ 0 (code: how many), a spike point's kernel code
 * (see atmn_quantize_decode), −1 for scratch that could not be allocated. Operations after the
 * failing one do not run. */
int64_t CAT(run_program_, SUFFIX)(const CAT(step_op_, SUFFIX) * ops, int64_t n,
                                  const int64_t *tokens, REAL *const *states, int64_t *code) {
  for (int64_t i = 0; i < n; ++i) {
    const CAT(step_op_, SUFFIX) *o = ops + i;
    REAL *const *p = (REAL *const *)o->p;
    const int64_t *c = o->n;
    int64_t bad = 0;
    switch (o->kind) {
    case OP_EMBED:
      for (int64_t m = 0; m < c[2]; ++m) {
        if (tokens[m] < 0 || tokens[m] >= c[1]) {
          *code = m;
          return i + 1;
        }
        memcpy(p[1] + m * c[0], p[0] + tokens[m] * c[0], (size_t)c[0] * sizeof(REAL));
      }
      break;
    case OP_NORM:
      CAT(rms_norm_, SUFFIX)(p[0], c[0], c[1], c[2], p[1], o->f[0], p[2]);
      break;
    case OP_LINEAR:
      CAT(linear_, SUFFIX)(p[0], p[1], p[2], p[3], c[0], c[1], c[2], (int)o->nthreads);
      break;
    case OP_MIXER: {
      REAL *conv = states[2 * c[0]], *ssm = states[2 * c[0] + 1];
      bad = CAT(mixer_step_, SUFFIX)(o->p[0], p[1], conv, ssm, conv, ssm, p[2], p[3], c[1],
                                     (int)o->nthreads);
      if (bad) *code = bad;
      break;
    }
    case OP_SPIKE: {
      CAT(spike_fn_, SUFFIX) fn;
      memcpy(&fn, &o->p[0], sizeof fn);
      bad = fn(p[1], p[2], c[0], c[1], c[2], o->f[0], (REAL)o->f[1], (int)c[3], p[3], NULL,
               (int)o->nthreads);
      if (bad) *code = bad;
      break;
    }
    case OP_SWIGLU: {
      const REAL *g = p[0], *u = p[1];
      REAL *y = p[2];
      memcpy(y, g, (size_t)c[0] * sizeof(REAL));
      CAT(silu_run_, SUFFIX)(y, c[0]);
      for (int64_t k = 0; k < c[0]; ++k) y[k] *= u[k];
      break;
    }
    case OP_ADD:
      if (c[1])
        for (int64_t k = 0; k < c[0]; ++k) p[0][k] = (REAL)(float)p[0][k] + p[1][k];
      else
        for (int64_t k = 0; k < c[0]; ++k) p[0][k] += p[1][k];
      break;
    default:
      *code = o->kind;
      return i + 1;
    }
    if (bad) return i + 1;
  }
  return 0;
}
