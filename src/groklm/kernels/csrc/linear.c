/* groklm_linear: x @ W.T for one or several int8 or int4 weights in one call, threaded (worksharing.c);
 * rows_dot, span_dot and weight_dot pick the kernel and the tile for each stretch of weight rows. */

#define MT_STREAMED (VNNI ? 4 : 2) /* activation rows a tile takes against STREAMS weight rows */

/* res[j][0..M) = weight row w[j] (int8, or packed int4, per `bits`) against M activation rows, for
 * nt (1, 2 or STREAMS) weight rows. Activation rows go in tiles of 4 so each weight byte is loaded once
 * per tile; the STREAMS weight rows go together while NT * MT accumulators fit in the registers
 * (tiles of up to MT_STREAMED rows), one by one otherwise. */
static void rows_dot(int bits, acts a, const int *rows, int base, int M, int nt, const void *const *w,
                     size_t gstride, const uint16_t *const *s, int G, float *const *res) {
    const void *xr[4];
    const float *xsr[4];
    const int *xcr[4];
    for (int m0 = 0; m0 < M; m0 += 4) {
        const int mt = M - m0 < 4 ? M - m0 : 4;
        for (int i = 0; i < mt; i++) {
            const size_t r = (size_t)(rows ? rows[m0 + i] : base + m0 + i);
            xr[i] = bits == 8 ? (const void *)((const int16_t *)a.xq + r * a.ldq) : (const void *)((const int8_t *)a.xq + r * a.ldq);
            xsr[i] = a.xs + r * a.lds;
            xcr[i] = bits == 8 ? NULL : a.xc + r * a.lds;
        }
        float *rs[STREAMS];
        for (int j = 0; j < nt; j++) rs[j] = res[j] + m0;
#define DOT(J, NT, MT)                                                                                              \
    if (bits == 8)                                                                                                  \
        dot8((const int16_t *const *)xr, xsr, a.K, (const int8_t *const *)w + (J), gstride, s + (J), G, a.chunk,    \
             rs + (J), NT, MT);                                                                                     \
    else                                                                                                            \
        dot4((const int8_t *const *)xr, xsr, xcr, a.K, (const uint8_t *const *)w + (J), s + (J), G, a.chunk,        \
             rs + (J), NT, MT);                                                                                     \
    break;
        if (nt == STREAMS && mt <= MT_STREAMED) {
            switch (mt) {
                case 1: DOT(0, STREAMS, 1)
#if VNNI
                case 3: DOT(0, STREAMS, 3)
                case 4: DOT(0, STREAMS, 4)
#endif
                default: DOT(0, STREAMS, 2)
            }
            continue;
        }
        if (nt == 2 && mt <= MT_STREAMED) {
            switch (mt) {
                case 1: DOT(0, 2, 1)
#if VNNI
                case 3: DOT(0, 2, 3)
                case 4: DOT(0, 2, 4)
#endif
                default: DOT(0, 2, 2)
            }
            continue;
        }
        for (int j = 0; j < nt; j++) {
            switch (mt) {
                case 4: DOT(j, 1, 4)
                case 3: DOT(j, 1, 3)
                case 2: DOT(j, 1, 2)
                default: DOT(j, 1, 1)
            }
        }
#undef DOT
    }
}

/* res[r * M + i] for weight rows r < count of W (row stride wrow bytes, scale groups gstride bytes apart
 * within a row; G scales a row, rows ls apart): the rows are taken `streams_for` at a time from that
 * many equal parts of the span, then the remainder one by one. */
static void span_dot(int bits, acts a, const int *rows, int base, int M, const char *w, size_t wrow,
                     size_t gstride, const uint16_t *s, int G, size_t ls, int count, float *res) {
    if (bits == 4 && M >= PANEL_MIN_M && !panels_dot(a, rows, base, M, (const uint8_t *)w, wrow, 0, s, G, ls, count, res))
        return;
    const int ns = streams_for(bits, a.K, M), q = count / ns;
    for (int r = 0; r < q; r++) {
        const void *wp[STREAMS];
        const uint16_t *sp[STREAMS];
        float *rp[STREAMS];
        for (int j = 0; j < ns; j++) {
            const size_t row = (size_t)j * q + r;
            wp[j] = w + row * wrow;
            sp[j] = s + row * ls;
            rp[j] = res + row * M;
        }
        rows_dot(bits, a, rows, base, M, ns, wp, gstride, sp, G, rp);
    }
    for (int r = ns * q; r < count; r++) {
        const void *wp = w + (size_t)r * wrow;
        const uint16_t *sp = s + (size_t)r * ls;
        float *rp = res + (size_t)r * M;
        rows_dot(bits, a, rows, base, M, 1, &wp, gstride, &sp, G, &rp);
    }
}

