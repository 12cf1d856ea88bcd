// kivi_decode_attention: one decode step of attention over KIVI codes (see
// src/infertrix/ops/kivi_attention.py for the reference and the layouts).
//
// Per (batch row, KV head), the G query heads of its GQA group share every read of the codes:
//   keys   (per channel, blocks of T tokens): score_t = sum_d (q_d s_bd) c_dt + sum_d q_d z_bd
//   values (per token, groups of vg channels): out_c = sum_t (p_t s_tj) c_tc + sum_t p_t z_tj
// then the full-precision residual. Softmax over all scores is ATen's (vectorised, accurate exp).
// Paths: AVX-512 (16 bytes of codes -> 16 lanes per load, one accumulator per code position in a
// byte and query head, put back in order after the loop) and scalar (AVX2 CPUs use it too); both
// agree with the reference to float32 rounding (the sums are reassociated).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_isa.h"

namespace infertrix {
namespace {

// Query heads per KV head, head dim, key blocks, tokens per key block, quantized / residual / all
// tokens, channels per value group.
struct Layout {
  int64_t G, D, nblk, T, Sq, R, S, vg;
};

template <int BITS>
inline float code_at(const uint8_t* p, int64_t i) {
  constexpr int per = 8 / BITS;
  return static_cast<float>((p[i / per] >> (BITS * (i % per))) & ((1 << BITS) - 1));
}

// scores[g][t] for the quantized tokens: q [G, D] already multiplied by the softmax scaling.
template <int BITS>
void key_scores_scalar(const float* q, const uint8_t* kc, const float* ks, const float* kz,
                       const Layout& m, float* scores) {
  const int64_t Tb = m.T * BITS / 8;
  std::vector<float> qs(m.D);
  for (int64_t blk = 0; blk < m.nblk; ++blk) {
    const float* s = ks + blk * m.D;
    const float* z = kz + blk * m.D;
    for (int64_t g = 0; g < m.G; ++g) {
      const float* qg = q + g * m.D;
      float c = 0.f;
      for (int64_t d = 0; d < m.D; ++d) {
        qs[d] = qg[d] * s[d];
        c += qg[d] * z[d];
      }
      float* out = scores + g * m.S + blk * m.T;
      std::fill(out, out + m.T, c);
      for (int64_t d = 0; d < m.D; ++d) {
        const uint8_t* row = kc + (blk * m.D + d) * Tb;
        for (int64_t t = 0; t < m.T; ++t) out[t] += qs[d] * code_at<BITS>(row, t);
      }
    }
  }
}

// acc[g][c] += sum_t (p_gt s_tj) code_tc and zacc[g][j] += sum_t p_gt z_tj over the quantized tokens.
template <int BITS>
void value_sums_scalar(const float* p, const uint8_t* vc, const float* vs, const float* vz,
                       const Layout& m, float* acc, float* zacc) {
  const int64_t Db = m.D * BITS / 8, ngrp = m.D / m.vg;
  for (int64_t t = 0; t < m.Sq; ++t) {
    const uint8_t* row = vc + t * Db;
    for (int64_t g = 0; g < m.G; ++g) {
      const float w = p[g * m.S + t];
      for (int64_t j = 0; j < ngrp; ++j) {
        const float ws = w * vs[t * ngrp + j];
        zacc[g * ngrp + j] += w * vz[t * ngrp + j];
        float* a = acc + g * m.D + j * m.vg;
        for (int64_t c = 0; c < m.vg; ++c) a[c] += ws * code_at<BITS>(row, j * m.vg + c);
      }
    }
  }
}

#if INFERTRIX_X86
// The bytes [p, p + n) (n <= 16) as 16 int32 lanes, zero past n (a masked load reads nothing there).
INFERTRIX_TARGET_AVX512 inline __m512i load_bytes16(const uint8_t* p, int64_t n) {
  const __mmask16 live = n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
  return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, p));
}

// Code k of each lane's byte as floats: lane i holds element i * PER + k of the 16 bytes.
template <int BITS>
INFERTRIX_TARGET_AVX512 inline __m512 lane_codes(__m512i bytes, int k) {
  const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(bytes, _mm512_set1_epi32(k * BITS)),
                                     _mm512_set1_epi32((1 << BITS) - 1));
  return _mm512_cvtepi32_ps(q);
}

