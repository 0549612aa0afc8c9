/* The scalar twins: plain C, one thread, no intrinsics, for each exported SIMD kernel, with its
 * signature: groklm_linear_ref, groklm_route_ref, groklm_moe_ref, groklm_attend_ref, groklm_transpose8_ref.
 * They state what the kernels compute, and tests/test_kernels.py holds each build to them:
 *
 *   - activations are quantized alike (the same steps and the same integers), and integer sums are exact
 *     in both, so int4 (one fused multiply-add a segment in the kernels too) gives the kernels' bits;
 *   - int8: the kernels fold a segment in 8 lanes, summed at the end (block-major: a sum a block), where
 *     the twin folds it whole: the two differ by fp32 rounding only;
 *   - route, MoE and attention: libm's tanh, exp and erf where the kernels take torch's 8-lane ones, and
 *     sums in plain order: the same roundings to bf16, the last fp32 bits apart;
 *   - the transpose moves bytes: equal.
 *
 * groklm_chunk (activations.c) is a rule both use, not a kernel. Slow: for tests and for reading. */

/* A weight of `bits` (8: int8, 4: packed int4), N rows of K columns, G scale groups, in rows or (blocked)
 * in its kernel's own layout: int8 block-major [G, N, K/G]; int4 panels (q4_panel32), scales in panel order. */
typedef struct {
    int bits, blocked, N, K, G;
    const void *w;
    const uint16_t *s;
} ref_weight;

/* Column k of row n, as a signed integer (int4: the nibble less its offset of 8). */
static int ref_w(const ref_weight *m, int n, int k) {
    if (m->bits == 8) {
        const int8_t *w = (const int8_t *)m->w;
        const int kg = m->K / m->G;
        return m->blocked ? w[((size_t)(k / kg) * m->N + n) * kg + k % kg] : w[(size_t)n * m->K + k];
    }
    const int block = k / 32, j = k % 16, high = k % 32 >= 16; /* byte j: column j low, column j + 16 high */
    uint8_t byte;
    if (m->blocked) {
        const q4_panel32 *p = (const q4_panel32 *)m->w + (size_t)(n / PANEL) * (m->K / 32) + block;
        byte = ((const uint8_t *)&p->t[j / 4][n % PANEL])[j % 4];
    } else {
        byte = ((const q4_block32 *)m->w + (size_t)n * (m->K / 32) + block)->b[j];
    }
    return (high ? byte >> 4 : byte & 15) - 8;
}

/* The scale of row n, group g. */
static float ref_s(const ref_weight *m, int n, int g) {
    if (m->bits == 4 && m->blocked)
        return bf16_to_f32(m->s[(size_t)(n / PANEL) * PANEL * m->G + (size_t)g * PANEL + n % PANEL]);
    return bf16_to_f32(m->s[(size_t)n * m->G + g]);
}

/* One activation row [K] quantized for `bits`-bit weights with `chunk` (groklm_chunk's): int16 with a
 * step max|x| / 32767 a chunk (int8 weights), or int8 with a step max|x| / 127 a chunk (int4); each
 * value rounded to nearest even. xq holds K ints. */
static void ref_quantize(int bits, const uint16_t *x, int K, int chunk, int *xq, float *xs) {
    const float top = bits == 8 ? 32767.f : 127.f;
    for (int c = 0; c < K / chunk; c++) {
        float amax = 0.f;
        for (int k = c * chunk; k < (c + 1) * chunk; k++) amax = fmaxf(amax, fabsf(bf16_to_f32(x[k])));
        const float inv = amax > 0.f ? top / amax : 0.f;
        xs[c] = amax / top;
        for (int k = c * chunk; k < (c + 1) * chunk; k++) {
            const long v = lrintf(bf16_to_f32(x[k]) * inv);
            xq[k] = (int)(v > (long)top ? (long)top : v < -(long)top - 1 ? -(long)top - 1 : v);
        }
    }
}

/* Row n of m against a quantized activation row: per segment (one weight scale, one activation step)
 * an exact integer sum, folded into fp32 as fma(sum, scale * step, out). */
