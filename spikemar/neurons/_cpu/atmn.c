/* Fused CPU kernels for ATMN (see atmn_impl.h); built once per machine by
 * spikemar/neurons/cpu_backend.py with the system C compiler and loaded through ctypes.
 * The scaffolding is neuron-agnostic: parallel.h (threads, ranges) once, simd.h (vectors,
 * groups, padded tails, per-channel buffers) per element type; atmn_impl.h is ATMN's
 * arithmetic and loops. A second neuron includes the same two and its own _impl.h. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
/* the bodies that must inline into their callers, whose constant flags then fold away */
#define HOT static inline __attribute__((always_inline))

#include "parallel.h"

#define REAL float
#define SUFFIX f32
#define EXP expf
#define LOG1P log1pf
#include "simd.h"
#include "atmn_impl.h"
#undef REAL
#undef SUFFIX
#undef EXP
#undef LOG1P

#define REAL double
#define SUFFIX f64
#define EXP exp
#define LOG1P log1p
#include "simd.h"
#include "atmn_impl.h"
#undef REAL
#undef SUFFIX
#undef EXP
#undef LOG1P
