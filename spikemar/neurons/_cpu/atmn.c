/* Fused CPU kernels for ATMN (see atmn_impl.h); built once per machine by
 * spikemar/neurons/cpu_backend.py with the system C compiler and loaded through ctypes.
 * The scaffolding is neuron-agnostic: parallel.h (headers, threads, ranges) once; per element
 * type simd.h (vectors, padded tails, per-channel buffers) and multistep.h (blocks, groups,
 * tails, threads and the forward's dispatch, around a neuron's micro-step). atmn_impl.h is
 * ATMN's micro-step, its backward and MAR's spike point, and includes multistep.h. A second
 * neuron is a file like this one with its own _impl.h (tests/test_neuron_seam.py builds one). */
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
