/* y = x·Wᵀ + b for a few rows of x: the projections of one generated token. Built on first use
 * by spikemar/ssm/linear.py through spikemar.neurons.cpu_backend.build_library and loaded with
 * ctypes; nn.functional.linear is the reference it equals to rounding (tests/test_linear.py).
 *
 * Why C: at batch 1 a projection is a matrix-vector product whose cost is reading W once, and
 * torch's CPU wheel (MKL's sgemv/sgemm on this AMD EPYC, 2 threads) reads it at ~15 GB/s where
 * a plain sum over the same bytes reads ~29 GB/s (measured 2026-12-06, benchmarks/RESULTS.md,
 * issue 19). Here each thread streams its own rows of W once, four rows from four far-apart
 * parts of its share side by side (four streams), every row of x (in L1) meeting
 * each loaded vector of W: the bytes of W at close
 * to the machine's read bandwidth, for any number of rows of x up to a few dozen (beyond that
 * torch's blocked GEMM is the better kernel and the caller uses it). */
#include "parallel.h"

/* a·b + c in one rounding where the machine has FMA (the sums are reordered anyway: equal to
 * the reference to rounding, not to the bit); ISO C mode turns contraction off otherwise */
#if defined(__clang__)
#pragma clang fp contract(fast)
#else
#pragma GCC optimize("fp-contract=fast")
#endif

/* the shared scaffolding (parallel.h, simd.h, per_type.h) comes from the neurons' CPU backend,
 * which build_library puts on the include path */
#define TYPED_SCAFFOLD "simd.h"
#define TYPED_BODY "linear_impl.h"
#include "per_type.h"
