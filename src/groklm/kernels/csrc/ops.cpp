// The CPU implementations of the groklm::linear, groklm::moe and groklm::attend ops (schemas and fake kernels are
// defined in kernels/ops.py) as C++ around the C kernels in csrc/groklm.c: the checks, the output
// allocation and the call, with no Python in between.
//
// Why: a decode step makes ~25 of these calls, each right after its weights have swept the CPU caches,
// where every Python and torch call around a kernel costs microseconds (benchmarks/NOTES.md, "The ops").
//
// The C kernels live in their own shared library (built with the ISA flags, loaded by ctypes); its
// functions are handed over by groklm_ops_set_kernels, called again whenever that library is loaded.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace {

using linear_fn = int (*)(int, const void *, int, int, int, int, const void *const *, const void *const *, int,
                           const int *, void *, int, float, int);
using moe_fn = int (*)(int, const void *, int, int, const float *, int, int, int, const void *, const void *, int,
                       const void *, const void *, int, const void *, const void *, int, int, int, int, int, float, int,
                       void *);
using chunk_fn = int (*)(int, int, int);
using attend_fn = int (*)(const void *, const void *, const void *, long, const void *, int, int, int, int, int, float,
                          float, float, int, const float *, void *);

linear_fn kernel_linear = nullptr;
moe_fn kernel_moe = nullptr;
chunk_fn kernel_chunk = nullptr;
attend_fn kernel_attend = nullptr;

// A refusal of the weights, as kernels/native.py words it (ValueError in Python); needs `bits` in scope.
#define REFUSE_UNLESS(cond, ...) \
    TORCH_CHECK_VALUE(cond, "groklm: the native int", bits, " kernel does not take these weights: ", __VA_ARGS__)

// One weight with bf16 scales [*L, N, G]: row-major [*L, N, K] (int8) or packed [*L, N, K/2] (uint8,
// bits 4), or in its kernel's own layout (then *blocked): int8 block-major [*L, G, N, K/G], int4 panels
// [*L, N/16, K/32, 256]. The conditions of kernels/layout.py's fits.
// Returns K.
int64_t check_weight(int64_t bits, const at::Tensor &w, const at::Tensor &s, const char *what, bool *blocked) {
    TORCH_CHECK_VALUE(bits == 8 || bits == 4, "groklm: bits must be 8 or 4, not ", bits);
    REFUSE_UNLESS(w.device().is_cpu() && s.device().is_cpu(), what, " must be on the CPU");
    REFUSE_UNLESS(w.scalar_type() == (bits == 8 ? at::kChar : at::kByte), what, " weight is ", w.scalar_type());
    REFUSE_UNLESS(s.scalar_type() == at::kBFloat16, what, " scales must be bf16, not ", s.scalar_type());
    REFUSE_UNLESS(w.is_contiguous() && s.is_contiguous(), what, " weight and scales must be contiguous");
    *blocked = w.dim() == s.dim() + 1;
    REFUSE_UNLESS(s.dim() >= 2 && (w.dim() == s.dim() || *blocked), what, " weight ", w.sizes(), ", scales ",
                  s.sizes());
    const int64_t g = s.size(-1), lead = s.dim() - 2;
    for (int64_t d = 0; d < lead; d++)
        REFUSE_UNLESS(w.size(d) == s.size(d), what, " weight ", w.sizes(), ", scales ", s.sizes());
    // rows [.., N, K(/2)]; int8 block-major [.., G, N, K/G]; int4 panels [.., N/16, K/32, 256]
    const bool fits = !*blocked ? w.size(-2) == s.size(-2)
                      : bits == 8 ? w.size(-2) == s.size(-2) && w.size(lead) == g
                                  : w.size(-3) * 16 == s.size(-2) && w.size(-1) == 256;
    REFUSE_UNLESS(fits, what, " weight ", w.sizes(), ", scales ", s.sizes());
    const int64_t k = !*blocked ? w.size(-1) * (bits == 8 ? 1 : 2) : bits == 8 ? g * w.size(-1) : 32 * w.size(-2);
    REFUSE_UNLESS(g > 0 && k % g == 0 && (k / g) % (bits == 8 ? 64 : 32) == 0, what, ": ", g, " scale groups over ",
                  k, " columns");
    return k;
}

