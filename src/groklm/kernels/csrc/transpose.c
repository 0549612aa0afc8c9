/* groklm_transpose8, for loading: a byte matrix src [rows, cols] written transposed: dst[c * ld + r] = src[r * cols + c]. The loader
 * turns the released [in, out] int8 weights into [out, in] with this; torch's strided copy of a
 * transposed int8 view is slow enough to be most of the load time. 16 x 16 tiles are
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
