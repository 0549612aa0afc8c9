/* How the threads of a parallel region share their work; the kernels themselves run single-threaded.
 *
 * Units (rows, or int4 panels) start split evenly, each thread's share one contiguous stretch that it
 * takes from the front a chunk at a time (one long stream through memory); a thread that finishes its
 * share takes chunks from the back of the share with most left: on cores whose speed varies from
 * moment to moment, a static split leaves the faster thread waiting at the barrier. Rows are computed
 * alike whoever takes them, so results do not depend on the split. */
typedef struct {
    _Atomic uint64_t left; /* units [front, back) not yet taken: front | back << 32 */
    char pad[56];          /* a cache line each */
} share;
_Static_assert(sizeof(share) == 64, "a share is one cache line, so that threads never contend on a line");

static inline uint64_t share_pack(int front, int back) { return (uint32_t)front | (uint64_t)(uint32_t)back << 32; }

/* t shares of n units (freed by the caller), or NULL if memory ran out. */
static share *shares_new(int t, int n) {
    share *sh = aligned_alloc(64, sizeof(share) * (size_t)t);
    if (sh)
        for (int i = 0; i < t; i++) atomic_init(&sh[i].left, share_pack((int)((long)n * i / t), (int)((long)n * (i + 1) / t)));
    return sh;
}

/* Takes up to `chunk` units [*lo, *hi) from the front of s (its owner) or its back (another thread); 0
 * if none are left. Near a share's end the chunks shrink (a quarter of what is left, down to a sixteenth
 * of `chunk`), so that the threads finish together. */
static int share_take(share *s, int chunk, int from_back, int *lo, int *hi) {
    uint64_t old = atomic_load(&s->left);
    const int least = chunk / 16 > 1 ? chunk / 16 : 1;
    for (;;) {
        const int front = (int)(uint32_t)old, back = (int)(old >> 32), quarter = (back - front + 3) / 4;
        if (front >= back) return 0;
        chunk = quarter < chunk ? (quarter > least ? quarter : least) : chunk;
        *lo = from_back ? (back - chunk > front ? back - chunk : front) : front;
        *hi = from_back ? back : (front + chunk < back ? front + chunk : back);
        if (atomic_compare_exchange_weak(&s->left, &old, from_back ? share_pack(front, *lo) : share_pack(*hi, back)))
            return 1;
    }
}

/* The next units [*lo, *hi) for this thread: from its own share while it lasts, then from the others'
 * (t shares, one a thread of the team that was asked for; a smaller team takes the rest by stealing). */
static int share_next(share *sh, int t, int chunk, int *lo, int *hi) {
    const int id = omp_get_thread_num();
    if (id < t && share_take(&sh[id], chunk, 0, lo, hi)) return 1;
    for (;;) {
        int most = 0, from = -1;
        for (int i = 0; i < t; i++) {
            const uint64_t v = atomic_load(&sh[i].left);
            const int left = (int)(v >> 32) - (int)(uint32_t)v;
            if (left > most) most = left, from = i;
        }
        if (from < 0) return 0;
        if (share_take(&sh[from], chunk, 1, lo, hi)) return 1;
    }
}

/* Units a chunk takes, of `most` (a block's): a weight in rows a whole block, which its kernel reads as
 * STREAMS runs (see block_rows), long ones; int4 panels, read as one stream whatever the chunk, about 1 MB
 * of them (unit_bytes each), or a quarter of a thread's share if that is less: smaller chunks switch a
 * thread between weights more often. */
static inline int share_chunk(int panels, size_t unit_bytes, int most, int units, int team) {
    int c = most;
    if (panels) {
        c = (int)(((1 << 20) + unit_bytes - 1) / unit_bytes);
        c = units / (4 * team) < c ? units / (4 * team) : c;
    }
    return c < 1 ? 1 : c < most ? c : most;
}

/* The part of units [u, hi) in one expert's weight (n units of `align` rows, `rows` rows in all, the
 * experts end to end): the expert's place *k among them and its rows [*rlo, *rhi). Returns the units it
 * spans. */
static inline int expert_piece(int u, int hi, int n, int align, int rows, int *k, int *rlo, int *rhi) {
    const int at = u % n, end = at + (hi - u) < n ? at + (hi - u) : n;
    *k = u / n;
    *rlo = at * align;
    *rhi = end * align < rows ? end * align : rows;
    return end - at;
}

/* Rows a unit of shared work holds: int4 weights are split between panels (see panels_dot). */
static inline int row_align(int bits) { return bits == 4 ? PANEL : 1; }

/* Weight rows per span step (STREAMS parts of block / STREAMS rows) for m activation rows: a stream runs
 * on through its part before jumping, long runs reading nearer memory speed; larger batches are
 * compute-bound and keep their results (block * m floats per thread) small. */
static inline int block_rows(int m) { return m <= 16 ? 4096 : 256; }

/* Weight rows processed together by one thread: separate streams through memory keep more loads in
 * flight than one stream can. */
#define STREAMS 4

/* Weight streams per thread for int8 rows of K columns against M activation rows: STREAMS, unless
 * that many rows and the int16 activations (2K bytes a row) overflow the L1 cache while two would not;
 * then two. With more activation rows nothing fits, and four streams share each activation load. */
static inline int streams_for(int bits, int K, int M) {
    const long l1 = 28 * 1024;
    return bits == 8 && (long)(STREAMS + 2 * M) * K > l1 && (long)(2 + 2 * M) * K <= l1 ? 2 : STREAMS;
}