// The activation chunk: the C library's rule (as kernels/native.py's chunk).
int chunk_of(int64_t bits, int64_t k, int64_t groups) {
    const int c = kernel_chunk((int)bits, (int)k, (int)(k / groups));
    TORCH_CHECK_VALUE(c > 0, "groklm: no activation chunk fits ", groups, " groups over ", k, " columns");
    return c;
}

at::Tensor bf16_rows(const at::Tensor &x, int64_t k) {
    TORCH_CHECK_VALUE(x.device().is_cpu() && x.dim() == 2 && x.size(1) == k, "groklm: x has shape ", x.sizes(),
                      ", the weights expect [rows, ", k, "]");
    return x.scalar_type() == at::kBFloat16 && x.is_contiguous() ? x : x.to(at::kBFloat16).contiguous();
}

// The kinds of output the C library's linear writes (its store: common.h).
enum { Y_F32 = 0, Y_BF16 = 1, Y_LOGITS = 2 };

// x @ W.T for the (weight, scales) pairs side by side, written as `kind` (Y_LOGITS: times `scale`, see store).
at::Tensor linear_as(int64_t bits, const at::Tensor &x, at::TensorList weights, int kind, float scale) {
    TORCH_CHECK_VALUE(kernel_linear, "groklm: the native kernels are not loaded");
    TORCH_CHECK_VALUE(!weights.empty() && weights.size() % 2 == 0, "groklm: weights must be (weight, scales) pairs");
    const size_t n = weights.size() / 2;
    int64_t k = -1, groups = -1;
    bool blocked = false;
    std::vector<const void *> w(n), s(n);
    std::vector<int> sizes(n);
    for (size_t j = 0; j < n; j++) {
        const at::Tensor &wj = weights[2 * j], &sj = weights[2 * j + 1];
        bool bj = false;
        const int64_t kj = check_weight(bits, wj, sj, "linear", &bj);
        REFUSE_UNLESS(sj.dim() == 2, "linear weight ", wj.sizes(), " with scales ", sj.sizes(), " is not one matrix");
        REFUSE_UNLESS(j == 0 || (kj == k && sj.size(-1) == groups && bj == blocked),
                      "they must share input size, scale groups and layout");
        k = kj, groups = sj.size(-1), blocked = bj;
        w[j] = wj.data_ptr(), s[j] = sj.data_ptr(), sizes[j] = (int)sj.size(0);
    }
    const at::Tensor xb = bf16_rows(x, k);
    const int64_t m = x.size(0);
    int64_t total = 0;
    for (size_t j = 0; j < n; j++) total += sizes[j];
    at::Tensor y = at::empty({m, total}, x.options().dtype(kind == Y_BF16 ? at::kBFloat16 : at::kFloat));
    const int rc = kernel_linear((int)bits, xb.data_ptr(), (int)m, (int)k, chunk_of(bits, k, groups), (int)n, w.data(),
                                 s.data(), (int)groups, sizes.data(), y.data_ptr(), kind, scale, blocked ? 1 : 0);
    TORCH_CHECK(rc == 0, "groklm: the native linear could not allocate its scratch for ", m, " rows");
    return y;
}

at::Tensor linear(int64_t bits, const at::Tensor &x, at::TensorList weights, bool fp32) {
    return linear_as(bits, x, weights, fp32 ? Y_F32 : Y_BF16, 1.0f);
}

