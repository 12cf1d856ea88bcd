// KV-cache kernels on the CPU (see src/infertrix/ops/kv_cache_ops.py for the references).
//
//   kv_gather(x [B,H,S,D], index [B,H,K]) -> [B,H,K,D]   copy the kept tokens into a compact cache
//   kv_quantize(x [...,N], bits, group)   -> packed uint8, scale, zero   (KIVI-style, asymmetric)
//   kv_dequantize(packed, scale, zero, bits, group) -> float32 [...,N]
//   kv_dequantize_into(packed, scale, zero, bits, group, per_channel, out [B,H,S,D])  in place, no allocation
//
// Bit-identical to the PyTorch references: the same IEEE single-precision operations in the same
// order; multiply-add contraction into FMA is switched off so `q * scale + zero` rounds twice like
// the reference's two tensor ops.
#pragma GCC optimize("fp-contract=off")
#pragma STDC FP_CONTRACT OFF

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_isa.h"

namespace infertrix {
namespace {

constexpr float kMinScale = 1e-8f;

at::Tensor kv_gather_cpu(const at::Tensor& x_in, const at::Tensor& index_in) {
  TORCH_CHECK(x_in.dim() == 4 && index_in.dim() == 3 && x_in.size(0) == index_in.size(0) &&
                  x_in.size(1) == index_in.size(1),
              "kv_gather expects x [B, H, S, D] and index [B, H, K], got ", x_in.sizes(), " and ",
              index_in.sizes());
  TORCH_CHECK(index_in.scalar_type() == at::kLong, "kv_gather expects an int64 index, got ",
              index_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3), K = index.size(2);
  auto out = at::empty({B, H, K, D}, x.options());
  const int64_t row_bytes = D * static_cast<int64_t>(x.element_size());
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t* ip = index.const_data_ptr<int64_t>();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const char* src = xp + bh * S * row_bytes;
      char* dst = op + bh * K * row_bytes;
      const int64_t* idx = ip + bh * K;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t s = idx[j];
        TORCH_CHECK(s >= 0 && s < S, "kv_gather: index ", s, " out of range for ", S, " tokens");
        std::memcpy(dst + j * row_bytes, src + s * row_bytes, row_bytes);
      }
    }
  });
  return out;
}

inline float load_f(const float* p, int64_t i) { return p[i]; }
inline float load_f(const c10::BFloat16* p, int64_t i) { return static_cast<float>(p[i]); }
inline float load_f(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
inline float load_f(const double* p, int64_t i) { return static_cast<float>(p[i]); }

template <typename T>
void quantize_group(const T* x, int64_t g, int bits, uint8_t* packed, float* scale, float* zero) {
  float mn = load_f(x, 0), mx = mn;
  for (int64_t i = 1; i < g; ++i) {
    const float v = load_f(x, i);
    mn = std::min(mn, v);
    mx = std::max(mx, v);
  }
  const float levels = static_cast<float>((1 << bits) - 1);
  const float s = std::max((mx - mn) / levels, kMinScale);
  const int per = 8 / bits;
  for (int64_t i = 0; i < g; i += per) {
    uint8_t byte = 0;
    for (int j = 0; j < per; ++j) {
      float q = std::nearbyint((load_f(x, i + j) - mn) / s);
      q = std::min(levels, std::max(0.f, q));
      byte |= static_cast<uint8_t>(static_cast<int>(q) << (bits * j));
    }
    packed[i / per] = byte;
  }
  *scale = s;
  *zero = mn;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_quantize_cpu(const at::Tensor& x_in, int64_t bits,
                                                               int64_t group) {
  TORCH_CHECK(bits == 2 || bits == 4, "kv_quantize supports bits=2 or 4, got ", bits);
  TORCH_CHECK(x_in.dim() >= 1, "kv_quantize: input must have at least one dimension");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16 ||
                  x_in.scalar_type() == at::kHalf,
              "kv_quantize expects float32, bfloat16 or float16 input, got ", x_in.scalar_type());
  const int64_t n = x_in.size(-1);
  TORCH_CHECK(group > 0 && n % group == 0, "kv_quantize: the last dimension (", n,
              ") must be a multiple of group_size=", group);
  const int per = 8 / static_cast<int>(bits);
  TORCH_CHECK(group % per == 0, "kv_quantize: group_size=", group, " must be a multiple of ", per);
  const at::Tensor x = x_in.contiguous();
  auto lead = x.sizes().vec();
  lead.pop_back();
  auto psizes = lead;
  psizes.push_back(n / per);
  auto ssizes = lead;
  ssizes.push_back(n / group);
  auto packed = at::empty(psizes, x.options().dtype(at::kByte));
  auto scale = at::empty(ssizes, x.options().dtype(at::kFloat));
  auto zero = at::empty(ssizes, x.options().dtype(at::kFloat));
  const int64_t groups = n == 0 ? 0 : x.numel() / group;
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* sp = scale.data_ptr<float>();
  float* zp = zero.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "kv_quantize", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, groups, 64, [&](int64_t begin, int64_t end) {
      for (int64_t gi = begin; gi < end; ++gi) {
        quantize_group(xp + gi * group, group, static_cast<int>(bits), pp + gi * (group / per), sp + gi,
                       zp + gi);
      }
    });
  });
  return {packed, scale, zero};
}

