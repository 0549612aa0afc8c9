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
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

using linear_fn = int (*)(int, const void *, int, int, int, int, const void *const *, const void *const *, int,
                           const int *, void *, int, int);
using moe_fn = int (*)(int, const void *, int, int, const float *, int, int, int, const void *, const void *, int,
                       const void *, const void *, int, const void *, const void *, int, int, int, int, int, float, int,
                       void *);
using chunk_fn = int (*)(int, int, int);
using attend_fn = int (*)(const void *, const void *, const void *, long, const void *, int, int, int, int, int, float,
                          float, float, const float *, void *);

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

at::Tensor linear(int64_t bits, const at::Tensor &x, at::TensorList weights, bool fp32) {
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
    at::Tensor y = at::empty({m, total}, x.options().dtype(fp32 ? at::kFloat : at::kBFloat16));
    const int rc = kernel_linear((int)bits, xb.data_ptr(), (int)m, (int)k, chunk_of(bits, k, groups), (int)n, w.data(),
                                 s.data(), (int)groups, sizes.data(), y.data_ptr(), fp32 ? 0 : 1, blocked ? 1 : 0);
    TORCH_CHECK(rc == 0, "groklm: the native linear could not allocate its scratch for ", m, " rows");
    return y;
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
                  double multiplier, double softcap, double masked, const c10::optional<at::Tensor> &scale) {
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
                                 row_scale, o.data_ptr());
    TORCH_CHECK(rc == 0, "groklm: the native attention could not allocate its scores for ", s, " slots");
    return o;
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
}
