/* One element type's bodies for per_type.h (which defines REAL, SUFFIX, EXP and LOG1P before
 * each inclusion): the scaffolding, the kernel's _impl.h, then the type's names undone. */
#ifdef TYPED_SCAFFOLD
#include TYPED_SCAFFOLD
#endif
#include TYPED_BODY
#undef REAL
#undef SUFFIX
#undef EXP
#undef LOG1P
