/* Weight-only int8 / int4 matmuls with grouped scales for x86 AVX2 / AVX-512 VNNI, at memory speed for decode, and
 * the experts of one MoE layer in one call.
 *
 *   y[m, n] = sum_g s[n, g] * sum_{k in block g} x[m, k] * w[n, k]
 *
 * w is int8 [N, K] (nn.Linear's [out, in] layout of the released [in, out] weight), s is bf16
 * [N, G]: G scale blocks of Kg = K/G input columns. x is bf16 [M, K]; y is [M, N], written in
 * bf16 (rounded to nearest even, as a torch cast does) or fp32.
 *
 * int8 weights (the released model's): activations are quantized to int16 per row and per chunk of
 * columns (step = max|x| / 32767 of that chunk, a 2^-15 relative step: far finer than bf16's 2^-8),
 * so each 16 weights cost one widening load and one madd (16 int16 products summed pairwise into 8
 * int32 lanes). The inner loop takes 64 columns a step (four madds summed as a tree, then one add into
 * the accumulator), scale groups and chunks are tracked by counters, not divisions. Each thread
 * streams four separate stretches of weight rows at once: that is what reaches memory speed (one
 * stream per thread measured 20-24 GB/s on a 2-core EPYC, four 26-40). Within a segment an int32
 * lane sums at most CHUNK_MAX/32 * 2 * 32767 * 128 < 2^30, so it cannot overflow; each segment is
 * then folded into fp32 with its weight scale and activation step.
 *
 * int4 weights: activations are int8 per segment of at most 256 columns within a scale group (step
 * max|x| / 127, 2^-7, against the weights' own 2^-3), the nibbles multiply them as unsigned bytes
 * (one vpdpbusd per 4 columns x 16 rows with VNNI, maddubs on AVX2) and their +8 offset is taken off
 * with the segment's activation sum. Weights are held in 16-row panels (see panels_dot): the lanes of
 * a vector are rows, so a segment's sums need no reduction and fold with one multiply-add per 16 rows.
 *
 * Built with AVX-512 VNNI (32 vector registers), each 32 int8 columns cost one 512-bit fused
 * multiply-add (vpdpwssd) per activation row instead of two madds and two adds, and up to 4
 * activation rows run against the 4 weight streams at once, where AVX2's 16 registers allow 2:
 * batches and prefill are compute-bound, and this is where they gain. The integer sums are exact
 * either way and are folded alike, so both builds give the same bits.
 *
 * Output rows are split across OpenMP threads (torch's own libgomp, which the dynamic linker shares
 * with this library under the same soname).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK_MAX 2048
/* Weight reads are prefetched this many bytes ahead of use into the L2 cache (T1), by each of a row
 * kernel's streams (ROW_PREFETCH) and a panel kernel's one (PANEL_PREFETCH). On a 2-core Intel Xeon
 * VM (AVX-512 VNNI) whose memory gave 28-30 GB/s, against a plain read (a torch sum, itself not
 * prefetched) at 2 threads: int8 [32768, 6144] batch 1 0.93 -> 1.02, batch 8 0.65 -> 0.79; an int4
 * panel matvec 0.76 (4096 bytes ahead into L1, as before) -> 0.89-0.92 (8192-16384 into L2; 2048
 * into L1 0.87). A full-size Grok-1 layer (benchmarks/layer.py, alternating runs), of its roofline:
 * int4 batch 1 0.72 -> 0.82, batch 8 0.77-0.83 -> 0.91; int8 batch 1 0.83 -> 0.94, batch 8 0.79 ->
 * 0.89; the AVX2 build int4 0.81 -> 0.85, int8 0.77 -> 0.91 (batch 8 0.60 -> 0.80). The hardware's
 * prefetchers alone left those reads short of memory speed. Not yet measured on the Zen VMs the
 * 4096-into-L1 distance was chosen on.
 *
 * A panel's weights and scales are prefetched a second time, further ahead (PANEL_PREFETCH2, hint T2):
 * on another Intel Xeon VM (AVX-512 VNNI + AMX, 480 MB L3, memory 30-32 GB/s to a torch sum; one core
 * alone read 15.6 GB/s, so a core's misses in flight are the limit, not the memory), an int4 panel
 * matvec streaming 1 GB went from 0.88-0.89 of a plain read to 0.97-0.99 with the weights' second
 * prefetch (16-24 KB ahead; 32 KB 0.96, 64 KB 0.94), and to 1.0 with the scales' too; bench-mid int4
 * decode, batch 1, compiled, 29.2 -> 27.2-27.8 ms a step (0.77 -> 0.82-0.85 of its roofline). Fewer
 * prefetches (one every 128 or 256 bytes) read 0.70-0.80; the T2 prefetch on the int8 rows' streams
 * made bench-mid int8 decode slower (0.93 -> 0.90), so they have one. */
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1
#endif
#ifndef ROW_PREFETCH
#define ROW_PREFETCH 2048
#endif
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

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

/* The activation chunk (columns under one activation step) for K columns in scale groups of Kg, 0 if
 * none fits (the caller must then use another kernel).
 * int8 weights: the largest multiple of 64 (the inner loop's step) <= CHUNK_MAX that divides Kg or is
 * a multiple of Kg dividing K, so that every segment of min(Kg, chunk) columns has one scale and one
 * step.
 * int4 weights (Kg % 32 == 0): Kg itself up to 256 columns, else the largest of 256, 128, 64, 32
 * dividing it: a segment of int8 activations then lies within one scale group, and its int16 sums on
 * AVX2 (at most 8 blocks of 32 columns, each pair of products < 2 * 15 * 127) cannot overflow. */
int groklm_chunk(int bits, int K, int kg) {
    if (bits == 4) {
        if (kg % 32) return 0;
        if (kg <= 256) return kg;
        for (int c = 256; c >= 32; c /= 2)
            if (kg % c == 0) return c;
    }
    for (int c = CHUNK_MAX; c >= 64; c -= 64)
        if (kg % c == 0 || (c % kg == 0 && K % c == 0)) return c;
    return 0;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                          /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static inline void store(void *y, int y_bf16, size_t at, float v) {
    if (y_bf16)
        ((uint16_t *)y)[at] = f32_to_bf16(v);
    else
        ((float *)y)[at] = v;
}

static inline float bf16_round(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static inline __m256 load_bf16x8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* max |x[k]| over n bf16 values (n % 8 == 0), as a float. */
static inline float abs_max(const uint16_t *x, int n) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps();
    for (int k = 0; k < n; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(load_bf16x8(x + k), abs_mask));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    return _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
}

/* x [K] bf16 -> xq [K] int16 and xs [K / chunk] (dequantization step of each chunk); chunk % 8 == 0.
 * Rounds to nearest even, as lrintf does. */
static void quantize_row(const uint16_t *x, int K, int chunk, int16_t *xq, float *xs) {
    for (int c = 0; c < K / chunk; c++) {
        const uint16_t *xc = x + (size_t)c * chunk;
        const float amax = abs_max(xc, chunk);
        const __m256 inv = _mm256_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
        xs[c] = amax / 32767.f;
        int16_t *q = xq + (size_t)c * chunk;
        for (int k = 0; k < chunk; k += 8) {
            const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(load_bf16x8(xc + k), inv));
            _mm_storeu_si128((__m128i *)(q + k), _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
        }
    }
}

/* For int4 weights: x [K] bf16 -> xq [K] int8, with xs [K / seg] (each segment's step, max|x| / 127 of
 * its columns: a relative step of 2^-7, against the int4 weights' 2^-3) and xc [K / seg] (8 times the
 * sum of the segment's int8 values: the packed weights are stored + 8, see dot4). Rounds to nearest
 * even. Where seg % 64 == 0 each 64 columns are stored in the order the packed weights unpack in:
 * columns 0-15, 32-47, 16-31, 48-63 (the low nibbles of 32 bytes, then the high ones); else (seg 32,
 * 96, ...) in order, as one 16-byte block unpacks. seg % 32 == 0. */
static void quantize_row4(const uint16_t *x, int K, int seg, int8_t *xq, float *xs, int *xc) {
    static const int order64[4] = {0, 32, 16, 48}; /* source column of each 16-column quarter */
    static const int order32[4] = {0, 16, 32, 48};
    const int *order = seg % 64 == 0 ? order64 : order32;
    for (int c = 0; c < K / seg; c++) {
        const uint16_t *xc0 = x + (size_t)c * seg;
        const float amax = abs_max(xc0, seg);
        const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
        xs[c] = amax / 127.f;
        int8_t *q = xq + (size_t)c * seg;
        __m256i sum = _mm256_setzero_si256();
        for (int k = 0; k < seg; k += 16) {
            const uint16_t *src = xc0 + (k & ~63) + order[(k & 63) / 16];
            const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(load_bf16x8(src), inv));
            const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(load_bf16x8(src + 8), inv));
            sum = _mm256_add_epi32(sum, _mm256_add_epi32(a, b));
            const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
            const __m128i v16 = _mm_packs_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
            _mm_storeu_si128((__m128i *)(q + k), _mm_packs_epi16(w16, v16));
        }
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        xc[c] = 8 * _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1)));
    }
}