// x [N, D] bf16, router [E, D] fp32: one MoE layer, routing included. See groklm_moe.
at::Tensor moe(const at::Tensor &x, const at::Tensor &router, int64_t topk, int64_t bits, at::TensorList weights,
               double router_cap, int64_t gelu_erf) {
    TORCH_CHECK_VALUE(kernel_moe, "groklm: the native kernels are not loaded");
    TORCH_CHECK_VALUE(weights.size() == 6, "groklm: moe takes w1, its scales, v, its scales, w2, its scales");
    const at::Tensor &w1 = weights[0], &s1 = weights[1], &v = weights[2], &sv = weights[3], &w2 = weights[4],
                     &s2 = weights[5];
    bool blocked1 = false, blocked2 = false, blocked_v = false;
    const int64_t d = check_weight(bits, w1, s1, "moe w1", &blocked1), f = check_weight(bits, w2, s2, "moe w2", &blocked2);
    check_weight(bits, v, sv, "moe v", &blocked_v);
    REFUSE_UNLESS(s1.dim() == 3 && w1.sizes() == v.sizes() && s1.sizes() == sv.sizes(), "moe w1 ", w1.sizes(),
                  " and v ", v.sizes(), " must match, scales too");
    const int64_t e = s1.size(0);
    REFUSE_UNLESS(s2.dim() == 3 && s2.size(0) == e && s2.size(1) == d && s1.size(1) == f, "moe w1 ", w1.sizes(),
                  " and w2 ", w2.sizes(), " do not fit together");
    TORCH_CHECK_VALUE(router.device().is_cpu() && router.scalar_type() == at::kFloat && router.is_contiguous() &&
                          router.dim() == 2 && router.size(0) == e && router.size(1) == d,
                      "groklm: the router must be a contiguous fp32 [", e, ", ", d, "], not ", router.scalar_type(),
                      " ", router.sizes());
    TORCH_CHECK_VALUE(topk >= 1 && topk <= e, "groklm: top-", topk, " of ", e, " experts");
    const at::Tensor xb = bf16_rows(x, d);
    const int64_t n = x.size(0);
    at::Tensor y = at::empty({n, d}, x.options().dtype(at::kBFloat16));
    const int rc = kernel_moe((int)bits, xb.data_ptr(), (int)n, (int)d, router.data_ptr<float>(), (int)topk, (int)e,
                              (int)f, w1.data_ptr(), s1.data_ptr(), (int)s1.size(-1), v.data_ptr(), sv.data_ptr(),
                              (int)sv.size(-1), w2.data_ptr(), s2.data_ptr(), (int)s2.size(-1),
                              chunk_of(bits, d, s1.size(-1)), chunk_of(bits, f, s2.size(-1)), blocked1 ? 1 : 0,
                              blocked2 ? 1 : 0, (float)router_cap, gelu_erf ? 1 : 0, y.data_ptr());
    TORCH_CHECK(rc == 0, "groklm: the native MoE could not allocate its scratch for ", n, " tokens");
    return y;
}

// q [B, H, G, Dh] (one new token per row), k and v [B, S, H, Dh] (a cache prefix: rows may lie further
// apart than S * H * Dh), mask [B, S] bool -> [B, H, G, Dh]; all bf16 but the mask. See groklm_attend.
at::Tensor attend(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &mask,
                  double multiplier, double softcap, double masked, const c10::optional<at::Tensor> &scale,
                  bool round_scores) {
    TORCH_CHECK_VALUE(kernel_attend, "groklm: the native kernels are not loaded");
    for (const at::Tensor *t : {&q, &k, &v})
        TORCH_CHECK_VALUE(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->dim() == 4,
                          "groklm: attend takes 4-D bf16 CPU q, k and v, not ", t->sizes(), " ", t->scalar_type());
    const int64_t b = q.size(0), h = q.size(1), g = q.size(2), dh = q.size(3), s = k.size(1);
    TORCH_CHECK_VALUE(q.is_contiguous() && dh % 8 == 0, "groklm: attend takes a contiguous q with Dh % 8 == 0, not ",
                      q.sizes());
    TORCH_CHECK_VALUE(k.sizes() == v.sizes() && k.strides() == v.strides() && k.size(0) == b && k.size(2) == h &&
                          k.size(3) == dh && k.stride(3) == 1 && k.stride(2) == dh && k.stride(1) == h * dh,
                      "groklm: attend: k ", k.sizes(), " and v ", v.sizes(), " do not fit q ", q.sizes());
    TORCH_CHECK_VALUE(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.dim() == 2 &&
                          mask.size(0) == b && mask.size(1) == s,
                      "groklm: attend: mask must be a contiguous bool [", b, ", ", s, "], not ", mask.sizes());
    const float *row_scale = nullptr;
    if (scale.has_value()) {
        TORCH_CHECK_VALUE(scale->scalar_type() == at::kFloat && scale->is_contiguous() && scale->dim() == 1 &&
                              scale->size(0) == b,
                          "groklm: attend: scale must be a contiguous fp32 [", b, "], not ", scale->sizes());
        row_scale = scale->data_ptr<float>();
    }
    at::Tensor o = at::empty_like(q);
    const int rc = kernel_attend(q.data_ptr(), k.data_ptr(), v.data_ptr(), (long)k.stride(0), mask.data_ptr(), (int)b,
                                 (int)s, (int)h, (int)g, (int)dh, (float)multiplier, (float)softcap, (float)masked,
                                 round_scores ? 1 : 0, row_scale, o.data_ptr());
    TORCH_CHECK(rc == 0, "groklm: the native attention could not allocate its scores for ", s, " slots");
    return o;
}

