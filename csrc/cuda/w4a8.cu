// infertrix::w4a8_linear and infertrix::w4a8_matmul_int32 for CUDA tensors (kernels: w4a8_kernels.cuh).
//
// NOT RUN ON A GPU: built only with a CUDA torch (setup.py), never executed here (the machines this
// project has are CPU-only). tests/ops/test_w4a8_cuda.py compares it with the PyTorch reference
// when a GPU is present, and tests/ops/test_cuda_sources.py compiles the kernels with nvcc.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>

#include "w4a8_kernels.cuh"

namespace infertrix {
namespace {

struct Shapes {
  int64_t M, N, K, Kpad, S, gs, G, Npad;
};

Shapes check(const at::Tensor& qweight, const at::Tensor& group_scale, const c10::optional<at::Tensor>& zero,
             int64_t N, int64_t K, int64_t group_size, int64_t M) {
  TORCH_CHECK(K > 0, "w4a8 (cuda): in_features must be positive, got ", K);
  TORCH_CHECK(group_size == -1 || (group_size > 0 && group_size % 8 == 0),
              "w4a8 (cuda): group_size must be -1 or a positive multiple of 8, got ", group_size);
  Shapes s{};
  s.M = M; s.N = N; s.K = K;
  s.S = (K + 7) / 8;
  s.Kpad = (K + 31) / 32 * 32;
  s.gs = group_size == -1 ? s.Kpad : group_size;
  s.G = group_size == -1 ? 1 : (K + group_size - 1) / group_size;
  const int64_t P = (N + 15) / 16;
  s.Npad = 16 * P;
  TORCH_CHECK(qweight.is_cuda() && qweight.scalar_type() == at::kByte && qweight.dim() == 3 && qweight.size(0) == P &&
              qweight.size(1) == s.S && qweight.size(2) == 64 && qweight.is_contiguous(),
              "w4a8 (cuda): qweight must be contiguous uint8 [", P, ", ", s.S, ", 64] on the GPU, got ",
              qweight.sizes());
  TORCH_CHECK(group_scale.scalar_type() == at::kByte && group_scale.dim() == 2 && group_scale.size(0) == s.G &&
              group_scale.size(1) == s.Npad && group_scale.is_contiguous(),
              "w4a8 (cuda): group_scale must be contiguous uint8 [", s.G, ", ", s.Npad, "]");
  if (zero.has_value())
    TORCH_CHECK(zero->scalar_type() == at::kByte && zero->sizes() == group_scale.sizes() && zero->is_contiguous(),
                "w4a8 (cuda): zero must be uint8 shaped like group_scale");
  return s;
}

// int8 tensor cores when every group starts on a 32-column chunk and the GPU has them (sm_80+).
bool use_mma(const Shapes& s, const at::Tensor& t) {
  const auto* prop = at::cuda::getDeviceProperties(t.get_device());
  return prop->major >= 8 && (s.gs % 32 == 0);
}

void gemm(const Shapes& s, const at::Tensor& xq, const float* sx, const at::Tensor& rowsum, const at::Tensor& qweight,
          const at::Tensor& group_scale, const c10::optional<at::Tensor>& zero, const float* s1, const float* bias,
          int32_t* acc, float* y) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const uint8_t* z = zero.has_value() ? zero->data_ptr<uint8_t>() : nullptr;
  if (use_mma(s, qweight)) {
    constexpr int warps = 4;
    dim3 block(32, warps), grid((s.N + 8 * warps - 1) / (8 * warps), (s.M + 15) / 16);
    infertrix_cuda::w4a8_mma<<<grid, block, 0, stream>>>(
        xq.data_ptr<int8_t>(), sx, rowsum.data_ptr<int32_t>(), qweight.data_ptr<uint8_t>(),
        group_scale.data_ptr<uint8_t>(), z, s1, bias, s.M, s.N, s.K, s.Kpad, s.S, s.gs, s.G, s.Npad, acc, y);
  } else {
    dim3 block(128), grid((s.N + 127) / 128, s.M);
    infertrix_cuda::w4a8_generic<<<grid, block, 0, stream>>>(
        xq.data_ptr<int8_t>(), sx, rowsum.data_ptr<int32_t>(), qweight.data_ptr<uint8_t>(),
        group_scale.data_ptr<uint8_t>(), z, s1, bias, s.M, s.N, s.K, s.Kpad, s.S, s.gs, s.G, s.Npad, acc, y);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor w4a8_matmul_int32_cuda(const at::Tensor& x_q_in, const at::Tensor& qweight, const at::Tensor& group_scale,
                                  const c10::optional<at::Tensor>& zero, int64_t in_features, int64_t out_features,
                                  int64_t group_size) {
  TORCH_CHECK(x_q_in.scalar_type() == at::kChar && x_q_in.dim() == 2 && x_q_in.size(1) == in_features,
              "w4a8_matmul_int32 (cuda): x_q must be int8 [M, ", in_features, "], got ", x_q_in.sizes());
  const c10::cuda::CUDAGuard guard(x_q_in.device());
  Shapes s = check(qweight, group_scale, zero, out_features, in_features, group_size, x_q_in.size(0));
  auto out = at::empty({s.M, s.N}, x_q_in.options().dtype(at::kInt));
  if (s.M == 0) return out;
  const at::Tensor x = x_q_in.contiguous();
  auto xq = at::empty({s.M, s.Kpad}, x.options());
  auto rowsum = at::empty({s.M, s.G}, x.options().dtype(at::kInt));
  infertrix_cuda::pad_rows<<<s.M, 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.data_ptr<int8_t>(), s.K, s.Kpad, s.gs, s.G, xq.data_ptr<int8_t>(), rowsum.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  gemm(s, xq, nullptr, rowsum, qweight, group_scale, zero, nullptr, nullptr, out.data_ptr<int32_t>(), nullptr);
  return out;
}

at::Tensor w4a8_linear_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                            const at::Tensor& group_scale, const c10::optional<at::Tensor>& zero, int64_t in_features,
                            int64_t group_size, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "w4a8_linear (cuda): expected float32, bfloat16 or float16 activations, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "w4a8_linear (cuda): last dimension of x must be ",
              in_features, ", got ", x.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.is_contiguous(),
              "w4a8_linear (cuda): scale must be a contiguous float32 vector");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({-1, in_features}).contiguous();
  Shapes s = check(qweight, group_scale, zero, scale.size(0), in_features, group_size, x2.size(0));
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.N, "w4a8_linear (cuda): bias must be [", s.N, "]");
    b = bias->to(at::kFloat).contiguous();
  }
  auto y = at::empty({s.M, s.N}, x2.options().dtype(at::kFloat));
  if (s.M > 0) {
    auto xq = at::empty({s.M, s.Kpad}, x2.options().dtype(at::kChar));
    auto sx = at::empty({s.M}, x2.options().dtype(at::kFloat));
    auto rowsum = at::empty({s.M, s.G}, x2.options().dtype(at::kInt));
    auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2.scalar_type(), "w4a8_quantize_rows", [&] {
      infertrix_cuda::quantize_rows<scalar_t><<<s.M, 256, 0, stream>>>(
          x2.data_ptr<scalar_t>(), s.K, s.Kpad, s.gs, s.G, xq.data_ptr<int8_t>(), sx.data_ptr<float>(),
          rowsum.data_ptr<int32_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    gemm(s, xq, sx.data_ptr<float>(), rowsum, qweight, group_scale, zero, scale.data_ptr<float>(),
         b.defined() ? b.data_ptr<float>() : nullptr, nullptr, y.data_ptr<float>());
  }
  auto sizes = x.sizes().vec();
  sizes.back() = s.N;
  y = y.view(sizes);
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(infertrix, CUDA, m) {
  m.impl("w4a8_matmul_int32", &w4a8_matmul_int32_cuda);
  m.impl("w4a8_linear", &w4a8_linear_cuda);
}

TORCH_LIBRARY_IMPL(infertrix, AutogradCUDA, m) {
  m.impl("w4a8_matmul_int32", torch::autograd::autogradNotImplementedFallback());
  m.impl("w4a8_linear", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace infertrix
