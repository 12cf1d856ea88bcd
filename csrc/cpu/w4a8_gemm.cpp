// infertrix::w4a8_matmul_int32 and infertrix::w4a8_linear on the CPU: int8 per-token activations
// times 4-bit weights with two-level scales (QServe/QoQ, Lin et al. 2024; QQQ, Zhang et al. 2024).
//
// Weights w[n, k] ~= s1[n] * s2[g, n] * (q[n, k] - z[g, n]), with q, z in 0..15 (symmetric: z = 8),
// s1 a float per output channel and s2 a small unsigned integer per group. Because s2 is an
// integer, the whole K dimension accumulates in int32:
//
//   acc[m, n] = sum_g s2[g, n] * (sum_{k in g} x[m, k] * q[n, k]  -  z[g, n] * S[m, g])
//   S[m, g]   = sum_{k in g} x[m, k]                  (the activation row sum of the group)
//   y[m, n]   = (float(acc[m, n]) * sx[m]) * s1[n]  (+ bias[n])
//
// vpdpbusd multiplies UNSIGNED bytes by SIGNED bytes: the 4-bit codes q (0..15) are the unsigned
// operand and the int8 activations the signed one, so the usual +128 shift of signed activations
// is not needed; the zero point (8 for symmetric weights) is the compensation, subtracted once per
// group as z * S. Integer sums are exact in any order, so every ISA path returns the same int32
// values as the PyTorch reference (src/infertrix/ops/w4a8.py), and the float epilogue performs the
// same IEEE operations in the same order (no FMA contraction), so float outputs match bit for bit.
//
// Packed layout (built once when a W4A8Linear is created; see ops/w4a8.py `pack_int4`):
//   qweight uint8 [P, S, 64], P = ceil(N / 16) panels of 16 output channels, S = ceil(K / 8)
//   steps of 8 input channels. Byte 4*c + j of qweight[p, s] holds, for channel n = 16 p + c,
//   q[n, 8 s + j] in its low nibble and q[n, 8 s + 4 + j] in its high nibble. So one 64-byte load
//   gives, after a mask and a shift, two registers of 16 channels x 4 consecutive k: exactly the
//   operand of one vpdpbusd each (AVX2: two 32-byte halves of 8 channels, vpmaddubsw + vpmaddwd).
//   group_scale / zero: uint8 [G, 16 P] (group-major, so 16 consecutive channels load at once).
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#include "quantize_per_token.h"

// The epilogue must be mul, mul, add exactly as in the reference: forbid FMA contraction.
#pragma GCC optimize("fp-contract=off")