// What lies between the kernels in a decoder layer, as plain loops that round where torch does: the
// arithmetic (fp32 products and sums, each rounded; bf16 by torch's own conversion) is that of RMSNorm,
// apply_rope and the residual adds in model.py, which compute one operation a tensor, so the results
// are theirs bit for bit (ops.cpp is built without contracting a product and a sum into one FMA).

// The fp32 reciprocal root of a row's mean square as RMSNorm takes it: squares summed in fp64 (exact,
// so the order of summing them is immaterial to the fp32 mean), the mean rounded once.
float rms_scale(const at::BFloat16 *x, int64_t d, double eps) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= d; i += 8)
        for (int u = 0; u < 8; u++) {
            const double v = static_cast<float>(x[i + u]);
            acc[u] += v * v;
        }
    for (; i < d; i++) {
        const double v = static_cast<float>(x[i]);
        acc[0] += v * v;
    }
    double total = 0;
    for (double a : acc) total += a;
    const float mean = static_cast<float>(total / static_cast<double>(d));
    return 1.0f / std::sqrt(mean + static_cast<float>(eps));
}

// y = RMSNorm(x) (weight w [D], fp32), or, with h, y = h + RMSNorm(x), for `rows` rows of D, bf16.
void normed_rows(const at::BFloat16 *xp, const float *wp, const at::BFloat16 *hp, int64_t rows, int64_t d,
                 double eps, at::BFloat16 *yp) {
    for (int64_t r = 0; r < rows; r++, xp += d, yp += d, hp = hp ? hp + d : nullptr) {
        const float scale = rms_scale(xp, d, eps);
        for (int64_t i = 0; i < d; i++) {
            const float n = wp[i] * (static_cast<float>(xp[i]) * scale);
            const at::BFloat16 normed_i(n);
            yp[i] = hp ? at::BFloat16(static_cast<float>(hp[i]) + static_cast<float>(normed_i)) : normed_i;
        }
    }
}

// The same for rows [B, D], into a new tensor.
at::Tensor normed(const at::Tensor &x, const at::Tensor &w, double eps, const at::Tensor *residual = nullptr) {
    at::Tensor y = at::empty_like(x);
    normed_rows(x.data_ptr<at::BFloat16>(), w.data_ptr<float>(),
                residual ? residual->data_ptr<at::BFloat16>() : nullptr, x.size(0), x.size(1), eps,
                y.data_ptr<at::BFloat16>());
    return y;
}

// RMSNorm (model.py's, bit for bit: see normed) of the rows of x [N, D] bf16 with weight [D] fp32, the rows
// split between threads: one call where the torch path makes six, each costing a decode step tens of
// microseconds after the weights have swept the caches.
at::Tensor rms_norm(const at::Tensor &x, const at::Tensor &w, double eps) {
    TORCH_CHECK_VALUE(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(),
                      "groklm: rms_norm takes contiguous bf16 CPU rows [N, D], not ", x.scalar_type(), " ", x.sizes());
    TORCH_CHECK_VALUE(w.device().is_cpu() && w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 1 &&
                          w.size(0) == x.size(1),
                      "groklm: rms_norm: the weight must be a contiguous fp32 [", x.size(1), "], not ",
                      w.scalar_type(), " ", w.sizes());
    at::Tensor y = at::empty_like(x);
    const int64_t d = x.size(1);
    const at::BFloat16 *xp = x.data_ptr<at::BFloat16>();
    at::BFloat16 *yp = y.data_ptr<at::BFloat16>();
    at::parallel_for(0, x.size(0), 16, [&](int64_t lo, int64_t hi) {
        normed_rows(xp + lo * d, w.data_ptr<float>(), nullptr, hi - lo, d, eps, yp + lo * d);
    });
    return y;
}

