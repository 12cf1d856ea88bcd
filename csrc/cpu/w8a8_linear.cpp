// infertrix::w8a8_linear on the CPU: int8 per-token activations x int8 per-channel weights
// (SmoothQuant's W8A8, Xiao et al. 2023), for decoding's few rows.
//
//   acc[m, n] = sum_k x_q[m, k] * q[n, k]                  (int32, exact)
//   y[m, n]   = (float(acc[m, n]) * sx[m]) * s1[n]  (+ bias[n])
//
// Why: a quantized draft model (speculative/quantized_self.py) runs one token at a time, where
// the weights cost far more than the arithmetic. torch._int_mm plus the separate quantize,
// scale and cast ops took SmolLM2's W8A8 draft step to ~11 ms on one core (1 thread), ~6 ms of
// it in _int_mm; the weights are 134 MB, ~4 ms of DRAM traffic. Here one call quantizes the
// rows, streams every weight byte once for all rows (up to kMaxRows) and applies the scales.
//
// The weights stay in the row-major int8 [N, K] of the float layer (W8A8Linear's storage), so
// blocking follows skinny_linear: MB rows of x times NR = kLanes / MB rows of w, kLanes int32
// accumulators of lane-partial sums reduced by one transpose-add tree. vpdpbusd multiplies
// UNSIGNED bytes by SIGNED bytes: the activation's magnitude |x| is the unsigned operand and its
// sign moves onto the weight (w negated where x < 0; AVX2's vpsignb does exactly this). That is
// exact for weight codes in [-127, 127], the symmetric range every quantizer here produces
// (-128 would overflow when negated: W8A8Linear refuses it). Integer sums are exact in any
// order, and the float epilogue performs the reference's operations in its order (no FMA
// contraction), so every path is bit-identical to src/infertrix/ops/w8a8.py's reference. More
// rows than kMaxRows go to at::_int_mm (compute-bound there), with the same epilogue.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "row_blocks.h"
#include "quantize_per_token.h"

// The epilogue must be mul, mul, add exactly as in the reference: forbid FMA contraction.
#pragma GCC optimize("fp-contract=off")