/* res[j][i] = int8 weight row w[j] [K] (scales s[j] [G]) against activation row xr[i] (int16, K)
 * with chunk steps xsr[i] (K / chunk), for NT weight rows and MT activation rows at once. Rows
 * are walked in segments of min(K/G, chunk) columns, each under one weight scale and one activation
 * step: an int32 dot product per segment, folded into fp32 with scale * step. A row's scale groups
 * lie gstride bytes apart (K/G in a row-major weight; a block-major one's block size). NT and MT are
 * compile-time constants at each call site, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dot8(
    const int16_t *const *xr, const float *const *xsr, int K, const int8_t *const *w, size_t gstride,
    const uint16_t *const *s, int G, int chunk, float *const *res, const int NT, const int MT) {
    const int kg = K / G, seg = kg < chunk ? kg : chunk;
    const int per_g = kg / seg, per_c = chunk / seg; /* segments per scale group, per chunk: one is 1 */
#if VNNI
    /* Accumulator n = j * MT + i; pairs (2p, 2p + 1) fold together in one 512-bit register, the
     * first's 8 lanes low, the second's high: the same lane arithmetic as one 256-bit fold each. */
    const int P = NT * MT, pairs = P / 2;
    __m512 outz[8];
    for (int p = 0; p < pairs; p++) outz[p] = _mm512_setzero_ps();
#endif
    __m256 out[4][4];
    for (int j = 0; j < NT; j++)
        for (int i = 0; i < MT; i++) out[j][i] = _mm256_setzero_ps();
    int g = 0, gn = 0, c = 0, cn = 0; /* scale group and chunk of this segment (counters: no division) */
    size_t skip = 0;                  /* bytes between this group's columns and where a row-major row has them */
    for (int c0 = 0; c0 < K; c0 += seg) {
        __m256 step[4], sc[4]; /* broadcast once a segment: scale * step is then one vector product */
        for (int i = 0; i < MT; i++) step[i] = _mm256_set1_ps(xsr[i][c]);
        for (int j = 0; j < NT; j++) sc[j] = _mm256_set1_ps(bf16_to_f32(s[j][g]));
#if VNNI
        /* 32 columns a step in 512-bit registers: MT activation loads and NT weight loads feed
         * NT * MT fused multiply-adds (vpdpwssd), each accumulator a chain of its own. Halves of a
         * 512-bit accumulator hold the same column pairs as two 256-bit steps: added, they are
         * the AVX2 path's lanes exactly. */
        __m512i a5[4][4];
        for (int j = 0; j < NT; j++)
            for (int i = 0; i < MT; i++) a5[j][i] = _mm512_setzero_si512();
        for (int k = 0; k < seg; k += 32) {
            __m512i xv[4];
            for (int i = 0; i < MT; i++) xv[i] = _mm512_loadu_si512((const void *)(xr[i] + c0 + k));
            for (int j = 0; j < NT; j++) {
                if (!(k & 63)) _mm_prefetch((const char *)(w[j] + skip + c0 + k + ROW_PREFETCH), PF_HINT);
                const __m512i wv = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(w[j] + skip + c0 + k)));
                for (int i = 0; i < MT; i++) a5[j][i] = _mm512_dpwssd_epi32(a5[j][i], wv, xv[i]);
            }
        }
        for (int p = 0; p < pairs; p++) {
            const int j0 = 2 * p / MT, i0 = 2 * p % MT, j1 = (2 * p + 1) / MT, i1 = (2 * p + 1) % MT;
            const __m512i a = a5[j0][i0], b = a5[j1][i1];
            /* [a.lo + a.hi, b.lo + b.hi]: 128-bit lanes (0, 1) and (2, 3) of each, side by side */
            const __m512i sum = _mm512_add_epi32(_mm512_shuffle_i64x2(a, b, 0x44), _mm512_shuffle_i64x2(a, b, 0xee));
            const __m512 f = _mm512_castpd_ps(_mm512_insertf64x4(
                _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_mul_ps(sc[j0], step[i0]))),
                _mm256_castps_pd(_mm256_mul_ps(sc[j1], step[i1])), 1));
            outz[p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), f, outz[p]);
        }
        if (P % 2) {
            const __m512i a = a5[NT - 1][MT - 1];
            const __m256i sum = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
            out[NT - 1][MT - 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(sc[NT - 1], step[MT - 1]),
                                                  out[NT - 1][MT - 1]);
        }
#else
        __m256i acc[4][4];
        for (int j = 0; j < NT; j++)
            for (int i = 0; i < MT; i++) acc[j][i] = _mm256_setzero_si256();
        for (int k = 0; k < seg; k += 64) {
            for (int j = 0; j < NT; j++) {
                const int8_t *wc = w[j] + skip + c0 + k;
                _mm_prefetch((const char *)(wc + ROW_PREFETCH), PF_HINT);
                __m256i wa = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wc));
                __m256i wb = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wc + 16)));
                __m256i wc3 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wc + 32)));
                __m256i wd = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wc + 48)));
                for (int i = 0; i < MT; i++) {
                    const int16_t *xp = xr[i] + c0 + k;
                    const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(wa, _mm256_loadu_si256((const __m256i *)xp)),
                                                       _mm256_madd_epi16(wb, _mm256_loadu_si256((const __m256i *)(xp + 16))));
                    const __m256i q = _mm256_add_epi32(_mm256_madd_epi16(wc3, _mm256_loadu_si256((const __m256i *)(xp + 32))),
                                                       _mm256_madd_epi16(wd, _mm256_loadu_si256((const __m256i *)(xp + 48))));
                    acc[j][i] = _mm256_add_epi32(acc[j][i], _mm256_add_epi32(p, q));
                }
            }
        }
        for (int j = 0; j < NT; j++)
            for (int i = 0; i < MT; i++)
                out[j][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[j][i]), _mm256_mul_ps(sc[j], step[i]), out[j][i]);
#endif
        if (++gn == per_g) gn = 0, g++, skip += gstride - kg;
        if (++cn == per_c) cn = 0, c++;
    }
#if VNNI
    for (int p = 0; p < pairs; p++) {
        out[2 * p / MT][2 * p % MT] = _mm512_castps512_ps256(outz[p]);
        out[(2 * p + 1) / MT][(2 * p + 1) % MT] = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(outz[p]), 1));
    }
#endif
    for (int j = 0; j < NT; j++)
        for (int i = 0; i < MT; i++) res[j][i] = hsum(out[j][i]);
}

/* The four totals of a, b, c, d's 8 int32 lanes each, as one vector (exact). */
static inline __m128i isum4(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

/* tab[t * width + lane + j] = the scale of group g + t (t < 8, those < G) of row s[j] (j < 4; 0 for
 * j >= nt), as floats: 8 groups of 4 rows loaded and transposed at once, as a segment's fold reads them. */
static inline void scale_table(const uint16_t *const *s, int nt, int g, int G, float *tab, int width, int lane) {
    if (g + 8 <= G) {
        __m256 r[4];
        for (int j = 0; j < 4; j++) r[j] = j < nt ? load_bf16x8(s[j] + g) : _mm256_setzero_ps();
        const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
        const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
        const __m256 v[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xee), /* groups 0 1 | 4 5 */
                             _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xee)}; /* groups 2 3 | 6 7 */
        for (int t = 0; t < 4; t++) {
            _mm_storeu_ps(tab + t * width + lane, _mm256_castps256_ps128(v[t]));
            _mm_storeu_ps(tab + (t + 4) * width + lane, _mm256_extractf128_ps(v[t], 1));
        }
        return;
    }
    for (int t = 0; t < 8 && g + t < G; t++)
        for (int j = 0; j < 4; j++) tab[t * width + lane + j] = j < nt ? bf16_to_f32(s[j][g + t]) : 0.f;
}

/* The same for int4 weights against int8 activations (quantize_row4): w is K/2 bytes; each 32 input
 * columns are 16 bytes, byte j = column j (low nibble) and column j + 16 (high nibble), stored as
 * value + 8 (u = w + 8, 0..15). s holds one scale per K/G columns; segments of `seg` columns (one
 * activation step, xsr, and xcr = 8 * the sum of the segment's activations) lie within one group.
 *
 * The unpacked nibbles are unsigned bytes that multiply the signed int8 activations directly: one
 * vpdpbusd per 32 columns and activation row with VNNI, a maddubs and an int16 add on AVX2 (pairs of
 * products are < 2 * 15 * 127 and a segment adds at most 8 of them in a lane: no saturation), widened
 * once a segment. Either way a segment's sum of u * x is exact; sum w * x = that - xc, also exact. The
 * NT weight rows' sums are then reduced together, in integers, to one vector of NT lanes, which is
 * folded into fp32 with one fused multiply-add (scale * step): each row's result is the same sequence
 * of float operations however many rows share the call, on either build. Where seg % 64 == 0, 32
 * bytes (64 columns) unpack with one mask and one shift for both halves, the activations being stored
 * in that order. NT <= 4. */
