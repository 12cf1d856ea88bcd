// Per-token int8 quantization of one activation row, shared by the quantize op and the fused
// W4A8 linear (which quantizes straight into its own padded buffer, with no second op call).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "cpu_isa.h"

namespace infertrix {

// q[0..k) = clamp(round_half_even(x * (127 / amax)), -127, 127), *scale = amax / 127, with
// amax = max(|x|, 1e-10): bit-identical to the reference in src/infertrix/ops/quantize.py.
void quantize_row_int8(Isa isa, const float* x, int64_t k, int8_t* q, float* scale);
void quantize_row_int8(Isa isa, const c10::BFloat16* x, int64_t k, int8_t* q, float* scale);
void quantize_row_int8(Isa isa, const c10::Half* x, int64_t k, int8_t* q, float* scale);

// Calls f(const T* data) with x's element type: float32, bfloat16 or float16 (else an error).
template <class F>
void with_float_data(const at::Tensor& x, const char* op, F&& f) {
  switch (x.scalar_type()) {
    case at::kFloat: return f(x.data_ptr<float>());
    case at::kBFloat16: return f(x.data_ptr<c10::BFloat16>());
    case at::kHalf: return f(x.data_ptr<c10::Half>());
    default: TORCH_CHECK(false, op, ": expected float32, bfloat16 or float16 input, got ", x.scalar_type());
  }
}

}  // namespace infertrix