/* span_dot over `count` rows of an int8 weight with G scale groups, row-major (panel == 0: rows of K
 * bytes) or block-major (panel != 0: G panels `panel` bytes apart, each holding K/G columns of every
 * row, rows K/G bytes apart, w pointing into the first). A panel is read as one contiguous run
 * against its own K/G activation columns, which stay in the L1 cache however wide the row. Each
 * panel's sums are added into res (part: scratch for count * M floats). Prefill reads them block by
 * block too: a row's sums then add up in the same order whatever the number of activation rows, so a
 * prompt prefilled in chunks (a server's) or with other tokens routed to the same expert gets the bits
 * it gets alone. For int4, panel != 0 says the weight is in panels (see panels_dot). */
static void weight_dot(int bits, acts a, const int *rows, int base, int M, const char *w, size_t panel,
                       const uint16_t *s, int G, int count, float *res, float *part) {
    const int kg = a.K / G;
    if (bits == 4 && panel) { /* int4 in panels (count % PANEL == 0, w at a panel's start) */
        panels_dot(a, rows, base, M, (const uint8_t *)w, 0, 1, s, G, G, count, res);
        return;
    }
    if (!panel || G == 1) {
        span_dot(bits, a, rows, base, M, w, row_bytes(bits, a.K), kg, s, G, G, count, res);
        return;
    }
    for (int g = 0; g < G; g++) {
        acts p = a;
        p.xq = (int16_t *)a.xq + (size_t)g * kg; /* int8 weights only */
        p.xs += (size_t)g * kg / a.chunk;
        p.K = kg;
        span_dot(bits, p, rows, base, M, w + g * panel, kg, kg, s + g, 1, G, count, g ? part : res);
        if (g)
            for (size_t i = 0; i < (size_t)count * M; i++) res[i] += part[i];
    }
}

/* y [M, N_0 + N_1 + ...] = x @ W_j.T, side by side, for nmat weights W_j [N_j, K] (int8, or packed int4
 * [N_j, K/2]) sharing one scale layout ([N_j, G] bf16), in one parallel pass: x [M, K] bf16 is quantized once with
 * `chunk` (groklm_chunk's), and the rows of all the weights, end to end, are split across OpenMP
 * threads (torch's own libgomp when loaded into torch; int4 at panel boundaries). One call computes
 * e.g. an attention layer's q, k and v. y is fp32, bf16 or logits (`y_kind`, `y_scale`: see store). With
 * `blocked`, each W_j is in its kernel's own layout: int8 block-major, [G, N_j, K/G] (see weight_dot);
 * int4 in panels, [N_j/16, K/32, 256], scales in panel order (see panels_dot). Returns 0, or -1 if memory ran out (y then unwritten). */
int groklm_linear(int bits, const uint16_t *x, int M, int K, int chunk, int nmat, const void *const *w,
                   const uint16_t *const *s, int G, const int *N, void *y, int y_kind, float y_scale, int blocked) {
    int total = 0;
    for (int j = 0; j < nmat; j++) total += N[j];
    acts a;
    if (acts_alloc(&a, bits, M, K, chunk)) return -1;
    const size_t wrow = blocked && bits == 8 ? (size_t)(K / G) : row_bytes(bits, K); /* from one row to the next */
    const int align = row_align(bits);
    int units = 0; /* all the weights' rows, end to end, in whole units of `align` rows each */
    for (int j = 0; j < nmat; j++) units += (N[j] + align - 1) / align;
    const int team = omp_get_max_threads(), block = block_rows(M);
    const int take = share_chunk(bits == 4 && blocked, align * row_bytes(bits, K), block / align, units, team);
    share *sh = shares_new(team, units);
    if (!sh) return acts_free(a), -1;
#pragma omp parallel num_threads(team)
    {
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) acts_quantize(a, bits, (size_t)m, x + (size_t)m * K);
        float *res = malloc(sizeof(float) * 2 * block * (size_t)M), *part = res + block * (size_t)M;
        int lo, hi;
        while (share_next(sh, team, take, &lo, &hi)) {
            for (int j = 0, base = 0, ubase = 0; j < nmat; base += N[j], ubase += (N[j] + align - 1) / align, j++) {
                const int ufrom = lo > ubase ? lo : ubase, uto = hi < ubase + (N[j] + align - 1) / align ? hi : ubase + (N[j] + align - 1) / align;
                const int from = (ufrom - ubase) * align, to = (uto - ubase) * align < N[j] ? (uto - ubase) * align : N[j];
                for (int n0 = from; n0 < to; n0 += block) {
                    const int count = to - n0 < block ? to - n0 : block;
                    weight_dot(bits, a, NULL, 0, M, (const char *)w[j] + (size_t)n0 * wrow, blocked ? (size_t)N[j] * wrow : 0,
                               s[j] + (size_t)n0 * G, G, count, res, part);
                    for (int r = 0; r < count; r++)
                        for (int m = 0; m < M; m++) store(y, y_kind, y_scale, (size_t)m * total + base + n0 + r, res[(size_t)r * M + m]);
                }
            }
        }
        free(res);
    }
    free(sh);
    acts_free(a);
    return 0;
}