static inline __attribute__((always_inline)) void dot4(
    const int8_t *const *xr, const float *const *xsr, const int *const *xcr, int K, const uint8_t *const *w,
    const uint16_t *const *s, int G, int seg, float *const *res, const int NT, const int MT) {
    const int per_g = K / G / seg;
    const __m256i low4 = _mm256_set1_epi8(0x0f);
#if !VNNI
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    __m128 out[4];
    for (int i = 0; i < MT; i++) out[i] = _mm_setzero_ps();
    int g = 0, gn = 0, tab_at = -8;
    float tab[8][4];
    for (int c0 = 0, c = 0; c0 < K; c0 += seg, c++) {
        __m256i acc[4][4];
        for (int j = 0; j < 4; j++)
            for (int i = 0; i < MT; i++) acc[j][i] = _mm256_setzero_si256();
#if VNNI
#define MAC(A, U, X) A = _mm256_dpbusd_epi32(A, U, X)
#else
#define MAC(A, U, X) A = _mm256_add_epi16(A, _mm256_maddubs_epi16(U, X))
#endif
        if (seg % 64 == 0) {
            for (int k = 0; k < seg; k += 64) {
                __m256i xl[4], xh[4];
                for (int i = 0; i < MT; i++) {
                    xl[i] = _mm256_loadu_si256((const __m256i *)(xr[i] + c0 + k));
                    xh[i] = _mm256_loadu_si256((const __m256i *)(xr[i] + c0 + k + 32));
                }
                for (int j = 0; j < NT; j++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(w[j] + (c0 + k) / 2));
                    const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    for (int i = 0; i < MT; i++) {
                        MAC(acc[j][i], lo, xl[i]);
                        MAC(acc[j][i], hi, xh[i]);
                    }
                }
            }
        } else {
            for (int k = 0; k < seg; k += 32) {
                __m256i xv[4];
                for (int i = 0; i < MT; i++) xv[i] = _mm256_loadu_si256((const __m256i *)(xr[i] + c0 + k));
                for (int j = 0; j < NT; j++) {
                    const __m128i v = _mm_loadu_si128((const __m128i *)(w[j] + (c0 + k) / 2));
                    const __m256i u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), low4);
                    for (int i = 0; i < MT; i++) MAC(acc[j][i], u, xv[i]);
                }
            }
        }
#undef MAC
        if (g == tab_at + 8) scale_table(s, NT, tab_at = g, G, tab[0], 4, 0);
        const __m128 sc = _mm_loadu_ps(tab[g - tab_at]);
        for (int i = 0; i < MT; i++) {
#if !VNNI
            for (int j = 0; j < NT; j++) acc[j][i] = _mm256_madd_epi16(acc[j][i], ones);
#endif
            const __m128i t = _mm_sub_epi32(isum4(acc[0][i], acc[1][i], acc[2][i], acc[3][i]), _mm_set1_epi32(xcr[i][c]));
            out[i] = _mm_fmadd_ps(_mm_cvtepi32_ps(t), _mm_mul_ps(sc, _mm_set1_ps(xsr[i][c])), out[i]);
        }
        if (++gn == per_g) gn = 0, g++;
    }
    for (int i = 0; i < MT; i++) {
        float o[4];
        _mm_storeu_ps(o, out[i]);
        for (int j = 0; j < NT; j++) res[j][i] = o[j];
    }
}

/* Quantized activations: K columns (xq: int16 for int8 weights, int8 for int4 ones) with their steps
 * (xs, one per chunk of columns; for int4 also xc, 8 * each chunk's sum) in rows ldq and lds elements
 * apart. Row i of a call is row rows[i] of these, or base + i when rows is NULL. K is the columns a
 * call reads: a block-major weight's panel reads only its own. */
typedef struct {
    void *xq;
    float *xs;
    int *xc;
    int K, chunk;
    size_t ldq, lds;
} acts;

/* Buffers for M rows of K columns quantized for `bits`-bit weights, in chunks of `chunk`; 0, or -1 if
 * memory ran out (nothing then allocated). */
static int acts_alloc(acts *a, int bits, int M, int K, int chunk) {
    const size_t n = (size_t)M * K, nc = (size_t)M * (K / chunk);
    *a = (acts){malloc(n * (bits == 8 ? 2 : 1)), malloc(sizeof(float) * nc), bits == 4 ? malloc(sizeof(int) * nc) : NULL,
                K, chunk, (size_t)K, (size_t)(K / chunk)};
    if (a->xq && a->xs && (bits == 8 || a->xc)) return 0;
    free(a->xq), free(a->xs), free(a->xc);
    return -1;
}

static void acts_free(acts a) { free(a.xq), free(a.xs), free(a.xc); }

/* Row r of a from x [K] bf16. */
static void acts_quantize(acts a, int bits, size_t r, const uint16_t *x) {
    if (bits == 8)
        quantize_row(x, a.K, a.chunk, (int16_t *)a.xq + r * a.ldq, a.xs + r * a.lds);
    else
        quantize_row4(x, a.K, a.chunk, (int8_t *)a.xq + r * a.ldq, a.xs + r * a.lds, a.xc + r * a.lds);
}

/* Weight rows processed together: separate streams through memory keep more loads in flight than
 * one stream can (measured on a 2-core EPYC: 20-24 GB/s with one stream per thread, 26-40 with 4). */
#define STREAMS 4
#define MT_STREAMED (VNNI ? 4 : 2) /* activation rows a tile takes against STREAMS weight rows */

/* res[j][0..M) = weight row w[j] (int8, or packed int4, per `bits`) against M activation rows, for
 * nt (1, 2 or STREAMS) weight rows. Activation rows go in tiles of 4 so each weight byte is loaded once
 * per tile; the STREAMS weight rows go together while NT * MT accumulators fit in the registers
 * (tiles of up to MT_STREAMED rows), one by one otherwise. */
static void rows_dot(int bits, acts a, const int *rows, int base, int M, int nt, const void *const *w,
                     size_t gstride, const uint16_t *const *s, int G, float *const *res) {
    const void *xr[4];
    const float *xsr[4];
    const int *xcr[4];
    for (int m0 = 0; m0 < M; m0 += 4) {
        const int mt = M - m0 < 4 ? M - m0 : 4;
        for (int i = 0; i < mt; i++) {
            const size_t r = (size_t)(rows ? rows[m0 + i] : base + m0 + i);
            xr[i] = bits == 8 ? (const void *)((const int16_t *)a.xq + r * a.ldq) : (const void *)((const int8_t *)a.xq + r * a.ldq);
            xsr[i] = a.xs + r * a.lds;
            xcr[i] = bits == 8 ? NULL : a.xc + r * a.lds;
        }
        float *rs[STREAMS];
        for (int j = 0; j < nt; j++) rs[j] = res[j] + m0;
#define DOT(J, NT, MT)                                                                                              \
    if (bits == 8)                                                                                                  \
        dot8((const int16_t *const *)xr, xsr, a.K, (const int8_t *const *)w + (J), gstride, s + (J), G, a.chunk,    \
             rs + (J), NT, MT);                                                                                     \
    else                                                                                                            \
        dot4((const int8_t *const *)xr, xsr, xcr, a.K, (const uint8_t *const *)w + (J), s + (J), G, a.chunk,        \
             rs + (J), NT, MT);                                                                                     \
    break;
        if (nt == STREAMS && mt <= MT_STREAMED) {
            switch (mt) {
                case 1: DOT(0, STREAMS, 1)
#if VNNI
                case 3: DOT(0, STREAMS, 3)
                case 4: DOT(0, STREAMS, 4)
#endif
                default: DOT(0, STREAMS, 2)
            }
            continue;
        }
        if (nt == 2 && mt <= MT_STREAMED) {
            switch (mt) {
                case 1: DOT(0, 2, 1)
#if VNNI
                case 3: DOT(0, 2, 3)
                case 4: DOT(0, 2, 4)
#endif
                default: DOT(0, 2, 2)
            }
            continue;
        }
        for (int j = 0; j < nt; j++) {
            switch (mt) {
                case 4: DOT(j, 1, 4)
                case 3: DOT(j, 1, 3)
                case 2: DOT(j, 1, 2)
                default: DOT(j, 1, 1)
            }
        }
#undef DOT
    }
}

static inline size_t row_bytes(int bits, int K) { return bits == 8 ? (size_t)K : (size_t)K / 2; }

/* Units (rows, or int4 panels) shared between the threads of a parallel region. They start split evenly,
 * each thread's share one contiguous stretch that it takes from the front a chunk at a time (one long
 * stream through memory); a thread that finishes its share takes chunks from the back of the share with
 * most left. On a VM whose cores run at different speeds from moment to moment (other tenants), a static
 * split left the faster thread waiting at the barrier: 8.6% of a 2-core Zen 4 VM's time in bench-mid
 * int4 decode (perf), 3.3% with the shares (the rest is the MoE's barriers between its phases). The
 * step time it saves there is within that machine's noise; rows are computed alike whoever takes them. */
typedef struct {
    _Atomic uint64_t left; /* units [front, back) not yet taken: front | back << 32 */
    char pad[56];          /* a cache line each */
} share;

static inline uint64_t share_pack(int front, int back) { return (uint32_t)front | (uint64_t)(uint32_t)back << 32; }

/* t shares of n units (freed by the caller), or NULL if memory ran out. */
static share *shares_new(int t, int n) {
    share *sh = aligned_alloc(64, sizeof(share) * (size_t)t);
    if (sh)
        for (int i = 0; i < t; i++) atomic_init(&sh[i].left, share_pack((int)((long)n * i / t), (int)((long)n * (i + 1) / t)));
    return sh;
}

/* Takes up to `chunk` units [*lo, *hi) from the front of s (its owner) or its back (another thread); 0
 * if none are left. Near a share's end the chunks shrink (a quarter of what is left, down to a sixteenth
 * of `chunk`), so that the threads finish together: with whole chunks to the end, the main thread of
 * bench-mid int4 decode waited at the barriers 4.0% of its time (perf), with shrinking ones 1.9%, and a
 * step took 0.82-0.85 of its roofline against 0.81-0.83 (an Intel Xeon VM, alternating builds). */
static int share_take(share *s, int chunk, int from_back, int *lo, int *hi) {
    uint64_t old = atomic_load(&s->left);
    const int least = chunk / 16 > 1 ? chunk / 16 : 1;
    for (;;) {
        const int front = (int)(uint32_t)old, back = (int)(old >> 32), quarter = (back - front + 3) / 4;
        if (front >= back) return 0;
        chunk = quarter < chunk ? (quarter > least ? quarter : least) : chunk;
        *lo = from_back ? (back - chunk > front ? back - chunk : front) : front;
        *hi = from_back ? back : (front + chunk < back ? front + chunk : back);
        if (atomic_compare_exchange_weak(&s->left, &old, from_back ? share_pack(front, *lo) : share_pack(*hi, back)))
            return 1;
    }
}

