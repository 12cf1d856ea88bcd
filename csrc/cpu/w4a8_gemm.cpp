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
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_isa.h"

// The epilogue must be mul, mul, add exactly as in the reference: forbid FMA contraction.
#pragma GCC optimize("fp-contract=off")

namespace infertrix {
namespace {

constexpr int kPanel = 16;  // output channels per panel
constexpr int kStep = 8;    // input channels per 64-byte step

struct Problem {
  int64_t M, N, K, Kp, S, P, G, steps_per_group;
  const int8_t* x;        // [M, Kp]
  const int32_t* rowsum;  // [M, G]
  const uint8_t* w;       // [P, S, 64]
  const uint8_t* s2;      // [G, 16 P]
  const uint8_t* z;       // [G, 16 P] or nullptr (symmetric: z = 8)
  // epilogue: float output when out_f is set, else int32 into out_i
  const float* sx;    // [M]
  const float* s1;    // [N]
  const float* bias;  // [N] or nullptr
  float* out_f;
  int32_t* out_i;
};

inline int64_t group_end(const Problem& p, int64_t g) {
  return std::min<int64_t>((g + 1) * p.steps_per_group, p.S);
}

// Write one row of 16 (or fewer, at the N tail) int32 accumulators through the epilogue.
inline void store_row_scalar(const Problem& p, int64_t m, int64_t n0, const int32_t* acc, int64_t cols) {
  if (p.out_f) {
    for (int64_t c = 0; c < cols; ++c) {
      float y = static_cast<float>(acc[c]) * p.sx[m];
      y = y * p.s1[n0 + c];
      if (p.bias) y = y + p.bias[n0 + c];
      p.out_f[m * p.N + n0 + c] = y;
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
// ---------------------------------------------------------------- AVX-512 VNNI
// MR rows x NB panels per tile; the weights of the NB panels are unpacked once per step and used
// for all MR rows. With one row, the low- and high-nibble products go to separate accumulators so
// that eight independent vpdpbusd chains hide the instruction's latency.
template <int MR, int NB>
INFERTRIX_TARGET_AVX512 void tile_avx512(const Problem& p, int64_t panel0, int64_t m0) {
  constexpr bool kSplit = MR == 1;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  __m512i acc[MR][NB];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NB; ++c) acc[r][c] = _mm512_setzero_si512();
  const uint8_t* wbase = p.w + panel0 * p.S * 64;
  const int64_t pstride = p.S * 64;
  for (int64_t g = 0; g < p.G; ++g) {
    __m512i part[MR][NB], part2[kSplit ? NB : 1];
    for (int r = 0; r < MR; ++r)
      for (int c = 0; c < NB; ++c) part[r][c] = _mm512_setzero_si512();
    if (kSplit)
      for (int c = 0; c < NB; ++c) part2[c] = _mm512_setzero_si512();
    const int64_t s_end = group_end(p, g);
    for (int64_t s = g * p.steps_per_group; s < s_end; ++s) {
      __m512i wl[NB], wh[NB];
      for (int c = 0; c < NB; ++c) {
        const __m512i v = _mm512_loadu_si512(wbase + c * pstride + s * 64);
        wl[c] = _mm512_and_si512(v, nib);
        wh[c] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
      }
      for (int r = 0; r < MR; ++r) {
        const int8_t* xs = p.x + (m0 + r) * p.Kp + s * kStep;
        int32_t lo, hi;
        std::memcpy(&lo, xs, 4);
        std::memcpy(&hi, xs + 4, 4);
        const __m512i xl = _mm512_set1_epi32(lo), xh = _mm512_set1_epi32(hi);
        for (int c = 0; c < NB; ++c) {
          part[r][c] = _mm512_dpbusd_epi32(part[r][c], wl[c], xl);
          if (kSplit)
            part2[c] = _mm512_dpbusd_epi32(part2[c], wh[c], xh);
          else
            part[r][c] = _mm512_dpbusd_epi32(part[r][c], wh[c], xh);
        }
      }
    }
    // acc += s2 * (part - z * S)
    for (int c = 0; c < NB; ++c) {
      const int64_t col = g * p.P * kPanel + (panel0 + c) * kPanel;
      const __m512i s2 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.s2 + col)));
      __m512i z = _mm512_set1_epi32(8);
      if (p.z) z = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.z + col)));
      for (int r = 0; r < MR; ++r) {
        __m512i t = part[r][c];
        if (kSplit) t = _mm512_add_epi32(t, part2[c]);
        const __m512i S = _mm512_set1_epi32(p.rowsum[(m0 + r) * p.G + g]);
        t = _mm512_sub_epi32(t, _mm512_mullo_epi32(z, S));
        acc[r][c] = _mm512_add_epi32(acc[r][c], _mm512_mullo_epi32(t, s2));
      }
    }
  }
  for (int c = 0; c < NB; ++c) {
    const int64_t n0 = (panel0 + c) * kPanel;
    const int64_t cols = std::min<int64_t>(kPanel, p.N - n0);
    const __mmask16 mask = cols == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << cols) - 1u);
    for (int r = 0; r < MR; ++r) {
      const int64_t m = m0 + r;
      if (p.out_f) {
        __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][c]), _mm512_set1_ps(p.sx[m]));
        y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(mask, p.s1 + n0));
        if (p.bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, p.bias + n0));
        _mm512_mask_storeu_ps(p.out_f + m * p.N + n0, mask, y);
      } else {
        _mm512_mask_storeu_epi32(p.out_i + m * p.N + n0, mask, acc[r][c]);
      }
    }
  }
}