namespace infertrix {
namespace {

constexpr int64_t kMaxRows = 32;  // as skinny_linear: above this the product is compute-bound
constexpr int64_t kMaxK = (int64_t{2147483647}) / (127 * 127);  // |acc| <= 127^2 K fits int32
// Software prefetch kAheadBytes past the start of the block being read, at the pace it is read
// (past a weight's end: harmless, prefetches never fault). SmolLM2's 211 W8A8 layers in a row,
// cold (134 MB, 1 thread, AMD EPYC): 6.8 ms without, 5.4-5.7 ms at 16 KiB ahead (2-4 KiB: 6-7 ms,
// 24-64 KiB: no better); torch._int_mm alone took 5.7-6.7 ms.
constexpr int64_t kAheadBytes = 16384;

struct Args {
  const int8_t* x;  // [M, K] quantized activations
  const float* sx;  // [M] their scales
  int64_t M, K, N;
  const int8_t* w;     // [N, K]
  const float* s1;     // [N]
  const float* bias;   // [N] or nullptr
  float* y;            // [M, N]
  int32_t* raw = nullptr;  // [M, N]: when set, the int32 sums go here and y is not written
  // w8a8_flat_linear's flattened channels: [M, wide_len] int16 values (wide_len a multiple of 32),
  // each row's products with the first wide_len columns of the weight added to the sums; nullptr: none
  const int16_t* wide = nullptr;
  int64_t wide_len = 0;
};

inline float epilogue(const Args& a, int32_t acc, int64_t m, int64_t n) {
  float y = static_cast<float>(acc) * a.sx[m];
  y = y * a.s1[n];
  if (a.bias) y = y + a.bias[n];
  return y;
}

// One output block: rows [m0, m0 + mrows) of x times rows [n0, n0 + nrows) of w, all of K.
void block_scalar(const Args& a, int64_t m0, int64_t mrows, int64_t n0, int64_t nrows) {
  for (int64_t m = m0; m < m0 + mrows; ++m) {
    const int8_t* xr = a.x + m * a.K;
    for (int64_t n = n0; n < n0 + nrows; ++n) {
      const int8_t* wr = a.w + n * a.K;
      int64_t s = 0;  // exact: the final sum fits int32
      for (int64_t k = 0; k < a.K; ++k) s += static_cast<int32_t>(xr[k]) * wr[k];
      if (a.wide)
        for (int64_t k = 0; k < std::min(a.wide_len, a.K); ++k)
          s += static_cast<int32_t>(a.wide[m * a.wide_len + k]) * wr[k];
      if (a.raw) a.raw[m * a.N + n] = static_cast<int32_t>(s);
      else a.y[m * a.N + n] = epilogue(a, static_cast<int32_t>(s), m, n);
    }
  }
}

#if INFERTRIX_X86
// Each vector type V gives the block these operations: kLanes int32 lanes per vector, kBytes =
// 4 kLanes bytes per load; zero(), load(p), load_tail(p, n) (the first n bytes, zeros after);
// prep(x) -> X (an activation vector made ready for dot); dot(acc, X, w): acc + per-lane sum of
// 4 products x * w; hsum(v[kLanes]): one vector whose lane t is the sum of v[t]'s lanes; sub;
// store(p, v). With kOffset, also the blocks of 2+ rows' form: prep_offset(x) (x + 128 as
// unsigned bytes), offset_dot(acc, X or ones(), w): acc + per-lane sum of 4 products u8 x s8
// (wrapping), and shl7(v) = 128 v. That costs one instruction per (row of x, row of w) pair
// instead of two (the sign move), plus one per row of w for its sum, so several rows of x stay
// memory-bound; a one-row block keeps the sign form (its 16 row sums would not fit in registers).

// ---------------------------------------------------------------- AVX-512 VNNI: vpdpbusd
namespace avx512 {
#define W8A8_TARGET INFERTRIX_TARGET_AVX512
struct V {
  using I = __m512i;
  struct X {
    __m512i mag;     // |x| as unsigned bytes
    __mmask64 neg;   // lanes where x < 0
  };
  static constexpr int kLanes = 16;
  static constexpr int kBytes = 64;
  static constexpr bool kOffset = true;
  W8A8_TARGET static I zero() { return _mm512_setzero_si512(); }
  W8A8_TARGET static I load(const int8_t* p) { return _mm512_loadu_si512(p); }
  W8A8_TARGET static I load_tail(const int8_t* p, int64_t n) {
    return _mm512_maskz_loadu_epi8(n >= 64 ? ~__mmask64{0} : (__mmask64{1} << n) - 1, p);
  }
  W8A8_TARGET static X prep(I x) { return {_mm512_abs_epi8(x), _mm512_movepi8_mask(x)}; }
  W8A8_TARGET static I dot(I acc, const X& x, I w) {
    return _mm512_dpbusd_epi32(acc, x.mag, _mm512_mask_sub_epi8(w, x.neg, _mm512_setzero_si512(), w));
  }
  W8A8_TARGET static X prep_offset(I x) { return {_mm512_xor_si512(x, _mm512_set1_epi8(-128)), 0}; }
  W8A8_TARGET static X ones() { return {_mm512_set1_epi8(1), 0}; }
  W8A8_TARGET static I offset_dot(I acc, const X& x, I w) { return _mm512_dpbusd_epi32(acc, x.mag, w); }
  W8A8_TARGET static I shl7(I v) { return _mm512_slli_epi32(v, 7); }
  // int16 products (w8a8_flat_linear's flattened channels): kWide int16 lanes; widen(p, n) the first n
  // bytes at p as int16 (zeros after); wdot(acc, a, w): acc + per-lane sum of 2 products a * w
  static constexpr int kWide = 32;
  W8A8_TARGET static I load16(const int16_t* p) { return _mm512_loadu_si512(p); }
  W8A8_TARGET static I widen(const int8_t* p, int64_t n) {
    return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(n >= 32 ? ~__mmask32{0} : (__mmask32{1} << n) - 1, p));
  }
  W8A8_TARGET static I wdot(I acc, I a, I w) { return _mm512_dpwssd_epi32(acc, a, w); }
  W8A8_TARGET static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  W8A8_TARGET static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  W8A8_TARGET static I hsum(const I* v) {  // skinny_linear's transpose-add tree, on int32 lanes
    I u[8];
    for (int i = 0; i < 8; ++i)
      u[i] = add(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    I w[4];
    for (int j = 0; j < 4; ++j) {
      const __m512 a = _mm512_castsi512_ps(u[2 * j]), b = _mm512_castsi512_ps(u[2 * j + 1]);
      w[j] = add(_mm512_castps_si512(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0))),
                 _mm512_castps_si512(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2))));
    }
    const I s01 = add(_mm512_shuffle_i32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                      _mm512_shuffle_i32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const I s23 = add(_mm512_shuffle_i32x4(w[2], w[3], _MM_SHUFFLE(2, 0, 2, 0)),
                      _mm512_shuffle_i32x4(w[2], w[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return add(_mm512_shuffle_i32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
               _mm512_shuffle_i32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  W8A8_TARGET static void store(int32_t* p, I v) { _mm512_storeu_si512(p, v); }
};
#include "w8a8_block.inc"
#undef W8A8_TARGET
}  // namespace avx512

// ---------------------------------------------------------------- AVX2: vpsignb + vpmaddubsw
// vpmaddubsw(|x|, sign(x) * w) gives 16-bit pair sums of at most 2 * 127 * 127 = 32258 (no
// saturation); vpmaddwd with ones widens them to int32.
namespace avx2 {
#define W8A8_TARGET INFERTRIX_TARGET_AVX2
struct V {
  using I = __m256i;
  struct X {
    __m256i mag, x;
  };
  static constexpr int kLanes = 8;
  static constexpr int kBytes = 32;
  static constexpr bool kOffset = false;  // vpmaddubsw would saturate on (x + 128) * w
  W8A8_TARGET static I zero() { return _mm256_setzero_si256(); }
  W8A8_TARGET static I load(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  W8A8_TARGET static I load_tail(const int8_t* p, int64_t n) {
    alignas(32) int8_t buf[32] = {0};
    std::memcpy(buf, p, static_cast<size_t>(std::min<int64_t>(n, 32)));
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
  }
  W8A8_TARGET static X prep(I x) { return {_mm256_abs_epi8(x), x}; }
  W8A8_TARGET static I dot(I acc, const X& x, I w) {
    const I pairs = _mm256_maddubs_epi16(x.mag, _mm256_sign_epi8(w, x.x));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
  // never called (kOffset is false); they let the block compile
  W8A8_TARGET static X prep_offset(I x) { return prep(x); }
  W8A8_TARGET static X ones() { return prep(_mm256_set1_epi8(1)); }
  W8A8_TARGET static I offset_dot(I acc, const X& x, I w) { return dot(acc, x, w); }
  W8A8_TARGET static I shl7(I v) { return _mm256_slli_epi32(v, 7); }
  static constexpr int kWide = 16;  // vpmaddwd: 2 int16 products per int32 lane, no saturation
  W8A8_TARGET static I load16(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  W8A8_TARGET static I widen(const int8_t* p, int64_t n) {
    alignas(16) int8_t buf[16] = {0};
    if (n >= 16) return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    std::memcpy(buf, p, static_cast<size_t>(n));
    return _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
  }
  W8A8_TARGET static I wdot(I acc, I a, I w) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, w)); }
  W8A8_TARGET static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  W8A8_TARGET static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  W8A8_TARGET static I hsum(const I* v) {
    I u[4];
    for (int i = 0; i < 4; ++i)
      u[i] = add(_mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    I w[2];
    for (int j = 0; j < 2; ++j) {
      const __m256 a = _mm256_castsi256_ps(u[2 * j]), b = _mm256_castsi256_ps(u[2 * j + 1]);
      w[j] = add(_mm256_castps_si256(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0))),
                 _mm256_castps_si256(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2))));
    }
    return add(_mm256_permute2x128_si256(w[0], w[1], 0x20), _mm256_permute2x128_si256(w[0], w[1], 0x31));
  }
  W8A8_TARGET static void store(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
};
#include "w8a8_block.inc"
#undef W8A8_TARGET
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

// Activations quantized per token, per calling thread and reused across calls (a decode step
// allocates nothing here but its output).
struct Activations {
  std::vector<int8_t> x;
  std::vector<float> sx;
};

// y = epilogue(x_q w^T) for activations already quantized into a.x / a.sx (the int32 sums into
// a.raw instead when it is set): one pass over the weights for up to kMaxRows rows, at::_int_mm
// above (compute-bound there).
void multiply(const Args& a, const at::Tensor& wc, Isa isa) {
  const int64_t M = a.M, N = a.N, K = a.K;
  if (M > kMaxRows) {
    const at::Tensor xt = at::from_blob(const_cast<int8_t*>(a.x), {M, K}, at::TensorOptions().dtype(at::kChar));
    const at::Tensor acc = at::_int_mm(xt, wc.t());
    const int32_t* ap = acc.const_data_ptr<int32_t>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        for (int64_t n = 0; n < N; ++n) {
          if (a.raw) a.raw[m * N + n] = ap[m * N + n];
          else a.y[m * N + n] = epilogue(a, ap[m * N + n], m, n);
        }
    });
  } else {  // one pass over the weights (row_blocks.h)
    run_row_blocks(a, M, N, K, isa, &block_scalar, kAvx512Blocks, kAvx2Blocks);
  }
}

at::Tensor w8a8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "w8a8_linear: expected float32, bfloat16 or float16 activations, got ", x.scalar_type());
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2,
              "w8a8_linear: expected an int8 weight [N, K], got ", qweight.scalar_type(), " ", qweight.sizes());
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "w8a8_linear: last dimension of x must be in_features=", K,
              ", got shape ", x.sizes());
  TORCH_CHECK(K <= kMaxK, "w8a8_linear: in_features=", K, " could overflow the int32 sum (at most ", kMaxK, ")");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == N,
              "w8a8_linear: scale must be float32 [", N, "], got ", scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N), "w8a8_linear: bias must be [", N, "], got ",
              bias->sizes());
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const at::Tensor wc = qweight.contiguous();
  const at::Tensor sc = scale.contiguous();
  at::Tensor b;
  if (bias) b = bias->to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const Isa isa = active_isa();
  thread_local Activations buffers;
  Activations& act = buffers;  // the calling thread's (the row loops may run on other threads)
  act.x.resize(M * K);
  act.sx.resize(M);
  int8_t* xq = act.x.data();
  float* sx = act.sx.data();
  with_float_data(x2, "w8a8_linear", [&](const auto* xp) {
    at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) quantize_row_int8(isa, xp + m * K, K, xq + m * K, sx + m);
    });
  });
  Args a{xq, sx, M, K, N, wc.const_data_ptr<int8_t>(), sc.const_data_ptr<float>(),
         b.defined() ? b.const_data_ptr<float>() : nullptr, out.data_ptr<float>()};
  multiply(a, wc, isa);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  out = out.view(sizes);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}


