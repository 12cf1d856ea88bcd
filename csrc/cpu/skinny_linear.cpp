// skinny_linear: y[M, N] = x[M, K] @ w[N, K]^T (+ bias) in float32 for a few rows (M <= 32).
//
// Why: decoding multiplies a handful of rows (one token per sequence, or a verification window of
// a few draft tokens) by each weight matrix. The weights then cost far more than the arithmetic,
// so the time should be one pass over the weights whatever M is. torch's CPU GEMM at M = 2..8
// packs the weight matrix on every call and takes about twice its M = 1 time (measured on
// SmolLM2's layers), which makes a speculative verification forward of width 4 cost ~1.6 plain
// steps. Here every weight element is loaded once and multiplied with all the rows it meets.
//
// Blocking: 16 accumulators (8 with AVX2), MB rows of x times NR = 16 / MB rows of w, each holding
// 16 lane-partial sums over k = lane (mod 16); a transpose-add tree reduces the 16 accumulators
// to one vector of 16 results. The sum order of an output depends only on K (never on M, on the
// other rows or on the thread count), so a row's result is bitwise independent of its batch.
// Not bit-identical to torch's F.linear (another summation order): equal to float32 rounding.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cpu_isa.h"

namespace infertrix {
namespace {

constexpr int64_t kMaxRows = 32;  // above this torch's GEMM is the better choice (compute-bound)

struct Args {
  const float* x;
  int64_t M, K, N;
  const float* w;
  const float* bias;  // nullptr: none
  float* y;
};

// One output block: rows [m0, m0 + mrows) of x times rows [n0, n0 + nrows) of w, all of K.
void block_scalar(const Args& a, int64_t m0, int64_t mrows, int64_t n0, int64_t nrows) {
  for (int64_t m = m0; m < m0 + mrows; ++m) {
    const float* xr = a.x + m * a.K;
    for (int64_t n = n0; n < n0 + nrows; ++n) {
      const float* wr = a.w + n * a.K;
      float s = 0.f;
      for (int64_t k = 0; k < a.K; ++k) s += xr[k] * wr[k];
      a.y[m * a.N + n] = a.bias ? s + a.bias[n] : s;
    }
  }
}

#if INFERTRIX_X86
// Reduce v[0..15] (16 lanes each) to one vector whose lane t is the sum of v[t]'s lanes.
INFERTRIX_TARGET_AVX512 inline __m512 hsum16_512(const __m512* v) {
  __m512 u[8];
  for (int i = 0; i < 8; ++i)  // per 128-bit quarter: (a0+a2, b0+b2, a1+a3, b1+b3)
    u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  __m512 w[4];
  for (int j = 0; j < 4; ++j)  // per quarter: (a, b, c, d) = v[4j .. 4j+3]
    w[j] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
}

template <int MB>
INFERTRIX_TARGET_AVX512 void block_avx512(const Args& a, int64_t m0, int64_t mrows, int64_t n0,
                                          int64_t nrows) {
  constexpr int NR = 16 / MB;
  const int64_t K = a.K;
  const float* xr[MB];
  const float* wr[NR];
  for (int m = 0; m < MB; ++m) xr[m] = a.x + (m0 + std::min<int64_t>(m, mrows - 1)) * K;
  for (int r = 0; r < NR; ++r) wr[r] = a.w + (n0 + std::min<int64_t>(r, nrows - 1)) * K;
  __m512 acc[16];
  for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 xv[MB];
    for (int m = 0; m < MB; ++m) {
      xv[m] = _mm512_loadu_ps(xr[m] + k);
      __asm__("" : "+v"(xv[m]));  // keep x in registers: not one memory operand per FMA
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 wv = _mm512_loadu_ps(wr[r] + k);
      for (int m = 0; m < MB; ++m) acc[m * NR + r] = _mm512_fmadd_ps(wv, xv[m], acc[m * NR + r]);
    }
  }
  if (k < K) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, xr[m] + k);
    for (int r = 0; r < NR; ++r) {
      const __m512 wv = _mm512_maskz_loadu_ps(mask, wr[r] + k);
      for (int m = 0; m < MB; ++m) acc[m * NR + r] = _mm512_fmadd_ps(wv, xv[m], acc[m * NR + r]);
    }
  }
  alignas(64) float out[16];
  _mm512_store_ps(out, hsum16_512(acc));
  for (int64_t m = 0; m < mrows; ++m)
    for (int64_t r = 0; r < nrows; ++r) {
      const float s = out[m * NR + r];
      a.y[(m0 + m) * a.N + n0 + r] = a.bias ? s + a.bias[n0 + r] : s;
    }
}

