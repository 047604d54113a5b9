/* The GEMV/thin-GEMM of linear.c for one element type (REAL, SUFFIX), on simd.h's vectors (VEC,
 * VL lanes, VLOAD). */

/* the lanes of v summed pairwise, in a fixed order (the result does not depend on threads), in
 * registers: through memory, each 32-byte store read back as scalars stalls store forwarding.
 * Lane 0 after the rotations by VL/2, ..., 1 is ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))
 * for 8 lanes. GCC takes the rotation as a vector (folded to constants); Clang's shuffle needs
 * literal indices, so there the lanes are summed in the same order one by one. */
static inline REAL CAT(lsum_, SUFFIX)(VEC v) {
#if defined(__clang__)
  for (int64_t w = VL / 2; w >= 1; w /= 2)
    for (int64_t i = 0; i < w; ++i) v[i] += v[i + w];
#else
  MASK lane;
  for (int64_t i = 0; i < VL; ++i) lane[i] = (LANE_INT)i;
  for (int64_t w = VL / 2; w >= 1; w /= 2)
    v += __builtin_shuffle(v, (lane + (LANE_INT)w) & (LANE_INT)(VL - 1));
#endif
  return v[0];
}

/* Rows o[0], ..., o[R − 1] of W (R ≤ 4, anywhere in W) against rows [m0, m0 + S) of x (S ≤ 2):
 * the R·S dot products over K, in R·S vector accumulators, W's vectors loaded once for the S
 * rows of x. */
HOT void CAT(tile_, SUFFIX)(const REAL *x, const REAL *W, const REAL *b, REAL *y,
                                        int64_t K, int64_t N, const int64_t *o, int R, int64_t m0,
                                        int S) {
  VEC acc[2][4] = {{{0}}};
  const REAL *w[4];
  for (int r = 0; r < R; ++r) w[r] = W + o[r] * K;
  const int64_t Kv = K - K % VL;
  for (int64_t k = 0; k < Kv; k += VL) {
    VEC xv[2];
    for (int s = 0; s < S; ++s) xv[s] = VLOAD(x + (m0 + s) * K + k);
    for (int r = 0; r < R; ++r) {
      const VEC wv = VLOAD(w[r] + k);
      for (int s = 0; s < S; ++s) acc[s][r] += wv * xv[s];
    }
  }
  for (int s = 0; s < S; ++s)
    for (int r = 0; r < R; ++r) {
      REAL sum = CAT(lsum_, SUFFIX)(acc[s][r]);
      const REAL *xr = x + (m0 + s) * K;
      for (int64_t k = Kv; k < K; ++k) sum += w[r][k] * xr[k];
      y[(m0 + s) * N + o[r]] = b ? sum + b[o[r]] : sum;
    }
}

typedef struct {
  const REAL *x, *W, *b;
  REAL *y;
  int64_t M, K, N, chunk; /* chunk: output rows taken at a time (a multiple of 4) */
  int64_t *ranges;        /* per thread, LINEAR_STREAMS ranges of chunks not yet taken, each
                             [front, back) packed */
  int nthreads, self;
} CAT(linear_job_, SUFFIX);

/* Rows o[0], ..., o[R − 1] of W (R ≤ 4, anywhere in W) against the one row of x (M = 1,
 * generation at batch 1): each row read front to back in its own four vector accumulators, the
 * R rows side by side. Every row's sum has the same order whatever R and whichever rows it is
 * grouped with, so the result does not depend on the grouping. The rows come from four places
 * far apart in W (see linear_worker_): four sequential streams per thread, which this AMD EPYC
 * (Zen 3, 2 cores, KVM) reads at ~1.2x the rate of one stream — 33-35 GB/s against 27-28 for a
 * row at a time and 30-32 GB/s for a memcpy's read + write (C micro-benchmark, 512 MB of rows of
 * 768 floats, 2 threads, medians of 15; 2026-12-07). Four rows side by side that lie next to
 * each other are one stream to the prefetcher and read no faster than one row. */
