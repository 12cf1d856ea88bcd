// kivi_decode_attention: one decode step of attention over KIVI codes (see
// src/infertrix/ops/kivi_attention.py for the reference and the layouts).
//
// Per (batch row, KV head), the G query heads of its GQA group share every read of the codes:
//   keys   (per channel, blocks of T tokens): score_t = sum_d (q_d s_bd) c_dt + sum_d q_d z_bd
//   values (per token, groups of vg channels): out_c = sum_t (p_t s_tj) c_tc + sum_t p_t z_tj
// then the full-precision residual. Softmax over all scores is ATen's (vectorised, accurate exp).
// Work is split over (row, KV head, key block) for the scores and (row, KV head, value groups)
// for the output, so a few KV heads still keep every thread busy.
// Paths: AVX-512 (16 bytes of codes -> 16 lanes per load, one accumulator per code position in a
// byte and query head, put back in order after the loop; rows shorter than 16 bytes share a load)
// and scalar (AVX2 CPUs use it too); both agree with the reference to float32 rounding (the sums
// are reassociated).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_isa.h"

namespace infertrix {
namespace {

// Query heads per KV head, head dim, key blocks, tokens per key block, quantized / residual / all
// tokens, channels per value group, value groups; bytes per key row (one channel of a block), per
// value row (one token) and per value group.
struct Layout {
  int64_t G, D, nblk, T, Sq, R, S, vg, ngrp, Tb, Db, gb;
};

template <int BITS>
inline float code_at(const uint8_t* p, int64_t i) {
  constexpr int per = 8 / BITS;
  return static_cast<float>((p[i / per] >> (BITS * (i % per))) & ((1 << BITS) - 1));
}

// Scores of one key block's T tokens for the G heads (q already scaled): out[g * S + t].
template <int BITS>
void key_block_scalar(const float* q, const uint8_t* kb, const float* s, const float* z, const Layout& m,
                      float* out) {
  for (int64_t g = 0; g < m.G; ++g) {
    const float* qg = q + g * m.D;
    float c = 0.f;
    for (int64_t d = 0; d < m.D; ++d) c += qg[d] * z[d];
    float* o = out + g * m.S;
    std::fill(o, o + m.T, c);
    for (int64_t d = 0; d < m.D; ++d) {
      const float qs = qg[d] * s[d];
      for (int64_t t = 0; t < m.T; ++t) o[t] += qs * code_at<BITS>(kb + d * m.Tb, t);
    }
  }
}

// acc[g][c] += sum_t p[g][t] (scale[t][j] code[t][c] + zero[t][j]) for the channels of groups [j0, j1).
template <int BITS>
void value_groups_scalar(const float* p, const uint8_t* vc, const float* vs, const float* vz, const Layout& m,
                         int64_t j0, int64_t j1, float* acc) {
  for (int64_t t = 0; t < m.Sq; ++t)
    for (int64_t g = 0; g < m.G; ++g) {
      const float w = p[g * m.S + t];
      for (int64_t j = j0; j < j1; ++j) {
        const float ws = w * vs[t * m.ngrp + j], wz = w * vz[t * m.ngrp + j];
        float* a = acc + g * m.D + j * m.vg;
        for (int64_t c = 0; c < m.vg; ++c) a[c] += ws * code_at<BITS>(vc + t * m.Db, j * m.vg + c) + wz;
      }
    }
}

#if INFERTRIX_X86

// The bytes [p, p + n) (n <= 16) as 16 int32 lanes, zero past n (a masked load reads nothing there).
INFERTRIX_TARGET_AVX512 inline __m512i load_bytes16(const uint8_t* p, int64_t n) {
  return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(first_lanes(n), p));
}

// Code k of each lane's byte as floats: lane i holds element i * PER + k of the 16 bytes.
template <int BITS>
INFERTRIX_TARGET_AVX512 inline __m512 lane_codes(__m512i bytes, int k) {
  const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(bytes, _mm512_set1_epi32(k * BITS)),
                                     _mm512_set1_epi32((1 << BITS) - 1));
  return _mm512_cvtepi32_ps(q);
}

// Lane i -> i / row_bytes: which of the rows sharing a 16-byte load lane i belongs to.
INFERTRIX_TARGET_AVX512 inline __m512i row_of_lane(int64_t row_bytes) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  alignas(64) int32_t idx[16];
  _mm512_store_si512(idx, lane);
  for (int32_t& i : idx) i /= static_cast<int32_t>(row_bytes);
  return _mm512_load_si512(idx);
}