namespace infertrix {
namespace {

constexpr int kPanel = 16;  // output channels per panel
constexpr int kStep = 8;    // input channels per 64-byte step
// 64-byte steps prefetched ahead per panel stream (16 KiB). 32 (2 KiB) was the best of 8/16/32/64 on
// the cold 4096^2 row on the AMD EPYC; on the Intel Xeon, SmolLM2 W4A8 engine decode (1 thread, 4
// interleaved pairs of runs) went 90 -> 98 tok/s at batch 1 and 245 -> 262 at batch 4 with 256
// (every pair faster; 512 no better). Not re-measured on the AMD EPYC.
constexpr int kPrefetchSteps = 256;

struct Problem {
  int64_t M, N, K, Kp, S, P, G, steps_per_group;
  const int8_t* x;        // [M, Kp], zero-padded
  const int32_t* rowsum;  // [M, G]
  const uint8_t* w;       // [P, S, 64]
  const uint8_t* s2;      // [G, 16 P]
  const uint8_t* z;       // [G, 16 P] or nullptr (symmetric: z = 8)
  // epilogue: float output when out_f is set, else int32 into out_i
  const float* sx;    // [M]
  const float* s1;    // [N]
  const float* bias;  // [N] or nullptr
  float* out_f;       // row m, channel n at out_f[m * ldo + n - n_base]
  int64_t ldo, n_base;
  int32_t* out_i;
};

inline int64_t group_end(const Problem& p, int64_t g) {
  return std::min<int64_t>((g + 1) * p.steps_per_group, p.S);
}

// Write `cols` int32 accumulators of row m, channels n0.., through the epilogue.
inline void store_row_scalar(const Problem& p, int64_t m, int64_t n0, const int32_t* acc, int64_t cols) {
  if (p.out_f) {
    for (int64_t c = 0; c < cols; ++c) {
      float y = static_cast<float>(acc[c]) * p.sx[m];
      y = y * p.s1[n0 + c];
      if (p.bias) y = y + p.bias[n0 + c];
      p.out_f[m * p.ldo + n0 + c - p.n_base] = y;
    }
  } else {
    std::memcpy(p.out_i + m * p.N + n0, acc, cols * sizeof(int32_t));
  }
}

// ---------------------------------------------------------------- scalar
void panel_scalar(const Problem& p, int64_t panel, int64_t m) {
  int32_t acc[kPanel] = {0};
  const int8_t* x = p.x + m * p.Kp;
  for (int64_t g = 0; g < p.G; ++g) {
    int32_t part[kPanel] = {0};
    for (int64_t s = g * p.steps_per_group; s < group_end(p, g); ++s) {
      const uint8_t* blk = p.w + (panel * p.S + s) * 64;
      const int8_t* xs = x + s * kStep;
      for (int c = 0; c < kPanel; ++c) {
        int32_t t = 0;
        for (int j = 0; j < 4; ++j) {
          const uint8_t b = blk[4 * c + j];
          t += static_cast<int32_t>(b & 0x0F) * xs[j] + static_cast<int32_t>(b >> 4) * xs[4 + j];
        }
        part[c] += t;
      }
    }
    const int32_t S = p.rowsum[m * p.G + g];
    const uint8_t* s2 = p.s2 + g * p.P * kPanel + panel * kPanel;
    const uint8_t* z = p.z ? p.z + g * p.P * kPanel + panel * kPanel : nullptr;
    for (int c = 0; c < kPanel; ++c) acc[c] += static_cast<int32_t>(s2[c]) * (part[c] - (z ? z[c] : 8) * S);
  }
  const int64_t n0 = panel * kPanel;
  store_row_scalar(p, m, n0, acc, std::min<int64_t>(kPanel, p.N - n0));
}

void chunk_scalar(const Problem& p, int64_t panel_begin, int64_t panel_end) {
  for (int64_t panel = panel_begin; panel < panel_end; ++panel)
    for (int64_t m = 0; m < p.M; ++m) panel_scalar(p, panel, m);
}

#if INFERTRIX_X86
// Each vector type V gives the tile loop (w4a8_tile.inc) these operations on int32 lanes:
//   kLanes channels per vector, kVectors vectors per tile; zero(), set1(int32), add, sub, mullo;
//   load_codes(p, lo, hi): the low and high nibbles of kLanes x 4 bytes at p (one vector each);
//   dot(acc, w, x): acc + per-lane sum of 4 products u8 code x s8 activation;
//   dot2(acc, wl, xl, wh, xh) = dot(dot(acc, wl, xl), wh, xh); load_u8(p): kLanes bytes widened;
//   store(p, acc, m, n, cols): the epilogue for cols <= kLanes channels of row m from channel n.

// ---------------------------------------------------------------- AVX-512 VNNI: vpdpbusd
namespace avx512 {
#define W4A8_TARGET INFERTRIX_TARGET_AVX512
struct V {
  using I = __m512i;
  static constexpr int kLanes = 16;   // one panel per vector
  static constexpr int kVectors = 4;  // 64 channels per tile
  W4A8_TARGET static I zero() { return _mm512_setzero_si512(); }
  W4A8_TARGET static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  W4A8_TARGET static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  W4A8_TARGET static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  W4A8_TARGET static I mullo(I a, I b) { return _mm512_mullo_epi32(a, b); }
  W4A8_TARGET static void load_codes(const uint8_t* p, I& lo, I& hi) {
    const I v = _mm512_loadu_si512(p), nib = _mm512_set1_epi8(0x0F);
    lo = _mm512_and_si512(v, nib);
    hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
  }
  W4A8_TARGET static I dot(I acc, I w, I x) { return _mm512_dpbusd_epi32(acc, w, x); }
  W4A8_TARGET static I dot2(I acc, I wl, I xl, I wh, I xh) { return dot(dot(acc, wl, xl), wh, xh); }
  W4A8_TARGET static I load_u8(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  W4A8_TARGET static void store(const Problem& p, I acc, int64_t m, int64_t n, int64_t cols) {
    const __mmask16 mask = first_lanes(cols);
    if (!p.out_f) return _mm512_mask_storeu_epi32(p.out_i + m * p.N + n, mask, acc);
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(p.sx[m]));
    y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(mask, p.s1 + n));
    if (p.bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, p.bias + n));
    _mm512_mask_storeu_ps(p.out_f + m * p.ldo + n - p.n_base, mask, y);
  }
};
#include "w4a8_tile.inc"
#undef W4A8_TARGET
}  // namespace avx512

