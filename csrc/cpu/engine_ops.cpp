// The decode engine's CPU kernels (src/infertrix/ops/engine.py declares the ops and their
// references): RMSNorm (with the residual add), SiLU- and GELU(tanh)-gated products, rotary
// embedding from precomputed tables, KV append into preallocated storage, and grouped-query
// attention over a contiguous cache.
//
// Invariance: each output row is computed by one fixed sequence of operations that depends only
// on the model's shapes and the row's own data. Reductions (norms, dot products, softmax sums)
// run in an order fixed by their length; attention splits each query's keys into blocks of
// kKvBlock keys counted from the row's first valid slot (so left padding does not move them),
// computes the blocks in parallel and combines them in block order. So a token's result is the
// same bits in a 1-token step, a k-token window, a padded batch row or at any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_isa.h"

// Separate multiplies and adds (no FMA contraction) where the code says so, as the references do.
#pragma GCC optimize("fp-contract=off")

namespace infertrix {
namespace {

constexpr int64_t kKvBlock = 64;  // keys per attention block (the split points of the softmax)

namespace scalar {
#define ENGINE_TARGET
struct V {
  using F = float;
  static constexpr int64_t kLanes = 1;
  static F zero() { return 0.0f; }
  static F set1(float v) { return v; }
  static F load(const float* p) { return *p; }
  static F load_n(const float* p, int64_t) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static void store_n(float* p, F v, int64_t) { *p = v; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F max(F a, F b) { return a > b ? a : b; }
  static F fmadd(F a, F b, F c) { return a * b + c; }
  static float reduce_add(F a) { return a; }
  static F round(F a) { return std::nearbyint(a); }
  static F ldexp2(F p, F n) { return std::ldexp(p, static_cast<int>(n)); }
};
#include "engine_kernels.inc"
#undef ENGINE_TARGET
}  // namespace scalar

#if INFERTRIX_X86
namespace avx512 {
#define ENGINE_TARGET INFERTRIX_TARGET_AVX512
struct V {
  using F = __m512;
  static constexpr int64_t kLanes = 16;
  ENGINE_TARGET static __mmask16 mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
  ENGINE_TARGET static F zero() { return _mm512_setzero_ps(); }
  ENGINE_TARGET static F set1(float v) { return _mm512_set1_ps(v); }
  ENGINE_TARGET static F load(const float* p) { return _mm512_loadu_ps(p); }
  ENGINE_TARGET static F load_n(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  ENGINE_TARGET static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  ENGINE_TARGET static void store_n(float* p, F v, int64_t n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  ENGINE_TARGET static F add(F a, F b) { return _mm512_add_ps(a, b); }
  ENGINE_TARGET static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  ENGINE_TARGET static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  ENGINE_TARGET static F div(F a, F b) { return _mm512_div_ps(a, b); }
  ENGINE_TARGET static F max(F a, F b) { return _mm512_max_ps(a, b); }
  ENGINE_TARGET static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  ENGINE_TARGET static float reduce_add(F a) {
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
  }
  ENGINE_TARGET static F round(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  ENGINE_TARGET static F ldexp2(F p, F n) {
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  }
};
#include "engine_kernels.inc"
#undef ENGINE_TARGET
}  // namespace avx512

namespace avx2 {
#define ENGINE_TARGET INFERTRIX_TARGET_AVX2
struct V {
  using F = __m256;
  static constexpr int64_t kLanes = 8;
  ENGINE_TARGET static __m256i mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  ENGINE_TARGET static F zero() { return _mm256_setzero_ps(); }
  ENGINE_TARGET static F set1(float v) { return _mm256_set1_ps(v); }
  ENGINE_TARGET static F load(const float* p) { return _mm256_loadu_ps(p); }
  ENGINE_TARGET static F load_n(const float* p, int64_t n) { return _mm256_maskload_ps(p, mask(n)); }
  ENGINE_TARGET static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  ENGINE_TARGET static void store_n(float* p, F v, int64_t n) { _mm256_maskstore_ps(p, mask(n), v); }
  ENGINE_TARGET static F add(F a, F b) { return _mm256_add_ps(a, b); }
  ENGINE_TARGET static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  ENGINE_TARGET static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  ENGINE_TARGET static F div(F a, F b) { return _mm256_div_ps(a, b); }
  ENGINE_TARGET static F max(F a, F b) { return _mm256_max_ps(a, b); }
  ENGINE_TARGET static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  ENGINE_TARGET static float reduce_add(F a) {
    const __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
  }
  ENGINE_TARGET static F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  ENGINE_TARGET static F ldexp2(F p, F n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
};
#include "engine_kernels.inc"
#undef ENGINE_TARGET
}  // namespace avx2
#endif

// Calls the ISA's version of a row kernel: DISPATCH(fn, args...).
#if INFERTRIX_X86
#define ENGINE_DISPATCH(isa, fn, ...)                              \
  do {                                                             \
    if (isa == Isa::Avx512Vnni) avx512::fn(__VA_ARGS__);           \
    else if (isa == Isa::Avx2) avx2::fn(__VA_ARGS__);              \
    else scalar::fn(__VA_ARGS__);                                  \
  } while (0)
#else
#define ENGINE_DISPATCH(isa, fn, ...) scalar::fn(__VA_ARGS__)
#endif

void check_float_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() >= 1, op, ": expected float32 input, got ", x.scalar_type(),
              " ", x.sizes());
}

// Rows of at least ~16 KiB of work per task: small calls stay on the calling thread.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, n)); }

at::Tensor rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  check_float_rows(x_in, "rms_norm");
  const int64_t n = x_in.size(-1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 && weight.size(0) == n,
              "rms_norm: weight must be float32 [", n, "], got ", weight.scalar_type(), " ", weight.sizes());
  const at::Tensor x = x_in.contiguous(), w = weight.contiguous();
  auto out = at::empty_like(x);
  const int64_t rows = n ? x.numel() / n : 0;
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Isa isa = active_isa();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, row_grain(n), [&](int64_t b, int64_t end) {
    for (int64_t r = b; r < end; ++r) ENGINE_DISPATCH(isa, rms_norm_row, xp + r * n, wp, op + r * n, n, e);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x_in, const at::Tensor& res_in,
                                                    const at::Tensor& weight, double eps) {
  check_float_rows(x_in, "add_rms_norm");
  TORCH_CHECK(res_in.sizes() == x_in.sizes() && res_in.scalar_type() == at::kFloat,
              "add_rms_norm: residual must be float32 with x's shape ", x_in.sizes(), ", got ", res_in.sizes());
  const int64_t n = x_in.size(-1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 && weight.size(0) == n,
              "add_rms_norm: weight must be float32 [", n, "], got ", weight.sizes());
  const at::Tensor x = x_in.contiguous(), res = res_in.contiguous(), w = weight.contiguous();
  auto sum = at::empty_like(x), out = at::empty_like(x);
  const int64_t rows = n ? x.numel() / n : 0;
  const float *xp = x.const_data_ptr<float>(), *rp = res.const_data_ptr<float>(), *wp = w.const_data_ptr<float>();
  float *sp = sum.data_ptr<float>(), *op = out.data_ptr<float>();
  const Isa isa = active_isa();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, row_grain(n), [&](int64_t b, int64_t end) {
    for (int64_t r = b; r < end; ++r)
      ENGINE_DISPATCH(isa, add_rms_norm_row, xp + r * n, rp + r * n, wp, sp + r * n, op + r * n, n, e);
  });
  return {sum, out};
}

// act(gate) * up for gate_up = [gate | up] rows: SiLU, or gelu_pytorch_tanh when `gelu`.
at::Tensor gated_product(const at::Tensor& gu_in, bool gelu, const char* name) {
  check_float_rows(gu_in, name);
  const int64_t n2 = gu_in.size(-1);
  TORCH_CHECK(n2 % 2 == 0, name, ": the last dimension holds gate and up halves, got odd size ", n2);
  const int64_t n = n2 / 2;
  const at::Tensor gu = gu_in.contiguous();
  auto sizes = gu.sizes().vec();
  sizes.back() = n;
  auto out = at::empty(sizes, gu.options());
  const int64_t rows = n ? gu.numel() / n2 : 0;
  const float* gp = gu.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Isa isa = active_isa();
  at::parallel_for(0, rows, row_grain(n), [&](int64_t b, int64_t end) {
    for (int64_t r = b; r < end; ++r) {
      if (gelu) ENGINE_DISPATCH(isa, gelu_tanh_mul_row, gp + r * n2, gp + r * n2 + n, op + r * n, n);
      else ENGINE_DISPATCH(isa, silu_mul_row, gp + r * n2, gp + r * n2 + n, op + r * n, n);
    }
  });
  return out;
}

at::Tensor silu_mul_cpu(const at::Tensor& gu) { return gated_product(gu, false, "silu_mul"); }
at::Tensor gelu_tanh_mul_cpu(const at::Tensor& gu) { return gated_product(gu, true, "gelu_tanh_mul"); }

// x [B, T, N, D] (any strides, last dimension contiguous), tables [P, D], positions [B, T].
at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 4 && x.stride(3) == 1,
              "rope: x must be float32 [B, T, heads, head_dim] with a contiguous last dimension, got ", x.sizes());
  const int64_t B = x.size(0), T = x.size(1), N = x.size(2), D = x.size(3);
  TORCH_CHECK(D % 2 == 0, "rope: head_dim must be even, got ", D);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.dim() == 2 && cos.size(1) == D && cos.is_contiguous() &&
                  sin.sizes() == cos.sizes() && sin.is_contiguous() && sin.scalar_type() == at::kFloat,
              "rope: cos and sin must be contiguous float32 [positions, ", D, "], got ", cos.sizes(), " and ",
              sin.sizes());
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 2 && positions.size(0) == B &&
                  positions.size(1) == T,
              "rope: positions must be int64 [", B, ", ", T, "], got ", positions.scalar_type(), " ", positions.sizes());
  const at::Tensor pos = positions.contiguous();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  const int64_t P = cos.size(0);
  for (int64_t i = 0; i < B * T; ++i)
    TORCH_CHECK(pp[i] >= 0 && pp[i] < P, "rope: position ", pp[i], " outside the tables' ", P, " positions");
  auto out = at::empty({B, T, N, D}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const float *cp = cos.const_data_ptr<float>(), *sp = sin.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), h = D / 2;
  at::parallel_for(0, B * T, row_grain(N * D), [&](int64_t b0, int64_t end) {
    for (int64_t bt = b0; bt < end; ++bt) {
      const float* c = cp + pp[bt] * D;
      const float* s = sp + pp[bt] * D;
      for (int64_t n = 0; n < N; ++n) {
        const float* xr = xp + (bt / T) * s0 + (bt % T) * s1 + n * s2;
        float* o = op + (bt * N + n) * D;
        // x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1): the reference's operations
        for (int64_t i = 0; i < h; ++i) o[i] = xr[i] * c[i] - xr[i + h] * s[i];
        for (int64_t i = h; i < D; ++i) o[i] = xr[i] * c[i] + xr[i - h] * s[i];
      }
    }
  });
  return out;
}