/* The next units [*lo, *hi) for this thread: from its own share while it lasts, then from the others'
 * (t shares, one a thread of the team that was asked for; a smaller team takes the rest by stealing). */
static int share_next(share *sh, int t, int chunk, int *lo, int *hi) {
    const int id = omp_get_thread_num();
    if (id < t && share_take(&sh[id], chunk, 0, lo, hi)) return 1;
    for (;;) {
        int most = 0, from = -1;
        for (int i = 0; i < t; i++) {
            const uint64_t v = atomic_load(&sh[i].left);
            const int left = (int)(v >> 32) - (int)(uint32_t)v;
            if (left > most) most = left, from = i;
        }
        if (from < 0) return 0;
        if (share_take(&sh[from], chunk, 1, lo, hi)) return 1;
    }
}

/* Units a chunk takes, of `most` (a block's): a weight in rows a whole block, which its kernel reads as
 * STREAMS runs (see block_rows), long ones; int4 panels, read as one stream whatever the chunk, about 1 MB
 * of them (unit_bytes each), or a quarter of a thread's share if that is less. Chunks of 128 KB, as
 * often switching a thread between W1 and V, left 4.2% of the time at the barriers, 1 MB 3.3%. */
static inline int share_chunk(int panels, size_t unit_bytes, int most, int units, int team) {
    int c = most;
    if (panels) {
        c = (int)(((1 << 20) + unit_bytes - 1) / unit_bytes);
        c = units / (4 * team) < c ? units / (4 * team) : c;
    }
    return c < 1 ? 1 : c < most ? c : most;
}

/* The part of units [u, hi) in one expert's weight (n units of `align` rows, `rows` rows in all, the
 * experts end to end): the expert's place *k among them and its rows [*rlo, *rhi). Returns the units it
 * spans. */
static inline int expert_piece(int u, int hi, int n, int align, int rows, int *k, int *rlo, int *rhi) {
    const int at = u % n, end = at + (hi - u) < n ? at + (hi - u) : n;
    *k = u / n;
    *rlo = at * align;
    *rhi = end * align < rows ? end * align : rows;
    return end - at;
}

/* Rows a unit of shared work holds: int4 weights are split between panels (see panels_dot). */
static inline int row_align(int bits) { return bits == 4 ? PANEL : 1; }

/* Weight rows per span step (STREAMS parts of block / STREAMS rows) for m activation rows. A stream runs
 * on through its part before jumping: at batch sizes up to 16, 4096 rows (2 MB runs at width 2048)
 * read 0.95 of a plain read's speed where 256 rows (128 KB runs) read 0.88, on a Zen 4 VM whose memory
 * then gave ~60 GB/s (the same at ~35 GB/s). Larger batches are compute-bound and keep their results
 * (block * m floats per thread) small. */
static inline int block_rows(int m) { return m <= 16 ? 4096 : 256; }

/* Weight streams per thread for int8 rows of K columns against M activation rows: STREAMS, unless
 * that many rows and the int16 activations (2K bytes a row) overflow the L1 cache while two would not;
 * then two. Measured on a Zen 4 VM (32 KB L1) whose memory gave ~60 GB/s, one activation row, against
 * a plain read of the same bytes: at K = 6144, 0.73 with four streams and 0.89 with two; at 2048 four
 * are best (0.93 against 0.91), and where even two overflow (10240, 32768) four are (0.68 against
 * 0.55). With more activation rows nothing fits, and four streams share each activation load. */
static inline int streams_for(int bits, int K, int M) {
    const long l1 = 28 * 1024;
    return bits == 8 && (long)(STREAMS + 2 * M) * K > l1 && (long)(2 + 2 * M) * K <= l1 ? 2 : STREAMS;
}

/* ---- int4 weight panels ------------------------------------------------------------------------------
 *
 * dot4's fold (a reduction across lanes, a segment) is most of its work. In a panel, PANEL weight rows
 * are interleaved so that the lanes of one vector are the rows: for each 32 columns, 4 vectors of
 * PANEL dwords, vector t holding dword t (bytes 4t..4t+3: columns 4t..4t+3 in the low nibbles,
 * 16+4t..19+4t in the high ones) of every row, 256 bytes in all. Each multiply-add then takes one
 * activation dword broadcast to all lanes, the lanes' sums need no reduction, and a segment is folded
 * with one fused multiply-add per PANEL rows. The integer sums and the fold are dot4's, lane by lane,
 * so a row gets the same bits from either kernel, on either build.
 *
 * Weights are held in panels from load (quant.pack_int4: [N/16, K/32, 256], rows a multiple of 16), and
 * so are their scales: [N, G] still, but each panel's 16 x G of them group by group (16 rows of group 0,
 * then of group 1, ...), so that a panel's scales are one more stream, read in order, where scales in
 * rows are 16 streams of 16 bytes every 8 groups (plus a transposition, panel_scales). A full-size
 * Grok-1 layer read 0.84-0.90 of its roofline with them against 0.79 (0.81 with those 16 streams
 * prefetched; a Zen 5 VM whose memory gave 40-52 GB/s). A weight in rows ([N, K/2], e.g. memory-mapped) is repacked
 * into a thread's scratch a panel at a time (its scales read in rows) where PANEL_MIN_M or more
 * activation rows share it, and read in place by dot4 otherwise. */
#define PANEL_MIN_M 4 /* activation rows from which a weight in rows is repacked, a call at a time */
#define MT_PANEL (VNNI ? 8 : 2) /* activation rows a panel tile takes */
#ifndef PANEL_PREFETCH
#define PANEL_PREFETCH 8192
#endif
#ifndef PANEL_PREFETCH2
#define PANEL_PREFETCH2 24576
#endif

static inline size_t panel_bytes(int K) { return (size_t)K / 2 * PANEL; }

/* Rows [0, n) (n <= PANEL; the rest zero) of a packed int4 weight in rows, wrow bytes apart, into the
 * panel layout at pw. */
static void panel_pack(const uint8_t *w, size_t wrow, int n, int K, uint8_t *pw) {
    for (int r0 = 0; r0 < PANEL; r0 += 4)
        for (int b = 0; b < K / 32; b++) {
            __m128i a[4];
            for (int r = 0; r < 4; r++)
                a[r] = r0 + r < n ? _mm_loadu_si128((const __m128i *)(w + (size_t)(r0 + r) * wrow + (size_t)b * 16))
                                  : _mm_setzero_si128();
            const __m128i t0 = _mm_unpacklo_epi32(a[0], a[1]), t1 = _mm_unpackhi_epi32(a[0], a[1]);
            const __m128i t2 = _mm_unpacklo_epi32(a[2], a[3]), t3 = _mm_unpackhi_epi32(a[2], a[3]);
            uint8_t *d = pw + (size_t)b * 16 * PANEL + (size_t)r0 * 4;
            _mm_storeu_si128((__m128i *)d, _mm_unpacklo_epi64(t0, t2));
            _mm_storeu_si128((__m128i *)(d + 4 * PANEL), _mm_unpackhi_epi64(t0, t2));
            _mm_storeu_si128((__m128i *)(d + 8 * PANEL), _mm_unpacklo_epi64(t1, t3));
            _mm_storeu_si128((__m128i *)(d + 12 * PANEL), _mm_unpackhi_epi64(t1, t3));
        }
}

static inline __m256i bcast4(const int8_t *p) {
    int v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

#if VNNI
/* tab[t][r] = the scale of group g + t of row srow[r] as a float, t < 8 (g + 8 <= G), r < PANEL: the 16 x 8
 * bf16 scales transposed with two rounds of two-source word permutes (about 50 instructions where 4
 * scale_table calls take about 110). */
static int16_t idx1[2][32], idx2[4][32]; /* panel_scales' permutes, built when the library loads */

__attribute__((constructor)) static void panel_scales_init(void) {
    for (int h = 0; h < 2; h++) /* groups 4h..4h+3 of 8 rows: [t][row] from [row][t] in two sources */
        for (int t = 0; t < 4; t++)
            for (int r = 0; r < 8; r++) idx1[h][t * 8 + r] = (int16_t)((r / 4) * 32 + (r % 4) * 8 + 4 * h + t);
    for (int k = 0; k < 4; k++) /* groups 2k, 2k + 1 of 16 rows: rows 0-7 from the first source, 8-15 the second */
        for (int tt = 0; tt < 2; tt++)
            for (int r = 0; r < 16; r++) idx2[k][tt * 16 + r] = (int16_t)((r / 8) * 32 + ((2 * k + tt) % 4) * 8 + r % 8);
}

static inline void panel_scales(const uint16_t *const *srow, int g, float tab[8][PANEL]) {
    __m512i z[4];
    for (int q = 0; q < 4; q++) {
        z[q] = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(srow[4 * q] + g)));
        for (int j = 1; j < 4; j++)
            z[q] = _mm512_inserti32x4(z[q], _mm_loadu_si128((const __m128i *)(srow[4 * q + j] + g)), j);
    }
    const __m512i i1a = _mm512_loadu_si512((const void *)idx1[0]), i1b = _mm512_loadu_si512((const void *)idx1[1]);
    const __m512i a[2] = {_mm512_permutex2var_epi16(z[0], i1a, z[1]), _mm512_permutex2var_epi16(z[0], i1b, z[1])};
    const __m512i b[2] = {_mm512_permutex2var_epi16(z[2], i1a, z[3]), _mm512_permutex2var_epi16(z[2], i1b, z[3])};
    for (int k = 0; k < 4; k++) {
        const __m512i t2 = _mm512_permutex2var_epi16(a[k / 2], _mm512_loadu_si512((const void *)idx2[k]), b[k / 2]);
        _mm512_storeu_ps(tab[2 * k], _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(t2)), 16)));
        _mm512_storeu_ps(tab[2 * k + 1],
                         _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(t2, 1)), 16)));
    }
}
#endif