// sum_d a[d] * b[d] in 16 partial sums (the serial sum would wait on each add's latency).
INFERTRIX_TARGET_AVX512 inline float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16)
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(first_lanes(n - i), a + i),
                          _mm512_maskz_loadu_ps(first_lanes(n - i), b + i), acc);
  return _mm512_reduce_add_ps(acc);
}

constexpr int64_t kTile = 4;  // query heads per tile: PER * kTile accumulators stay in registers
// Loops over code positions and heads are unrolled before GCC decides where the accumulator
// arrays live: otherwise it stores them to the stack on every iteration.
#define INFERTRIX_UNROLL _Pragma("GCC unroll 16")

// Adds NG heads' accumulators, stored in tmp[k][j][16], to out: lane i of code position k is
// element (i % fold) * PER + k (fold = the row length in bytes when rows share a load, else 16).
template <int PER, int NG>
inline void add_tile(const float* tmp, int64_t nb, int64_t fold, float* out, int64_t out_stride) {
  for (int j = 0; j < NG; ++j) {
    float* o = out + j * out_stride;
    for (int64_t i = 0; i < nb; ++i)
      for (int k = 0; k < PER; ++k) o[(i % fold) * PER + k] += tmp[(k * NG + j) * 16 + i];
  }
}

// acc[k][j] += mult[j] * (code position k of `bytes`): the inner step of the key and value tiles.
template <int BITS, int NG>
INFERTRIX_TARGET_AVX512 __attribute__((always_inline)) inline void fma_codes(__m512 (&acc)[8 / BITS][NG],
                                                                              const __m512i bytes,
                                                                              const __m512 (&mult)[NG]) {
  INFERTRIX_UNROLL
  for (int k = 0; k < 8 / BITS; ++k) {
    const __m512 code = lane_codes<BITS>(bytes, k);
    INFERTRIX_UNROLL
    for (int j = 0; j < NG; ++j) acc[k][j] = _mm512_fmadd_ps(mult[j], code, acc[k][j]);
  }
}

// Adds a tile's accumulators to out (through add_tile's lane order).
template <int PER, int NG>
INFERTRIX_TARGET_AVX512 __attribute__((always_inline)) inline void flush_tile(const __m512 (&acc)[PER][NG], int64_t nb,
                                                                               int64_t fold, float* out,
                                                                               int64_t out_stride) {
  alignas(64) float tmp[PER * NG * 16];
  INFERTRIX_UNROLL
  for (int k = 0; k < PER; ++k)
    INFERTRIX_UNROLL
    for (int j = 0; j < NG; ++j) _mm512_store_ps(tmp + (k * NG + j) * 16, acc[k][j]);
  add_tile<PER, NG>(tmp, nb, fold, out, out_stride);
}

// Keys of one block for NG heads, one 16-byte load at a time: sum over channels d of
// qs[j][d] * code[d][token]. ROWS: several channels' rows (row_bytes each) share a load, lane
// multipliers come from qs by row; else one row per load, from byte `codes` of each row.
template <int BITS, int NG, bool ROWS>
INFERTRIX_TARGET_AVX512 void key_tile(const uint8_t* codes, int64_t row_bytes, int64_t nb, int64_t D,
                                      const float* qs, float* out, int64_t out_stride) {
  constexpr int PER = 8 / BITS;
  const int64_t per_load = ROWS ? 16 / row_bytes : 1;
  const __m512i rows = row_of_lane(ROWS ? row_bytes : 16);
  __m512 acc[PER][NG];
  INFERTRIX_UNROLL
  for (int k = 0; k < PER; ++k)
    INFERTRIX_UNROLL
    for (int j = 0; j < NG; ++j) acc[k][j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += per_load) {
    const int64_t n_rows = std::min(per_load, D - d);
    const __m512i bytes = load_bytes16(codes + d * row_bytes, ROWS ? n_rows * row_bytes : nb);
    __m512 mult[NG];
    INFERTRIX_UNROLL
    for (int j = 0; j < NG; ++j)
      mult[j] = ROWS ? _mm512_permutexvar_ps(rows, _mm512_maskz_loadu_ps(first_lanes(n_rows), qs + j * D + d))
                     : _mm512_set1_ps(qs[j * D + d]);
    fma_codes<BITS, NG>(acc, bytes, mult);
  }
  flush_tile<PER, NG>(acc, ROWS ? 16 : nb, ROWS ? row_bytes : 16, out, out_stride);
}

