/* Vector scaffolding of spikemar's CPU kernels for one element type (REAL, SUFFIX), neuron-
 * agnostic: GCC/Clang generic vectors (the same source builds for AVX2, AVX-512 or NEON), a
 * group of GW = GK·VL neighbouring elements stepped side by side, the zero-padded copies that
 * run a block's ragged tail through the same vector code, a block-periodic buffer of a
 * per-channel parameter, and a vector e^x. Included per element type by a kernel file, before
 * the neuron's own _impl.h (atmn.c: float, double). */

#undef VBYTES
#undef VL
#undef GK
#undef GW
#undef VEC
#undef MASK
#undef DVEC
#undef LANE_INT
#undef QVEC
#undef VLOAD
#undef VSTORE
#undef VSPLAT
#undef VSELECT
#undef SIGN_CLEAR
#undef VABS

/* 32-byte vectors, AVX2's width (GCC lowers wider generic vectors on AVX2 to code ~10× slower;
 * NEON and AVX-512 run them as pairs or halves) */
#define VBYTES 32
#define VL ((int64_t)(VBYTES / sizeof(REAL)))
#define GK 4 /* vectors stepped side by side (see forward_steps) */
#define GW (GK * VL)
#define VEC CAT(vec_, SUFFIX)
#define MASK CAT(mask_, SUFFIX)
#define DVEC CAT(dvec_, SUFFIX)
typedef REAL VEC __attribute__((vector_size(VBYTES)));
/* a comparison's lanes: all ones or all zeros, integers of REAL's width */
#define LANE_INT CAT(lane_int_, SUFFIX)
typedef __typeof__(_Generic((REAL)0, float: (int32_t)0, default: (int64_t)0)) LANE_INT;
typedef LANE_INT MASK __attribute__((vector_size(VBYTES)));
/* dL/dV is summed in double, four lanes at a time (a wider generic vector compiles to spills) */
#define QVEC CAT(qvec_, SUFFIX)
typedef REAL QVEC __attribute__((vector_size(4 * sizeof(REAL))));
typedef double DVEC __attribute__((vector_size(32)));

/* acc[k] += lanes 4k..4k+3 of v, in double */
static inline void CAT(vaccumulate_, SUFFIX)(DVEC *acc, VEC v) {
  for (int k = 0; k < (int)(VL / 4); ++k) {
    QVEC q;
    memcpy(&q, (const REAL *)&v + 4 * k, sizeof q);
    acc[k] += __builtin_convertvector(q, DVEC);
  }
}

static inline VEC CAT(vload_, SUFFIX)(const REAL *p) {
  VEC v;
  memcpy(&v, p, sizeof v);
  return v;
}
static inline void CAT(vstore_, SUFFIX)(REAL *p, VEC v) { memcpy(p, &v, sizeof v); }
#define VLOAD CAT(vload_, SUFFIX)
#define VSTORE CAT(vstore_, SUFFIX)
#define VSPLAT(a) ((VEC){0} + (REAL)(a)) /* exact except that −0 becomes +0 */
/* the lanes of v where m is set, +0 elsewhere (an AND: exact, one instruction) */
#define VSELECT(m, v) ((VEC)((m) & (MASK)(v)))
/* |v|: clear the sign bits */
#define SIGN_CLEAR ((LANE_INT)((UINT64_C(1) << (8 * sizeof(REAL) - 1)) - 1))
#define VABS(v) ((VEC)((MASK)(v) & ((MASK){0} + SIGN_CLEAR)))

static void CAT(fill_vb_, SUFFIX)(REAL *vb, const REAL *vth, int64_t C, int64_t n) {
  for (int64_t i = 0; i < n; ++i) vb[i] = vth[C == 0 ? 0 : i % C];
}

/* e^x for float lanes, for the sigmoid surrogate, whose lane-by-lane expf made the backward 3×
 * slower (22 → 8 ms at T = 4, N = 2^20). Cephes' expf: x = n·ln 2 + r with |r| ≤ ln 2 / 2, a
 * degree-6 polynomial in r, then 2^n through the exponent bits; measured within 8.1e-8 relative
 * of exp over [−87, 88]. x is clamped to [−87.3, 88.3] (e^x stays finite and normal; the
 * sigmoid is 0 or 1 to float precision there either way). Compiled for both element types,
 * used only for float. */
HOT VEC CAT(vexpf_, SUFFIX)(VEC x) {
  const VEC hi = VSPLAT(88.3762626647949), lo = VSPLAT(-87.3365447505531); /* e^lo: FLT_MIN */
  x = VSELECT(x < hi, x) + VSELECT(x >= hi, hi);
  x = VSELECT(x > lo, x) + VSELECT(x <= lo, lo);
  const VEC t = x * (REAL)1.44269504088896341 + (REAL)0.5;
  VEC n = __builtin_convertvector(__builtin_convertvector(t, MASK), VEC); /* toward zero */
  n -= VSELECT(n > t, VSPLAT(1));                                       /* floor */
  const VEC r = x - n * (REAL)0.693359375 - n * (REAL)-2.12194440e-4;
  VEC y = (REAL)1.9875691500E-4 * r + (REAL)1.3981999507E-3;
  y = y * r + (REAL)8.3334519073E-3;
  y = y * r + (REAL)4.1665795894E-2;
  y = y * r + (REAL)1.6666665459E-1;
  y = y * r + (REAL)5.0000001201E-1;
  y = y * (r * r) + r + (REAL)1;
  const int mant = sizeof(REAL) == 4 ? 23 : 52, bias = sizeof(REAL) == 4 ? 127 : 1023;
  const MASK e = (__builtin_convertvector(n, MASK) + bias) << mant;
  VEC scale;
  memcpy(&scale, &e, sizeof scale);
  return y * scale;
}

/* scratch for a block's padded tail: rows of GW elements, 64-byte aligned */
static REAL *CAT(tail_scratch_, SUFFIX)(int64_t rows) {
  return aligned_alloc(64, (size_t)(rows * GW * sizeof(REAL) + 63) / 64 * 64);
}

/* pad a group at offset i (n < GW live lanes) into the scratch: x-like inputs, then [GW] ones */
static void CAT(pad_in_, SUFFIX)(REAL *dst, const REAL *src, int64_t rows, int64_t N, int64_t i,
                                 int64_t n) {
  memset(dst, 0, sizeof(REAL) * rows * GW);
  if (src)
    for (int64_t t = 0; t < rows; ++t) memcpy(dst + t * GW, src + t * N + i, sizeof(REAL) * n);
}
static void CAT(pad_out_, SUFFIX)(REAL *dst, const REAL *src, int64_t rows, int64_t N, int64_t i,
                                  int64_t n) {
  if (dst)
    for (int64_t t = 0; t < rows; ++t) memcpy(dst + t * N + i, src + t * GW, sizeof(REAL) * n);
}