HOT void CAT(rows1_, SUFFIX)(const REAL *x, const REAL *W, const REAL *b, REAL *y, int64_t K,
                             const int64_t *o, const int R) {
  VEC acc[4][4] = {{{0}}};
  const REAL *w[4];
  for (int r = 0; r < R; ++r) w[r] = W + o[r] * K;
  const int64_t K4 = K - K % (4 * VL);
  int64_t k = 0;
  for (; k < K4; k += 4 * VL)
    for (int a = 0; a < 4; ++a) {
      const VEC xv = VLOAD(x + k + a * VL);
      for (int r = 0; r < R; ++r) acc[r][a] += VLOAD(w[r] + k + a * VL) * xv;
    }
  for (int r = 0; r < R; ++r) {
    int64_t kr = k;
    for (; kr + VL <= K; kr += VL) acc[r][0] += VLOAD(w[r] + kr) * VLOAD(x + kr);
    REAL sum = CAT(lsum_, SUFFIX)((acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]));
    for (; kr < K; ++kr) sum += w[r][kr] * x[kr];
    y[o[r]] = b ? sum + b[o[r]] : sum;
  }
}

#ifndef LINEAR_TAKE /* once for both types */
#define LINEAR_TAKE
/* the parts of a thread's share of W read side by side (linear_chunks_ takes up to 4) */
enum { LINEAR_STREAMS = 4 };
/* A range of chunks [front, back) packed in one int64 (front low, back high 32 bits), taken from
 * either end by compare-and-swap: its owner from the front, others from the back. Returns the
 * chunk taken, or −1 when the range is empty. */