// Values of groups [j0, j0 + n_groups) for NG heads over every token: sum_t w * code[t][channel].
// ROWS: the groups share each load (w[j][t][r] per group r, lane multipliers by group); else one
// group, w[j][t], and the load is bytes [u, u + nb) of its codes.
template <int BITS, int NG, bool ROWS>
INFERTRIX_TARGET_AVX512 void value_tile(const uint8_t* codes, int64_t row_stride, int64_t nb, int64_t Sq,
                                        const float* w, int64_t w_stride, int64_t n_groups, int64_t group_bytes,
                                        float* out, int64_t out_stride) {
  constexpr int PER = 8 / BITS;
  const __m512i rows = row_of_lane(ROWS ? group_bytes : 16);
  const __mmask16 live = first_lanes(n_groups);
  __m512 acc[PER][NG];
  INFERTRIX_UNROLL
  for (int k = 0; k < PER; ++k)
    INFERTRIX_UNROLL
    for (int j = 0; j < NG; ++j) acc[k][j] = _mm512_setzero_ps();
  for (int64_t t = 0; t < Sq; ++t) {
    const __m512i bytes = load_bytes16(codes + t * row_stride, nb);
    __m512 mult[NG];
    INFERTRIX_UNROLL
    for (int j = 0; j < NG; ++j)
      mult[j] = ROWS ? _mm512_permutexvar_ps(rows, _mm512_maskz_loadu_ps(live, w + j * w_stride + t * n_groups))
                     : _mm512_set1_ps(w[j * w_stride + t]);
    fma_codes<BITS, NG>(acc, bytes, mult);
  }
  flush_tile<PER, NG>(acc, nb, 16, out, out_stride);
}

// Runs tile<NG>(g0, ...) over the G heads in tiles of kTile (NG a compile-time count).
#define INFERTRIX_HEAD_TILES(G, CALL)                     \
  for (int64_t g0 = 0; g0 < (G); g0 += kTile) {          \
    switch (std::min(kTile, (G) - g0)) {                 \
      case 1: CALL(1); break;                            \
      case 2: CALL(2); break;                            \
      case 3: CALL(3); break;                            \
      default: CALL(4);                                  \
    }                                                    \
  }

template <int BITS>
INFERTRIX_TARGET_AVX512 void key_block_avx512(const float* q, const uint8_t* kb, const float* s,
                                              const float* z, const Layout& m, float* out, float* qs) {
  for (int64_t g = 0; g < m.G; ++g) {
    for (int64_t d = 0; d < m.D; ++d) qs[g * m.D + d] = q[g * m.D + d] * s[d];
    std::fill(out + g * m.S, out + g * m.S + m.T, dot_avx512(q + g * m.D, z, m.D));
  }
  constexpr int PER = 8 / BITS;
  if (m.Tb < 16 && 16 % m.Tb == 0) {  // short rows (e.g. 2-bit blocks of 32 tokens): several per load
#define KEY_ROWS(NG) key_tile<BITS, NG, true>(kb, m.Tb, 16, m.D, qs + g0 * m.D, out + g0 * m.S, m.S)
    INFERTRIX_HEAD_TILES(m.G, KEY_ROWS)
#undef KEY_ROWS
    return;
  }
  for (int64_t u = 0; u < m.Tb; u += 16) {
    const int64_t nb = std::min<int64_t>(16, m.Tb - u);
#define KEY_ROW(NG) \
  key_tile<BITS, NG, false>(kb + u, m.Tb, nb, m.D, qs + g0 * m.D, out + g0 * m.S + u * PER, m.S)
    INFERTRIX_HEAD_TILES(m.G, KEY_ROW)
#undef KEY_ROW
  }
}