// One head of Dh rotated as apply_rope rotates it (rotate-half): out = x * cos + rotate_half(x) * sin.
void rope_head(const at::BFloat16 *x, const float *cos, const float *sin, int64_t dh, at::BFloat16 *out) {
    const int64_t half = dh / 2;
    for (int64_t j = 0; j < dh; j++) {
        const float rotated = j < half ? -static_cast<float>(x[j + half]) : static_cast<float>(x[j - half]);
        const float a = static_cast<float>(x[j]) * cos[j], c = rotated * sin[j];
        out[j] = at::BFloat16(a + c);
    }
}

// One decoder layer (model.py's Block) for one new token per row, as decode runs it: h [B, D] bf16 ->
// [B, D]. The layer's q, k and v projections, its output projection and its MoE are the native int8 or
// int4 kernels (`weights`: wq, wk, wv, wo, w1, v, w2, each weight then scales; norms: the four RMSNorm
// weights in the order the block applies them); the new keys and values are written into the cache
// (cache_k, cache_v [B, S, K, Dh], a prefix of the layer's cache) at `positions` [B] (int64), then the
// token attends over the slots `mask` [B, S] allows; cos, sin [B, Dh] fp32 are the rows' RoPE tables;
// `scale` [B] fp32 (Grok-2's temperature) or none. Everything between the kernels runs here, in one
// call from Python instead of ~150 torch calls a layer (see blocks).
at::Tensor block(const at::Tensor &h, const at::Tensor &cos, const at::Tensor &sin, const at::Tensor &mask,
                 const at::Tensor &cache_k, const at::Tensor &cache_v, const at::Tensor &positions, at::TensorList norms,
                 at::TensorList weights, const at::Tensor &router, int64_t bits, double eps, double multiplier,
                 double softcap, double masked, const c10::optional<at::Tensor> &scale, bool round_scores,
                 int64_t topk, double router_cap, int64_t gelu_erf) {
    TORCH_CHECK_VALUE(norms.size() == 4 && weights.size() == 14,
                      "groklm: block takes 4 norm weights and 7 (weight, scales) pairs");
    TORCH_CHECK_VALUE(h.device().is_cpu() && h.scalar_type() == at::kBFloat16 && h.dim() == 2 && h.is_contiguous(),
                      "groklm: block takes a contiguous bf16 h [B, D], not ", h.scalar_type(), " ", h.sizes());
    const int64_t b = h.size(0), d = h.size(1);
    for (const at::Tensor &w : norms)
        TORCH_CHECK_VALUE(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == d,
                          "groklm: block: a norm weight must be a contiguous fp32 [", d, "], not ", w.sizes());
    TORCH_CHECK_VALUE(cache_k.dim() == 4 && cache_k.size(0) == b && cache_k.scalar_type() == at::kBFloat16,
                      "groklm: block: the cache must be bf16 [", b, ", S, K, Dh], not ", cache_k.sizes());
    const int64_t slots = cache_k.size(1), kh = cache_k.size(2), dh = cache_k.size(3), kv = kh * dh;
    TORCH_CHECK_VALUE(cache_k.sizes() == cache_v.sizes() && cache_k.strides() == cache_v.strides() &&
                          cache_k.stride(3) == 1 && cache_k.stride(2) == dh && cache_k.stride(1) == kv &&
                          dh % 2 == 0,
                      "groklm: block: cache k ", cache_k.sizes(), " and v ", cache_v.sizes(), " do not fit");
    for (const at::Tensor *t : {&cos, &sin})
        TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == b &&
                              t->size(1) == dh,
                          "groklm: block: the RoPE tables must be contiguous fp32 [", b, ", ", dh, "], not ",
                          t->sizes());
    TORCH_CHECK_VALUE(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == b,
                      "groklm: block: positions must be a contiguous int64 [", b, "]");
    const int64_t *pos = positions.data_ptr<int64_t>();
    for (int64_t r = 0; r < b; r++)
        TORCH_CHECK_INDEX(pos[r] >= 0 && pos[r] < slots, "groklm: block: position ", pos[r], " outside the ", slots,
                          " cache slots");

    const at::Tensor x = normed(h, norms[0], eps);
    const at::Tensor qkv = linear(bits, x, weights.slice(0, 6), false);  // [B, Q + 2 KV]
    const int64_t q_size = qkv.size(1) - 2 * kv;
    TORCH_CHECK_VALUE(q_size > 0 && q_size % kv == 0, "groklm: block: q, k and v give ", qkv.size(1),
                      " columns, not Q + 2 * ", kv, " with Q a multiple of ", kv);
    at::Tensor q = at::empty({b, kh, q_size / kv, dh}, h.options());
    const at::BFloat16 *row = qkv.data_ptr<at::BFloat16>();
    at::BFloat16 *qp = q.data_ptr<at::BFloat16>();
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    for (int64_t r = 0; r < b; r++, row += qkv.size(1), cp += dh, sp += dh) {
        for (int64_t j = 0; j < q_size; j += dh) rope_head(row + j, cp, sp, dh, qp + r * q_size + j);
        const int64_t at_slot = r * cache_k.stride(0) + pos[r] * kv;
        at::BFloat16 *kp = cache_k.data_ptr<at::BFloat16>() + at_slot, *vp = cache_v.data_ptr<at::BFloat16>() + at_slot;
        for (int64_t j = 0; j < kv; j += dh) rope_head(row + q_size + j, cp, sp, dh, kp + j);
        std::copy(row + q_size + kv, row + q_size + 2 * kv, vp);
    }
    const at::Tensor o = attend(q, cache_k, cache_v, mask, multiplier, softcap, masked, scale, round_scores);
    const at::Tensor a = linear(bits, o.view({b, q_size}), weights.slice(6, 2), false);
    const at::Tensor h1 = normed(a, norms[1], eps, &h);
    const at::Tensor f = moe(normed(h1, norms[2], eps), router, topk, bits, weights.slice(8, 6), router_cap, gelu_erf);
    return normed(f, norms[3], eps, &h1);
}