// k/v [B, T, KV, D] (any strides, last dimension contiguous) into cache slots index.. of [B, KV, C, D].
void kv_append_cpu(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v, int64_t index) {
  for (const at::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->scalar_type() == at::kFloat && c->dim() == 4 && c->is_contiguous(),
                "kv_append: caches must be contiguous float32 [B, kv_heads, capacity, head_dim], got ", c->sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "kv_append: k and v caches differ in shape");
  const int64_t B = k_cache.size(0), KV = k_cache.size(1), C = k_cache.size(2), D = k_cache.size(3);
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 4 && t->size(0) == B && t->size(2) == KV &&
                    t->size(3) == D && t->stride(3) == 1,
                "kv_append: new keys/values must be float32 [", B, ", T, ", KV, ", ", D, "], got ", t->sizes());
  const int64_t T = k.size(1);
  TORCH_CHECK(v.size(1) == T, "kv_append: keys and values differ in length");
  TORCH_CHECK(index >= 0 && index + T <= C, "kv_append: slots [", index, ", ", index + T, ") outside capacity ", C);
  for (int which = 0; which < 2; ++which) {
    const at::Tensor& src = which ? v : k;
    float* dst = (which ? v_cache : k_cache).data_ptr<float>();
    const float* sp = src.const_data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < KV; ++h)
          std::memcpy(dst + ((b * KV + h) * C + index + t) * D,
                      sp + b * src.stride(0) + t * src.stride(1) + h * src.stride(2), D * sizeof(float));
  }
}