void dequant_group_scalar(const uint8_t* p, int64_t g, int bits, float s, float z, float* out) {
  const int per = 8 / bits;
  const int mask = (1 << bits) - 1;
  for (int64_t i = 0; i < g; i += per) {
    const uint8_t byte = p[i / per];
    for (int j = 0; j < per; ++j) {
      const float q = static_cast<float>((byte >> (bits * j)) & mask);
      const float prod = q * s;
      out[i + j] = prod + z;
    }
  }
}

#if INFERTRIX_X86
// 4-bit: 8 codes (4 bytes) -> 8 floats per step; mul then add (no FMA) as the reference.
INFERTRIX_TARGET_AVX2 void dequant_group_avx2(const uint8_t* p, int64_t g, int bits, float s, float z,
                                              float* out) {
  if (bits != 4) return dequant_group_scalar(p, g, bits, s, z, out);
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
  const __m256i shifts = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
  const __m256i mask = _mm256_set1_epi32(0xF);
  int64_t i = 0;
  for (; i + 8 <= g; i += 8) {
    const uint8_t* b = p + i / 2;
    const __m256i bytes = _mm256_setr_epi32(b[0], b[0], b[1], b[1], b[2], b[2], b[3], b[3]);
    const __m256i q = _mm256_and_si256(_mm256_srlv_epi32(bytes, shifts), mask);
    const __m256 prod = _mm256_mul_ps(_mm256_cvtepi32_ps(q), vs);
    _mm256_storeu_ps(out + i, _mm256_add_ps(prod, vz));
  }
  if (i < g) dequant_group_scalar(p + i / 2, g - i, bits, s, z, out + i);
}

INFERTRIX_TARGET_AVX512 void dequant_group_avx512(const uint8_t* p, int64_t g, int bits, float s, float z,
                                                  float* out) {
  if (bits != 4) return dequant_group_scalar(p, g, bits, s, z, out);
  const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
  const __m512i shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  const __m512i mask = _mm512_set1_epi32(0xF);
  int64_t i = 0;
  for (; i + 16 <= g; i += 16) {
    const __m128i b8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i / 2));  // 8 bytes
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b8, b8));             // each byte twice
    const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(bytes, shifts), mask);
    const __m512 prod = _mm512_mul_ps(_mm512_cvtepi32_ps(q), vs);
    _mm512_storeu_ps(out + i, _mm512_add_ps(prod, vz));
  }
  if (i < g) dequant_group_avx2(p + i / 2, g - i, bits, s, z, out + i);
}
#endif

void dequant_group(Isa isa, const uint8_t* p, int64_t g, int bits, float s, float z, float* out) {
#if INFERTRIX_X86
  if (isa == Isa::Avx512Vnni) return dequant_group_avx512(p, g, bits, s, z, out);
  if (isa == Isa::Avx2) return dequant_group_avx2(p, g, bits, s, z, out);
#endif
  dequant_group_scalar(p, g, bits, s, z, out);
}

at::Tensor kv_dequantize_cpu(const at::Tensor& packed_in, const at::Tensor& scale_in, const at::Tensor& zero_in,
                             int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 2 || bits == 4, "kv_dequantize supports bits=2 or 4, got ", bits);
  TORCH_CHECK(packed_in.scalar_type() == at::kByte, "kv_dequantize expects uint8 packed codes, got ",
              packed_in.scalar_type());
  const int per = 8 / static_cast<int>(bits);
  const int64_t n = packed_in.size(-1) * per;
  TORCH_CHECK(group > 0 && n % group == 0 && group % per == 0, "kv_dequantize: bad group_size=", group,
              " for ", n, " elements");
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor scale = scale_in.to(at::kFloat).contiguous();
  const at::Tensor zero = zero_in.to(at::kFloat).contiguous();
  const int64_t groups = n == 0 ? 0 : packed.numel() * per / group;
  TORCH_CHECK(scale.numel() == groups && zero.numel() == groups, "kv_dequantize: expected ", groups,
              " scales and zeros, got ", scale.numel(), " and ", zero.numel());
  auto sizes = packed.sizes().vec();
  sizes.back() = n;
  auto out = at::empty(sizes, packed.options().dtype(at::kFloat));
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const float* sp = scale.const_data_ptr<float>();
  const float* zp = zero.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Isa isa = active_isa();
  at::parallel_for(0, groups, 256, [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin; gi < end; ++gi) {
      dequant_group(isa, pp + gi * (group / per), group, static_cast<int>(bits), sp[gi], zp[gi], op + gi * group);
    }
  });
  return out;
}