static int64_t take_chunk(int64_t *range, int from_back) {
  int64_t v = __atomic_load_n(range, __ATOMIC_RELAXED);
  for (;;) {
    const int64_t front = v & 0xffffffff, back = (int64_t)((uint64_t)v >> 32);
    if (front >= back) return -1;
    const int64_t f = from_back ? front : front + 1, b = from_back ? back - 1 : back;
    if (__atomic_compare_exchange_n(range, &v, (int64_t)((uint64_t)b << 32 | (uint64_t)f), 0,
                                    __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      return from_back ? back - 1 : front;
  }
}
#endif

/* The rows of chunks c[0..n) (n ≤ 4): row i of every chunk side by side in one call (rows1_ for
 * one row of x, the tile for each pair of rows of x), so each chunk is one sequential stream. */
static void CAT(linear_chunks_, SUFFIX)(const CAT(linear_job_, SUFFIX) *j, const int64_t *c,
                                         int n) {
  int64_t start[4], len[4], longest = 0;
  for (int s = 0; s < n; ++s) {
    start[s] = c[s] * j->chunk;
    len[s] = start[s] + j->chunk < j->N ? j->chunk : j->N - start[s];
    if (len[s] > longest) longest = len[s];
  }
  for (int64_t i = 0; i < longest; ++i) {
    int64_t o[4];
    int R = 0;
    for (int s = 0; s < n; ++s)
      if (i < len[s]) o[R++] = start[s] + i;
    if (j->M == 1) {
      switch (R) { /* a constant R for each call: the compiler unrolls each into straight code */
      case 4: CAT(rows1_, SUFFIX)(j->x, j->W, j->b, j->y, j->K, o, 4); break;
      case 3: CAT(rows1_, SUFFIX)(j->x, j->W, j->b, j->y, j->K, o, 3); break;
      case 2: CAT(rows1_, SUFFIX)(j->x, j->W, j->b, j->y, j->K, o, 2); break;
      default: CAT(rows1_, SUFFIX)(j->x, j->W, j->b, j->y, j->K, o, 1); break;
      }
      continue;
    }
    int64_t m = 0;
    for (; m + 2 <= j->M; m += 2) {
#define TILE(r) CAT(tile_, SUFFIX)(j->x, j->W, j->b, j->y, j->K, j->N, o, r, m, 2)
      switch (R) { /* constant R and S, as above */
      case 4: TILE(4); break;
      case 3: TILE(3); break;
      case 2: TILE(2); break;
      default: TILE(1); break;
      }
#undef TILE
    }
    /* an odd last row of x: one row of W at a time (in L1 from the pairs above). Tiles of one
     * row of x gave other bits for other R here (GCC), and which rows are grouped depends on
     * the thread count; tiles of two rows of x did not (tests/test_linear.py checks both) */
    if (m < j->M)
      for (int r = 0; r < R; ++r)
        CAT(tile_, SUFFIX)(j->x, j->W, j->b, j->y, j->K, j->N, o + r, 1, m, 1);
  }
}

/* A thread streams its own contiguous share of W's rows front to back, then takes what is left
 * of the others' shares from their backs. Own shares: each thread's reads are long runs that the
 * hardware prefetcher follows (chunks dealt out in turn cost 10 % against a sum over the same
 * bytes), cut in LINEAR_STREAMS parts read side by side, a chunk of each at a time (see
 * rows1_: 1.2x the read rate of one stream here; at 8 rows of x a generated token of the 130 M
 * Mamba-2 took 37-43 ms against 45 with adjacent rows). Taken, not assigned: on a busy machine
 * one thread of the team may start late (a waiting runnable thread gets the core only at the next time slice,
 * milliseconds), and the others then do its share instead of waiting for it. Each output is
 * still one thread's sum in a fixed order: the result does not depend on who took it. */
static void *CAT(linear_worker_, SUFFIX)(void *arg) {
  const CAT(linear_job_, SUFFIX) *j = arg;
  for (int k = 0; k < j->nthreads; ++k) {
    int64_t *ranges = j->ranges + (int64_t)((j->self + k) % j->nthreads) * LINEAR_STREAMS;
    for (;;) {
      int64_t c[LINEAR_STREAMS];
      int n = 0;
      for (int s = 0; s < LINEAR_STREAMS; ++s)
        if ((c[n] = take_chunk(ranges + s, k != 0)) >= 0) ++n;
      if (n == 0) break;
      CAT(linear_chunks_, SUFFIX)(j, c, n);
    }
  }
  return NULL;
}

/* y[M, N] = x[M, K]·W[N, K]ᵀ (+ b[N]); all contiguous, b may be NULL; nthreads ≥ 1 */
void CAT(linear_, SUFFIX)(const REAL *x, const REAL *W, const REAL *b, REAL *y, int64_t M,
                          int64_t K, int64_t N, int nthreads) {
  /* chunks of ~64 KiB of W (at least one tile): what a late thread's share is taken in; a
   * thread per 256 KiB of W at the most: waking the team costs microseconds when it spins and a
   * time slice when a core is busy elsewhere, while a core streams 256 KiB in ~15 µs */
  /* K = 0 (an FFN of width 0: y = b) would divide by zero here */
  const int64_t row_bytes = (K > 0 ? K : 1) * (int64_t)sizeof(REAL);
  int64_t chunk = ((int64_t)1 << 16) / row_bytes & ~(int64_t)3;
  if (chunk < 4) chunk = 4;
  const int64_t most = N * K * (int64_t)sizeof(REAL) / ((int64_t)1 << 18);
  if (nthreads > most) nthreads = most > 1 ? (int)most : 1;
  if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
  const int64_t chunks = (N + chunk - 1) / chunk;
  const int parts = nthreads * LINEAR_STREAMS;
  int64_t ranges[MAX_THREADS * LINEAR_STREAMS];
  CAT(linear_job_, SUFFIX) jobs[MAX_THREADS];
  for (int p = 0; p < parts; ++p) {
    const int64_t front = chunks * p / parts, back = chunks * (p + 1) / parts;
    ranges[p] = (int64_t)((uint64_t)back << 32 | (uint64_t)front);
  }
  for (int k = 0; k < nthreads; ++k)
    jobs[k] = (CAT(linear_job_, SUFFIX)){x, W, b, y, M, K, N, chunk, ranges, nthreads, k};
  if (nthreads <= 1) {
    CAT(linear_worker_, SUFFIX)(&jobs[0]);
    return;
  }
  run_parallel(CAT(linear_worker_, SUFFIX), jobs, sizeof jobs[0], nthreads);
}