// q [B, T, H, D] (last dimension contiguous); query t of row b sits in cache slot index + t and
// sees slots [max(start[b], index + t - window + 1), index + t] (window <= 0: no lower limit).
// tree (optional, int64 [B, T]): a token tree over the new slots (SpecInfer-style verification):
// tree[b][t] is the new slot of query t's parent (-1: none), and query t sees the cache before
// `index` and its ancestors-or-self among the new slots. Keys are counted *logically*: the cache's
// slots, then the query's path in depth order, so a node at depth d reduces over exactly the keys,
// in the same order and the same blocks, as the same token at slot index + d of a linear window
// (the path's keys are gathered into a block buffer first), and its result is the same bits.
// hidden (optional, bool [B, KV, S]): slots s < S that kv head h of row b does not attend (head-wise
// KV budgets, AdaKV); a block's visible keys are gathered, in order, before it is computed, so a
// row's result depends only on its own keys and mask.
// probs (optional, [B, H, T, index + T]): each query's softmax over the slots, 0 where hidden. A
// block writes its exp(s - block max) and the combine rescales them by exp(block max - max) / sum,
// so each probability is as invariant as the output.
at::Tensor gqa_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& start, int64_t index, double scale, int64_t window,
                             const std::optional<at::Tensor>& probs, const std::optional<at::Tensor>& tree,
                             const std::optional<at::Tensor>& hidden) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 4 && q.stride(3) == 1,
              "gqa_attention: q must be float32 [B, T, heads, head_dim] with a contiguous last dimension, got ",
              q.sizes());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  for (const at::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->scalar_type() == at::kFloat && c->dim() == 4 && c->is_contiguous() && c->size(0) == B &&
                    c->size(3) == D && c->sizes() == k_cache.sizes(),
                "gqa_attention: caches must be contiguous float32 [", B, ", kv_heads, capacity, ", D, "], got ",
                c->sizes());
  const int64_t KV = k_cache.size(1), C = k_cache.size(2);
  TORCH_CHECK(KV > 0 && H % KV == 0, "gqa_attention: ", H, " query heads do not group over ", KV, " kv heads");
  TORCH_CHECK(index >= 0 && index + T <= C, "gqa_attention: queries in slots [", index, ", ", index + T,
              ") outside capacity ", C);
  TORCH_CHECK(start.scalar_type() == at::kLong && start.dim() == 1 && start.size(0) == B,
              "gqa_attention: start must be int64 [", B, "], got ", start.sizes());
  const at::Tensor st = start.contiguous();
  const int64_t* sp = st.const_data_ptr<int64_t>();
  int64_t first = index + T;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sp[b] >= 0, "gqa_attention: negative start ", sp[b]);
    first = std::min(first, sp[b]);
  }
  const int64_t N = index + T;
  float* pr = nullptr;
  if (probs.has_value()) {
    TORCH_CHECK(probs->scalar_type() == at::kFloat && probs->is_contiguous() &&
                    probs->sizes() == at::IntArrayRef({B, H, T, N}),
                "gqa_attention: probs must be contiguous float32 [", B, ", ", H, ", ", T, ", ", N, "], got ",
                probs->sizes());
    pr = probs->data_ptr<float>();
  }
  // the tree's paths: depth[bt] and path[bt * T + i] = the new slot of query bt's i-th window key
  std::vector<int64_t> depth, path;
  if (tree.has_value()) {
    TORCH_CHECK(!probs.has_value(), "gqa_attention: a token tree takes no probs");
    TORCH_CHECK(tree->scalar_type() == at::kLong && tree->sizes() == at::IntArrayRef({B, T}),
                "gqa_attention: tree must be int64 [", B, ", ", T, "], got ", tree->sizes());
    const at::Tensor tr = tree->contiguous();
    const int64_t* par = tr.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(sp[b] <= index, "gqa_attention: a token tree needs each row to start in the cache (start ", sp[b],
                  " > index ", index, ")");
    depth.assign(B * T, 0);
    path.assign(B * T * T, 0);
    for (int64_t bt = 0; bt < B * T; ++bt) {
      const int64_t t = bt % T, p = par[bt];
      TORCH_CHECK(p >= -1 && p < t, "gqa_attention: tree parent ", p, " of new slot ", t, " is not an earlier slot");
      if (p >= 0) {
        depth[bt] = depth[bt - t + p] + 1;
        std::copy_n(path.begin() + (bt - t + p) * T, depth[bt], path.begin() + bt * T);
      }
      path[bt * T + depth[bt]] = t;
    }
  }
  const bool* hid = nullptr;
  int64_t HS = 0;
  at::Tensor hidden_c;
  if (hidden.has_value()) {
    TORCH_CHECK(hidden->scalar_type() == at::kBool && hidden->dim() == 3 && hidden->size(0) == B &&
                    hidden->size(1) == KV && hidden->size(2) <= index,
                "gqa_attention: hidden must be bool [", B, ", ", KV, ", S <= ", index, "], got ", hidden->sizes());
    hidden_c = hidden->contiguous();
    hid = hidden_c.const_data_ptr<bool>();
    HS = hidden_c.size(2);
  }
  const int64_t NB = std::max<int64_t>(1, (index + T - first + kKvBlock - 1) / kKvBlock);
  const int64_t stride = D + 2;  // m, l, acc[D]
  // the per-block partials of a chunk of (row, token) pairs at a time: a bounded buffer (about
  // 4 MB) whatever the prompt's length (a whole 1,000-token prompt's would be ~38 MB per layer,
  // growing with its square); each query's arithmetic does not depend on the chunking
  const int64_t per_bt = H * NB * stride;
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 20) / per_bt);
  std::unique_ptr<float[]> parts(new float[std::min(B * T, chunk) * per_bt]);
  const float* qp = q.const_data_ptr<float>();
  const float *kp = k_cache.const_data_ptr<float>(), *vp = v_cache.const_data_ptr<float>();
  const int64_t g = H / KV;
  const float sc = static_cast<float>(scale);
  const Isa isa = active_isa();
  auto out = at::empty({B, T, H, D}, q.options());
  float* op = out.data_ptr<float>();
  // unit u = ((b * T + t) * H + h); its visible slots [lo, hi]
  auto bounds = [&](int64_t u, int64_t& lo, int64_t& hi) {
    const int64_t b = u / (T * H), t = (u / H) % T;
    hi = index + (depth.empty() ? t : depth[u / H]);
    lo = sp[b];
    if (window > 0) lo = std::max(lo, hi - window + 1);
  };
  // one task per (row, token, kv head, block): the kv head's g query heads in turn, so the block's
  // keys and values are read from memory once and from L1 for the other heads
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kKvBlock * D * g));
  for (int64_t c0 = 0; c0 < B * T; c0 += chunk) {
    const int64_t c1 = std::min(B * T, c0 + chunk);
    at::parallel_for(c0 * KV * NB, c1 * KV * NB, grain, [&](int64_t b0, int64_t end) {
      alignas(64) float s[kKvBlock];
      // a block's visible keys and values, gathered (a tree's path, slots hidden per head), and their slots
      std::vector<float> gathered(depth.empty() && !hid ? 0 : 2 * kKvBlock * D);
      int64_t slots[kKvBlock];
      for (int64_t i = b0; i < end; ++i) {
        // queries fastest: consecutive tasks read the same block of keys and values (from L1)
        const int64_t n = c1 - c0, local = i - c0 * KV * NB;
        const int64_t bt = c0 + local % n, blk = (local / n) % NB, kvh = local / (n * NB), b = bt / T, t = bt % T;
        int64_t lo, hi;
        bounds(bt * H, lo, hi);
        const int64_t j0 = std::max(lo, sp[b] + blk * kKvBlock), j1 = std::min(hi + 1, sp[b] + (blk + 1) * kKvBlock);
        const int64_t kv = ((b * KV + kvh) * C) * D;
        const float *kb = kp + kv, *vb = vp + kv;
        int64_t a0 = j0, a1 = j1;
        const bool* hk = hid ? hid + (b * KV + kvh) * HS : nullptr;
        bool gather = !depth.empty() && j1 > index;  // keys past the cache: this query's path
        for (int64_t j = j0; hk && !gather && j < std::min(j1, HS); ++j) gather = hk[j];
        if (gather && j0 < j1) {
          a1 = 0;
          for (int64_t j = j0; j < j1; ++j) {
            if (j < HS && hk[j]) continue;
            const int64_t slot = j < index || depth.empty() ? j : index + path[bt * T + j - index];
            std::memcpy(gathered.data() + a1 * D, kb + slot * D, D * sizeof(float));
            std::memcpy(gathered.data() + (kKvBlock + a1) * D, vb + slot * D, D * sizeof(float));
            slots[a1++] = j;
          }
          kb = gathered.data();
          vb = gathered.data() + kKvBlock * D;
          a0 = 0;
        }
        for (int64_t h = kvh * g; h < (kvh + 1) * g; ++h) {
          float* part = parts.get() + (((bt - c0) * H + h) * NB + blk) * stride;
          if (a0 >= a1) {
            part[0] = -INFINITY;
            part[1] = 0.0f;
            continue;
          }
          const float* qr = qp + b * q.stride(0) + t * q.stride(1) + h * q.stride(2);
          ENGINE_DISPATCH(isa, attend_block, qr, kb, vb, a0, a1, D, sc, s, part);
          if (!pr) continue;
          float* row = pr + ((b * H + h) * T + t) * N;
          if (!gather) {
            std::memcpy(row + j0, s, (j1 - j0) * sizeof(float));
          } else {  // hidden slots get 0
            std::fill(row + j0, row + j1, 0.0f);
            for (int64_t i = 0; i < a1; ++i) row[slots[i]] = s[i];
          }
        }
      }
    });
    // combine each query's blocks in block order
    at::parallel_for(c0 * H, c1 * H, std::max<int64_t>(1, 256 / std::max<int64_t>(1, NB)), [&](int64_t b0, int64_t end) {
      for (int64_t u = b0; u < end; ++u) {
        const float* pu = parts.get() + (u - c0 * H) * NB * stride;
        float m = -INFINITY;
        for (int64_t blk = 0; blk < NB; ++blk)
          if (pu[blk * stride + 1] > 0.0f) m = std::max(m, pu[blk * stride]);
        float* o = op + u * D;
        std::fill(o, o + D, 0.0f);
        float* row = pr ? pr + (((u / (T * H)) * H + u % H) * T + (u / H) % T) * N : nullptr;
        if (m == -INFINITY) {  // a padding query: no visible key
          if (row) std::fill(row, row + N, 0.0f);
          continue;
        }
        float l = 0.0f;
        for (int64_t blk = 0; blk < NB; ++blk) {
          const float* pb = pu + blk * stride;
          if (!(pb[1] > 0.0f)) continue;
          const float f = std::exp(pb[0] - m);
          l = l + f * pb[1];
          for (int64_t d = 0; d < D; ++d) o[d] = o[d] + f * pb[2 + d];
        }
        const float inv = 1.0f / l;
        for (int64_t d = 0; d < D; ++d) o[d] = o[d] * inv;
        if (!row) continue;
        int64_t lo, hi;
        bounds(u, lo, hi);
        std::fill(row, row + lo, 0.0f);
        std::fill(row + hi + 1, row + N, 0.0f);
        const int64_t b = u / (T * H);
        for (int64_t blk = 0; blk < NB; ++blk) {
          const float* pb = pu + blk * stride;
          const int64_t j0 = std::max(lo, sp[b] + blk * kKvBlock), j1 = std::min(hi + 1, sp[b] + (blk + 1) * kKvBlock);
          if (j0 >= j1) continue;
          if (!(pb[1] > 0.0f)) {
            std::fill(row + j0, row + j1, 0.0f);
            continue;
          }
          const float f = std::exp(pb[0] - m) * inv;
          for (int64_t j = j0; j < j1; ++j) row[j] = row[j] * f;
        }
      }
    });
  }
  return out;
}