// ---------------------------------------------------------------- w8a8_flat_linear (FlattenQuant)
// Static per-tensor activations (Zhang et al. 2024, arXiv:2402.17985): codes are
// clamp(round(x * mult), -127, 127) with the calibrated 1 / step, and each of the F flattened
// channels' code again with its own multiplier (1 / (step * copies)); its copies carry that code,
// so their products are one channel of value a = copies * code (|a| <= 128 * 127). No max search
// over the row: one pass instead of quantize_row_int8's two. Clamping before rounding gives the
// reference's round-then-clamp result for the bounds +-127.
// The weight's columns are permuted (src/infertrix/ops/w8a8_flat.py flat_permutation) so the F
// flattened channels come first: a row's codes are written in that order with 0 at positions
// [0, F), and the flattened channels' values a go to a short int16 row of their own (`wide`,
// wide_len long, zeros past F). The blocks multiply the codes as w8a8_linear's, then that row by
// the first wide_len columns of the same weight rows, just read, widened to int16 (vpdpwssd: two
// products per int32 lane, |a w| <= 128 * 127 * 127: exact). The call streams exactly w8a8_linear's
// weight bytes; the flattening costs one multiply-add per 32 flattened channels, per weight row
// and row of x.

inline int8_t flat_code(float x, float mult) {
  return static_cast<int8_t>(std::nearbyint(std::min(127.f, std::max(-127.f, x * mult))));
}