// ---------------------------------------------------------------- AVX2: vpmaddubsw + vpmaddwd
// vpmaddubsw(u8 code, s8 activation) gives 16-bit pair sums (at most 2 * 15 * 127, no saturation
// since activations never reach -128); dot2 adds the low- and high-nibble results in 16 bits (at
// most 7620) before vpmaddwd with ones widens them.
namespace avx2 {
#define W4A8_TARGET INFERTRIX_TARGET_AVX2
struct V {
  using I = __m256i;
  static constexpr int kLanes = 8;    // half a panel per vector
  static constexpr int kVectors = 2;  // one panel per tile (16 registers)
  W4A8_TARGET static I zero() { return _mm256_setzero_si256(); }
  W4A8_TARGET static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  W4A8_TARGET static I add(I a, I b) { return _mm256_add_epi32(a, b); }
  W4A8_TARGET static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  W4A8_TARGET static I mullo(I a, I b) { return _mm256_mullo_epi32(a, b); }
  W4A8_TARGET static void load_codes(const uint8_t* p, I& lo, I& hi) {
    const I v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), nib = _mm256_set1_epi8(0x0F);
    lo = _mm256_and_si256(v, nib);
    hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
  }
  W4A8_TARGET static I widen(I t16) { return _mm256_madd_epi16(t16, _mm256_set1_epi16(1)); }
  W4A8_TARGET static I dot(I acc, I w, I x) { return add(acc, widen(_mm256_maddubs_epi16(w, x))); }
  W4A8_TARGET static I dot2(I acc, I wl, I xl, I wh, I xh) {
    return add(acc, widen(_mm256_add_epi16(_mm256_maddubs_epi16(wl, xl), _mm256_maddubs_epi16(wh, xh))));
  }
  W4A8_TARGET static I load_u8(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  }
  W4A8_TARGET static void store(const Problem& p, I acc, int64_t m, int64_t n, int64_t cols) {
    if (cols == kLanes && p.out_f) {
      __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(p.sx[m]));
      y = _mm256_mul_ps(y, _mm256_loadu_ps(p.s1 + n));
      if (p.bias) y = _mm256_add_ps(y, _mm256_loadu_ps(p.bias + n));
      return _mm256_storeu_ps(p.out_f + m * p.ldo + n - p.n_base, y);
    }
    alignas(32) int32_t tmp[kLanes];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), acc);
    store_row_scalar(p, m, n, tmp, cols);
  }
};
#include "w4a8_tile.inc"
#undef W4A8_TARGET
}  // namespace avx2
#endif