// ---------------------------------------------------------------- one decoder layer in one call
// The packed layout of infertrix::engine_layer (src/infertrix/ops/engine.py engine_layer_reference
// documents it and is the reference): tensors = [mlp_norm, next_norm, q_norm?, k_norm?,
// attn_out_norm?, mlp_out_norm?] then kSlotTensors (five) per linear slot (fp32: weight, -, -, -, bias;
// w4a8: qweight, scale, group_scale, zero?, bias; w8a8: qweight, scale, -, -, bias; w4a16: qweight,
// scales_and_zeros, -, -, bias; w8a8_flat: qweight, scales, -, -, bias); ints = [heads,
// kv_heads, head_dim, n_qkv, n_gu, window, gelu] then (kind, in_features, group_size) per slot;
// floats = [scaling, mlp_eps, next_eps, qn_eps, kn_eps, attn_out_eps, mlp_out_eps]. The optional
// output norms and `gelu` are Gemma 3's layer (Llama-style layers leave them out).
// The linear kernels are reached through the dispatcher (their own files register them).
constexpr int64_t kLayerInts = 7, kLayerTensors = 6, kLayerFloats = 7;  // before the slots
constexpr int64_t kSlotTensors = 5;                                       // per linear slot
constexpr int64_t kSkinnyMaxRows = 32;  // ops/skinny_linear.py MAX_ROWS: larger calls leave the kernel