template <int MR>
void tile_avx512_nb(const Problem& p, int64_t panel0, int nb, int64_t m0) {
  switch (nb) {
    case 4: return tile_avx512<MR, 4>(p, panel0, m0);
    case 3: return tile_avx512<MR, 3>(p, panel0, m0);
    case 2: return tile_avx512<MR, 2>(p, panel0, m0);
    default: return tile_avx512<MR, 1>(p, panel0, m0);
  }
}

void chunk_avx512(const Problem& p, int64_t panel_begin, int64_t panel_end) {
  for (int64_t panel = panel_begin; panel < panel_end; panel += 4) {
    const int nb = static_cast<int>(std::min<int64_t>(4, panel_end - panel));
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) tile_avx512_nb<4>(p, panel, nb, m);
    for (; m < p.M; ++m) tile_avx512_nb<1>(p, panel, nb, m);
  }
}

// ---------------------------------------------------------------- AVX2
// One panel (two 8-channel halves) x MR rows. vpmaddubsw(u8 code, s8 activation) gives 16-bit
// pair sums (at most 2 * 15 * 127, no saturation since activations never reach -128), the low-
// and high-nibble results are added in 16 bits (at most 7620), and vpmaddwd with ones widens them.
template <int MR>
INFERTRIX_TARGET_AVX2 void tile_avx2(const Problem& p, int64_t panel, int64_t m0) {
  const __m256i nib = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const uint8_t* wbase = p.w + panel * p.S * 64;
  for (int64_t g = 0; g < p.G; ++g) {
    __m256i part[MR][2];
    for (int r = 0; r < MR; ++r) part[r][0] = part[r][1] = _mm256_setzero_si256();
    const int64_t s_end = group_end(p, g);
    for (int64_t s = g * p.steps_per_group; s < s_end; ++s) {
      __m256i wl[2], wh[2];
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wbase + s * 64 + 32 * h));
        wl[h] = _mm256_and_si256(v, nib);
        wh[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
      }
      for (int r = 0; r < MR; ++r) {
        const int8_t* xs = p.x + (m0 + r) * p.Kp + s * kStep;
        int32_t lo, hi;
        std::memcpy(&lo, xs, 4);
        std::memcpy(&hi, xs + 4, 4);
        const __m256i xl = _mm256_set1_epi32(lo), xh = _mm256_set1_epi32(hi);
        for (int h = 0; h < 2; ++h) {
          const __m256i t16 = _mm256_add_epi16(_mm256_maddubs_epi16(wl[h], xl), _mm256_maddubs_epi16(wh[h], xh));
          part[r][h] = _mm256_add_epi32(part[r][h], _mm256_madd_epi16(t16, ones));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t col = g * p.P * kPanel + panel * kPanel + 8 * h;
      const __m256i s2 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.s2 + col)));
      __m256i z = _mm256_set1_epi32(8);
      if (p.z) z = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p.z + col)));
      for (int r = 0; r < MR; ++r) {
        const __m256i S = _mm256_set1_epi32(p.rowsum[(m0 + r) * p.G + g]);
        const __m256i t = _mm256_sub_epi32(part[r][h], _mm256_mullo_epi32(z, S));
        acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_mullo_epi32(t, s2));
      }
    }
  }
  const int64_t n0 = panel * kPanel;
  const int64_t cols = std::min<int64_t>(kPanel, p.N - n0);
  for (int r = 0; r < MR; ++r) {
    const int64_t m = m0 + r;
    if (cols == kPanel && p.out_f) {
      const __m256 sx = _mm256_set1_ps(p.sx[m]);
      for (int h = 0; h < 2; ++h) {
        __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][h]), sx);
        y = _mm256_mul_ps(y, _mm256_loadu_ps(p.s1 + n0 + 8 * h));
        if (p.bias) y = _mm256_add_ps(y, _mm256_loadu_ps(p.bias + n0 + 8 * h));
        _mm256_storeu_ps(p.out_f + m * p.N + n0 + 8 * h, y);
      }
    } else {
      alignas(32) int32_t tmp[kPanel];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), acc[r][0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 8), acc[r][1]);
      store_row_scalar(p, m, n0, tmp, cols);
    }
  }
}