// ---------------------------------------------------------------- driver
void check_weights(const at::Tensor& qweight, const at::Tensor& group_scale, const c10::optional<at::Tensor>& zero,
                   int64_t N, int64_t K, int64_t group_size, Problem& p) {
  TORCH_CHECK(K > 0, "w4a8: in_features must be positive, got ", K);
  TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % kStep == 0),
              "w4a8: group_size must be -1 (per channel) or a positive multiple of 8, got ", group_size);
  p.N = N;
  p.K = K;
  p.P = (N + kPanel - 1) / kPanel;
  p.S = (K + kStep - 1) / kStep;
  p.Kp = p.S * kStep;
  p.steps_per_group = group_size == -1 ? p.S : group_size / kStep;
  p.G = (p.S + p.steps_per_group - 1) / p.steps_per_group;
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 3 && qweight.size(0) == p.P &&
                  qweight.size(1) == p.S && qweight.size(2) == 64 && qweight.is_contiguous(),
              "w4a8: qweight must be contiguous uint8 [", p.P, ", ", p.S, ", 64] (infertrix.ops.w4a8.pack_int4), got ",
              qweight.scalar_type(), " ", qweight.sizes());
  TORCH_CHECK(group_scale.scalar_type() == at::kByte && group_scale.dim() == 2 && group_scale.size(0) == p.G &&
                  group_scale.size(1) == p.P * kPanel && group_scale.is_contiguous(),
              "w4a8: group_scale must be contiguous uint8 [", p.G, ", ", p.P * kPanel, "], got ",
              group_scale.scalar_type(), " ", group_scale.sizes());
  if (zero.has_value())
    TORCH_CHECK(zero->scalar_type() == at::kByte && zero->sizes() == group_scale.sizes() && zero->is_contiguous(),
                "w4a8: zero must be contiguous uint8 with group_scale's shape ", group_scale.sizes(), ", got ",
                zero->scalar_type(), " ", zero->sizes());
  p.w = qweight.data_ptr<uint8_t>();
  p.s2 = group_scale.data_ptr<uint8_t>();
  p.z = zero.has_value() ? zero->data_ptr<uint8_t>() : nullptr;
}

// Activations in the kernel's form, per calling thread and reused across calls, so a decode
// step allocates nothing here: int8 rows padded to Kp with zeros, their scales, group sums.
struct Activations {
  std::vector<int8_t> x;
  std::vector<float> sx;
  std::vector<int32_t> rowsum;
};

// Fills a.x[m] (padding included) through `fill(m, row)`, then the group sums, in parallel over rows.
template <class Fill>
void prepare_activations(Problem& p, Activations& a, Fill&& fill) {
  a.x.resize(p.M * p.Kp);
  a.rowsum.resize(p.M * p.G);
  const int64_t gk = p.steps_per_group * kStep;
  at::parallel_for(0, p.M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      int8_t* row = a.x.data() + m * p.Kp;
      fill(m, row);
      std::memset(row + p.K, 0, p.Kp - p.K);
      for (int64_t g = 0; g < p.G; ++g) {
        int32_t t = 0;
        for (int64_t k = g * gk, e = std::min<int64_t>(k + gk, p.Kp); k < e; ++k) t += row[k];
        a.rowsum[m * p.G + g] = t;
      }
    }
  });
  p.x = a.x.data();
  p.rowsum = a.rowsum.data();
}

// Output panels [pb, pe) on the active ISA.
void panels(const Problem& p, Isa isa, int64_t pb, int64_t pe) {
#if INFERTRIX_X86
  if (isa == Isa::Avx512Vnni) return avx512::chunk(p, pb, pe);
  if (isa == Isa::Avx2) return avx2::chunk(p, pb, pe);
#endif
  chunk_scalar(p, pb, pe);
}

constexpr int64_t kChunkPanels = 4;  // 64 channels: the unit of work of one thread
constexpr int64_t kChunk = kChunkPanels * kPanel;

// Chunks per parallel task: a call too small to repay waking a second thread stays on one.
int64_t chunk_grain(const Problem& p) {
  constexpr int64_t kMinWorkPerThread = 1 << 19;  // multiply-adds (~20 us of one core at M = 1)
  const int64_t chunk_work = kChunk * p.Kp * std::min<int64_t>(p.M, 16);
  return std::max<int64_t>(1, kMinWorkPerThread / chunk_work);
}

