/* Weight-only int8 matmul with grouped scales for x86 AVX2, at memory speed for decode.
 *
 *   y[m, n] = sum_g s[n, g] * sum_{k in block g} x[m, k] * w[n, k]
 *
 * w is int8 [N, K] (nn.Linear's [out, in] layout of the released [in, out] weight), s is bf16
 * [N, G]: G scale blocks of Kg = K/G input columns. x is bf16 [M, K]; y is [M, N], written in
 * bf16 (rounded to nearest even, as a torch cast does) or fp32.
 *
 * Activations are quantized to int16 per row and per chunk of columns (step = max|x| / 32767 of
 * that chunk, a 2^-15 relative step: far finer than bf16's 2^-8), so each 16 weights cost one
 * widening load and one madd (16 int16 products summed pairwise into 8 int32 lanes). The inner
 * loop is unrolled 4x over two accumulators so that several weight loads are in flight: that is
 * what reaches memory speed (measured 17 -> 30 GB/s on a 2-core AVX2 machine). Within a chunk an
 * int32 lane sums at most CHUNK_MAX/32 * 2 * 32767 * 128 < 2^30, so it cannot overflow; each chunk
 * is then folded into an fp32 accumulator with its step.
 *
 * Output columns are split across OpenMP threads (torch's own libgomp when loaded into torch).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CHUNK_MAX 2048

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

/* The chunk size for a group of Kg columns: the largest multiple of 64 (the inner loop's step)
 * <= CHUNK_MAX dividing Kg. 0 if there is none: the caller must use another kernel. */
int groklm_chunk(int kg) {
    for (int c = CHUNK_MAX; c >= 64; c -= 64)
        if (kg % c == 0) return c;
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

/* Output columns split across threads; rows of x in tiles of 4, then the remainder, each with a
 * compile-time tile size so the accumulators stay in registers. */
#define FOR_EACH_COLUMN(column, ...)                                                  \
    _Pragma("omp parallel for schedule(static)") for (int n = 0; n < N; n++) {        \
        int m0 = 0;                                                                   \
        for (; m0 + 4 <= M; m0 += 4) column(__VA_ARGS__, 4);                          \
        switch (M - m0) {                                                             \
            case 3: column(__VA_ARGS__, 3); break;                                    \
            case 2: column(__VA_ARGS__, 2); break;                                    \
            case 1: column(__VA_ARGS__, 1); break;                                    \
            default: break;                                                           \
        }                                                                             \
    }

/* x [M, K] bf16 -> xq [M, K] int16 and xs [M, K / chunk] (dequantization step of each chunk). */
void groklm_quantize_rows(const uint16_t *x, int M, int K, int chunk, int16_t *xq, float *xs) {
    int nc = K / chunk;
    for (int m = 0; m < M; m++) {
        for (int c = 0; c < nc; c++) {
            const uint16_t *xc = x + (size_t)m * K + (size_t)c * chunk;
            float amax = 0.f;
            for (int k = 0; k < chunk; k++) amax = fmaxf(amax, fabsf(bf16_to_f32(xc[k])));
            float step = amax / 32767.f;
            float inv = amax > 0.f ? 32767.f / amax : 0.f;
            xs[(size_t)m * nc + c] = step;
            int16_t *q = xq + (size_t)m * K + (size_t)c * chunk;
            for (int k = 0; k < chunk; k++) q[k] = (int16_t)lrintf(bf16_to_f32(xc[k]) * inv);
        }
    }
}

/* One output column n for MT rows of x starting at m0. MT is a compile-time constant at each call
 * site so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void column(
    const int16_t *xq, const float *xs, int K, int m0, const int8_t *w, const uint16_t *s, int G, int N,
    int n, int chunk, void *y, int y_bf16, const int MT) {
    const int kg = K / G, nc_g = kg / chunk, nc = K / chunk;
    __m256 out[4];
    for (int i = 0; i < MT; i++) out[i] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        const int8_t *wrow = w + (size_t)n * K + (size_t)g * kg;
        __m256 accf[4];
        for (int i = 0; i < MT; i++) accf[i] = _mm256_setzero_ps();
        for (int c = 0; c < nc_g; c++) {
            const int8_t *wc = wrow + (size_t)c * chunk;
            const size_t col = (size_t)g * kg + (size_t)c * chunk;
            __m256i acc[4];
            for (int i = 0; i < MT; i++) acc[i] = _mm256_setzero_si256();
            __m256i acc2[4];
            for (int i = 0; i < MT; i++) acc2[i] = _mm256_setzero_si256();
            for (int k = 0; k < chunk; k += 64) {
                __m256i wa = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wc + k)));
                __m256i wb = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wc + k + 16)));
                __m256i wc3 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wc + k + 32)));
                __m256i wd = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wc + k + 48)));
                for (int i = 0; i < MT; i++) {
                    const int16_t *xr = xq + (size_t)(m0 + i) * K + col + k;
                    acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(wa, _mm256_loadu_si256((const __m256i *)xr)));
                    acc2[i] = _mm256_add_epi32(acc2[i], _mm256_madd_epi16(wb, _mm256_loadu_si256((const __m256i *)(xr + 16))));
                    acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(wc3, _mm256_loadu_si256((const __m256i *)(xr + 32))));
                    acc2[i] = _mm256_add_epi32(acc2[i], _mm256_madd_epi16(wd, _mm256_loadu_si256((const __m256i *)(xr + 48))));
                }
            }
            for (int i = 0; i < MT; i++) acc[i] = _mm256_add_epi32(acc[i], acc2[i]);
            for (int i = 0; i < MT; i++) {
                __m256 step = _mm256_set1_ps(xs[(size_t)(m0 + i) * nc + (size_t)g * nc_g + c]);
                accf[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i]), step, accf[i]);
            }
        }
        /* Fold the group in as a vector: one horizontal sum per output, not per group (small groups). */
        const __m256 sc = _mm256_set1_ps(bf16_to_f32(s[(size_t)n * G + g]));
        for (int i = 0; i < MT; i++) out[i] = _mm256_fmadd_ps(accf[i], sc, out[i]);
    }
    for (int i = 0; i < MT; i++) store(y, y_bf16, (size_t)(m0 + i) * N + n, hsum(out[i]));
}

