/* Activations quantized once a call, per row: int16 for int8 weights, int8 for int4 ones, each chunk
 * (segment) of columns with its own step; the chunk rule decides how many columns share a step. */

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

