/* Fused CPU kernels for ATMN (see atmn_impl.h); built once per machine by
 * spikemar/neurons/cpu_backend.py with the system C compiler and loaded through ctypes.
 * The scaffolding is neuron-agnostic: parallel.h (headers, threads, ranges) once; per element
 * type (per_type.h: float, double) simd.h (vectors, padded tails, per-channel buffers) and
 * multistep.h (blocks, groups, tails, threads and the forward's dispatch, around a neuron's
 * micro-step). atmn_impl.h is ATMN's micro-step, its backward and MAR's spike point, and includes
 * multistep.h. A second neuron is a file like this one with its own _impl.h
 * (tests/test_neuron_seam.py builds one). */
#include "parallel.h"

#define TYPED_SCAFFOLD "simd.h"
#define TYPED_BODY "atmn_impl.h"
#include "per_type.h"