/* out[i][r] = panel row r (of n) against activation row xr[i] (see dot4 for the segments, steps and sums).
 * Scales: in panel order at ps (16 a group), or, with ps NULL, G a row at srow[r]. The panel is read as
 * one stream, prefetched ahead: at batch 1 that read 0.81-0.87 of a plain read, where four panels at once, in separate streams, read 0.68 (a Zen 4 VM
 * whose memory then gave ~50 GB/s). */
static inline __attribute__((always_inline)) void panel_dot(const uint8_t *pw, const uint16_t *ps,
                                                             const uint16_t *const *srow, int n,
                                                             const int8_t *const *xr, const float *const *xsr,
                                                             const int *const *xcr, int K, int G, int seg,
                                                             float out[][PANEL], const int MT) {
    const int per_g = K / G / seg, perm64 = seg % 64 == 0;
    float tab[8][PANEL]; /* scales of 8 groups, rows side by side */
    int tab_at = -8;
#if VNNI
    /* Independent chains of multiply-adds a row (half of them the high nibbles'), enough for the
     * multiply-add latency with few rows. The high nibbles are multiplied in place, masked but not
     * shifted (16 times their value: the sums, exact in int32, are shifted back at the fold). */
    const int CH = MT == 1 ? 4 : 2;
    const __m512i low4 = _mm512_set1_epi8(0x0f), high4 = _mm512_set1_epi8((char)0xf0);
    __m512 o[MT_PANEL];
    for (int i = 0; i < MT; i++) o[i] = _mm512_setzero_ps();
#else
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 o[MT_PANEL][2];
    for (int i = 0; i < MT; i++) o[i][0] = o[i][1] = _mm256_setzero_ps();
#endif
    int g = 0, gn = 0;
    for (int c0 = 0, c = 0; c0 < K; c0 += seg, c++) {
#if VNNI
        __m512i acc[MT_PANEL][8];
        for (int i = 0; i < MT; i++)
            for (int h = 0; h < CH; h++) acc[i][h] = _mm512_setzero_si512();
#else
        __m256i acc[MT_PANEL][2];
        for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
#endif
        for (int k = c0; k < c0 + seg; k += 32) {
            /* where columns k+4t.. (low nibbles) and k+16+4t.. (high) lie in the activation row */
            const int xa = perm64 ? (k & ~63) + ((k & 32) ? 16 : 0) : k, xb = perm64 ? xa + 32 : k + 16;
            const uint8_t *pb = pw + (size_t)(k / 32) * 16 * PANEL;
#if VNNI
            for (int t = 0; t < 4; t++) {
                _mm_prefetch((const char *)(pb + PANEL_PREFETCH2 + t * 4 * PANEL), _MM_HINT_T2);
                _mm_prefetch((const char *)(pb + PANEL_PREFETCH + t * 4 * PANEL), PF_HINT);
                const __m512i v = _mm512_loadu_si512((const void *)(pb + t * 4 * PANEL));
                const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(v, high4);
                const int h = 2 * t % CH;
                for (int i = 0; i < MT; i++) {
                    int va, vb;
                    memcpy(&va, xr[i] + xa + 4 * t, 4);
                    memcpy(&vb, xr[i] + xb + 4 * t, 4);
                    acc[i][h] = _mm512_dpbusd_epi32(acc[i][h], lo, _mm512_set1_epi32(va));
                    acc[i][h + 1] = _mm512_dpbusd_epi32(acc[i][h + 1], hi, _mm512_set1_epi32(vb));
                }
            }
#else
            for (int h = 0; h < 2; h++) {
                __m256i a16[MT_PANEL];
                for (int i = 0; i < MT; i++) a16[i] = _mm256_setzero_si256();
                for (int t = 0; t < 4; t++) {
                    if (!h) {
                        _mm_prefetch((const char *)(pb + PANEL_PREFETCH2 + t * 4 * PANEL), _MM_HINT_T2);
                        _mm_prefetch((const char *)(pb + PANEL_PREFETCH + t * 4 * PANEL), PF_HINT);
                    }
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(pb + t * 4 * PANEL + h * 32));
                    const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                    for (int i = 0; i < MT; i++)
                        a16[i] = _mm256_add_epi16(a16[i], _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(xr[i] + xa + 4 * t)),
                                                                           _mm256_maddubs_epi16(hi, bcast4(xr[i] + xb + 4 * t))));
                }
                for (int i = 0; i < MT; i++) acc[i][h] = _mm256_add_epi32(acc[i][h], _mm256_madd_epi16(a16[i], ones));
            }
#endif
        }
        if (!ps && g == tab_at + 8) {
            tab_at = g;
#if VNNI
            if (g + 8 <= G)
                panel_scales(srow, g, tab);
            else
#endif
                for (int r0 = 0; r0 < PANEL; r0 += 4)
                    scale_table(srow + r0, n - r0 < 0 ? 0 : n - r0 > 4 ? 4 : n - r0, g, G, tab[0], PANEL, r0);
        }
#if VNNI
        __m512 sc;
        if (ps) {
            _mm_prefetch((const char *)(ps + (size_t)g * PANEL + PANEL_PREFETCH / 16), _MM_HINT_T0);
            /* the scales, 1/16 of the weights' bytes, 6 KB ahead (PANEL_PREFETCH2 / 8 of these 2-byte
             * elements): on the 1 GB matvec 1.01 of a plain read, 3 KB ahead 0.98-1.01 */
            _mm_prefetch((const char *)(ps + (size_t)g * PANEL + PANEL_PREFETCH2 / 8), _MM_HINT_T2);
            const __m256i s16 = _mm256_loadu_si256((const __m256i *)(ps + (size_t)g * PANEL));
            sc = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(s16), 16));
        } else
            sc = _mm512_loadu_ps(tab[g - tab_at]);
        for (int i = 0; i < MT; i++) {
            __m512i lo = acc[i][0], hi = acc[i][1];
            for (int h = 2; h < CH; h += 2) lo = _mm512_add_epi32(lo, acc[i][h]), hi = _mm512_add_epi32(hi, acc[i][h + 1]);
            const __m512i sum = _mm512_add_epi32(lo, _mm512_srai_epi32(hi, 4));
            o[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum, _mm512_set1_epi32(xcr[i][c]))),
                                   _mm512_mul_ps(sc, _mm512_set1_ps(xsr[i][c])), o[i]);
        }
#else
        for (int h = 0; h < 2; h++) {
            const __m256 sc = ps ? load_bf16x8(ps + (size_t)g * PANEL + 8 * h) : _mm256_loadu_ps(tab[g - tab_at] + 8 * h);
            for (int i = 0; i < MT; i++)
                o[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[i][h], _mm256_set1_epi32(xcr[i][c]))),
                                          _mm256_mul_ps(sc, _mm256_set1_ps(xsr[i][c])), o[i][h]);
        }
#endif
        if (++gn == per_g) gn = 0, g++;
    }
    for (int i = 0; i < MT; i++) {
#if VNNI
        _mm512_storeu_ps(out[i], o[i]);
#else
        _mm256_storeu_ps(out[i], o[i][0]);
        _mm256_storeu_ps(out[i] + 8, o[i][1]);
#endif
    }
}

/* A thread's panel scratch (grown as needed, kept for the thread's life: one panel of the widest weight
 * it has repacked), or NULL if memory ran out. */
static uint8_t *panel_scratch(int K) {
    static __thread uint8_t *buf;
    static __thread size_t cap;
    if (panel_bytes(K) > cap) {
        free(buf);
        buf = malloc(panel_bytes(K));
        cap = buf ? panel_bytes(K) : 0;
    }
    return buf;
}

/* res[r * M + i] for `count` int4 rows of W against M activation rows, PANEL rows at a time: W in
 * panels (`packed`: w and s at a panel's start, the scales in panel order) or in rows (wrow bytes apart,
 * scales ls apart; repacked into the scratch). Returns -1 if a scratch was needed and could not be had
 * (nothing done). */
