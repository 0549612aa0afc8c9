/* groklm's native CPU kernels: shared definitions. The library is one translation unit, groklm.c, which
 * includes the kernel files in order; each file holds one idea (see groklm.c for the list).
 *
 * Weight-only int8 / int4 matmuls with grouped scales for x86 AVX2 / AVX-512 VNNI:
 *
 *   y[m, n] = sum_g s[n, g] * sum_{k in block g} x[m, k] * w[n, k]
 *
 * w is int8 [N, K] (nn.Linear's [out, in] layout of the released [in, out] weight), s is bf16
 * [N, G]: G scale blocks of Kg = K/G input columns. x is bf16 [M, K]; y is [M, N], written in
 * bf16 (rounded to nearest even, as a torch cast does) or fp32.
 *
 * int8 weights: activations are quantized to int16 per row and chunk of columns (step max|x| / 32767,
 * a 2^-15 relative step, far finer than bf16's 2^-8), so products sum exactly in int32 (see dot8).
 * int4 weights: activations are int8 per segment of at most 256 columns within a scale group (step
 * max|x| / 127), the nibbles multiply them as unsigned bytes and their +8 offset is taken off with the
 * segment's activation sum (see dot4, panel_dot).
 *
 * Every kernel sums a segment (one weight scale, one activation step) exactly in integers and folds it
 * into fp32 with scale * step; the VNNI and AVX2 builds fold alike, so both give the same bits.
 * reference.c holds the plain scalar twin of each exported kernel, the definition the SIMD ones are
 * tested against. Threading (OpenMP, torch's own libgomp) lives in the exported entry points and
 * worksharing.c, not in the kernels. Measurements behind the constants: benchmarks/NOTES.md.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK_MAX 2048 /* most columns under one int8 activation step: int32 lanes cannot overflow */
/* Weight reads are prefetched this far ahead into L2 (T1), by each row stream and each panel: the
 * hardware prefetchers alone left them short of memory speed (benchmarks/NOTES.md, "prefetch"). */
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1
#endif
#ifndef ROW_PREFETCH
#define ROW_PREFETCH 0 /* 0: by dot8's rule (ROW_PREFETCH_MIN, ROW_PREFETCH_TILE) */
#endif
#define ROW_PREFETCH_MIN 1024
#define ROW_PREFETCH_TILE 2048
#define PANEL 16 /* int4 weight rows interleaved in a panel (see panels_dot) */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI 1
#else
#define VNNI 0
#endif

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The sum of 8 lanes: (v0 + v4) + (v1 + v5) + ((v2 + v6) + (v3 + v7)), in that order. */
static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

/* Round to nearest even, as a torch cast does. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                          /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static inline float bf16_round(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* y[at] = v as kind Y_F32, Y_BF16 (rounded to nearest even, as a torch cast) or Y_LOGITS: fp32 logits, v
 * rounded to bf16, times `scale` in fp32, rounded to bf16 again (model.py's bf16 head output times its
 * output multiplier, cast to fp32). */
enum { Y_F32 = 0, Y_BF16 = 1, Y_LOGITS = 2 };
static inline void store(void *y, int kind, float scale, size_t at, float v) {
    if (kind == Y_BF16)
        ((uint16_t *)y)[at] = f32_to_bf16(v);
    else
        ((float *)y)[at] = kind == Y_LOGITS ? bf16_round(bf16_round(v) * scale) : v;
}

static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* Bytes of a weight row of K columns: int8, or two int4 a byte. */
static inline size_t row_bytes(int bits, int K) { return bits == 8 ? (size_t)K : (size_t)K / 2; }

static inline __m256 bf16_round8(__m256 v) { /* round to nearest even, as f32_to_bf16; NaN stays NaN */
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    const __m256 rounded = _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u)));
    return _mm256_blendv_ps(rounded, _mm256_or_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x400000))),
                            _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

/* p[0..8) = the bf16 of the 8 lanes of v, rounded as f32_to_bf16. */
static inline void store_bf16x8(uint16_t *p, __m256 v) {
    const __m256i y = _mm256_srli_epi32(_mm256_castps_si256(bf16_round8(v)), 16);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(y, y), 0x08)));
}

/* 8 lanes of b from element `at`: fp32, or bf16 widened. */
static inline __attribute__((always_inline)) __m256 load8(const void *b, int b_f32, int at) {
    return b_f32 ? _mm256_loadu_ps((const float *)b + at) : load_bf16x8((const uint16_t *)b + at);
}

/* The fp32 dot product of bf16 a [n] and b [n] (bf16, or fp32 with b_f32); n % 8 == 0. */
static inline __attribute__((always_inline)) float dot_with(const uint16_t *a, const void *b, int b_f32, int n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int d = 0;
    for (; d + 16 <= n; d += 16) {
        s0 = _mm256_fmadd_ps(load_bf16x8(a + d), load8(b, b_f32, d), s0);
        s1 = _mm256_fmadd_ps(load_bf16x8(a + d + 8), load8(b, b_f32, d + 8), s1);
    }
    if (d < n) s0 = _mm256_fmadd_ps(load_bf16x8(a + d), load8(b, b_f32, d), s0);
    return hsum(_mm256_add_ps(s0, s1));
}

/* torch's own 8-lane tanh, exp and erf (its bundled SLEEF), handed over by the groklm_set_* functions in
 * sleef.c, so that the native and torch paths compute the same functions; NULL: the scalar libm loop. */
typedef __m256 (*vec8_fn)(__m256);
static vec8_fn tanh8, erf8, exp8;

/* ---- block layouts ---------------------------------------------------------------------------------- */

/* int4 weights in rows ([N, K/2] uint8): 32 columns in 16 bytes, byte j holding column j in its low
 * nibble and column j + 16 in its high one, each stored + 8 (0..15). */
typedef struct {
    uint8_t b[16];
} q4_block32;
_Static_assert(sizeof(q4_block32) == 16, "an int4 block of 32 columns is 16 bytes");

/* int4 weights in panels ([N/16, K/32, 256] uint8): PANEL rows interleaved, so that the lanes of a
 * vector are rows; for each 32 columns, dword t (bytes 4t..4t+3 of each row's q4_block32) of every row. */
typedef struct {
    uint32_t t[4][PANEL];
} q4_panel32;
_Static_assert(sizeof(q4_panel32) == 16 * PANEL, "an int4 panel block is 32 columns of PANEL rows");
_Static_assert(sizeof(q4_panel32) == PANEL * sizeof(q4_block32), "a panel holds its rows' blocks, reordered");

/* int8 weights: row-major [N, K], or block-major [G, N, K/G] (a scale group's columns of every row,
 * contiguous); one int8 a column either way. Scales: bf16 [N, G]; for int4 panels, in panel order:
 * each panel's PANEL x G of them group by group (PANEL rows of group 0, then of group 1, ...). */
_Static_assert(sizeof(int8_t) == 1 && sizeof(uint16_t) == 2, "int8 weights, bf16 scales and activations");
