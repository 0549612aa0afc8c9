/* dot4: int4 weight rows (q4_block32, [N, K/2]) against int8 activations, for a few activation rows;
 * more rows take the panels (int4_panels.c). Scalar twin: ref_dot in reference.c. */

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

/* As dot8, for int4 weights against int8 activations (quantize_row4): w is K/2 bytes; each 32 input
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