static float ref_dot(const ref_weight *m, int n, const int *xq, const float *xs, int chunk) {
    const int kg = m->K / m->G, seg = m->bits == 8 && kg < chunk ? kg : chunk;
    float out = 0.f;
    for (int c0 = 0; c0 < m->K; c0 += seg) {
        int64_t sum = 0;
        for (int k = c0; k < c0 + seg; k++) sum += (int64_t)ref_w(m, n, k) * xq[k];
        out = fmaf((float)sum, ref_s(m, n, c0 / kg) * xs[c0 / chunk], out);
    }
    return out;
}

/* Scratch for one quantized row of K columns; 0, or -1 if memory ran out (nothing then allocated). */
static int ref_row_alloc(int K, int chunk, int **xq, float **xs) {
    *xq = malloc(sizeof(int) * (size_t)K);
    *xs = malloc(sizeof(float) * (size_t)(K / chunk));
    if (*xq && *xs) return 0;
    free(*xq), free(*xs);
    return -1;
}

int groklm_linear_ref(int bits, const uint16_t *x, int M, int K, int chunk, int nmat, const void *const *w,
                      const uint16_t *const *s, int G, const int *N, void *y, int y_kind, float y_scale,
                      int blocked) {
    int total = 0, *xq;
    float *xs;
    for (int j = 0; j < nmat; j++) total += N[j];
    if (ref_row_alloc(K, chunk, &xq, &xs)) return -1;
    for (int i = 0; i < M; i++) {
        ref_quantize(bits, x + (size_t)i * K, K, chunk, xq, xs);
        for (int j = 0, base = 0; j < nmat; base += N[j], j++) {
            const ref_weight m = {bits, blocked, N[j], K, G, w[j], s[j]};
            for (int n = 0; n < N[j]; n++) store(y, y_kind, y_scale, (size_t)i * total + base + n, ref_dot(&m, n, xq, xs, chunk));
        }
    }
    free(xq), free(xs);
    return 0;
}

