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
      int32_t s = 0;
      for (int64_t k = 0; k < a.K; ++k) s += static_cast<int32_t>(xr[k]) * wr[k];
      if (a.raw) a.raw[m * a.N + n] = s;
      else a.y[m * a.N + n] = epilogue(a, s, m, n);
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

// The block functions per ISA for run_row_blocks and run_row_tiles (row_blocks.h).
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
// clamp(round(x * mult[0]), -127, 127) with the calibrated 1 / step, then the F flattened
// channels' codes again with their own multiplier (1 / (step * copies)). No max search over the
// row: one pass instead of quantize_row_int8's two, and no per-channel array of size K to read.
// Clamping before rounding gives the reference's round-then-clamp result for the bounds +-127.
// The weight keeps the float layer's [N, K] rows, so the W8A8 blocks stream it as they stream
// w8a8_linear's; a flattened channel's extra copies carry its code again, and their products,
// (extra * code) * column, are one int32 correction per output, added to the block's sum before
// the epilogue (integer sums: exact in any order). The correction multiplies int16 pairs
// (vpdpwssd: two channels' columns by their int16 multipliers) over tiles of 16 outputs that lie
// one after another: with one vpmulld per channel and 16 outputs over [F, N] columns (F streams
// at once) it took 6.6 us a layer at 4 rows (SmolLM2, AMD EPYC, cold), a sixth of the layer. Each
// tile is finished (correction, epilogue) right after its blocks, on their thread (run_row_tiles),
// its columns asked for one tile ahead: no second pass over the sums.

// The copies' correction of a call: r [M, 2P] int16 multipliers (extra * code, 0 past F), cols
// [ceil(N / 16), P, 16, 2] the flattened channels' weight columns in tiles of 16 outputs.
struct Flat {
  const int16_t* r;
  const int8_t* cols;
  int64_t P;
};
static_assert(kRowTile == 16, "a tile of run_row_tiles must be one 16-output tile of flat_columns");

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

// Outputs [n0, n1) of one tile of kRowTile = 16 (n0 % 16 == 0), every row: the blocks' sums plus
// the copies' correction, sum_p r[m, 2p] cols[n / 16, p, n % 16, 0] + r[m, 2p + 1] cols[n / 16, p, n % 16, 1]
// (the tile's P pairs one 32-byte line half after another), then the epilogue's operations in its
// order (mul, mul, add: no FMA) into a.y.
INFERTRIX_TARGET_AVX512 void flat_tile_avx512(const Flat& f, const Args& a, int64_t n0, int64_t n1) {
  const __mmask16 k = first_lanes(n1 - n0);
  const int8_t* tile = f.cols + (n0 / 16) * f.P * 32;
  const __m512 s1 = _mm512_maskz_loadu_ps(k, a.s1 + n0);
  const __m512 bias = a.bias ? _mm512_maskz_loadu_ps(k, a.bias + n0) : _mm512_setzero_ps();
  for (int64_t m = 0; m < a.M; ++m) {
    // two chains of multiply-adds (one would wait out vpdpwssd's latency P times); int32: exact
    const int16_t* r = f.r + m * 2 * f.P;
    const auto term = [&](__m512i acc, int64_t p) INFERTRIX_TARGET_AVX512 {
      int32_t pair;
      std::memcpy(&pair, r + 2 * p, sizeof(pair));
      const __m512i c = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + p * 32)));
      return _mm512_dpwssd_epi32(acc, c, _mm512_set1_epi32(pair));
    };
    __m512i even = _mm512_maskz_loadu_epi32(k, a.raw + m * a.N + n0), odd = _mm512_setzero_si512();
    int64_t p = 0;
    for (; p + 1 < f.P; p += 2) {
      even = term(even, p);
      odd = term(odd, p + 1);
    }
    if (p < f.P) even = term(even, p);
    const __m512i sum = _mm512_add_epi32(even, odd);
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(a.sx[m]));
    y = _mm512_mul_ps(y, s1);
    if (a.bias) y = _mm512_add_ps(y, bias);
    _mm512_mask_storeu_ps(a.y + m * a.N + n0, k, y);
  }
}
#endif