// Dequantize a layer's KIVI codes straight into out [B, H, S, D] (rows of D floats contiguous, any
// stride over B and H: a slice of a buffer reused across layers and steps). per_channel: keys,
// packed [B, H, S/G, D, G*bits/8] with one (scale, zero) per (block, channel), written transposed;
// otherwise values, packed [B, H, S, D*bits/8] with D/group groups per token.
void kv_dequantize_into_cpu(const at::Tensor& packed_in, const at::Tensor& scale_in, const at::Tensor& zero_in,
                            int64_t bits, int64_t group, bool per_channel, const at::Tensor& out) {
  TORCH_CHECK(bits == 2 || bits == 4, "kv_dequantize_into supports bits=2 or 4, got ", bits);
  TORCH_CHECK(packed_in.scalar_type() == at::kByte, "kv_dequantize_into expects uint8 packed codes, got ",
              packed_in.scalar_type());
  TORCH_CHECK(out.dim() == 4 && out.scalar_type() == at::kFloat && out.stride(3) == 1 &&
                  (out.size(2) <= 1 || out.stride(2) == out.size(3)),
              "kv_dequantize_into expects a float32 out [B, H, S, D] with contiguous rows, got ", out.sizes(),
              " strides ", out.strides(), " ", out.scalar_type());
  const int per = 8 / static_cast<int>(bits);
  const int64_t B = out.size(0), H = out.size(1), S = out.size(2), D = out.size(3);
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor scale = scale_in.to(at::kFloat).contiguous();
  const at::Tensor zero = zero_in.to(at::kFloat).contiguous();
  const int64_t n = packed.size(-1) * per;  // elements per packed row
  if (per_channel) {
    TORCH_CHECK(packed.dim() == 5 && packed.size(0) == B && packed.size(1) == H && packed.size(3) == D &&
                    n == group && packed.size(2) * group == S && group % per == 0,
                "kv_dequantize_into: keys packed ", packed.sizes(), " do not match out ", out.sizes(),
                " with group_size=", group);
  } else {
    TORCH_CHECK(packed.dim() == 4 && packed.size(0) == B && packed.size(1) == H && packed.size(2) == S &&
                    n == D && group > 0 && D % group == 0 && group % per == 0,
                "kv_dequantize_into: values packed ", packed.sizes(), " do not match out ", out.sizes(),
                " with group_size=", group);
  }
  const int64_t groups = packed.numel() * per / group;
  TORCH_CHECK(scale.numel() == groups && zero.numel() == groups, "kv_dequantize_into: expected ", groups,
              " scales and zeros, got ", scale.numel(), " and ", zero.numel());
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const float* sp = scale.const_data_ptr<float>();
  const float* zp = zero.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t sb = out.stride(0), sh = out.stride(1);
  const Isa isa = active_isa();
  const int ibits = static_cast<int>(bits);
  if (per_channel) {
    const int64_t nblk = S / group, G = group;
    at::parallel_for(0, B * H * nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> tmp(D * G);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t bh = i / nblk, blk = i % nblk;
        for (int64_t d = 0; d < D; ++d) {
          const int64_t gi = i * D + d;
          dequant_group(isa, pp + gi * (G / per), G, ibits, sp[gi], zp[gi], tmp.data() + d * G);
        }
        float* dst = op + (bh / H) * sb + (bh % H) * sh + blk * G * D;
        for (int64_t t = 0; t < G; ++t)
          for (int64_t d = 0; d < D; ++d) dst[t * D + d] = tmp[d * G + t];
      }
    });
  } else {
    const int64_t gpr = D / group;  // groups per token
    at::parallel_for(0, B * H * S, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t bh = r / S, t = r % S;
        float* dst = op + (bh / H) * sb + (bh % H) * sh + t * D;
        for (int64_t j = 0; j < gpr; ++j) {
          const int64_t gi = r * gpr + j;
          dequant_group(isa, pp + gi * (group / per), group, ibits, sp[gi], zp[gi], dst + j * group);
        }
      }
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(infertrix, CPU, m) {
  m.impl("kv_gather", &kv_gather_cpu);
  m.impl("kv_quantize", &kv_quantize_cpu);
  m.impl("kv_dequantize", &kv_dequantize_cpu);
  m.impl("kv_dequantize_into", &kv_dequantize_into_cpu);
}

// No backward: the C++ "not implemented" kernel instead of custom_op's Python autograd wrapper
// (about 5 us per call outside inference_mode; see w4a8_gemm.cpp).
TORCH_LIBRARY_IMPL(infertrix, AutogradCPU, m) {
  m.impl("kv_gather", torch::autograd::autogradNotImplementedFallback());
  m.impl("kv_quantize", torch::autograd::autogradNotImplementedFallback());
  m.impl("kv_dequantize", torch::autograd::autogradNotImplementedFallback());
  m.impl("kv_dequantize_into", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace infertrix
