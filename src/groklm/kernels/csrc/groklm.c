/* The native CPU kernels as one translation unit (so that the kernels' helpers stay static and inline
 * across files), in the order each file needs the ones before it:
 *
 *   common.h        bf16 conversions, 8-lane helpers, block layouts (structs, static_assert)
 *   activations.c   the activation chunk rule (groklm_chunk) and activation quantization
 *   worksharing.c   how rows and panels are shared between threads, and the tile sizes
 *   linear_int8.c   dot8: int8 weight rows against int16 activations
 *   linear_int4.c   dot4: int4 weight rows against int8 activations
 *   int4_panels.c   panel_dot: int4 weights in 16-row panels
 *   linear.c        groklm_linear: x @ W.T for one or several weights, threaded
 *   moe.c           groklm_route, groklm_moe: one MoE layer, routing included
 *   attention.c     groklm_attend: one new token per row over its cache
 *   transpose.c     groklm_transpose8: the loader's byte-matrix transpose
 *   sigbus.c        groklm_guard_sigbus: a message for a memory-mapped file that shrank
 *   sleef.c         groklm_set_tanh8, _exp8, _erf8: torch's 8-lane functions, handed over
 *   reference.c     the scalar twins (groklm_*_ref): what each SIMD kernel is tested against
 *
 * Built with -mavx2 -mfma (and -mavx512f/bw/vl/vnni for the VNNI build, where `VNNI` is 1; kernels/isa.py).
 *
 * A new kernel: its own file, included here before linear.c if the dispatch there calls it (an ISA's
 * variant goes under #if on the ISA's macro, as VNNI's do); an exported entry point's scalar twin,
 * groklm_<name>_ref with the same signature, in reference.c; both declared in kernels/native.py; and a
 * test in tests/test_kernels.py holding each build (its `build` fixture) to the twin within a stated bound.
 */
#include "common.h"

#include "activations.c"
#include "worksharing.c"
#include "linear_int8.c"
#include "linear_int4.c"
#include "int4_panels.c"
#include "linear.c"
#include "moe.c"
#include "attention.c"
#include "transpose.c"
#include "sigbus.c"
#include "sleef.c"
#include "reference.c"