// One row's codes into q: the K channels at mult[0], then the F flattened at their own, whose int16
// multipliers extra * code go to r [2P] (0 past F).
template <typename T>
void flat_row(Isa isa, const T* x, const float* mult, const int64_t* index, int64_t F, int64_t P, int64_t K,
              int8_t* q, int16_t* r) {
  bool done = false;
#if INFERTRIX_X86
  if constexpr (std::is_same_v<T, float>) {
    if (isa == Isa::Avx512Vnni) {
      flat_row_avx512(x, mult[0], K, q);
      done = true;
    }
  }
#endif
  if (!done) flat_row_scalar(x, mult[0], K, q);
  for (int64_t f = 0; f < 2 * P; ++f) {
    if (f >= F) {
      r[f] = 0;
      continue;
    }
    const int64_t c = index[f];
    q[c] = flat_code(static_cast<float>(x[c]), mult[1 + f]);
    r[f] = static_cast<int16_t>(index[F + f] * q[c]);  // |extra| <= kMaxExtra: fits
  }
}

// One tile's outputs [n0, n1), every row: correction and epilogue (see flat_tile_avx512).
void flat_tile(Isa isa, const Flat& f, const Args& a, int64_t n0, int64_t n1) {
#if INFERTRIX_X86
  if (isa == Isa::Avx512Vnni) return flat_tile_avx512(f, a, n0, n1);
#endif
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* c = f.cols + ((n / 16) * f.P * 16 + n % 16) * 2;  // pair p at c + p * 32
      const int16_t* r = f.r + m * 2 * f.P;
      int32_t acc = a.raw[m * a.N + n];
      for (int64_t p = 0; p < f.P; ++p) acc += r[2 * p] * c[p * 32] + r[2 * p + 1] * c[p * 32 + 1];
      a.y[m * a.N + n] = epilogue(a, acc, m, n);
    }
}

// What tile t's flat_tile reads besides the sums (its columns, scales, bias), asked for ahead: short
// and cold in a decode step (no stream for the hardware prefetcher to learn before they end).
void prefetch_tile(const Flat& f, const Args& a, int64_t t) {
#if INFERTRIX_X86
  const int64_t n0 = t * 16;
  if (n0 >= a.N) return;
  const int8_t* tile = f.cols + t * f.P * 32;
  for (int64_t i = 0; i < f.P * 32; i += 64) _mm_prefetch(reinterpret_cast<const char*>(tile + i), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(a.s1 + n0), _MM_HINT_T0);
  if (a.bias) _mm_prefetch(reinterpret_cast<const char*>(a.bias + n0), _MM_HINT_T0);
#else
  (void)f, (void)a, (void)t;
#endif
}

constexpr int64_t kMaxExtra = 32767 / 127;  // extra copies whose multiplier extra * code fits int16

void check_flat(const at::Tensor& qweight, const at::Tensor& act_scale, const at::Tensor& mult,
                const at::Tensor& index, const at::Tensor& cols) {
  const int64_t N = qweight.size(0), K = qweight.size(1);
  const int64_t F = index.dim() == 2 ? index.size(1) : -1;
  TORCH_CHECK(act_scale.scalar_type() == at::kFloat && act_scale.numel() == 1,
              "w8a8_flat_linear: act_scale must be float32 [1]");
  TORCH_CHECK(index.scalar_type() == at::kLong && F >= 0 && index.size(0) == 2 && cols.scalar_type() == at::kChar &&
                  cols.dim() == 4 && cols.size(0) == (N + 15) / 16 && cols.size(1) == (F + 1) / 2 &&
                  cols.size(2) == 16 && cols.size(3) == 2 && mult.scalar_type() == at::kFloat && mult.dim() == 1 &&
                  mult.size(0) == 1 + F,
              "w8a8_flat_linear: F flattened channels need int64 flat_index [2, F], int8 flat_columns [",
              (N + 15) / 16, ", ceil(F / 2), 16, 2] and float32 mult [1 + F]; got flat_index ", index.scalar_type(), " ",
              index.sizes(),
              ", flat_columns ", cols.scalar_type(), " ", cols.sizes(), ", mult ", mult.scalar_type(), " ",
              mult.sizes());
  const int64_t* ip = index.const_data_ptr<int64_t>();
  int64_t width = K;
  for (int64_t f = 0; f < F; ++f) {
    TORCH_CHECK(ip[f] >= (f > 0 ? ip[f - 1] + 1 : 0) && ip[f] < K, "w8a8_flat_linear: flat_index[0] must hold "
                "increasing channels in [0, ", K, "), holds ", ip[f], " at ", f);
    TORCH_CHECK(ip[F + f] >= 0 && ip[F + f] <= kMaxExtra, "w8a8_flat_linear: flat_index[1] (copies beyond the "
                "first) must be in [0, ", kMaxExtra, "], holds ", ip[F + f]);
    width += ip[F + f];
  }
  TORCH_CHECK(width <= kMaxK, "w8a8_flat_linear: ", width, " flattened input channels could overflow the int32 sum");
}

