/* program.c's per-type body: the mixer kernels (no contraction, as in ssm.c), the projection
 * (contracted, as in linear.c: its pragma scoped to it here), then the program that calls them. */
#include "ssm_impl.h"
#if defined(__clang__)
#pragma float_control(push)
#pragma clang fp contract(fast)
#else
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#endif
#include "linear_impl.h"
#if defined(__clang__)
#pragma float_control(pop)
#else
#pragma GCC pop_options
#endif
#include "program_impl.h"