using OptTensor = std::optional<at::Tensor>;

at::Tensor call_linear(int64_t kind, int64_t in_features, int64_t group_size, const c10::List<OptTensor>& t,
                       int64_t base, const at::Tensor& x) {
  auto get = [&](int64_t i) -> OptTensor { return t.get(base + i); };
  auto need = [&](int64_t i) -> at::Tensor {
    OptTensor v = get(i);
    TORCH_CHECK(v.has_value(), "engine_layer: a linear slot of kind ", kind, " needs its tensor ", i);
    return *v;
  };
  if (kind == 1) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("infertrix::w4a8_linear", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const OptTensor&, c10::SymInt, c10::SymInt, const OptTensor&)>();
    return op.call(x, need(0), need(1), need(2), get(3), c10::SymInt(in_features), c10::SymInt(group_size), get(4));
  }
  if (kind == 2) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("infertrix::w8a8_linear", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&)>();
    return op.call(x, need(0), need(1), get(4));
  }
  if (kind == 3) {  // W4A16Linear's forward: torch's int4 kernel in bfloat16 (row by row), float32 out, + bias
    at::Tensor y = at::_weight_int4pack_mm_for_cpu(x.to(at::kBFloat16), need(0), group_size, need(1)).to(at::kFloat);
    return get(4).has_value() ? y + need(4) : y;
  }
  if (kind == 4) {  // FlattenLinear: per-tensor static int8 activations, large channels flattened
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("infertrix::w8a8_flat_linear", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&)>();
    return op.call(x, need(0), need(1), get(4));
  }
  TORCH_CHECK(kind == 0, "engine_layer: unknown linear kind ", kind);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("infertrix::skinny_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)>();
  const int64_t M = x.size(0);
  if (M <= kSkinnyMaxRows) return op.call(x, need(0), get(4));
  std::vector<at::Tensor> parts;
  for (int64_t i = 0; i < M; i += kSkinnyMaxRows)
    parts.push_back(op.call(x.slice(0, i, std::min(M, i + kSkinnyMaxRows)), need(0), get(4)));
  return at::cat(parts);
}