void chunk_avx2(const Problem& p, int64_t panel_begin, int64_t panel_end) {
  for (int64_t panel = panel_begin; panel < panel_end; ++panel) {
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) tile_avx2<4>(p, panel, m);
    for (; m < p.M; ++m) tile_avx2<1>(p, panel, m);
  }
}
#endif

// ---------------------------------------------------------------- driver
void check_weights(const at::Tensor& qweight, const at::Tensor& group_scale, const c10::optional<at::Tensor>& zero,
                   int64_t N, int64_t K, int64_t group_size, int64_t* P, int64_t* S, int64_t* G, int64_t* spg) {
  TORCH_CHECK(K > 0, "w4a8: in_features must be positive, got ", K);
  TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % kStep == 0),
              "w4a8: group_size must be -1 (per channel) or a positive multiple of 8, got ", group_size);
  *P = (N + kPanel - 1) / kPanel;
  *S = (K + kStep - 1) / kStep;
  *spg = group_size == -1 ? *S : group_size / kStep;
  *G = (*S + *spg - 1) / *spg;
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 3 && qweight.size(0) == *P &&
                  qweight.size(1) == *S && qweight.size(2) == 64,
              "w4a8: qweight must be uint8 [", *P, ", ", *S, ", 64] (infertrix.ops.w4a8.pack_int4), got ",
              qweight.scalar_type(), " ", qweight.sizes());
  TORCH_CHECK(group_scale.scalar_type() == at::kByte && group_scale.dim() == 2 && group_scale.size(0) == *G &&
                  group_scale.size(1) == *P * kPanel,
              "w4a8: group_scale must be uint8 [", *G, ", ", *P * kPanel, "], got ", group_scale.scalar_type(), " ",
              group_scale.sizes());
  if (zero.has_value())
    TORCH_CHECK(zero->scalar_type() == at::kByte && zero->sizes() == group_scale.sizes(),
                "w4a8: zero must be uint8 with group_scale's shape ", group_scale.sizes(), ", got ",
                zero->scalar_type(), " ", zero->sizes());
}

// Runs the kernel on int8 activations x_q [M, K]; fills out_f (float epilogue) or out_i.
void run(const at::Tensor& x_q_in, const at::Tensor& qweight_in, const at::Tensor& group_scale_in,
         const c10::optional<at::Tensor>& zero_in, int64_t N, int64_t K, int64_t group_size, const float* sx,
         const float* s1, const float* bias, float* out_f, int32_t* out_i) {
  Problem p{};
  check_weights(qweight_in, group_scale_in, zero_in, N, K, group_size, &p.P, &p.S, &p.G, &p.steps_per_group);
  p.M = x_q_in.size(0);
  p.N = N;
  p.K = K;
  p.Kp = p.S * kStep;
  if (p.M == 0) return;
  at::Tensor x_q = x_q_in.contiguous();
  if (p.Kp != K) x_q = at::constant_pad_nd(x_q, {0, p.Kp - K}, 0);  // zero activations in the padding
  const at::Tensor qweight = qweight_in.contiguous();
  const at::Tensor group_scale = group_scale_in.contiguous();
  at::Tensor zero;
  if (zero_in.has_value()) zero = zero_in->contiguous();
  // Activation sums per row and group: the zero-point compensation term, shared by all channels.
  at::Tensor rowsum = at::empty({p.M, p.G}, x_q.options().dtype(at::kInt));
  {
    const int8_t* xp = x_q.data_ptr<int8_t>();
    int32_t* rp = rowsum.data_ptr<int32_t>();
    const int64_t gk = p.steps_per_group * kStep;
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t g = 0; g < p.G; ++g) {
        int32_t t = 0;
        const int64_t e = std::min<int64_t>((g + 1) * gk, p.Kp);
        for (int64_t k = g * gk; k < e; ++k) t += xp[m * p.Kp + k];
        rp[m * p.G + g] = t;
      }
  }
  p.x = x_q.data_ptr<int8_t>();
  p.rowsum = rowsum.data_ptr<int32_t>();
  p.w = qweight.data_ptr<uint8_t>();
  p.s2 = group_scale.data_ptr<uint8_t>();
  p.z = zero.defined() ? zero.data_ptr<uint8_t>() : nullptr;
  p.sx = sx;
  p.s1 = s1;
  p.bias = bias;
  p.out_f = out_f;
  p.out_i = out_i;
  const Isa isa = active_isa();
  // Chunks of 4 panels (64 output channels) are the unit of work split across threads.
  const int64_t chunks = (p.P + 3) / 4;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const int64_t pb = begin * 4, pe = std::min<int64_t>(end * 4, p.P);