// Runs the kernel over all output panels, split across threads in chunks of 4 panels (64 channels).
void run(const Problem& p) {
  if (p.M == 0) return;
  const Isa isa = active_isa();
  const int64_t chunks = (p.P + kChunkPanels - 1) / kChunkPanels;
  at::parallel_for(0, chunks, chunk_grain(p), [&](int64_t begin, int64_t end) {
    panels(p, isa, begin * kChunkPanels, std::min<int64_t>(end * kChunkPanels, p.P));
  });
}

// torch.argmax's order on floats: larger wins, NaN beats any number, ties keep the earlier index.
inline bool beats(float v, float best) { return v > best || (std::isnan(v) && !std::isnan(best)); }

// Each row's argmax over the N outputs without writing them: every 64-channel chunk computes its
// outputs (the same bits as `run`) into a small per-thread buffer and keeps each row's best; the
// chunks' bests are then combined in chunk order, so ties go to the lowest index at any thread count.
void run_argmax(const Problem& p, int64_t* out) {
  if (p.M == 0) return;
  const Isa isa = active_isa();
  const int64_t chunks = (p.P + kChunkPanels - 1) / kChunkPanels;
  std::vector<float> best(chunks * p.M);
  std::vector<int64_t> where(chunks * p.M);
  at::parallel_for(0, chunks, chunk_grain(p), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(p.M * kChunk);
    Problem q = p;
    q.out_f = buf.data();
    q.ldo = kChunk;
    for (int64_t c = begin; c < end; ++c) {
      q.n_base = c * kChunk;
      panels(q, isa, c * kChunkPanels, std::min<int64_t>((c + 1) * kChunkPanels, p.P));
      const int64_t cols = std::min<int64_t>(kChunk, p.N - q.n_base);
      for (int64_t m = 0; m < p.M; ++m) {
        const float* y = buf.data() + m * kChunk;
        int64_t j = 0;
        for (int64_t i = 1; i < cols; ++i)
          if (beats(y[i], y[j])) j = i;
        best[c * p.M + m] = y[j];
        where[c * p.M + m] = q.n_base + j;
      }
    }
  });
  for (int64_t m = 0; m < p.M; ++m) {
    int64_t c_best = 0;
    for (int64_t c = 1; c < chunks; ++c)
      if (beats(best[c * p.M + m], best[c_best * p.M + m])) c_best = c;
    out[m] = where[c_best * p.M + m];
  }
}

at::Tensor w4a8_matmul_int32_cpu(const at::Tensor& x_q_in, const at::Tensor& qweight, const at::Tensor& group_scale,
                                 const c10::optional<at::Tensor>& zero, int64_t in_features, int64_t out_features,
                                 int64_t group_size) {
  TORCH_CHECK(x_q_in.scalar_type() == at::kChar && x_q_in.dim() == 2 && x_q_in.size(1) == in_features,
              "w4a8_matmul_int32: x_q must be int8 [M, ", in_features, "], got ", x_q_in.scalar_type(), " ",
              x_q_in.sizes());
  Problem p{};
  check_weights(qweight, group_scale, zero, out_features, in_features, group_size, p);
  p.M = x_q_in.size(0);
  const at::Tensor x_q = x_q_in.contiguous();
  const int8_t* xp = x_q.data_ptr<int8_t>();
  thread_local Activations buffers;
  prepare_activations(p, buffers, [&](int64_t m, int8_t* row) { std::memcpy(row, xp + m * p.K, p.K); });
  auto out = at::empty({p.M, out_features}, x_q.options().dtype(at::kInt));
  p.out_i = out.data_ptr<int32_t>();
  run(p);
  return out;
}