static int panels_dot(acts a, const int *rows, int base, int M, const uint8_t *w, size_t wrow, int packed,
                      const uint16_t *s, int G, size_t ls, int count, float *res) {
    uint8_t *scratch = packed ? NULL : panel_scratch(a.K);
    if (!packed && !scratch) return -1;
    for (int p0 = 0; p0 < count; p0 += PANEL) {
        const int n = count - p0 < PANEL ? count - p0 : PANEL;
        const uint8_t *pw = scratch;
        if (packed)
            pw = w + (size_t)p0 / PANEL * panel_bytes(a.K);
        else
            panel_pack(w + (size_t)p0 * wrow, wrow, n, a.K, scratch);
        const uint16_t *srow[PANEL], *ps = packed ? s + (size_t)p0 * ls : NULL; /* packed: ls == G */
        for (int r = 0; r < PANEL; r++) srow[r] = s + (size_t)(p0 + (r < n ? r : 0)) * ls;
        for (int m0 = 0; m0 < M; m0 += MT_PANEL) {
            const int mt = M - m0 < MT_PANEL ? M - m0 : MT_PANEL;
            const int8_t *xr[MT_PANEL];
            const float *xsr[MT_PANEL];
            const int *xcr[MT_PANEL];
            for (int i = 0; i < mt; i++) {
                const size_t r = (size_t)(rows ? rows[m0 + i] : base + m0 + i);
                xr[i] = (const int8_t *)a.xq + r * a.ldq;
                xsr[i] = a.xs + r * a.lds;
                xcr[i] = a.xc + r * a.lds;
            }
            float out[MT_PANEL][PANEL];
            switch (mt) {
#define PANEL_CASE(MT) case MT: panel_dot(pw, ps, srow, n, xr, xsr, xcr, a.K, G, a.chunk, out, MT); break;
                PANEL_CASE(1)
                PANEL_CASE(2)
#if VNNI
                PANEL_CASE(3) PANEL_CASE(4) PANEL_CASE(5) PANEL_CASE(6) PANEL_CASE(7) PANEL_CASE(8)
#endif
#undef PANEL_CASE
            }
            for (int r = 0; r < n; r++)
                for (int i = 0; i < mt; i++) res[(size_t)(p0 + r) * M + m0 + i] = out[i][r];
        }
    }
    return 0;
}

/* res[r * M + i] for weight rows r < count of W (row stride wrow bytes, scale groups gstride bytes apart
 * within a row; G scales a row, rows ls apart): the rows are taken `streams_for` at a time from that
 * many equal parts of the span, then the remainder one by one. */
static void span_dot(int bits, acts a, const int *rows, int base, int M, const char *w, size_t wrow,
                     size_t gstride, const uint16_t *s, int G, size_t ls, int count, float *res) {
    if (bits == 4 && M >= PANEL_MIN_M && !panels_dot(a, rows, base, M, (const uint8_t *)w, wrow, 0, s, G, ls, count, res))
        return;
    const int ns = streams_for(bits, a.K, M), q = count / ns;
    for (int r = 0; r < q; r++) {
        const void *wp[STREAMS];
        const uint16_t *sp[STREAMS];
        float *rp[STREAMS];
        for (int j = 0; j < ns; j++) {
            const size_t row = (size_t)j * q + r;
            wp[j] = w + row * wrow;
            sp[j] = s + row * ls;
            rp[j] = res + row * M;
        }
        rows_dot(bits, a, rows, base, M, ns, wp, gstride, sp, G, rp);
    }
    for (int r = ns * q; r < count; r++) {
        const void *wp = w + (size_t)r * wrow;
        const uint16_t *sp = s + (size_t)r * ls;
        float *rp = res + (size_t)r * M;
        rows_dot(bits, a, rows, base, M, 1, &wp, gstride, &sp, G, &rp);
    }
}

/* span_dot over `count` rows of an int8 weight with G scale groups, row-major (panel == 0: rows of K
 * bytes) or block-major (panel != 0: G panels `panel` bytes apart, each holding K/G columns of every
 * row, rows K/G bytes apart, w pointing into the first). A panel is read as one contiguous run
 * against its own K/G activation columns, which stay in the L1 cache however wide the row: at K =
 * 10240 and 32768 a matvec read 0.78 of a plain read row-major and 0.97 block-major on a Zen 4 VM
 * whose memory then gave ~55 GB/s (at ~30 GB/s both keep up). Each panel's sums are added into res
 * (part: scratch for count * M floats). Prefill reads them block by block too, although whole rows
 * were 4% faster there (bench-mid, 512 tokens): a row's sums then add up in the same order whatever
 * the number of activation rows, so a prompt prefilled in chunks (a server's) or with other tokens
 * routed to the same expert gets the bits it gets alone. For int4, panel != 0 says the weight is in
 * panels (see panels_dot). */
static void weight_dot(int bits, acts a, const int *rows, int base, int M, const char *w, size_t panel,
                       const uint16_t *s, int G, int count, float *res, float *part) {
    const int kg = a.K / G;
    if (bits == 4 && panel) { /* int4 in panels (count % PANEL == 0, w at a panel's start) */
        panels_dot(a, rows, base, M, (const uint8_t *)w, 0, 1, s, G, G, count, res);
        return;
    }
    if (!panel || G == 1) {
        span_dot(bits, a, rows, base, M, w, row_bytes(bits, a.K), kg, s, G, G, count, res);
        return;
    }
    for (int g = 0; g < G; g++) {
        acts p = a;
        p.xq = (int16_t *)a.xq + (size_t)g * kg; /* int8 weights only */
        p.xs += (size_t)g * kg / a.chunk;
        p.K = kg;
        span_dot(bits, p, rows, base, M, w + g * panel, kg, kg, s + g, 1, G, count, g ? part : res);
        if (g)
            for (size_t i = 0; i < (size_t)count * M; i++) res[i] += part[i];
    }
}

/* y [M, N_0 + N_1 + ...] = x @ W_j.T, side by side, for nmat weights W_j [N_j, K] (int8, or packed int4
 * [N_j, K/2]) sharing one scale layout ([N_j, G] bf16), in one parallel pass: x [M, K] bf16 is quantized once with
 * `chunk` (groklm_chunk's), and the rows of all the weights, end to end, are split across OpenMP
 * threads (torch's own libgomp when loaded into torch; int4 at panel boundaries). One call computes
 * e.g. an attention layer's q, k and v. y is bf16 or fp32. With `blocked`, each W_j is in its kernel's
 * own layout: int8 block-major, [G, N_j, K/G] (see weight_dot); int4 in panels, [N_j/16, K/32, 256],
 * scales in panel order (see panels_dot). Returns 0, or -1 if memory ran out (y then unwritten). */
int groklm_linear(int bits, const uint16_t *x, int M, int K, int chunk, int nmat, const void *const *w,
                   const uint16_t *const *s, int G, const int *N, void *y, int y_bf16, int blocked) {
    int total = 0;
    for (int j = 0; j < nmat; j++) total += N[j];
    acts a;
    if (acts_alloc(&a, bits, M, K, chunk)) return -1;
    const size_t wrow = blocked && bits == 8 ? (size_t)(K / G) : row_bytes(bits, K); /* from one row to the next */
    const int align = row_align(bits);
    int units = 0; /* all the weights' rows, end to end, in whole units of `align` rows each */
    for (int j = 0; j < nmat; j++) units += (N[j] + align - 1) / align;
    const int team = omp_get_max_threads(), block = block_rows(M);
    const int take = share_chunk(bits == 4 && blocked, align * row_bytes(bits, K), block / align, units, team);
    share *sh = shares_new(team, units);
    if (!sh) return acts_free(a), -1;
#pragma omp parallel num_threads(team)
    {
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) acts_quantize(a, bits, (size_t)m, x + (size_t)m * K);
        float *res = malloc(sizeof(float) * 2 * block * (size_t)M), *part = res + block * (size_t)M;
        int lo, hi;
        while (share_next(sh, team, take, &lo, &hi)) {
            for (int j = 0, base = 0, ubase = 0; j < nmat; base += N[j], ubase += (N[j] + align - 1) / align, j++) {
                const int ufrom = lo > ubase ? lo : ubase, uto = hi < ubase + (N[j] + align - 1) / align ? hi : ubase + (N[j] + align - 1) / align;
                const int from = (ufrom - ubase) * align, to = (uto - ubase) * align < N[j] ? (uto - ubase) * align : N[j];
                for (int n0 = from; n0 < to; n0 += block) {
                    const int count = to - n0 < block ? to - n0 : block;
                    weight_dot(bits, a, NULL, 0, M, (const char *)w[j] + (size_t)n0 * wrow, blocked ? (size_t)N[j] * wrow : 0,
                               s[j] + (size_t)n0 * G, G, count, res, part);
                    for (int r = 0; r < count; r++)
                        for (int m = 0; m < M; m++) store(y, y_bf16, (size_t)m * total + base + n0 + r, res[(size_t)r * M + m]);
                }
            }
        }
        free(res);
    }
    free(sh);
    acts_free(a);
    return 0;
}

/* ---- one MoE layer in one call: routing and the chosen experts -----------------------------------
 *
 *   probs[t] = softmax(router . x_t) in fp32 (router [E, D] fp32), experts[t] = its topk largest
 *   (ties: the lower expert first), gates[t] = their probabilities, not renormalised;
 *   y[t] = bf16( sum_j gates[t, j] * bf16( W2_e (bf16( bf16(gelu(bf16(W1_e x_t))) * bf16(V_e x_t) )) ) ),
 *   e = experts[t, j]
 *
 * with the roundings of the reference's bf16 computation (and of the torch path: the same function,
 * not the same bits, as sums run in another order). Routing here, not in torch, saves a decode step
 * three calls per layer (a matmul, a softmax and a top-k), each started with cold caches. Pairs
 * (t, j) are grouped by expert (a counting sort, stable), and each chosen expert's weights are read
 * once for all its tokens; experts nobody chose are never touched. Weights are [E, F, D] (W1, V) and
 * [E, D, F] (W2), int8 or packed int4, with bf16 scales [E, rows, G]; W1 and V with `blocked1`, W2 with
 * `blocked2`, are in their kernel's own layout: int8 block-major, [E, G, rows, cols / G] (see
 * weight_dot), int4 in panels, [E, rows / 16, cols / 32, 256], scales in panel order (see panels_dot).
 * Its scratch is allocated here (P = N * topk rows of F and D): the caller allocates only y. Returns 0,
 * or -1 if memory ran out (y then unwritten). D % 8 == 0, 1 <= topk <= E. */
