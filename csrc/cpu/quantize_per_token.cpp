// infertrix::quantize_per_token_int8 on the CPU: dynamic symmetric int8 quantization of each row
// (token) of an activation matrix, as W4A8/W8A8 linears need (SmoothQuant, QQQ).
//
//   amax  = max(|x_row|)            (clamped below at 1e-10 so an all-zero row is well defined)
//   inv   = 127 / amax              (float32)
//   q     = clamp(round_half_even(x * inv), -127, 127)   int8
//   scale = amax / 127              (float32, one per row)
//
// Bit-identical to the PyTorch reference in src/infertrix/ops/quantize.py: every float operation
// is the same IEEE single-precision operation in the same order.
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "cpu_isa.h"
#include "quantize_per_token.h"

namespace infertrix {
namespace {

constexpr float kMinAmax = 1e-10f;

inline float load_f(const float* p, int64_t i) { return p[i]; }
inline float load_f(const c10::BFloat16* p, int64_t i) { return static_cast<float>(p[i]); }
inline float load_f(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }

template <typename T>
void row_scalar(const T* x, int64_t k, int8_t* q, float* scale) {
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(load_f(x, i)));
  amax = std::max(amax, kMinAmax);
  const float inv = 127.f / amax;
  for (int64_t i = 0; i < k; ++i) {
    float v = std::nearbyint(load_f(x, i) * inv);
    q[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
  }
  *scale = amax / 127.f;
}

#if INFERTRIX_X86
INFERTRIX_TARGET_AVX2 void row_avx2(const float* x, int64_t k, int8_t* q, float* scale) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 vmax = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.f;
  for (float l : lanes) amax = std::max(amax, l);
  for (int64_t j = i; j < k; ++j) amax = std::max(amax, std::fabs(x[j]));
  amax = std::max(amax, kMinAmax);
  const float inv = 127.f / amax;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  // Within each 128-bit lane take byte 0 of each int32, then gather both lanes' 4 bytes.
  const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i join = _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1);
  i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), vinv));
    v = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
    v = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, pick), join);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm256_castsi256_si128(v));
  }
  for (; i < k; ++i) {
    float v = std::nearbyint(x[i] * inv);
    q[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
  }
  *scale = amax / 127.f;
}

INFERTRIX_TARGET_AVX512 void row_avx512(const float* x, int64_t k, int8_t* q, float* scale) {
  __m512 vmax = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  if (i < k) {
    const __mmask16 m = static_cast<__mmask16>((1u << (k - i)) - 1u);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + i)));
  }
  float amax = std::max(_mm512_reduce_max_ps(vmax), kMinAmax);
  const float inv = 127.f / amax;
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (i = 0; i < k; i += 16) {
    const __mmask16 m = first_lanes(k - i);
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), vinv));
    v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
    _mm_mask_storeu_epi8(q + i, m, _mm512_cvtsepi32_epi8(v));
  }
  *scale = amax / 127.f;
}
#endif

}  // namespace

void quantize_row_int8(Isa isa, const float* x, int64_t k, int8_t* q, float* scale) {
#if INFERTRIX_X86
  if (isa == Isa::Avx512Vnni) return row_avx512(x, k, q, scale);
  if (isa == Isa::Avx2) return row_avx2(x, k, q, scale);
#endif
  row_scalar(x, k, q, scale);
}
// half/bf16 inputs: converted element by element
void quantize_row_int8(Isa, const c10::BFloat16* x, int64_t k, int8_t* q, float* scale) { row_scalar(x, k, q, scale); }
void quantize_row_int8(Isa, const c10::Half* x, int64_t k, int8_t* q, float* scale) { row_scalar(x, k, q, scale); }

namespace {

std::tuple<at::Tensor, at::Tensor> quantize_per_token_int8_cpu(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() >= 1, "quantize_per_token_int8: input must have at least one dimension");
  with_float_data(x_in, "quantize_per_token_int8", [](const auto*) {});  // dtype check
  const int64_t k = x_in.size(-1);
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = k == 0 ? 0 : x.numel() / k;
  auto q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = 1;
  auto scale = at::empty(out_sizes, x.options().dtype(at::kFloat));
  if (k == 0) {
    scale.fill_(kMinAmax / 127.f);
    return {q, scale};
  }
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  const Isa isa = active_isa();
  with_float_data(x, "quantize_per_token_int8", [&](const auto* xp) {
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        quantize_row_int8(isa, xp + r * k, k, qp + r * k, sp + r);
      }
    });
  });
  return {q, scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(infertrix, CPU, m) {
  m.impl("quantize_per_token_int8", &quantize_per_token_int8_cpu);
}

// No backward: the C++ "not implemented" kernel instead of custom_op's Python autograd wrapper
// (about 5 us per call outside inference_mode; see w4a8_gemm.cpp).
TORCH_LIBRARY_IMPL(infertrix, AutogradCPU, m) {
  m.impl("quantize_per_token_int8", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace infertrix
