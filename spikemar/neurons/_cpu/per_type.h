/* Instantiates a kernel file's per-type bodies once per element type (float as f32, double as
 * f64): the one place that says what REAL, SUFFIX, EXP and LOG1P are for each. The including
 * file defines TYPED_BODY (its _impl.h, a quoted name) and optionally TYPED_SCAFFOLD (per-type
 * scaffolding included before it, e.g. "simd.h"), after including parallel.h. Both are found
 * beside this header or beside the file being compiled (build_library puts that file's folder on
 * the quote include path); per_type_one.h includes them for one type. */
#define REAL float
#define SUFFIX f32
#define EXP expf
#define LOG1P log1pf
#include "per_type_one.h"

#define REAL double
#define SUFFIX f64
#define EXP exp
#define LOG1P log1p
#include "per_type_one.h"
