/* CPU kernels of spikemar.ssm for inference (no autograd), built on first use by
 * spikemar/ssm/fast.py through spikemar.neurons.cpu_backend.build_library and loaded with ctypes.
 * The PyTorch operations of SelectiveMixer.step and of RMSNorm are the references these must
 * equal to rounding (tests/test_inference_fast.py). The shared scaffolding (parallel.h: torch's
 * thread team, ranges; simd.h: vectors; per_type.h: one instantiation per element type) comes
 * from the neurons' CPU backend, which build_library puts on the include path. */
#include "parallel.h"

#define TYPED_SCAFFOLD "simd.h"
#define TYPED_BODY "ssm_impl.h"
#include "per_type.h"