// Checks the arguments and quantizes x's rows (infertrix::quantize_per_token_int8's definition)
// straight into the kernel's padded buffer, with their group sums; returns x as [M, K].
at::Tensor prepare_linear(const char* name, const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                          const at::Tensor& group_scale, const c10::optional<at::Tensor>& zero, int64_t in_features,
                          int64_t group_size, const c10::optional<at::Tensor>& bias, Problem& p, at::Tensor& b) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              name, ": expected float32, bfloat16 or float16 activations, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, name, ": last dimension of x must be in_features=",
              in_features, ", got shape ", x.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.is_contiguous(),
              name, ": scale must be a contiguous float32 vector [out_features], got ", scale.scalar_type(), " ",
              scale.sizes());
  const int64_t N = scale.size(0);
  check_weights(qweight, group_scale, zero, N, in_features, group_size, p);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, name, ": bias must be [", N, "], got ", bias->sizes());
    b = bias->to(at::kFloat).contiguous();
    p.bias = b.data_ptr<float>();
  }
  const at::Tensor x2 = x.reshape({-1, in_features}).contiguous();
  p.M = x2.size(0);
  thread_local Activations buffers;
  Activations& act = buffers;  // the calling thread's (the row loop may run on other threads)
  act.sx.resize(p.M);
  float* sx = act.sx.data();
  const Isa isa = active_isa();
  with_float_data(x2, name, [&](const auto* xp) {
    prepare_activations(p, act, [&](int64_t m, int8_t* row) {
      quantize_row_int8(isa, xp + m * in_features, in_features, row, sx + m);
    });
  });
  p.sx = sx;
  p.s1 = scale.data_ptr<float>();
  return x2;
}

at::Tensor w4a8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const at::Tensor& group_scale, const c10::optional<at::Tensor>& zero,
                           int64_t in_features, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  Problem p{};
  at::Tensor b;
  prepare_linear("w4a8_linear", x, qweight, scale, group_scale, zero, in_features, group_size, bias, p, b);
  auto out = at::empty({p.M, p.N}, x.options().dtype(at::kFloat));
  p.out_f = out.data_ptr<float>();
  p.ldo = p.N;
  run(p);
  auto sizes = x.sizes().vec();
  sizes.back() = p.N;
  out = out.view(sizes);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

// Greedy decoding's LM head: each row's argmax of w4a8_linear's float32 outputs (the same bits)
// without materialising them.
at::Tensor w4a8_linear_argmax_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                                  const at::Tensor& group_scale, const c10::optional<at::Tensor>& zero,
                                  int64_t in_features, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  Problem p{};
  at::Tensor b;
  prepare_linear("w4a8_linear_argmax", x, qweight, scale, group_scale, zero, in_features, group_size, bias, p, b);
  TORCH_CHECK(p.N > 0, "w4a8_linear_argmax: no output channels");
  auto out = at::empty({p.M}, x.options().dtype(at::kLong));
  run_argmax(p, out.data_ptr<int64_t>());
  auto sizes = x.sizes().vec();
  sizes.pop_back();
  return out.view(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(infertrix, CPU, m) {
  m.impl("w4a8_matmul_int32", &w4a8_matmul_int32_cpu);
  m.impl("w4a8_linear", &w4a8_linear_cpu);
  m.impl("w4a8_linear_argmax", &w4a8_linear_argmax_cpu);
}

// Autograd: torch.library.custom_op puts a Python autograd kernel in front of every call, about
// 10 us per call outside inference_mode (2 ms per SmolLM2 decode step over 211 layers). These ops
// have no backward, so the C++ "not implemented" kernel takes its place for CPU tensors: same
// result (a backward through them raises), no Python on the way. Registered for AutogradCPU, which
// takes precedence over the alias key Autograd that the Python kernel sits on (no override).
TORCH_LIBRARY_IMPL(infertrix, AutogradCPU, m) {
  m.impl("w4a8_matmul_int32", torch::autograd::autogradNotImplementedFallback());
  m.impl("w4a8_linear", torch::autograd::autogradNotImplementedFallback());
  m.impl("w4a8_linear_argmax", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace infertrix