at::Tensor w8a8_flat_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                const at::Tensor& act_scale, const at::Tensor& mult_in, const at::Tensor& index_in,
                                const at::Tensor& cols_in, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "w8a8_flat_linear expects float32, bfloat16 or float16 activations, got ", x.scalar_type());
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2,
              "w8a8_flat_linear expects an int8 weight [N, K], got ", qweight.scalar_type(), " ", qweight.sizes());
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "w8a8_flat_linear: x [..., ", x.size(-1), "] needs a weight [N, ",
              x.size(-1), "]; got ", qweight.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == N,
              "w8a8_flat_linear: scale must be float32 [", N, "], got ", scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N), "w8a8_flat_linear: bias must be [", N, "]");
  const at::Tensor mult = mult_in.contiguous(), index = index_in.contiguous(), cols = cols_in.contiguous();
  check_flat(qweight, act_scale, mult, index, cols);
  const at::Tensor x2 = x.reshape({-1, K}).contiguous(), wc = qweight.contiguous(), sc = scale.contiguous();
  at::Tensor b;
  if (bias) b = bias->to(at::kFloat).contiguous();
  const int64_t M = x2.size(0), F = index.size(1), P = cols.size(1);
  auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const Isa isa = active_isa();
  thread_local Activations buffers;
  thread_local std::vector<int32_t> sum_buffer;
  thread_local std::vector<int16_t> multipliers;
  Activations& act = buffers;
  std::vector<int32_t>& sums = sum_buffer;
  std::vector<int16_t>& r = multipliers;
  act.x.resize(M * K);
  act.sx.assign(M, *act_scale.const_data_ptr<float>());
  sums.resize(M * N);
  r.resize(M * 2 * P);
  int8_t* xq = act.x.data();
  const float* mp = mult.const_data_ptr<float>();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  with_float_data(x2, "w8a8_flat_linear", [&](const auto* xp) {
    at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) flat_row(isa, xp + m * K, mp, ip, F, P, K, xq + m * K, r.data() + m * 2 * P);
    });
  });
  // the blocks leave the int32 sums; each tile of 16 outputs is finished (the copies' correction, the
  // epilogue) right after its blocks, on their thread, while the sums are hot
  Args a{xq, act.sx.data(), M, K, N, wc.const_data_ptr<int8_t>(), sc.const_data_ptr<float>(),
         b.defined() ? b.const_data_ptr<float>() : nullptr, out.data_ptr<float>(), sums.data()};
  const Flat fl{r.data(), cols.const_data_ptr<int8_t>(), P};
  const auto tile = [&](int64_t n0, int64_t n1) {
    prefetch_tile(fl, a, n0 / kRowTile + 1);
    flat_tile(isa, fl, a, n0, n1);
  };
  prefetch_tile(fl, a, 0);
  if (M > kMaxRows) {  // at::_int_mm's sums (compute-bound here), then the tiles
    multiply(a, wc, isa);
    at::parallel_for(0, (N + kRowTile - 1) / kRowTile, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) tile(t * kRowTile, std::min(N, (t + 1) * kRowTile));
    });
  } else {
    run_row_tiles(a, M, N, K, isa, &block_scalar, kAvx512Blocks, kAvx2Blocks, tile);
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