template <typename T>
void flat_row_scalar(const T* x, float mult, int64_t K, int8_t* q) {
  for (int64_t k = 0; k < K; ++k) q[k] = flat_code(static_cast<float>(x[k]), mult);
}

#if INFERTRIX_X86
INFERTRIX_TARGET_AVX512 void flat_row_avx512(const float* x, float mult, int64_t K, int8_t* q) {
  const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f), mv = _mm512_set1_ps(mult);
  for (int64_t i = 0; i < K; i += 16) {
    const __mmask16 m = first_lanes(K - i);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), mv);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    _mm_mask_storeu_epi8(q + i, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));  // rounds to nearest even
  }
}
#endif

// One row's codes into q (the permuted order, 0 at [0, F)) and the flattened channels' values into
// wide [wide_len]. flat is the float32 [1 + F, 3] table: (step, 1 / step, 0), then per flattened
// channel (channel, extra copies, multiplier). Flattened channel f's slot is f: swap(f, c_f) in
// turn, as flat_permutation.
template <typename T>
void flat_row(Isa isa, const T* x, const float* flat, int64_t F, int64_t K, int8_t* q, int16_t* wide,
              int64_t wide_len) {
  bool done = false;
#if INFERTRIX_X86
  if constexpr (std::is_same_v<T, float>) {
    if (isa == Isa::Avx512Vnni) {
      flat_row_avx512(x, flat[1], K, q);
      done = true;
    }
  }
#endif
  if (!done) flat_row_scalar(x, flat[1], K, q);
  std::fill(wide, wide + wide_len, int16_t{0});
  for (int64_t f = 0; f < F; ++f) {
    const float* e = flat + 3 * (1 + f);
    const auto c = static_cast<int64_t>(e[0]);
    q[c] = q[f];
    q[f] = 0;
    wide[f] = static_cast<int16_t>((1 + static_cast<int32_t>(e[1])) * flat_code(static_cast<float>(x[c]), e[2]));
  }
}

