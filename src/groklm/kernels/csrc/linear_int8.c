/* dot8: int8 weight rows against int16 activations (the released model's int8 weights).
 *
 * Each 16 weights cost one widening load and one madd (16 int16 products summed pairwise into 8 int32
 * lanes), 64 columns a step on AVX2; with AVX-512 VNNI (32 vector registers) each 32 columns cost one
 * 512-bit vpdpwssd per activation row, and more activation rows run against the weight streams at
 * once: batches and prefill are compute-bound. Within a segment an int32 lane sums at most
 * CHUNK_MAX/32 * 2 * 32767 * 128 < 2^30, so it cannot overflow. Scale groups and chunks are tracked by
 * counters, not divisions. Scalar twin: ref_dot in reference.c. */

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
    /* How far ahead each stream prefetches: for one activation row, half a weight row (at least
     * ROW_PREFETCH_MIN); for a tile of several, which is compute-bound, ROW_PREFETCH_TILE bytes. On a Zen 4
     * one row read 0.77 of a plain read with 2048 bytes, 0.92 with half a row, but 8 rows ran 12-27%
     * slower with half a row than with 2048 (benchmarks/NOTES.md, "prefetch"). */
    const size_t half = ((size_t)K / 2 + 63) & ~(size_t)63;
    const size_t ahead = ROW_PREFETCH       ? ROW_PREFETCH
                         : MT > 1           ? ROW_PREFETCH_TILE
                         : half > ROW_PREFETCH_MIN ? half
                                              : ROW_PREFETCH_MIN;
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
                if (!(k & 63)) _mm_prefetch((const char *)(w[j] + skip + c0 + k + ahead), PF_HINT);
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
                _mm_prefetch((const char *)(wc + ahead), PF_HINT);
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

