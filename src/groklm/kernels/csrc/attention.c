/* groklm_attend: the attention of one new token per row over its cache (decode).
 *
 * For row b, kv head h and each of its G query heads (q [B, H, G, Dh], rotated, bf16):
 *   s_j = cap * tanh(bf16(q . k_j) * mult / cap) for cache slots j < S where mask[b, j], else `masked`
 *   (q . k_j not rounded to bf16 without `round_scores`: Grok-2's reference keeps it in fp32)
 *   o   = bf16( sum_j bf16(softmax_j(s)) * v_j )
 * in fp32 with the reference's bf16 roundings, as the torch path computes it (the same function, not
 * the same bits: sums run in another order). k, v are [B, S, H, Dh] bf16 whose rows lie `stride`
 * elements apart (a prefix of a longer cache); o is [B, H, G, Dh] bf16. The scores of masked slots are
 * never computed, and slots whose weight is 0 are not read for the output. The 8-lane exp and tanh are
 * torch's (groklm_set_exp8, groklm_set_tanh8): without them, libm's. Dh % 8 == 0. Returns 0, or -1 if
 * memory ran out (o then unwritten). */

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
                  int S, int H, int G, int Dh, float mult, float cap, float masked, int round_scores,
                  const float *row_scale, uint16_t *o) {
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
                        for (int j = 0; j < S8; j++) {
                            const float d = j < S && mb[j] ? dot_with(qr, kb + j * row, 0, Dh) : 0.f;
                            s[j] = (round_scores ? bf16_round(d) : d) * mult;
                        }
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

