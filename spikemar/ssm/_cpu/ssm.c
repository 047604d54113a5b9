/* CPU kernels of spikemar.ssm for inference (no autograd), built on first use by
 * spikemar/ssm/fast.py through spikemar.neurons.cpu_backend.build_library and loaded with ctypes.
 * The PyTorch operations of SelectiveMixer.step and of RMSNorm are the references these must
 * equal to rounding (tests/test_inference_fast.py). */
#include <math.h>
#include <stdint.h>

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

#define REAL float
#define SUFFIX f32
#define EXP expf
#define LOG1P log1pf
#include "ssm_impl.h"
#undef REAL
#undef SUFFIX
#undef EXP
#undef LOG1P

#define REAL double
#define SUFFIX f64
#define EXP exp
#define LOG1P log1p
#include "ssm_impl.h"
#undef REAL
#undef SUFFIX
#undef EXP
#undef LOG1P