static inline float gelu_tanh(float x) {
    const float beta = 0.7978845608028654f, kappa = 0.044715f; /* sqrt(2/pi), as torch and JAX */
    return 0.5f * x * (1.f + tanhf(beta * (x + kappa * x * x * x)));
}

/* GELU with erf (Grok-2's experts, as SGLang's CUDA kernels and torch's approximate="none"). */
static inline float gelu_erf(float x) { return x * 0.5f * (1.f + erff(x * 0.70710678118654752f)); }

/* The same on 8 lanes, with the 8-lane tanh torch itself uses (its bundled SLEEF, handed over by
 * groklm_set_tanh8), so both paths compute the same function; without it, the scalar loop. A libm
 * tanhf costs ~75 cycles: at batch 1 that was 7% of an MoE layer. */
typedef __m256 (*tanh8_fn)(__m256);
static tanh8_fn tanh8, erf8;
void groklm_set_tanh8(tanh8_fn f) { tanh8 = f; }
void groklm_set_erf8(tanh8_fn f) { erf8 = f; }

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

static inline __m256 gelu_tanh8(__m256 x) {
    const __m256 inner = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                       _mm256_add_ps(x, _mm256_mul_ps(_mm256_set1_ps(0.044715f),
                                                                      _mm256_mul_ps(_mm256_mul_ps(x, x), x))));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.f), tanh8(inner)));
}

static inline __m256 gelu_erf8(__m256 x) {
    const __m256 e = erf8(_mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f)));
    return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), _mm256_add_ps(_mm256_set1_ps(1.f), e));
}

/* h[i][r] = bf16(bf16(gelu(bf16(a[r * m + i]))) * bf16(b[r * m + i])) for r < n, i < m; h rows F apart;
 * the tanh GELU, or with `erf` the erf one. */
static void gelu_product(const float *a, const float *b, int n, int m, uint16_t *h, size_t F, int erf) {
    for (int i = 0; i < m; i++) {
        uint16_t *hi = h + (size_t)i * F;
        int r = 0;
        if (erf ? erf8 != NULL : tanh8 != NULL) {
            const __m256i at = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(m));
            for (; r + 8 <= n; r += 8) {
                const __m256 va = bf16_round8(_mm256_i32gather_ps(a + (size_t)r * m + i, at, 4));
                const __m256 vb = _mm256_i32gather_ps(b + (size_t)r * m + i, at, 4);
                const __m256 act = bf16_round8(erf ? gelu_erf8(va) : gelu_tanh8(va));
                store_bf16x8(hi + r, _mm256_mul_ps(act, bf16_round8(vb)));
            }
        }
        for (; r < n; r++) {
            const float va = bf16_round(a[(size_t)r * m + i]);
            const float act = bf16_round(erf ? gelu_erf(va) : gelu_tanh(va));
            hi[r] = f32_to_bf16(act * bf16_round(b[(size_t)r * m + i]));
        }
    }
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

/* experts[t, :topk], gates[t, :topk] for the N tokens x [N, D] (see above). */
static void route(const uint16_t *x, int N, int D, const float *router, int E, int topk, float cap, int *experts,
                  float *gates) {
#pragma omp parallel for schedule(static) if (N >= 16)
    for (int t = 0; t < N; t++) {
        const uint16_t *xt = x + (size_t)t * D;
        float p[E];
        for (int e = 0; e < E; e++) p[e] = dot_with(xt, router + (size_t)e * D, 1, D);
        if (cap > 0.f) { /* Grok-2: cap * tanh(l / cap), with torch's 8-lane tanh where there are 8 experts */
            if (E == 8 && tanh8) {
                const __m256 c = _mm256_set1_ps(cap);
                _mm256_storeu_ps(p, _mm256_mul_ps(c, tanh8(_mm256_div_ps(_mm256_loadu_ps(p), c))));
            } else {
                for (int e = 0; e < E; e++) p[e] = cap * tanhf(p[e] / cap);
            }
        }
        float mx = -INFINITY, sum = 0.f;
        for (int e = 0; e < E; e++) mx = p[e] > mx ? p[e] : mx;
        for (int e = 0; e < E; e++) sum += (p[e] = expf(p[e] - mx));
        for (int e = 0; e < E; e++) p[e] /= sum;
        for (int j = 0; j < topk; j++) { /* a NaN probability is never chosen over a number; ids stay valid */
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int i = 0; i < j; i++) taken |= experts[(size_t)t * topk + i] == e;
                if (!taken && (best < 0 || p[e] > p[best])) best = e;
            }
            experts[(size_t)t * topk + j] = best;
            gates[(size_t)t * topk + j] = p[best];
        }
    }
}

/* The routing groklm_moe uses, on its own (for routing statistics: the same choices, tie for tie). */
void groklm_route(const uint16_t *x, int N, int D, const float *router, int E, int topk, float cap, int *experts,
                  float *gates) {
    route(x, N, D, router, E, topk, cap, experts, gates);
}

int groklm_moe(int bits, const uint16_t *x, int N, int D, const float *router, int topk, int E, int F,
               const void *w1, const uint16_t *s1, int g1, const void *wv, const uint16_t *sv, int gv,
               const void *w2, const uint16_t *s2, int g2, int chunk_d, int chunk_f, int blocked1, int blocked2,
               float router_cap, int gelu_erf_, uint16_t *y) {
    const int P = N * topk;
    acts ax, ah;
    if (acts_alloc(&ax, bits, N, D, chunk_d)) return -1;
    if (acts_alloc(&ah, bits, P, F, chunk_f)) return acts_free(ax), -1;
    float *pairs = malloc(sizeof(float) * (size_t)P * D);
    uint16_t *h = malloc(sizeof(uint16_t) * (size_t)P * F);
    int *idx = malloc(sizeof(int) * (size_t)(3 * P + 4 * E + 1));
    float *gates = malloc(sizeof(float) * (size_t)P);
    if (!pairs || !h || !idx || !gates) {
        acts_free(ax), acts_free(ah), free(pairs), free(h), free(idx), free(gates);
        return -1;
    }
    int *order = idx, *token = idx + P, *experts = idx + 2 * P, *count = idx + 3 * P, *start = count + E,
        *fill = start + E + 1, *used = fill + E;
    route(x, N, D, router, E, topk, router_cap, experts, gates);
    memset(count, 0, sizeof(int) * (size_t)E);
    for (int p = 0; p < P; p++) count[experts[p]]++;
    start[0] = 0;
    for (int e = 0; e < E; e++) start[e + 1] = start[e] + count[e];
    for (int e = 0; e < E; e++) fill[e] = start[e];
    for (int p = 0; p < P; p++) {
        const int at = fill[experts[p]]++;
        order[at] = p;
        token[at] = p / topk;
    }
    int maxc = 0, ne = 0; /* the most tokens an expert has; the experts chosen, used[0..ne) */
    for (int e = 0; e < E; e++) {
        maxc = count[e] > maxc ? count[e] : maxc;
        if (count[e]) used[ne++] = e;
    }
    const size_t b1 = row_bytes(bits, D), b2 = row_bytes(bits, F); /* bytes a row */
    /* row to row (int8 block-major: within a block; int4 panels: rows a multiple of PANEL apart, as in rows) */
    const size_t step1 = blocked1 && bits == 8 ? (size_t)(D / g1) : b1, step2 = blocked2 && bits == 8 ? (size_t)(F / g2) : b2;
    /* The chosen experts' rows, end to end, in units of `align`: fu an expert's W1 (and V), du its W2. */
    const int align = row_align(bits), fu = (F + align - 1) / align, du = (D + align - 1) / align;
    const int team = omp_get_max_threads(), block = block_rows(maxc);
    const int take1 = share_chunk(bits == 4 && blocked1, 2 * align * b1, block / align, ne * fu, team);
    const int take2 = share_chunk(bits == 4 && blocked2, align * b2, block / align, ne * du, team);
    share *sh1 = shares_new(team, ne * fu), *sh2 = shares_new(team, ne * du);
    if (!sh1 || !sh2) {
        acts_free(ax), acts_free(ah), free(pairs), free(h), free(idx), free(gates), free(sh1), free(sh2);
        return -1;
    }
#pragma omp parallel num_threads(team)
    {
        float *r1 = malloc(sizeof(float) * 3 * block * (size_t)maxc), *rv = r1 + block * (size_t)maxc;
        float *part = rv + block * (size_t)maxc;
#pragma omp for schedule(static)
        for (int t = 0; t < N; t++)
            acts_quantize(ax, bits, (size_t)t, x + (size_t)t * D);
        /* W1 and V of the chosen experts, shared between threads; no barrier between experts. */
        int lo, hi;
        while (share_next(sh1, team, take1, &lo, &hi))
            for (int u = lo, k, rlo, rhi, n; u < hi; u += n) {
                n = expert_piece(u, hi, fu, align, F, &k, &rlo, &rhi);
                const int e = used[k], m = count[e];
                const char *w1e = (const char *)w1 + (size_t)e * F * b1, *wve = (const char *)wv + (size_t)e * F * b1;
                for (int n0 = rlo; n0 < rhi; n0 += block) {
                    const int cnt = rhi - n0 < block ? rhi - n0 : block;
                    weight_dot(bits, ax, token + start[e], 0, m, w1e + n0 * step1, blocked1 ? F * step1 : 0,
                               s1 + ((size_t)e * F + n0) * g1, g1, cnt, r1, part);
                    weight_dot(bits, ax, token + start[e], 0, m, wve + n0 * step1, blocked1 ? F * step1 : 0,
                               sv + ((size_t)e * F + n0) * gv, gv, cnt, rv, part);
                    gelu_product(r1, rv, cnt, m, h + (size_t)start[e] * F + n0, F, gelu_erf_);
                }
            }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int p = 0; p < P; p++)
            acts_quantize(ah, bits, (size_t)p, h + (size_t)p * F);
        /* W2, gated, into each pair's own row. */
        while (share_next(sh2, team, take2, &lo, &hi))
            for (int u = lo, k, rlo, rhi, n; u < hi; u += n) {
                n = expert_piece(u, hi, du, align, D, &k, &rlo, &rhi);
                const int e = used[k], m = count[e];
                const char *w2e = (const char *)w2 + (size_t)e * D * b2;
                for (int n0 = rlo; n0 < rhi; n0 += block) {
                    const int cnt = rhi - n0 < block ? rhi - n0 : block;
                    weight_dot(bits, ah, NULL, start[e], m, w2e + n0 * step2, blocked2 ? D * step2 : 0,
                               s2 + ((size_t)e * D + n0) * g2, g2, cnt, r1, part);
                    for (int r = 0; r < cnt; r++)
                        for (int i = 0; i < m; i++) {
                            const int p = order[start[e] + i];
                            pairs[(size_t)p * D + n0 + r] = bf16_round(r1[r * m + i]) * gates[p];
                        }
                }
            }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int t = 0; t < N; t++)
            for (int n = 0; n < D; n++) {
                float acc = 0.f;
                for (int j = 0; j < topk; j++) acc += pairs[((size_t)t * topk + j) * D + n];
                y[(size_t)t * D + n] = f32_to_bf16(acc);
            }
        free(r1);
    }
    acts_free(ax), acts_free(ah), free(pairs), free(h), free(idx), free(gates), free(sh1), free(sh2);
    return 0;
}