constexpr int64_t kMaxExtra = 127;  // (1 + extra) * 127 <= 128 * 127: an int16 whose products with 2 weights fit int32

// F, after checking scales = the flat table [1 + F, 3] then N weight scales: integer channels
// increasing in [0, K), integer extra copies in [0, kMaxExtra], the widened input within the int32
// sum's bound.
int64_t check_flat(const at::Tensor& scales, int64_t N, int64_t K) {
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1 && scales.numel() >= N + 3 &&
                  (scales.numel() - N) % 3 == 0,
              "w8a8_flat_linear: scales must be float32 [3 (1 + F) + ", N, "] (the flat table [1 + F, 3]: (step, 1 / "
              "step, 0), then (channel, extra copies, multiplier) per flattened channel; then the weight scales), got ",
              scales.scalar_type(), " ", scales.sizes());
  const int64_t F = (scales.numel() - N) / 3 - 1;
  const float* p = scales.const_data_ptr<float>();
  const auto positive = [](float v) { return std::isfinite(v) && v > 0; };
  TORCH_CHECK(positive(p[0]) && positive(p[1]), "w8a8_flat_linear: flat's step and its inverse must be finite and "
              "positive, hold ", p[0], " and ", p[1]);
  int64_t width = K;
  for (int64_t f = 0; f < F; ++f) {
    const float c = p[3 * (1 + f)], e = p[3 * (1 + f) + 1];
    TORCH_CHECK(positive(p[3 * (1 + f) + 2]), "w8a8_flat_linear: flat's multipliers must be finite and positive, "
                "holds ", p[3 * (1 + f) + 2], " at ", f);
    TORCH_CHECK(c == std::floor(c) && c >= (f > 0 ? p[3 * f] + 1 : 0) && c < static_cast<float>(K),
                "w8a8_flat_linear: flat's channels must be increasing integers in [0, ", K, "), holds ", c, " at ", f);
    TORCH_CHECK(e == std::floor(e) && e >= 0 && e <= kMaxExtra, "w8a8_flat_linear: flat's extra copies must be "
                "integers in [0, ", kMaxExtra, "], holds ", e, " at ", f);
    width += static_cast<int64_t>(e);
  }
  TORCH_CHECK(width <= kMaxK, "w8a8_flat_linear: ", width, " flattened input channels could overflow the int32 sum");
  return F;
}