/* Needs Kg % 64 == 0 (groklm_chunk(Kg) != 0); xq/xs from groklm_quantize_rows with that chunk. */
void groklm_int8_matmul(const int16_t *xq, const float *xs, int M, int K, const int8_t *w, const uint16_t *s,
                        int G, int N, int chunk, void *y, int y_bf16) {
    FOR_EACH_COLUMN(column, xq, xs, K, m0, w, s, G, N, n, chunk, y, y_bf16)
}

/* ---- int4 --------------------------------------------------------------------------------------
 * w is uint8 [N, K/2]: each 32 input columns are 16 bytes, byte j = column j (low nibble) and
 * column j + 16 (high nibble), stored as value + 8. s is bf16 [N, G] with G = K / group, one scale
 * per `group` (a multiple of 32) columns; the x chunk holds whole groups (chunk % group == 0). */

static inline __attribute__((always_inline)) void column4(
    const int16_t *xq, const float *xs, int K, int m0, const uint8_t *w, const uint16_t *s, int G, int N,
    int n, int chunk, void *y, int y_bf16, const int MT) {
    const int group = K / G, nc = K / chunk;
    const __m128i low4 = _mm_set1_epi8(0x0f);
    const __m256i eight = _mm256_set1_epi16(8);
    const uint8_t *row = w + (size_t)n * (K / 2);
    __m256 out[4];
    for (int i = 0; i < MT; i++) out[i] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        const size_t col = (size_t)g * group;
        __m256i acc[4];
        for (int i = 0; i < MT; i++) acc[i] = _mm256_setzero_si256();
        for (int k = 0; k < group; k += 32) {
            __m128i v = _mm_loadu_si128((const __m128i *)(row + (col + k) / 2));
            __m256i wl = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_and_si128(v, low4)), eight);
            __m256i wh = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), low4)), eight);
            for (int i = 0; i < MT; i++) {
                const int16_t *xr = xq + (size_t)(m0 + i) * K + col + k;
                acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(wl, _mm256_loadu_si256((const __m256i *)xr)));
                acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(wh, _mm256_loadu_si256((const __m256i *)(xr + 16))));
            }
        }
        const float sc = bf16_to_f32(s[(size_t)n * G + g]);
        for (int i = 0; i < MT; i++) {
            const __m256 f = _mm256_set1_ps(sc * xs[(size_t)(m0 + i) * nc + col / chunk]);
            out[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i]), f, out[i]);
        }
    }
    for (int i = 0; i < MT; i++) store(y, y_bf16, (size_t)(m0 + i) * N + n, hsum(out[i]));
}

void groklm_int4_matmul(const int16_t *xq, const float *xs, int M, int K, const uint8_t *w, const uint16_t *s,
                        int G, int N, int chunk, void *y, int y_bf16) {
    FOR_EACH_COLUMN(column4, xq, xs, K, m0, w, s, G, N, n, chunk, y, y_bf16)
}
