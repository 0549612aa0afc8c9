/* groklm_moe: one MoE layer in one call, routing and the chosen experts:
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
 * tanhf is slow (benchmarks/NOTES.md, "MoE"). */
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