// slots [first, first + n) applied to x, outputs side by side
at::Tensor call_group(const c10::List<OptTensor>& t, at::IntArrayRef ints, int64_t first, int64_t n,
                      const at::Tensor& x) {
  std::vector<at::Tensor> outs;
  for (int64_t s = first; s < first + n; ++s)
    outs.push_back(call_linear(ints[kLayerInts + 3 * s], ints[kLayerInts + 1 + 3 * s], ints[kLayerInts + 2 + 3 * s], t,
                               kLayerTensors + kSlotTensors * s, x));
  return n == 1 ? outs[0] : at::cat(outs, -1);
}

// engine_layer's packed layout: slots and ints/tensors counts agree
void check_layout(const c10::List<OptTensor>& t, at::IntArrayRef ints, at::ArrayRef<double> floats, const char* name) {
  TORCH_CHECK(static_cast<int64_t>(ints.size()) >= kLayerInts && static_cast<int64_t>(floats.size()) == kLayerFloats,
              name, ": malformed ints/floats");
  const int64_t slots = ints[3] + ints[4] + 2;
  TORCH_CHECK(static_cast<int64_t>(ints.size()) == kLayerInts + 3 * slots &&
                  static_cast<int64_t>(t.size()) == kLayerTensors + kSlotTensors * slots,
              name, ": ", slots, " linear slots need ", kLayerInts + 3 * slots, " ints and ",
              kLayerTensors + kSlotTensors * slots, " tensors");
}

