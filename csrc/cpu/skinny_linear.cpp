// skinny_linear: y[M, N] = x[M, K] @ w[N, K]^T (+ bias) in float32 for a few rows (M <= 32).
//
// Why: decoding multiplies a handful of rows (one token per sequence, or a verification window of
// a few draft tokens) by each weight matrix. The weights then cost far more than the arithmetic,
// so the time should be one pass over the weights whatever M is. torch's CPU GEMM at M = 2..8
// packs the weight matrix on every call and takes about twice its M = 1 time (measured on
// SmolLM2's layers), which makes a speculative verification forward of width 4 cost ~1.6 plain
// steps. Here every weight element is loaded once and multiplied with all the rows it meets.
//
// Blocking (skinny_block.inc, written once for AVX-512 and AVX2): 16 accumulators (8 with AVX2),
// MB rows of x times NR = 16 / MB rows of w, each holding
// 16 lane-partial sums over k = lane (mod 16); a transpose-add tree reduces the 16 accumulators
// to one vector of 16 results. The sum order of an output depends only on K (never on M, on the
// other rows or on the thread count), so a row's result is bitwise independent of its batch.
// Not bit-identical to torch's F.linear (another summation order): equal to float32 rounding.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cpu_isa.h"
#include "row_blocks.h"

namespace infertrix {
namespace {

constexpr int64_t kMaxRows = 32;  // above this torch's GEMM is the better choice (compute-bound)
// Software prefetch of the weights (skinny_block.inc): blocks of 2+ rows of x take a few weight
// rows each, too few streams for the hardware prefetcher to keep memory busy; prefetching the
// block kSkinnyAhead on took SmolLM2's lm_head (49152 x 576, cold) at 8 rows from 9.8 to 3.7 ms
// and at 5 rows from 10.2 to 3.3 ms (1 thread, AMD EPYC; 1, 3 and 4 blocks ahead were slower).
// One-row blocks read 16 weight rows at once and are slower with it (3.2 -> 4.0 ms): not there.
// The prefetches go to L2 (prefetcht1), not L1: each T0 prefetch that misses holds one of L1's few
// fill buffers until its line arrives, so the loads and prefetches of a block's compute queue
// behind them; into L2 the requests use L2's deeper queue and memory keeps streaming while the
// block computes. Intel Xeon, 210 SmolLM2-shaped matrices, cold, 1 thread, two interleaved rounds
// (ms, T0 -> T1): 2 rows 45.3/46.1 -> 40.5/41.1, 4 rows 50.2/51.5 -> 43.0/43.4, 8 rows 56.7/57.8 ->
// 49.6/49.0, 16 rows 75.6/77.0 -> 65.2/66.0 (1 row, no prefetch: 44.2-44.9 either way). Not
// measured on the AMD EPYC.
constexpr int64_t kSkinnyAhead = 2;
constexpr int kSkinnyPrefetchRows = 2;
// Blocks of 1-4 rows of x read their weight rows one after another rather than interleaved
// (skinny_block.inc). SmolLM2's 210 layer matrices, cold, 1 thread, AMD EPYC (ms per pass,
// interleaved -> sequential): 1 row 22.9 -> 22.7 (after the one-row block went sequential: it was
// 16-17 GB/s, now 23.4 on benchmarks/bandwidth.py), 2 rows 28.2 -> 21.4, 4 rows 36.2 -> 31.9,
// 8 rows 42.4 -> 58.8 (8 rows stay interleaved, with their prefetch).
constexpr bool kSkinnySequential = true;

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
// Each vector type V gives the block (skinny_block.inc) these float operations: kLanes lanes per
// vector; zero(), load(p), tail_mask(n) and load_tail(p, mask) (the first n lanes, zeros after),
// fma(a, b, c) = a * b + c, pin(v) (keeps v in a register), store(p, v), and hsum(v[kLanes]): one
// vector whose lane t is the sum of v[t]'s lanes (a transpose-add tree).

// ---------------------------------------------------------------- AVX-512
namespace avx512 {
#define SKINNY_TARGET INFERTRIX_TARGET_AVX512
struct V {
  using F = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  SKINNY_TARGET static F zero() { return _mm512_setzero_ps(); }
  SKINNY_TARGET static F load(const float* p) { return _mm512_loadu_ps(p); }
  SKINNY_TARGET static Mask tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
  SKINNY_TARGET static F load_tail(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  SKINNY_TARGET static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  SKINNY_TARGET static void pin(F& v) { __asm__("" : "+v"(v)); }
  SKINNY_TARGET static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  SKINNY_TARGET static F hsum(const F* v) {
    F u[8];
    for (int i = 0; i < 8; ++i)  // per 128-bit quarter: (a0+a2, b0+b2, a1+a3, b1+b3)
      u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                           _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    F w[4];
    for (int j = 0; j < 4; ++j)  // per quarter: (a, b, c, d) = v[4j .. 4j+3]
      w[j] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const F s01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const F s23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_f32x4(w[2], w[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
  }
};
#include "skinny_block.inc"
#undef SKINNY_TARGET
}  // namespace avx512

// ---------------------------------------------------------------- AVX2
namespace avx2 {
#define SKINNY_TARGET INFERTRIX_TARGET_AVX2
struct V {
  using F = __m256;
  using Mask = __m256i;
  static constexpr int kLanes = 8;
  SKINNY_TARGET static F zero() { return _mm256_setzero_ps(); }
  SKINNY_TARGET static F load(const float* p) { return _mm256_loadu_ps(p); }
  SKINNY_TARGET static Mask tail_mask(int64_t n) {
    alignas(32) int32_t lanes[8];
    for (int i = 0; i < 8; ++i) lanes[i] = i < n ? -1 : 0;
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
  }
  SKINNY_TARGET static F load_tail(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  SKINNY_TARGET static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  SKINNY_TARGET static void pin(F& v) { __asm__("" : "+x"(v)); }
  SKINNY_TARGET static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  SKINNY_TARGET static F hsum(const F* v) {
    F u[4];
    for (int i = 0; i < 4; ++i)
      u[i] = _mm256_add_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                           _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    F w[2];
    for (int j = 0; j < 2; ++j)
      w[j] = _mm256_add_ps(_mm256_shuffle_ps(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm256_shuffle_ps(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm256_add_ps(_mm256_permute2f128_ps(w[0], w[1], 0x20),
                         _mm256_permute2f128_ps(w[0], w[1], 0x31));
  }
};
#include "skinny_block.inc"
#undef SKINNY_TARGET
}  // namespace avx2
#endif

// The block functions per ISA for run_row_blocks (row_blocks.h).
#if INFERTRIX_X86
const RowBlockFn<Args> kAvx512Blocks[4] = {&avx512::block<1>, &avx512::block<2>, &avx512::block<4>,
                                           &avx512::block<8>};
const RowBlockFn<Args> kAvx2Blocks[3] = {&avx2::block<1>, &avx2::block<2>, &avx2::block<4>};
#else
const RowBlockFn<Args>* const kAvx512Blocks = nullptr;
const RowBlockFn<Args>* const kAvx2Blocks = nullptr;
#endif

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
  run_row_blocks(a, M, N, K * 4, active_isa(), &block_scalar, kAvx512Blocks, kAvx2Blocks);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(infertrix, CPU, m) { m.impl("skinny_linear", &skinny_linear_cpu); }

// No backward: the C++ "not implemented" kernel instead of custom_op's Python autograd wrapper
// (about 5 us per call outside inference_mode; see w4a8_gemm.cpp).
TORCH_LIBRARY_IMPL(infertrix, AutogradCPU, m) {
  m.impl("skinny_linear", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace infertrix