// Reduce v[0..7] (8 lanes each) to one vector whose lane t is the sum of v[t]'s lanes.
INFERTRIX_TARGET_AVX2 inline __m256 hsum8_256(const __m256* v) {
  __m256 u[4];
  for (int i = 0; i < 4; ++i)
    u[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  __m256 w[2];
  for (int j = 0; j < 2; ++j)
    w[j] = _mm256_add_ps(_mm256_shuffle_ps(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm256_add_ps(_mm256_permute2f128_ps(w[0], w[1], 0x20),
                       _mm256_permute2f128_ps(w[0], w[1], 0x31));
}

template <int MB>
INFERTRIX_TARGET_AVX2 void block_avx2(const Args& a, int64_t m0, int64_t mrows, int64_t n0,
                                      int64_t nrows) {
  constexpr int NR = 8 / MB;
  const int64_t K = a.K;
  const float* xr[MB];
  const float* wr[NR];
  for (int m = 0; m < MB; ++m) xr[m] = a.x + (m0 + std::min<int64_t>(m, mrows - 1)) * K;
  for (int r = 0; r < NR; ++r) wr[r] = a.w + (n0 + std::min<int64_t>(r, nrows - 1)) * K;
  __m256 acc[8];
  for (int t = 0; t < 8; ++t) acc[t] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) {
      xv[m] = _mm256_loadu_ps(xr[m] + k);
      __asm__("" : "+x"(xv[m]));
    }
    for (int r = 0; r < NR; ++r) {
      const __m256 wv = _mm256_loadu_ps(wr[r] + k);
      for (int m = 0; m < MB; ++m) acc[m * NR + r] = _mm256_fmadd_ps(wv, xv[m], acc[m * NR + r]);
    }
  }
  if (k < K) {
    alignas(32) int32_t lanes[8];
    for (int i = 0; i < 8; ++i) lanes[i] = (k + i < K) ? -1 : 0;
    const __m256i mask = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
    __m256 xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = _mm256_maskload_ps(xr[m] + k, mask);
    for (int r = 0; r < NR; ++r) {
      const __m256 wv = _mm256_maskload_ps(wr[r] + k, mask);
      for (int m = 0; m < MB; ++m) acc[m * NR + r] = _mm256_fmadd_ps(wv, xv[m], acc[m * NR + r]);
    }
  }
  alignas(32) float out[8];
  _mm256_store_ps(out, hsum8_256(acc));
  for (int64_t m = 0; m < mrows; ++m)
    for (int64_t r = 0; r < nrows; ++r) {
      const float s = out[m * NR + r];
      a.y[(m0 + m) * a.N + n0 + r] = a.bias ? s + a.bias[n0 + r] : s;
    }
}
#endif

using BlockFn = void (*)(const Args&, int64_t, int64_t, int64_t, int64_t);

// The block kernel for chunks of `rows` rows of x, and how many output rows one block takes.
BlockFn pick(Isa isa, int64_t rows, int64_t& nr) {
  BlockFn fn = &block_scalar;
  nr = 8;
#if INFERTRIX_X86
  if (isa == Isa::Avx512Vnni) {
    static const BlockFn by_rows[4] = {&block_avx512<1>, &block_avx512<2>, &block_avx512<4>,
                                       &block_avx512<8>};
    const int i = rows == 1 ? 0 : rows == 2 ? 1 : rows <= 4 ? 2 : 3;
    fn = by_rows[i];
    nr = 16 >> i;
  } else if (isa == Isa::Avx2) {
    // at most 4 rows: 8 accumulators + 4 rows of x + a weight vector fit AVX2's 16 registers
    static const BlockFn by_rows[3] = {&block_avx2<1>, &block_avx2<2>, &block_avx2<4>};
    const int i = rows == 1 ? 0 : rows == 2 ? 1 : 2;
    fn = by_rows[i];
    nr = 8 >> i;
  }
#else
  (void)isa;
  (void)rows;
#endif
  return fn;
}

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, "skinny_linear expects a 2-D weight [N, K], got ", weight.sizes());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "skinny_linear: x [..., ",
              weight.size(1), "] expected for weight ", weight.sizes(), ", got ", x.sizes());
  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = K ? x.numel() / K : 0;
  const bool f32 = x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                   (!bias || bias->scalar_type() == at::kFloat);
  if (!f32 || M > kMaxRows || M == 0 || K == 0) return at::linear(x, weight, bias);
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N), "skinny_linear: bias of ", N,
              " values expected, got ", bias->sizes());
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  std::optional<at::Tensor> bc;
  if (bias) bc = bias->contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  const Args a{xc.const_data_ptr<float>(), M, K, N, wc.const_data_ptr<float>(),
               bc ? bc->const_data_ptr<float>() : nullptr, y.data_ptr<float>()};
  const Isa isa = active_isa();
  const int64_t chunk = isa == Isa::Avx512Vnni ? 8 : 4;
  // one pass over the weights: output blocks in parallel, each taking every chunk of rows of x
  // (a block's few weight rows stay in L1 between chunks); a last, shorter chunk reuses the same
  // block shape with repeated rows, so every block has the same output rows
  int64_t nr = 0;
  const BlockFn fn = pick(isa, std::min(M, chunk), nr);
  const int64_t blocks = (N + nr - 1) / nr;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (nr * K * 4));  // >= 64 KiB each
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * nr, nrows = std::min(nr, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += chunk) fn(a, m0, std::min(chunk, M - m0), n0, nrows);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(infertrix, CPU, m) { m.impl("skinny_linear", &skinny_linear_cpu); }

}  // namespace infertrix