// A layer's q, k (q/k norms, rotary) and v [batch, T, heads, D] from its normed input a.
std::tuple<at::Tensor, at::Tensor, at::Tensor> queries_keys_values(const at::Tensor& a, const c10::List<OptTensor>& t,
                                                                    at::IntArrayRef ints, at::ArrayRef<double> floats,
                                                                    const at::Tensor& cos, const at::Tensor& sin,
                                                                    const at::Tensor& positions, int64_t batch) {
  const int64_t H = ints[0], KV = ints[1], D = ints[2], n_qkv = ints[3];
  const at::Tensor qkv = call_group(t, ints, 0, n_qkv, a).view({batch, a.size(0) / batch, H + 2 * KV, D});
  const OptTensor qn = t.get(2), kn = t.get(3);
  if (qn.has_value())
    return {rope_cpu(rms_norm_cpu(qkv.slice(2, 0, H), *qn, floats[3]), cos, sin, positions),
            rope_cpu(rms_norm_cpu(qkv.slice(2, H, H + KV), *kn, floats[4]), cos, sin, positions),
            qkv.slice(2, H + KV, H + 2 * KV)};
  const at::Tensor qk = rope_cpu(qkv.slice(2, 0, H + KV), cos, sin, positions);
  return {qk.slice(2, 0, H), qk.slice(2, H, H + KV), qkv.slice(2, H + KV, H + 2 * KV)};
}

// A layer after its attention o [M, H * D]: o_proj (and Gemma 3's output norm), the residual add with
// the MLP's norm, the gated MLP (and its output norm), the residual add with the next norm.
std::tuple<at::Tensor, at::Tensor> layer_tail(const at::Tensor& h, const at::Tensor& o, const c10::List<OptTensor>& t,
                                              at::IntArrayRef ints, at::ArrayRef<double> floats) {
  const int64_t n_qkv = ints[3], n_gu = ints[4];
  at::Tensor attn = call_group(t, ints, n_qkv, 1, o);
  if (const OptTensor n = t.get(4); n.has_value()) attn = rms_norm_cpu(attn, *n, floats[5]);
  auto [h2, a2] = add_rms_norm_cpu(attn, h, *t.get(0), floats[1]);
  const at::Tensor gu = call_group(t, ints, n_qkv + 1, n_gu, a2);
  at::Tensor mlp = call_group(t, ints, n_qkv + 1 + n_gu, 1, ints[6] ? gelu_tanh_mul_cpu(gu) : silu_mul_cpu(gu));
  if (const OptTensor n = t.get(5); n.has_value()) mlp = rms_norm_cpu(mlp, *n, floats[6]);
  return add_rms_norm_cpu(mlp, h2, *t.get(1), floats[2]);
}