/* ---- attention of one new token per row over its cache (decode) ----------------------------------
 *
 * For row b, kv head h and each of its G query heads (q [B, H, G, Dh], rotated, bf16):
 *   s_j = cap * tanh(bf16(q . k_j) * mult / cap) for cache slots j < S where mask[b, j], else `masked`
 *   o   = bf16( sum_j bf16(softmax_j(s)) * v_j )
 * in fp32 with the reference's bf16 roundings, as the torch path computes it (the same function, not
 * the same bits: sums run in another order). k, v are [B, S, H, Dh] bf16 whose rows lie `stride`
 * elements apart (a prefix of a longer cache); o is [B, H, G, Dh] bf16. The scores of masked slots are
 * never computed, and slots whose weight is 0 are not read for the output. The 8-lane exp and tanh are
 * torch's (groklm_set_exp8, groklm_set_tanh8): without them, libm's. Dh % 8 == 0. Returns 0, or -1 if
 * memory ran out (o then unwritten). */
typedef __m256 (*exp8_fn)(__m256);
static exp8_fn exp8;
void groklm_set_exp8(exp8_fn f) { exp8 = f; }


/* s[0..n) = cap * tanh(s / cap), in place. */
static void soft_cap(float *s, int n, float cap) {
    int j = 0;
    if (tanh8)
        for (; j + 8 <= n; j += 8)
            _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_set1_ps(cap),
                                                  tanh8(_mm256_div_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(cap)))));
    for (; j < n; j++) s[j] = cap * tanhf(s[j] / cap);
}

/* s[0..n) = bf16(softmax(s)), in place: e = exp(s - max), then e / sum e. */
static void softmax_bf16(float *s, int n) {
    float mx = -INFINITY, sum = 0.f;
    for (int j = 0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
    int j = 0;
    if (exp8) {
        __m256 acc = _mm256_setzero_ps();
        for (; j + 8 <= n; j += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(mx)));
            _mm256_storeu_ps(s + j, e);
            acc = _mm256_add_ps(acc, e);
        }
        sum = hsum(acc);
    }
    for (; j < n; j++) sum += (s[j] = expf(s[j] - mx));
    for (j = 0; j < n; j++) s[j] = bf16_round(s[j] / sum);
}

int groklm_attend(const uint16_t *q, const uint16_t *k, const uint16_t *v, long stride, const uint8_t *mask, int B,
                  int S, int H, int G, int Dh, float mult, float cap, float masked, const float *row_scale,
                  uint16_t *o) {
    int failed = 0;
    /* Scores run over S rounded up to 8, the extra slots masked: each slot then always takes the same
     * lane of the 8-wide tanh, exp and sum, so a row's result does not depend on how many slots the
     * call covers (a batch attends up to its longest row; alone, a row attends up to its own end). */
    const int S8 = (S + 7) / 8 * 8;
#pragma omp parallel
    {
        float *s = malloc(sizeof(float) * (size_t)S8);
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static) collapse(3)
            for (int b = 0; b < B; b++)
                for (int h = 0; h < H; h++)
                    for (int g = 0; g < G; g++) {
                        const uint16_t *qr = q + (((size_t)b * H + h) * G + g) * Dh;
                        const uint16_t *kb = k + (size_t)b * stride + (size_t)h * Dh, *vb = v + (size_t)b * stride + (size_t)h * Dh;
                        const uint8_t *mb = mask + (size_t)b * S;
                        const size_t row = (size_t)H * Dh; /* between slots */
                        for (int j = 0; j < S8; j++) s[j] = j < S && mb[j] ? bf16_round(dot_with(qr, kb + j * row, 0, Dh)) * mult : 0.f;
                        soft_cap(s, S8, cap);
                        if (row_scale) /* Grok-2's temperature: the capped scores of this row's query, scaled */
                            for (int j = 0; j < S8; j++) s[j] *= row_scale[b];
                        for (int j = 0; j < S8; j++)
                            if (j >= S || !mb[j]) s[j] = masked;
                        softmax_bf16(s, S8);
                        uint16_t *out = o + (((size_t)b * H + h) * G + g) * Dh;
                        for (int d0 = 0; d0 < Dh; d0 += 64) {
                            const int nv = (Dh - d0) / 8 < 8 ? (Dh - d0) / 8 : 8;
                            __m256 acc[8];
                            for (int t = 0; t < nv; t++) acc[t] = _mm256_setzero_ps();
                            for (int j = 0; j < S; j++) {
                                if (s[j] == 0.f) continue;
                                const __m256 pj = _mm256_set1_ps(s[j]);
                                const uint16_t *vr = vb + j * row + d0;
                                for (int t = 0; t < nv; t++) acc[t] = _mm256_fmadd_ps(pj, load_bf16x8(vr + 8 * t), acc[t]);
                            }
                            for (int t = 0; t < nv; t++) store_bf16x8(out + d0 + 8 * t, acc[t]);
                        }
                    }
        }
        free(s);
    }
    return failed ? -1 : 0;
}

/* ---- loading -----------------------------------------------------------------------------------
 *
 * A byte matrix src [rows, cols] written transposed: dst[c * ld + r] = src[r * cols + c]. The loader
 * turns the released [in, out] int8 weights into [out, in] with this; torch's strided copy of a
 * transposed int8 view runs at about 1 GB/s, which made it most of the load time. 16 x 16 tiles are
 * transposed in registers (four rounds of byte interleaving: row i with row i + 8), the edges byte
 * by byte; bands of 64 columns are split across threads. */
static inline void tile16(const uint8_t *s, long ss, uint8_t *d, long ds) {
    __m128i x[16], y[16];
    for (int i = 0; i < 16; i++) x[i] = _mm_loadu_si128((const __m128i *)(s + i * ss));
    for (int round = 0; round < 4; round++) {
        for (int i = 0; i < 8; i++) {
            y[2 * i] = _mm_unpacklo_epi8(x[i], x[i + 8]);
            y[2 * i + 1] = _mm_unpackhi_epi8(x[i], x[i + 8]);
        }
        memcpy(x, y, sizeof x);
    }
    for (int i = 0; i < 16; i++) _mm_storeu_si128((__m128i *)(d + i * ds), x[i]);
}

void groklm_transpose8(const uint8_t *src, long rows, long cols, uint8_t *dst, long ld) {
#pragma omp parallel for schedule(static)
    for (long c0 = 0; c0 < cols; c0 += 64) {
        const long c1 = c0 + 64 < cols ? c0 + 64 : cols;
        long r0 = 0;
        for (; r0 + 16 <= rows; r0 += 16) {
            long c = c0;
            for (; c + 16 <= c1; c += 16) tile16(src + r0 * cols + c, cols, dst + c * ld + r0, ld);
            for (; c < c1; c++)
                for (long r = r0; r < r0 + 16; r++) dst[c * ld + r] = src[r * cols + c];
        }
        for (long c = c0; c < c1; c++)
            for (long r = r0; r < rows; r++) dst[c * ld + r] = src[r * cols + c];
    }
}

/* Not a kernel: a guard for memory-mapped checkpoints. A file that shrinks while it is mapped (a
 * copy or a download rewriting it) turns the next read of the lost pages into SIGBUS, which kills
 * the process with a bare "Bus error". This handler says what happened instead, then exits: the
 * mapped weights are gone, so the process cannot go on. Only async-signal-safe calls. */
#include <signal.h>
#include <unistd.h>

static char sigbus_message[2048];

static void on_sigbus(int sig) {
    (void)sig;
    ssize_t written = write(2, sigbus_message, strlen(sigbus_message));
    (void)written;
    _exit(135);
}

void groklm_guard_sigbus(const char *message) {
    strncpy(sigbus_message, message, sizeof sigbus_message - 1);
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_sigbus;
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, NULL);
}