constexpr int64_t kTile = 4;  // query heads per tile: PER * kTile accumulators stay in registers

// Writes (or adds, for values) NG heads' accumulators, stored in tmp[k][j][16], in element order:
// lane i of code position k is element i * PER + k of the unit's nb bytes.
template <int PER, int NG, bool ADD>
inline void scatter_tile(const float* tmp, int64_t nb, float* out, int64_t out_stride) {
  for (int j = 0; j < NG; ++j) {
    float* o = out + j * out_stride;
    for (int64_t i = 0; i < nb; ++i)
      for (int k = 0; k < PER; ++k) {
        const float x = tmp[(k * NG + j) * 16 + i];
        if constexpr (ADD) o[i * PER + k] += x;
        else o[i * PER + k] = x;
      }
  }
}

// sum_d a[d] * b[d] in 16 partial sums (the serial sum would wait on each add's latency).
INFERTRIX_TARGET_AVX512 inline float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 live = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(live, a + i), _mm512_maskz_loadu_ps(live, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Keys, one 16-byte unit (16 * PER tokens) of a block for NG heads: sum over channels d of
// qs[j][d] * code[d][token], starting from c[j]; the unit's row of channel d is at codes + d * stride.
template <int BITS, int NG>
INFERTRIX_TARGET_AVX512 void key_tile(const uint8_t* codes, int64_t stride, int64_t nb, int64_t D,
                                      const float* qs, const float* c, float* out, int64_t out_stride) {
  constexpr int PER = 8 / BITS;
  __m512 acc[PER][NG];
  for (int k = 0; k < PER; ++k)
    for (int j = 0; j < NG; ++j) acc[k][j] = _mm512_set1_ps(c[j]);
  for (int64_t d = 0; d < D; ++d) {
    const __m512i bytes = load_bytes16(codes + d * stride, nb);
    for (int k = 0; k < PER; ++k) {
      const __m512 code = lane_codes<BITS>(bytes, k);
      for (int j = 0; j < NG; ++j) acc[k][j] = _mm512_fmadd_ps(_mm512_set1_ps(qs[j * D + d]), code, acc[k][j]);
    }
  }
  alignas(64) float tmp[PER * NG * 16];
  for (int k = 0; k < PER; ++k)
    for (int j = 0; j < NG; ++j) _mm512_store_ps(tmp + (k * NG + j) * 16, acc[k][j]);
  scatter_tile<PER, NG, false>(tmp, nb, out, out_stride);
}

// Values, one 16-byte unit (16 * PER channels) of a group for NG heads: sum over tokens t of
// w[j * w_stride + t] * code[t][channel]; token t's unit is at codes + t * stride.
template <int BITS, int NG>
INFERTRIX_TARGET_AVX512 void value_tile(const uint8_t* codes, int64_t stride, int64_t nb, int64_t Sq,
                                        const float* w, int64_t w_stride, float* out, int64_t out_stride) {
  constexpr int PER = 8 / BITS;
  __m512 acc[PER][NG];
  for (int k = 0; k < PER; ++k)
    for (int j = 0; j < NG; ++j) acc[k][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < Sq; ++t) {
    const __m512i bytes = load_bytes16(codes + t * stride, nb);
    for (int k = 0; k < PER; ++k) {
      const __m512 code = lane_codes<BITS>(bytes, k);
      for (int j = 0; j < NG; ++j) acc[k][j] = _mm512_fmadd_ps(_mm512_set1_ps(w[j * w_stride + t]), code, acc[k][j]);
    }
  }
  alignas(64) float tmp[PER * NG * 16];
  for (int k = 0; k < PER; ++k)
    for (int j = 0; j < NG; ++j) _mm512_store_ps(tmp + (k * NG + j) * 16, acc[k][j]);
  scatter_tile<PER, NG, true>(tmp, nb, out, out_stride);
}

template <int BITS>
INFERTRIX_TARGET_AVX512 void key_scores_avx512(const float* q, const uint8_t* kc, const float* ks,
                                               const float* kz, const Layout& m, float* scores) {
  const int64_t Tb = m.T * BITS / 8;
  std::vector<float> qs(m.G * m.D), c(m.G);
  for (int64_t blk = 0; blk < m.nblk; ++blk) {
    const float* s = ks + blk * m.D;
    const float* z = kz + blk * m.D;
    for (int64_t g = 0; g < m.G; ++g) {
      for (int64_t d = 0; d < m.D; ++d) qs[g * m.D + d] = q[g * m.D + d] * s[d];
      c[g] = dot_avx512(q + g * m.D, z, m.D);
    }
    for (int64_t u = 0; u < Tb; u += 16) {
      const int64_t nb = std::min<int64_t>(16, Tb - u);
      const uint8_t* codes = kc + blk * m.D * Tb + u;
      for (int64_t g0 = 0; g0 < m.G; g0 += kTile) {
        const float* qg = qs.data() + g0 * m.D;
        float* out = scores + g0 * m.S + blk * m.T + u * (8 / BITS);
        switch (std::min(kTile, m.G - g0)) {
          case 1: key_tile<BITS, 1>(codes, Tb, nb, m.D, qg, &c[g0], out, m.S); break;
          case 2: key_tile<BITS, 2>(codes, Tb, nb, m.D, qg, &c[g0], out, m.S); break;
          case 3: key_tile<BITS, 3>(codes, Tb, nb, m.D, qg, &c[g0], out, m.S); break;
          default: key_tile<BITS, 4>(codes, Tb, nb, m.D, qg, &c[g0], out, m.S);
        }
      }
    }
  }
}

template <int BITS>
INFERTRIX_TARGET_AVX512 void value_sums_avx512(const float* p, const uint8_t* vc, const float* vs,
                                               const float* vz, const Layout& m, float* acc_out,
                                               float* zacc) {
  const int64_t Db = m.D * BITS / 8, ngrp = m.D / m.vg, gb = m.vg * BITS / 8;
  // w[g][j][t] = p[g][t] * scale[t][j] and zacc[g][j] = sum_t p[g][t] * zero[t][j], 16 tokens at a
  // time (the scales of a group are strided: gathered once, used by every head)
  std::vector<float> w(m.G * ngrp * m.Sq);
  std::vector<float> zsum(m.G * 16);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t j = 0; j < ngrp; ++j) {
    std::fill(zsum.begin(), zsum.end(), 0.f);
    for (int64_t t0 = 0; t0 < m.Sq; t0 += 16) {
      const __mmask16 live = m.Sq - t0 >= 16 ? static_cast<__mmask16>(0xFFFF)
                                             : static_cast<__mmask16>((1u << (m.Sq - t0)) - 1);
      const __m512i idx = _mm512_mullo_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(t0)),
                                             _mm512_set1_epi32(static_cast<int>(ngrp)));
      const __m512 sv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idx, vs + j, 4);
      const __m512 zv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idx, vz + j, 4);
      for (int64_t g = 0; g < m.G; ++g) {
        const __m512 pv = _mm512_maskz_loadu_ps(live, p + g * m.S + t0);
        _mm512_mask_storeu_ps(w.data() + (g * ngrp + j) * m.Sq + t0, live, _mm512_mul_ps(pv, sv));
        float* zg = zsum.data() + g * 16;
        _mm512_storeu_ps(zg, _mm512_fmadd_ps(pv, zv, _mm512_loadu_ps(zg)));
      }
    }
    for (int64_t g = 0; g < m.G; ++g) zacc[g * ngrp + j] += _mm512_reduce_add_ps(_mm512_loadu_ps(zsum.data() + g * 16));
  }
  for (int64_t j = 0; j < ngrp; ++j) {
    for (int64_t u = 0; u < gb; u += 16) {
      const int64_t nb = std::min<int64_t>(16, gb - u);
      const uint8_t* codes = vc + j * gb + u;
      for (int64_t g0 = 0; g0 < m.G; g0 += kTile) {
        const float* wg = w.data() + (g0 * ngrp + j) * m.Sq;
        const int64_t ws = ngrp * m.Sq;  // from one head's weights to the next
        float* out = acc_out + g0 * m.D + j * m.vg + u * (8 / BITS);
        switch (std::min(kTile, m.G - g0)) {
          case 1: value_tile<BITS, 1>(codes, Db, nb, m.Sq, wg, ws, out, m.D); break;
          case 2: value_tile<BITS, 2>(codes, Db, nb, m.Sq, wg, ws, out, m.D); break;
          case 3: value_tile<BITS, 3>(codes, Db, nb, m.Sq, wg, ws, out, m.D); break;
          default: value_tile<BITS, 4>(codes, Db, nb, m.Sq, wg, ws, out, m.D);
        }
      }
    }
  }
}
#endif