std::tuple<at::Tensor, at::Tensor> engine_layer_cpu(const at::Tensor& h, const at::Tensor& a,
                                                    const c10::List<OptTensor>& t, at::IntArrayRef ints,
                                                    at::ArrayRef<double> floats, at::Tensor& k_cache,
                                                    at::Tensor& v_cache, const at::Tensor& cos, const at::Tensor& sin,
                                                    const at::Tensor& positions, const at::Tensor& start,
                                                    int64_t index, int64_t batch, const OptTensor& probs,
                                                    const OptTensor& queries, const OptTensor& tree,
                                                    const OptTensor& hidden) {
  check_layout(t, ints, floats, "engine_layer");
  const int64_t H = ints[0], D = ints[2], window = ints[5];
  const int64_t M = a.size(0);
  auto [q, k, v] = queries_keys_values(a, t, ints, floats, cos, sin, positions, batch);
  kv_append_cpu(k_cache, v_cache, k, v, index);
  if (queries.has_value()) {
    TORCH_CHECK(queries->sizes() == q.sizes() && queries->scalar_type() == at::kFloat,
                "engine_layer: queries must be float32 ", q.sizes(), ", got ", queries->sizes());
    queries->copy_(q);
  }
  const at::Tensor o = gqa_attention_cpu(q, k_cache, v_cache, start, index, floats[0], window, probs, tree, hidden);
  return layer_tail(h, o.view({M, H * D}), t, ints, floats);
}

// engine_layer for one new token per row over KIVI codes (ops/engine.py engine_kivi_layer_reference):
// the new key and value at slot `index` of the residual buffers, then kivi_decode_attention over the
// codes and the residual's first `length` slots.
std::tuple<at::Tensor, at::Tensor> engine_kivi_layer_cpu(const at::Tensor& h, const at::Tensor& a,
                                                         const c10::List<OptTensor>& t, at::IntArrayRef ints,
                                                         at::ArrayRef<double> floats, at::Tensor& k_cache,
                                                         at::Tensor& v_cache, int64_t length, at::TensorList codes,
                                                         const OptTensor& mask, int64_t bits, const at::Tensor& cos,
                                                         const at::Tensor& sin, const at::Tensor& positions,
                                                         int64_t index, int64_t batch) {
  check_layout(t, ints, floats, "engine_kivi_layer");
  TORCH_CHECK(codes.size() == 6, "engine_kivi_layer: 6 code tensors expected (key codes, scale, zero, value codes, "
              "scale, zero), got ", codes.size());
  TORCH_CHECK(a.size(0) == batch, "engine_kivi_layer: one new token per row expected, got ", a.size(0), " rows for ",
              batch);
  TORCH_CHECK(index >= 0 && index < length && length <= k_cache.size(2),
              "engine_kivi_layer: 0 <= index < length <= the buffers' ", k_cache.size(2), " slots expected, got index ",
              index, ", length ", length);
  const int64_t H = ints[0], D = ints[2];
  auto [q, k, v] = queries_keys_values(a, t, ints, floats, cos, sin, positions, batch);
  kv_append_cpu(k_cache, v_cache, k, v, index);
  static auto attend = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("infertrix::kivi_decode_attention", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, const OptTensor&, int64_t, double)>();
  const at::Tensor o = attend.call(q.select(1, 0).contiguous(), codes[0], codes[1], codes[2], codes[3], codes[4],
                                   codes[5], k_cache.narrow(2, 0, length), v_cache.narrow(2, 0, length), mask, bits,
                                   floats[0]);
  return layer_tail(h, o.reshape({batch, H * D}), t, ints, floats);
}

}  // namespace

TORCH_LIBRARY_IMPL(infertrix, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("add_rms_norm", &add_rms_norm_cpu);
  m.impl("silu_mul", &silu_mul_cpu);
  m.impl("gelu_tanh_mul", &gelu_tanh_mul_cpu);
  m.impl("rope", &rope_cpu);
  m.impl("kv_append", &kv_append_cpu);
  m.impl("gqa_attention", &gqa_attention_cpu);
  m.impl("engine_layer", &engine_layer_cpu);
  m.impl("engine_kivi_layer", &engine_kivi_layer_cpu);
}

// No backward: the C++ "not implemented" kernel instead of custom_op's Python autograd wrapper
// (see w4a8_gemm.cpp).
TORCH_LIBRARY_IMPL(infertrix, AutogradCPU, m) {
  for (const char* name : {"rms_norm", "add_rms_norm", "silu_mul", "gelu_tanh_mul", "rope", "kv_append", "gqa_attention",
                           "engine_layer", "engine_kivi_layer"})
    m.impl(name, torch::autograd::autogradNotImplementedFallback());
}

}  // namespace infertrix
