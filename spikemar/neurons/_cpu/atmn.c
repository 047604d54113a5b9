/* Fused CPU kernels for ATMN (see atmn_impl.h) and, sharing the build, one token of the SSM
 * mixer for inference (mixer_impl.h); built once per machine by
 * spikemar/neurons/cpu_backend.py with the system C compiler and loaded through ctypes. */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
/* the bodies that must inline into their callers, whose constant flags then fold away */
#define HOT static inline __attribute__((always_inline))

#define REAL float
#define SUFFIX f32
#define EXP expf
#define LOG1P log1pf
#include "atmn_impl.h"
#include "mixer_impl.h"
#undef REAL
#undef SUFFIX
#undef EXP
#undef LOG1P

#define REAL double
#define SUFFIX f64
#define EXP exp
#define LOG1P log1p
#include "atmn_impl.h"
#include "mixer_impl.h"
#undef REAL
#undef SUFFIX
#undef EXP
#undef LOG1P