template <int BITS>
void key_scores(bool avx512, const float* q, const uint8_t* kc, const float* ks, const float* kz,
                const Layout& m, float* scores) {
#if INFERTRIX_X86
  if (avx512) return key_scores_avx512<BITS>(q, kc, ks, kz, m, scores);
#endif
  key_scores_scalar<BITS>(q, kc, ks, kz, m, scores);
}

template <int BITS>
void value_sums(bool avx512, const float* p, const uint8_t* vc, const float* vs, const float* vz,
                const Layout& m, float* acc, float* zacc) {
#if INFERTRIX_X86
  if (avx512) return value_sums_avx512<BITS>(p, vc, vs, vz, m, acc, zacc);
#endif
  value_sums_scalar<BITS>(p, vc, vs, vz, m, acc, zacc);
}

at::Tensor kivi_decode_attention_cpu(const at::Tensor& query_in, const at::Tensor& kc_in,
                                     const at::Tensor& ks_in, const at::Tensor& kz_in,
                                     const at::Tensor& vc_in, const at::Tensor& vs_in,
                                     const at::Tensor& vz_in, const at::Tensor& keys_in,
                                     const at::Tensor& values_in, const std::optional<at::Tensor>& mask_in,
                                     int64_t bits, double scaling) {
  TORCH_CHECK(bits == 2 || bits == 4, "kivi_decode_attention supports bits=2 or 4, got ", bits);
  TORCH_CHECK(query_in.dim() == 3 && kc_in.dim() == 5 && vc_in.dim() == 4 && keys_in.dim() == 4 &&
                  values_in.dim() == 4,
              "kivi_decode_attention expects query [B, H_q, D], key codes [B, H, S/G, D, G*bits/8], value "
              "codes [B, H, S, D*bits/8] and residual [B, H, R, D], got ",
              query_in.sizes(), ", ", kc_in.sizes(), ", ", vc_in.sizes(), ", ", keys_in.sizes());
  TORCH_CHECK(kc_in.scalar_type() == at::kByte && vc_in.scalar_type() == at::kByte,
              "kivi_decode_attention expects uint8 codes");
  const int64_t B = query_in.size(0), Hq = query_in.size(1), D = query_in.size(2);
  const int64_t H = kc_in.size(1);
  Layout m{};
  m.D = D;
  m.nblk = kc_in.size(2);
  m.T = kc_in.size(4) * 8 / bits;
  m.Sq = vc_in.size(2);
  m.R = keys_in.size(2);
  m.S = m.Sq + m.R;
  TORCH_CHECK(H > 0 && Hq % H == 0, "kivi_decode_attention: ", Hq, " query heads for ", H, " KV heads");
  m.G = Hq / H;
  TORCH_CHECK(kc_in.size(0) == B && kc_in.size(3) == D && m.nblk * m.T == m.Sq && vc_in.size(0) == B &&
                  vc_in.size(1) == H && vc_in.size(3) * 8 / bits == D && keys_in.size(0) == B &&
                  keys_in.size(1) == H && keys_in.size(3) == D && values_in.sizes() == keys_in.sizes(),
              "kivi_decode_attention: key codes ", kc_in.sizes(), ", value codes ", vc_in.sizes(),
              " and residual ", keys_in.sizes(), " do not match query ", query_in.sizes());
  const int64_t ngrp = vs_in.size(-1);
  TORCH_CHECK(ngrp > 0 && D % ngrp == 0 && vs_in.numel() == B * H * m.Sq * ngrp &&
                  ks_in.numel() == B * H * m.nblk * D && kz_in.numel() == ks_in.numel() &&
                  vz_in.numel() == vs_in.numel(),
              "kivi_decode_attention: scales/zeros do not match the codes");
  m.vg = D / ngrp;
  const at::Tensor q = (query_in.to(at::kFloat) * scaling).contiguous();
  const at::Tensor kc = kc_in.contiguous(), vc = vc_in.contiguous();
  const at::Tensor ks = ks_in.to(at::kFloat).contiguous(), kz = kz_in.to(at::kFloat).contiguous();
  const at::Tensor vs = vs_in.to(at::kFloat).contiguous(), vz = vz_in.to(at::kFloat).contiguous();
  const at::Tensor rk = keys_in.to(at::kFloat).contiguous(), rv = values_in.to(at::kFloat).contiguous();
  at::Tensor mask;
  if (mask_in.has_value()) {
    mask = mask_in->to(at::kFloat).contiguous();
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == m.S,
                "kivi_decode_attention: mask must be [B, S] = [", B, ", ", m.S, "], got ", mask_in->sizes());
  }
  const bool avx512 = active_isa() == Isa::Avx512Vnni;
  const int64_t Tb = m.T * bits / 8, Db = D * bits / 8;

  at::Tensor scores = at::empty({B, Hq, m.S}, q.options());
  const float* qp = q.const_data_ptr<float>();
  const float* rkp = rk.const_data_ptr<float>();
  const float* rvp = rv.const_data_ptr<float>();
  const float* mp = mask.defined() ? mask.const_data_ptr<float>() : nullptr;
  float* sp = scores.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const float* qg = qp + bh * m.G * D;  // the G query heads of KV head bh are consecutive
      float* out = sp + bh * m.G * m.S;
      const auto key = [&](auto bits_tag) {
        constexpr int BITS = decltype(bits_tag)::value;
        key_scores<BITS>(avx512, qg, kc.const_data_ptr<uint8_t>() + bh * m.nblk * D * Tb,
                         ks.const_data_ptr<float>() + bh * m.nblk * D, kz.const_data_ptr<float>() + bh * m.nblk * D,
                         m, out);
      };
      if (bits == 4) key(std::integral_constant<int, 4>{});
      else key(std::integral_constant<int, 2>{});
      for (int64_t g = 0; g < m.G; ++g) {
        for (int64_t t = 0; t < m.R; ++t) {
          const float* k = rkp + (bh * m.R + t) * D;
          float a = 0.f;
          for (int64_t d = 0; d < D; ++d) a += qg[g * D + d] * k[d];
          out[g * m.S + m.Sq + t] = a;
        }
        if (mp != nullptr) {
          const float* mrow = mp + (bh / H) * m.S;
          for (int64_t t = 0; t < m.S; ++t) out[g * m.S + t] += mrow[t];
        }
      }
    }
  });
  const at::Tensor probs = at::softmax(scores, -1);

  at::Tensor result = at::empty({B, Hq, D}, q.options());
  const float* pp = probs.const_data_ptr<float>();
  float* op = result.data_ptr<float>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> zacc(m.G * ngrp);
    for (int64_t bh = begin; bh < end; ++bh) {
      const float* p = pp + bh * m.G * m.S;
      float* acc = op + bh * m.G * D;
      std::fill(acc, acc + m.G * D, 0.f);
      std::fill(zacc.begin(), zacc.end(), 0.f);
      const auto val = [&](auto bits_tag) {
        constexpr int BITS = decltype(bits_tag)::value;
        value_sums<BITS>(avx512, p, vc.const_data_ptr<uint8_t>() + bh * m.Sq * Db,
                         vs.const_data_ptr<float>() + bh * m.Sq * ngrp, vz.const_data_ptr<float>() + bh * m.Sq * ngrp,
                         m, acc, zacc.data());
      };
      if (bits == 4) val(std::integral_constant<int, 4>{});
      else val(std::integral_constant<int, 2>{});
      for (int64_t g = 0; g < m.G; ++g) {
        float* a = acc + g * D;
        for (int64_t d = 0; d < D; ++d) a[d] += zacc[g * ngrp + d / m.vg];
        for (int64_t t = 0; t < m.R; ++t) {
          const float w = p[g * m.S + m.Sq + t];
          const float* v = rvp + (bh * m.R + t) * D;
          for (int64_t d = 0; d < D; ++d) a[d] += w * v[d];
        }
      }
    }
  });
  return result.to(query_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(infertrix, CPU, m) { m.impl("kivi_decode_attention", &kivi_decode_attention_cpu); }

}  // namespace infertrix