// Decoder layers in order (model.py's Layers), each a `block` for one new token per row: one call from
// Python a decode step, not one a layer. Each layer has its cache (cache_k[i], cache_v[i]), four norm
// weights (norms[4i..4i+4)), seven (weight, scales) pairs (weights[14i..14i+14)) and a router; every
// other argument is shared, as the layers of one model share their settings.
at::Tensor blocks(const at::Tensor &h, const at::Tensor &cos, const at::Tensor &sin, const at::Tensor &mask,
                  at::TensorList cache_k, at::TensorList cache_v, const at::Tensor &positions, at::TensorList norms,
                  at::TensorList weights, at::TensorList routers, int64_t bits, double eps, double multiplier,
                  double softcap, double masked, const c10::optional<at::Tensor> &scale, bool round_scores,
                  int64_t topk, double router_cap, int64_t gelu_erf) {
    const size_t n = routers.size();
    TORCH_CHECK_VALUE(n >= 1 && cache_k.size() == n && cache_v.size() == n && norms.size() == 4 * n &&
                          weights.size() == 14 * n,
                      "groklm: blocks takes, for each layer, a cache k and v, 4 norm weights, 7 (weight, scales) "
                      "pairs and a router; got ", n, " routers, ", cache_k.size(), " and ", cache_v.size(),
                      " caches, ", norms.size(), " norm weights and ", weights.size(), " weight tensors");
    at::Tensor x = h;
    for (size_t i = 0; i < n; i++)
        x = block(x, cos, sin, mask, cache_k[i], cache_v[i], positions, norms.slice(4 * i, 4),
                  weights.slice(14 * i, 14), routers[i], bits, eps, multiplier, softcap, masked, scale, round_scores,
                  topk, router_cap, gelu_erf);
    return x;
}