template <int BITS>
INFERTRIX_TARGET_AVX512 void value_groups_avx512(const float* p, const uint8_t* vc, const float* vs,
                                                 const float* vz, const Layout& m, int64_t j0, int64_t j1,
                                                 float* acc) {
  constexpr int PER = 8 / BITS;
  const int64_t nr = j1 - j0;
  // w[g][t][r] = p[g][t] * scale[t][j0 + r]; the zero terms sum_t p[g][t] * zero[t][j] go straight to
  // acc. 16 tokens at a time: a group's scales and zeros are strided, gathered once for all heads.
  std::vector<float> w(m.G * m.Sq * nr), zpart(m.G * 16);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t j = j0 + r;
    std::fill(zpart.begin(), zpart.end(), 0.f);
    for (int64_t t0 = 0; t0 < m.Sq; t0 += 16) {
      const __mmask16 live = first_lanes(m.Sq - t0);
      const __m512i tok = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(t0)));
      const __m512i idx = _mm512_mullo_epi32(tok, _mm512_set1_epi32(static_cast<int32_t>(m.ngrp)));
      const __m512 sv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idx, vs + j, 4);
      const __m512 zv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idx, vz + j, 4);
      const __m512i at = _mm512_mullo_epi32(tok, _mm512_set1_epi32(static_cast<int32_t>(nr)));
      for (int64_t g = 0; g < m.G; ++g) {
        const __m512 pv = _mm512_maskz_loadu_ps(live, p + g * m.S + t0);
        float* wg = w.data() + g * m.Sq * nr + r;
        if (nr == 1) _mm512_mask_storeu_ps(wg + t0, live, _mm512_mul_ps(pv, sv));
        else _mm512_mask_i32scatter_ps(wg, live, at, _mm512_mul_ps(pv, sv), 4);
        float* zg = zpart.data() + g * 16;
        _mm512_storeu_ps(zg, _mm512_fmadd_ps(pv, zv, _mm512_loadu_ps(zg)));
      }
    }
    for (int64_t g = 0; g < m.G; ++g) {
      const float zs = _mm512_reduce_add_ps(_mm512_loadu_ps(zpart.data() + g * 16));
      float* a = acc + g * m.D + j * m.vg;
      for (int64_t c = 0; c < m.vg; ++c) a[c] += zs;
    }
  }
  if (nr > 1) {  // short groups (e.g. 2-bit groups of 32 channels): nr of them per load
    const uint8_t* codes = vc + j0 * m.gb;
#define VALUE_ROWS(NG)                                                                                   \
  value_tile<BITS, NG, true>(codes, m.Db, nr * m.gb, m.Sq, w.data() + g0 * m.Sq * nr, m.Sq * nr, nr, m.gb, \
                             acc + g0 * m.D + j0 * m.vg, m.D)
    INFERTRIX_HEAD_TILES(m.G, VALUE_ROWS)
#undef VALUE_ROWS
    return;
  }
  for (int64_t u = 0; u < m.gb; u += 16) {
    const int64_t nb = std::min<int64_t>(16, m.gb - u);
    const uint8_t* codes = vc + j0 * m.gb + u;
#define VALUE_ROW(NG)                                                                                   \
  value_tile<BITS, NG, false>(codes, m.Db, nb, m.Sq, w.data() + g0 * m.Sq, m.Sq, 1, m.gb,                \
                              acc + g0 * m.D + j0 * m.vg + u * PER, m.D)
    INFERTRIX_HEAD_TILES(m.G, VALUE_ROW)
#undef VALUE_ROW
  }
}
#undef INFERTRIX_HEAD_TILES
#endif

template <int BITS>
void key_block(bool avx512, const float* q, const uint8_t* kb, const float* s, const float* z, const Layout& m,
               float* out, float* scratch) {
#if INFERTRIX_X86
  if (avx512) return key_block_avx512<BITS>(q, kb, s, z, m, out, scratch);
#endif
  key_block_scalar<BITS>(q, kb, s, z, m, out);
}

