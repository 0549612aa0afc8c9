/* dot8q: int8 weight rows against int8 activations in blocks of Q8_BLOCK columns (quantize_row8), in
 * builds with INT8_ACTS (common.h; AVX2 instructions, either ISA). Scalar twin: ref_dot in reference.c.
 *
 * maddubs multiplies unsigned by signed bytes: |w| (0..128) against x with w's sign moved onto it
 * (sign(x, w), |x| <= 127), so a pair of products is at most 2 * 128 * 127 = 32512 and never saturates
 * int16; a madd against ones widens the pairs into int32. A block's sum (at most 32 * 128 * 127 < 2^24)
 * is exact, in int32 and as a float. The weight rows' sums are reduced together, in integers, to one
 * vector of 4 lanes, folded with one fused multiply-add (scale * step) a block, as the twin folds
 * it: the same bits. No accumulator outlives a block, so 4 weight rows and 4 activation rows fit the
 * registers: each weight load serves 4 activation rows, each activation load 4 weight rows. */

/* res[j][i] = int8 weight row w[j] [K] (scales s[j] [G], scale groups gstride bytes apart in a row, as
 * in dot8) against activation row xr[i] [K] (int8, block steps xsr[i]), for NT <= 4 weight rows and
 * MT <= 4 activation rows, both compile-time constants at each call site. */
static inline __attribute__((always_inline)) void dot8q(const int8_t *const *xr, const float *const *xsr, int K,
                                                         const int8_t *const *w, size_t gstride,
                                                         const uint16_t *const *s, int G, float *const *res,
                                                         const int NT, const int MT) {
    const int kg = K / G, per_g = kg / Q8_BLOCK;
    const __m256i ones = _mm256_set1_epi16(1);
    __m128 out[4];
    for (int i = 0; i < MT; i++) out[i] = _mm_setzero_ps();
    int g = 0, gn = 0, tab_at = -8;
    size_t skip = 0; /* bytes between this group's columns and where a row-major row has them */
    float tab[8][4];
    for (int c0 = 0, c = 0; c0 < K; c0 += Q8_BLOCK, c++) {
        if (g == tab_at + 8) scale_table(s, NT, tab_at = g, G, tab[0], 4, 0);
        const __m128 sc = _mm_loadu_ps(tab[g - tab_at]);
        __m256i aw[4];
        for (int j = 0; j < NT; j++) {
            const int8_t *wc = w[j] + skip + c0;
            if (!(c & 1)) _mm_prefetch((const char *)(wc + ROW_PREFETCH), PF_HINT);
            aw[j] = _mm256_abs_epi8(_mm256_loadu_si256((const __m256i *)wc));
        }
        for (int i = 0; i < MT; i++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xr[i] + c0));
            __m256i p[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
            for (int j = 0; j < NT; j++) { /* w reloaded (from L1) for its sign: the registers hold |w| */
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(w[j] + skip + c0));
                p[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[j], _mm256_sign_epi8(xv, wv)), ones);
            }
            out[i] = _mm_fmadd_ps(_mm_cvtepi32_ps(isum4(p[0], p[1], p[2], p[3])), _mm_mul_ps(sc, _mm_set1_ps(xsr[i][c])),
                                  out[i]);
        }
        if (++gn == per_g) gn = 0, g++, skip += gstride - kg;
    }
    for (int i = 0; i < MT; i++) {
        float o[4];
        _mm_storeu_ps(o, out[i]);
        for (int j = 0; j < NT; j++) res[j][i] = o[j];
    }
}