// model.py's Grok.unembed over an int8 or int4 output head (`weights`: its weight and scales): x [N, D]
// bf16 -> fp32 logits [N, V], the head's bf16 output times the output multiplier (a bf16 tensor with
// `jax_rounding`, else the float: as ATen, the product in fp32 rounded to bf16 once) written by the kernel
// itself, then, where final_cap > 0, capped (Grok-2) by the ATen calls model.py makes: one call from Python
// where the torch path makes ~10.
at::Tensor unembed(int64_t bits, const at::Tensor &x, at::TensorList weights, double multiplier, bool jax_rounding,
                   double final_cap) {
    const float m = jax_rounding ? static_cast<float>(at::BFloat16(static_cast<float>(multiplier)))
                                 : static_cast<float>(multiplier);
    at::Tensor y = linear_as(bits, x, weights, Y_LOGITS, m);
    return final_cap > 0 ? y.div(final_cap).tanh().mul(final_cap) : y;
}

// A decode step's hidden states (model.py's Grok.hidden for one new token a row, through a cache): tokens
// and positions [B] (int64) and the tokens' embeddings [B, D] bf16 (with `lookup`, the embedding table
// [V, D] bf16 to look them up in) -> the final-normed [B, D] bf16. The embeddings times `embed_multiplier`
// (rounded to bf16 first with `jax_rounding`, as the reference's weakly-typed float), each row's slot of
// key_ok [B, S] (bool, a prefix of the cache's) set unless the token is `pad` (-1: none), the mask (slots
// set and not past the row's position), RoPE rows from the tables cos, sin [P, Dh] fp32 (rope_tables for
// positions 0..P-1: row p is position p's), then `blocks` and the final norm (weight final_norm, fp32); and,
// given a `head` (its weight and scales, head_bits wide), the logits from them as `unembed` gives them, fp32
// [B, V]. One call from Python a step where the torch path makes ~35, each costing tens of microseconds after
// the weights have swept the caches.
at::Tensor decode(const at::Tensor &tokens, const at::Tensor &positions, const at::Tensor &embedded, bool lookup,
                  double embed_multiplier, bool jax_rounding, int64_t pad, const at::Tensor &key_ok,
                  const at::Tensor &cos_table, const at::Tensor &sin_table, at::TensorList cache_k,
                  at::TensorList cache_v, at::TensorList norms, at::TensorList weights, at::TensorList routers,
                  const at::Tensor &final_norm, int64_t bits, double eps, double multiplier, double softcap,
                  double masked, const c10::optional<at::Tensor> &scale, bool round_scores, int64_t topk,
                  double router_cap, int64_t gelu_erf, at::TensorList head, int64_t head_bits,
                  double output_multiplier, double final_cap) {
    TORCH_CHECK_VALUE(tokens.scalar_type() == at::kLong && tokens.dim() == 1 && tokens.is_contiguous() &&
                          positions.scalar_type() == at::kLong && positions.sizes() == tokens.sizes() &&
                          positions.is_contiguous() && tokens.device().is_cpu() && positions.device().is_cpu(),
                      "groklm: decode takes contiguous int64 CPU tokens and positions [B], not ", tokens.sizes(),
                      " and ", positions.sizes());
    const int64_t b = tokens.size(0);
    TORCH_CHECK_VALUE(embedded.device().is_cpu() && embedded.scalar_type() == at::kBFloat16 && embedded.dim() == 2 &&
                          (lookup || embedded.size(0) == b) && embedded.is_contiguous(),
                      "groklm: decode: the embeddings must be contiguous bf16 [", lookup ? "V" : std::to_string(b),
                      ", D], not ", embedded.scalar_type(), " ", embedded.sizes());
    const int64_t d = embedded.size(1);
    TORCH_CHECK_VALUE(key_ok.scalar_type() == at::kBool && key_ok.dim() == 2 && key_ok.size(0) == b &&
                          key_ok.stride(1) == 1,
                      "groklm: decode: key_ok must be bool [", b, ", S] with its slots adjacent, not ", key_ok.sizes());
    const int64_t slots = key_ok.size(1), dh = cos_table.size(-1);
    for (const at::Tensor *t : {&cos_table, &sin_table})
        TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                              t->sizes() == cos_table.sizes(),
                          "groklm: decode: the RoPE tables must be contiguous fp32 [P, Dh], alike, not ", t->sizes());
    TORCH_CHECK_VALUE(final_norm.scalar_type() == at::kFloat && final_norm.is_contiguous() && final_norm.numel() == d,
                      "groklm: decode: the final norm weight must be a contiguous fp32 [", d, "], not ",
                      final_norm.sizes());
    const int64_t *tok = tokens.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>();
    for (int64_t r = 0; r < b; r++) {
        TORCH_CHECK_INDEX(pos[r] >= 0 && pos[r] < slots && pos[r] < cos_table.size(0), "groklm: decode: position ",
                          pos[r], " outside the ", slots, " cache slots or the ", cos_table.size(0), " RoPE rows");
        TORCH_CHECK_INDEX(!lookup || (tok[r] >= 0 && tok[r] < embedded.size(0)), "groklm: decode: token ", tok[r],
                          " outside the vocabulary of ", embedded.size(0));
    }
    // bf16 * bf16 and bf16 * float are computed in fp32 and rounded once, as torch computes them
    const float m = jax_rounding ? static_cast<float>(at::BFloat16(static_cast<float>(embed_multiplier)))
                                 : static_cast<float>(embed_multiplier);
    at::Tensor h = at::empty({b, d}, embedded.options());
    at::Tensor mask = at::empty({b, slots}, key_ok.options());
    at::Tensor cos = at::empty({b, dh}, cos_table.options()), sin = at::empty({b, dh}, cos_table.options());
    const at::BFloat16 *xp = embedded.data_ptr<at::BFloat16>();
    at::BFloat16 *hp = h.data_ptr<at::BFloat16>();
    bool *ok = key_ok.data_ptr<bool>(), *mp = mask.data_ptr<bool>();
    for (int64_t r = 0; r < b; r++) {
        const at::BFloat16 *xr = xp + (lookup ? tok[r] : r) * d;
        for (int64_t i = 0; i < d; i++) hp[r * d + i] = at::BFloat16(static_cast<float>(xr[i]) * m);
        bool *okr = ok + r * key_ok.stride(0);
        okr[pos[r]] = tok[r] != pad;
        for (int64_t j = 0; j < slots; j++) mp[r * slots + j] = okr[j] && j <= pos[r];
        std::copy_n(cos_table.data_ptr<float>() + pos[r] * dh, dh, cos.data_ptr<float>() + r * dh);
        std::copy_n(sin_table.data_ptr<float>() + pos[r] * dh, dh, sin.data_ptr<float>() + r * dh);
    }
    const at::Tensor out = blocks(h, cos, sin, mask, cache_k, cache_v, positions, norms, weights, routers, bits, eps,
                                  multiplier, softcap, masked, scale, round_scores, topk, router_cap, gelu_erf);
    const at::Tensor normed_out = normed(out, final_norm, eps);
    return head.empty() ? normed_out
                        : unembed(head_bits, normed_out, head, output_multiplier, jax_rounding, final_cap);
}

}  // namespace

extern "C" void groklm_ops_set_kernels(void *linear_kernel, void *moe_kernel, void *chunk_kernel,
                                       void *attend_kernel) {
    kernel_linear = reinterpret_cast<linear_fn>(linear_kernel);
    kernel_moe = reinterpret_cast<moe_fn>(moe_kernel);
    kernel_chunk = reinterpret_cast<chunk_fn>(chunk_kernel);
    kernel_attend = reinterpret_cast<attend_fn>(attend_kernel);
}

TORCH_LIBRARY_IMPL(groklm, CPU, m) {
    m.impl("linear", &linear);
    m.impl("moe", &moe);
    m.impl("attend", &attend);
    m.impl("blocks", &blocks);
    m.impl("rms_norm", &rms_norm);
    m.impl("decode", &decode);
    m.impl("unembed", &unembed);
}
