/* One generated token of a spikemar SSM language model in one call (program_impl.h), on the
 * kernels of ssm.c (the mixer's middle, RMSNorm) and linear.c (the projections), compiled here
 * again with the same flags and pragmas so that each operation computes what its module's fast
 * path computes, to the bit. Built on first use by spikemar/models/fused_step.py through
 * spikemar.neurons.cpu_backend.build_library and loaded with ctypes. */
#include "parallel.h"

#define TYPED_SCAFFOLD "simd.h"
#define TYPED_BODY "program_body.h"
#include "per_type.h"