template <int BITS>
void value_groups(bool avx512, const float* p, const uint8_t* vc, const float* vs, const float* vz,
                  const Layout& m, int64_t j0, int64_t j1, float* acc) {
#if INFERTRIX_X86
  if (avx512) return value_groups_avx512<BITS>(p, vc, vs, vz, m, j0, j1, acc);
#endif
  value_groups_scalar<BITS>(p, vc, vs, vz, m, j0, j1, acc);
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
  TORCH_CHECK(H > 0 && Hq % H == 0, "kivi_decode_attention: ", Hq, " query heads for ", H, " KV heads");
  Layout m{};
  m.G = Hq / H;
  m.D = D;
  m.nblk = kc_in.size(2);
  m.Tb = kc_in.size(4);
  m.T = m.Tb * 8 / bits;
  m.Sq = vc_in.size(2);
  m.R = keys_in.size(2);
  m.S = m.Sq + m.R;
  m.Db = vc_in.size(3);
  m.ngrp = vs_in.size(-1);
  TORCH_CHECK(kc_in.size(0) == B && kc_in.size(3) == D && m.nblk * m.T == m.Sq && vc_in.size(0) == B &&
                  vc_in.size(1) == H && m.Db * 8 / bits == D && keys_in.size(0) == B && keys_in.size(1) == H &&
                  keys_in.size(3) == D && values_in.sizes() == keys_in.sizes(),
              "kivi_decode_attention: key codes ", kc_in.sizes(), ", value codes ", vc_in.sizes(),
              " and residual ", keys_in.sizes(), " do not match query ", query_in.sizes());
  TORCH_CHECK(m.ngrp > 0 && D % m.ngrp == 0 && (D / m.ngrp) % (8 / bits) == 0 &&
                  vs_in.numel() == B * H * m.Sq * m.ngrp && ks_in.numel() == B * H * m.nblk * D &&
                  kz_in.numel() == ks_in.numel() && vz_in.numel() == vs_in.numel(),
              "kivi_decode_attention: scales/zeros do not match the codes");
  m.vg = D / m.ngrp;
  m.gb = m.vg * bits / 8;
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
  const float* qp = q.const_data_ptr<float>();
  const uint8_t* kcp = kc.const_data_ptr<uint8_t>();
  const uint8_t* vcp = vc.const_data_ptr<uint8_t>();
  const float *ksp = ks.const_data_ptr<float>(), *kzp = kz.const_data_ptr<float>();
  const float *vsp = vs.const_data_ptr<float>(), *vzp = vz.const_data_ptr<float>();
  const float *rkp = rk.const_data_ptr<float>(), *rvp = rv.const_data_ptr<float>();
  const float* mp = mask.defined() ? mask.const_data_ptr<float>() : nullptr;

  // scores [B, H, G, S]: task (row and KV head, key block or, last, the residual window)
  at::Tensor scores = at::empty({B, Hq, m.S}, q.options());
  float* sp = scores.data_ptr<float>();
  const int64_t parts = m.nblk + 1;
  at::parallel_for(0, B * H * parts, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(m.G * D);  // q times a block's key scales
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / parts, blk = i % parts;
      const float* qg = qp + bh * m.G * D;  // the G query heads of KV head bh are consecutive
      const int64_t t0 = blk * m.T, n = blk < m.nblk ? m.T : m.R;
      float* out = sp + bh * m.G * m.S + t0;
      if (blk < m.nblk) {
        const int64_t kblk = bh * m.nblk + blk;
        const uint8_t* kb = kcp + kblk * D * m.Tb;
        if (bits == 4) key_block<4>(avx512, qg, kb, ksp + kblk * D, kzp + kblk * D, m, out, qs.data());
        else key_block<2>(avx512, qg, kb, ksp + kblk * D, kzp + kblk * D, m, out, qs.data());
      } else {
        for (int64_t g = 0; g < m.G; ++g)
          for (int64_t t = 0; t < m.R; ++t) {
            const float* k = rkp + (bh * m.R + t) * D;
            float a = 0.f;
            for (int64_t d = 0; d < D; ++d) a += qg[g * D + d] * k[d];
            out[g * m.S + t] = a;
          }
      }
      if (mp != nullptr)
        for (int64_t g = 0; g < m.G; ++g)
          for (int64_t t = 0; t < n; ++t) out[g * m.S + t] += mp[(bh / H) * m.S + t0 + t];
    }
  });
  const at::Tensor probs = at::softmax(scores, -1);

  // output [B, H, G, D]: task (row and KV head, a run of value groups that share a load)
  const int64_t run = m.gb < 16 && 16 % m.gb == 0 ? std::min<int64_t>(16 / m.gb, m.ngrp) : 1;
  const int64_t runs = (m.ngrp + run - 1) / run;
  at::Tensor result = at::zeros({B, Hq, D}, q.options());
  const float* pp = probs.const_data_ptr<float>();
  float* op = result.data_ptr<float>();
  at::parallel_for(0, B * H * runs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / runs, j0 = (i % runs) * run, j1 = std::min(j0 + run, m.ngrp);
      const float* p = pp + bh * m.G * m.S;
      float* acc = op + bh * m.G * D;
      const uint8_t* codes = vcp + bh * m.Sq * m.Db;
      const float *s = vsp + bh * m.Sq * m.ngrp, *z = vzp + bh * m.Sq * m.ngrp;
      if (bits == 4) value_groups<4>(avx512, p, codes, s, z, m, j0, j1, acc);
      else value_groups<2>(avx512, p, codes, s, z, m, j0, j1, acc);
      const int64_t c0 = j0 * m.vg, c1 = j1 * m.vg;
      for (int64_t g = 0; g < m.G; ++g)
        for (int64_t t = 0; t < m.R; ++t) {
          const float wt = p[g * m.S + m.Sq + t];
          const float* v = rvp + (bh * m.R + t) * D;
          for (int64_t c = c0; c < c1; ++c) acc[g * D + c] += wt * v[c];
        }
    }
  });
  return result.to(query_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(infertrix, CPU, m) { m.impl("kivi_decode_attention", &kivi_decode_attention_cpu); }

// No backward: the C++ "not implemented" kernel instead of custom_op's Python autograd wrapper
// (about 5 us per call outside inference_mode; see w4a8_gemm.cpp).
TORCH_LIBRARY_IMPL(infertrix, AutogradCPU, m) {
  m.impl("kivi_decode_attention", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace infertrix