at::Tensor w8a8_flat_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales_in,
                                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "w8a8_flat_linear expects float32, bfloat16 or float16 activations, got ", x.scalar_type());
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2,
              "w8a8_flat_linear expects an int8 weight [N, K], got ", qweight.scalar_type(), " ", qweight.sizes());
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "w8a8_flat_linear: x [..., ", x.size(-1), "] needs a weight [N, ",
              x.size(-1), "]; got ", qweight.sizes());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N), "w8a8_flat_linear: bias must be [", N, "]");
  const at::Tensor scales = scales_in.contiguous();
  const int64_t F = check_flat(scales, N, K);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous(), wc = qweight.contiguous();
  at::Tensor b;
  if (bias) b = bias->to(at::kFloat).contiguous();
  const int64_t M = x2.size(0), wl = (F + 31) / 32 * 32;
  auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const Isa isa = active_isa();
  thread_local Activations buffers;
  thread_local std::vector<int16_t> wide_buffer;
  Activations& act = buffers;
  std::vector<int16_t>& wide = wide_buffer;
  const float* fp = scales.const_data_ptr<float>();  // the table, then the weight scales at fp + 3 (1 + F)
  act.x.resize(M * K);
  act.sx.assign(M, fp[0]);
  wide.resize(M * wl);
  int8_t* xq = act.x.data();
  with_float_data(x2, "w8a8_flat_linear", [&](const auto* xp) {
    at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) flat_row(isa, xp + m * K, fp, F, K, xq + m * K, wide.data() + m * wl, wl);
    });
  });
  Args a{xq, act.sx.data(), M, K, N, wc.const_data_ptr<int8_t>(), fp + 3 * (1 + F),
         b.defined() ? b.const_data_ptr<float>() : nullptr, out.data_ptr<float>()};
  if (F > 0) {
    a.wide = wide.data();
    a.wide_len = wl;
  }
  if (M <= kMaxRows) {  // one pass over the weights (row_blocks.h), the flattened channels in the blocks
    run_row_blocks(a, M, N, K, isa, &block_scalar, kAvx512Blocks, kAvx2Blocks);
  } else {  // at::_int_mm's sums of the codes (compute-bound here), the flattened channels' as an exact double product
    thread_local std::vector<int32_t> sum_buffer;
    std::vector<int32_t>& sums = sum_buffer;
    sums.resize(M * N);
    a.raw = sums.data();
    multiply(a, wc, isa);
    // the flattened channels' products in chunks of rows (a [rows, N] float64 product at a time, not
    // [M, N]: a prefill through a large head stays small); |sum| <= 128 * 127 * 127 * F < 2^53: exact
    const at::Tensor wf = F > 0 ? wc.narrow(1, 0, F).to(at::kDouble).t() : at::Tensor();
    const at::Tensor v = at::from_blob(wide.data(), {M, wl}, at::TensorOptions().dtype(at::kShort));
    float* y = out.data_ptr<float>();
    constexpr int64_t kChunk = 64;
    for (int64_t m0 = 0; m0 < M; m0 += kChunk) {
      const int64_t rows = std::min(kChunk, M - m0);
      at::Tensor flattened;
      if (F > 0) flattened = at::mm(v.slice(0, m0, m0 + rows).narrow(1, 0, F).to(at::kDouble), wf).contiguous();
      const double* hp = F > 0 ? flattened.const_data_ptr<double>() : nullptr;
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r)
          for (int64_t n = 0; n < N; ++n) {
            const int64_t i = (m0 + r) * N + n;
            const int64_t acc = int64_t{sums[i]} + (hp ? static_cast<int64_t>(hp[r * N + n]) : 0);
            y[i] = epilogue(a, static_cast<int32_t>(acc), m0 + r, n);
          }
      });
    }
  }
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  out = out.view(sizes);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(infertrix, CPU, m) {
  m.impl("w8a8_linear", &w8a8_linear_cpu);
  m.impl("w8a8_flat_linear", &w8a8_flat_linear_cpu);
}

// No backward: the C++ "not implemented" kernel instead of custom_op's Python autograd wrapper
// (about 10 us per call outside inference_mode; see w4a8_gemm.cpp).
TORCH_LIBRARY_IMPL(infertrix, AutogradCPU, m) {
  m.impl("w8a8_linear", torch::autograd::autogradNotImplementedFallback());
  m.impl("w8a8_flat_linear", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace infertrix