#if INFERTRIX_X86
    if (isa == Isa::Avx512Vnni) return chunk_avx512(p, pb, pe);
    if (isa == Isa::Avx2) return chunk_avx2(p, pb, pe);
#endif
    chunk_scalar(p, pb, pe);
  });
}

at::Tensor w4a8_matmul_int32_cpu(const at::Tensor& x_q, const at::Tensor& qweight, const at::Tensor& group_scale,
                                 const c10::optional<at::Tensor>& zero, int64_t in_features, int64_t out_features,
                                 int64_t group_size) {
  TORCH_CHECK(x_q.scalar_type() == at::kChar && x_q.dim() == 2 && x_q.size(1) == in_features,
              "w4a8_matmul_int32: x_q must be int8 [M, ", in_features, "], got ", x_q.scalar_type(), " ",
              x_q.sizes());
  auto out = at::empty({x_q.size(0), out_features}, x_q.options().dtype(at::kInt));
  run(x_q, qweight, group_scale, zero, out_features, in_features, group_size, nullptr, nullptr, nullptr, nullptr,
      out.data_ptr<int32_t>());
  return out;
}

at::Tensor w4a8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const at::Tensor& group_scale, const c10::optional<at::Tensor>& zero,
                           int64_t in_features, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "w4a8_linear: expected float32, bfloat16 or float16 activations, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "w4a8_linear: last dimension of x must be in_features=",
              in_features, ", got shape ", x.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1,
              "w4a8_linear: scale must be a float32 vector [out_features], got ", scale.scalar_type(), " ",
              scale.sizes());
  const int64_t N = scale.size(0);
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "w4a8_linear: bias must be [", N, "], got ", bias->sizes());
    b = bias->to(at::kFloat).contiguous();
  }
  const at::Tensor x2 = x.reshape({-1, in_features});
  // Per-token int8 activations: the existing infertrix op (its compiled kernel when loaded).
  static auto quantize = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("infertrix::quantize_per_token_int8", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  // Below autograd (this kernel already runs there): the quantize op's CPU kernel, or its reference.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [x_q, sx] = quantize.call(x2);
  const at::Tensor s1 = scale.contiguous();
  const at::Tensor sxc = sx.contiguous();
  auto out = at::empty({x2.size(0), N}, x.options().dtype(at::kFloat));
  run(x_q, qweight, group_scale, zero, N, in_features, group_size, sxc.data_ptr<float>(), s1.data_ptr<float>(),
      b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr<float>(), nullptr);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  out = out.view(sizes);
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(infertrix, CPU, m) {
  m.impl("w4a8_matmul_int32", &w4a8_matmul_int32_cpu);
  m.impl("w4a8_linear", &w4a8_linear_cpu);
}

// Autograd: torch.library.custom_op puts a Python autograd kernel in front of every call, about
// 10 us per call outside inference_mode (2 ms per SmolLM2 decode step over 211 layers). These ops
// have no backward, so the C++ "not implemented" kernel takes its place for CPU tensors: same
// result (a backward through them raises), no Python on the way. Registered for AutogradCPU, which
// takes precedence over the alias key Autograd that the Python kernel sits on (no override).
TORCH_LIBRARY_IMPL(infertrix, AutogradCPU, m) {
  m.impl("w4a8_matmul_int32", torch::autograd::autogradNotImplementedFallback());
  m.impl("w4a8_linear", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace infertrix