void groklm_route_ref(const uint16_t *x, int N, int D, const float *router, int E, int topk, float cap, int *experts,
                      float *gates) {
    for (int t = 0; t < N; t++) {
        float p[E];
        for (int e = 0; e < E; e++) {
            float l = 0.f;
            for (int d = 0; d < D; d++) l = fmaf(bf16_to_f32(x[(size_t)t * D + d]), router[(size_t)e * D + d], l);
            p[e] = cap > 0.f ? cap * tanhf(l / cap) : l;
        }
        float mx = -INFINITY, sum = 0.f;
        for (int e = 0; e < E; e++) mx = fmaxf(mx, p[e]);
        for (int e = 0; e < E; e++) sum += (p[e] = expf(p[e] - mx));
        for (int e = 0; e < E; e++) p[e] /= sum;
        for (int j = 0; j < topk; j++) { /* the largest not yet taken; ties: the lower expert */
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

int groklm_moe_ref(int bits, const uint16_t *x, int N, int D, const float *router, int topk, int E, int F,
                   const void *w1, const uint16_t *s1, int g1, const void *wv, const uint16_t *sv, int gv,
                   const void *w2, const uint16_t *s2, int g2, int chunk_d, int chunk_f, int blocked1, int blocked2,
                   float router_cap, int gelu_erf_, uint16_t *y) {
    int *experts = malloc(sizeof(int) * (size_t)N * topk), *xq, *hq;
    float *gates = malloc(sizeof(float) * (size_t)N * topk), *acc = malloc(sizeof(float) * (size_t)D), *xs, *hs;
    uint16_t *h = malloc(sizeof(uint16_t) * (size_t)F);
    if (!experts || !gates || !acc || !h || ref_row_alloc(D, chunk_d, &xq, &xs)) {
        free(experts), free(gates), free(acc), free(h);
        return -1;
    }
    if (ref_row_alloc(F, chunk_f, &hq, &hs)) {
        free(experts), free(gates), free(acc), free(h), free(xq), free(xs);
        return -1;
    }
    groklm_route_ref(x, N, D, router, E, topk, router_cap, experts, gates);
    const size_t b1 = row_bytes(bits, D) * F, b2 = row_bytes(bits, F) * D; /* bytes an expert */
    for (int t = 0; t < N; t++) {
        ref_quantize(bits, x + (size_t)t * D, D, chunk_d, xq, xs);
        for (int d = 0; d < D; d++) acc[d] = 0.f;
        for (int j = 0; j < topk; j++) {
            const int e = experts[(size_t)t * topk + j];
            const ref_weight m1 = {bits, blocked1, F, D, g1, (const char *)w1 + e * b1, s1 + (size_t)e * F * g1};
            const ref_weight mv = {bits, blocked1, F, D, gv, (const char *)wv + e * b1, sv + (size_t)e * F * gv};
            const ref_weight m2 = {bits, blocked2, D, F, g2, (const char *)w2 + e * b2, s2 + (size_t)e * D * g2};
            for (int f = 0; f < F; f++) {
                const float a = bf16_round(ref_dot(&m1, f, xq, xs, chunk_d)), b = ref_dot(&mv, f, xq, xs, chunk_d);
                const float act = bf16_round(gelu_erf_ ? gelu_erf(a) : gelu_tanh(a));
                h[f] = f32_to_bf16(act * bf16_round(b));
            }
            ref_quantize(bits, h, F, chunk_f, hq, hs);
            for (int d = 0; d < D; d++) acc[d] += bf16_round(ref_dot(&m2, d, hq, hs, chunk_f)) * gates[(size_t)t * topk + j];
        }
        for (int d = 0; d < D; d++) y[(size_t)t * D + d] = f32_to_bf16(acc[d]);
    }
    free(experts), free(gates), free(acc), free(h), free(xq), free(xs), free(hq), free(hs);
    return 0;
}

/* A row with every slot masked takes a uniform softmax over its S slots here; the kernel spreads it over S
 * rounded up to 8. Decode never meets one: a new token always sees itself. */
int groklm_attend_ref(const uint16_t *q, const uint16_t *k, const uint16_t *v, long stride, const uint8_t *mask, int B,
                      int S, int H, int G, int Dh, float mult, float cap, float masked, int round_scores,
                      const float *row_scale, uint16_t *o) {
    float *s = malloc(sizeof(float) * (size_t)(S > 0 ? S : 1));
    if (!s) return -1;
    const size_t row = (size_t)H * Dh; /* between slots */
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int g = 0; g < G; g++) {
                const uint16_t *qr = q + (((size_t)b * H + h) * G + g) * Dh;
                const uint16_t *kb = k + (size_t)b * stride + (size_t)h * Dh, *vb = v + (size_t)b * stride + (size_t)h * Dh;
                const uint8_t *mb = mask + (size_t)b * S;
                for (int j = 0; j < S; j++) {
                    float dot = 0.f;
                    for (int d = 0; d < Dh; d++) dot = fmaf(bf16_to_f32(qr[d]), bf16_to_f32(kb[j * row + d]), dot);
                    s[j] = cap * tanhf((mb[j] ? (round_scores ? bf16_round(dot) : dot) * mult : 0.f) / cap);
                    if (row_scale) s[j] *= row_scale[b];
                    if (!mb[j]) s[j] = masked;
                }
                float mx = -INFINITY, sum = 0.f;
                for (int j = 0; j < S; j++) mx = fmaxf(mx, s[j]);
                for (int j = 0; j < S; j++) sum += (s[j] = expf(s[j] - mx));
                for (int j = 0; j < S; j++) s[j] = bf16_round(s[j] / sum);
                uint16_t *out = o + (((size_t)b * H + h) * G + g) * Dh;
                for (int d = 0; d < Dh; d++) {
                    float acc = 0.f;
                    for (int j = 0; j < S; j++) acc = fmaf(s[j], bf16_to_f32(vb[j * row + d]), acc);
                    out[d] = f32_to_bf16(acc);
                }
            }
    free(s);
    return 0;
}

void groklm_transpose8_ref(const uint8_t *src, long rows, long cols, uint8_t *dst, long ld) {
    for (long r = 0; r < rows; r++)
        for (long c = 0; c < cols; c++) dst[c * ld + r] = src[r * cols + c];
}
