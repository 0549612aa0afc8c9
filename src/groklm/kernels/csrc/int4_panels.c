/* int4 weight panels (q4_panel32, common.h).
 *
 * dot4's fold (a reduction across lanes, a segment) is most of its work. In a panel, PANEL weight rows
 * are interleaved so that the lanes of one vector are the rows: each multiply-add then takes one
 * activation dword broadcast to all lanes, the lanes' sums need no reduction, and a segment is folded
 * with one fused multiply-add per PANEL rows. The integer sums and the fold are dot4's, lane by lane,
 * so a row gets the same bits from either kernel, on either build (and from ref_dot, reference.c).
 *
 * Weights are held in panels from load (quant.pack_int4: [N/16, K/32, 256], rows a multiple of 16), and
 * so are their scales, in panel order, so that a panel's scales are one more stream read in order (in
 * rows they are 16 streams plus a transposition, panel_scales). A weight in rows ([N, K/2], e.g.
 * memory-mapped) is repacked into a thread's scratch a panel at a time (its scales read in rows) where
 * PANEL_MIN_M or more activation rows share it, and read in place by dot4 otherwise. */
#define PANEL_MIN_M 4 /* activation rows from which a weight in rows is repacked, a call at a time */
#define MT_PANEL (VNNI ? 8 : 2) /* activation rows a panel tile takes */
/* A panel's weights and scales are prefetched twice: PANEL_PREFETCH bytes ahead into L2 and, further,
 * PANEL_PREFETCH2 ahead into L3 (T2), keeping enough of one core's misses in flight. */
#ifndef PANEL_PREFETCH
#define PANEL_PREFETCH 4096
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
 * one stream, prefetched ahead: several panels at once, in separate streams, read slower. */
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
            /* the scales, 1/16 of the weights' bytes, as far ahead as the weights' second prefetch */
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

