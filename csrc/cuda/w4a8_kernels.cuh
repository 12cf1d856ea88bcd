// CUDA kernels of infertrix::w4a8_linear / infertrix::w4a8_matmul_int32: int8 per-token activations
// times 4-bit weights with two-level scales (QServe/QoQ, Lin et al. 2024, arXiv:2405.04532).
//
// NOT RUN ON A GPU: written and compiled (nvcc, sm_80 and sm_90) on a machine without one; no test
// has executed these kernels. The CPU kernels (csrc/cpu/w4a8_gemm.cpp) are the tested ones.
//
// Pure CUDA (no torch headers), so the file compiles on its own; w4a8.cu binds it to torch.
//
// Math (the reference, src/infertrix/ops/w4a8.py):
//   acc[m, n] = sum_g s2[g, n] * (dot_g(m, n) - zero[g, n] * rowsum_g(m))        (int32, exact)
//   dot_g(m, n) = sum_{k in group g} x_q[m, k] * q[n, k],  rowsum_g(m) = sum_{k in g} x_q[m, k]
//   y[m, n] = (float(acc) * x_scale[m]) * scale[n] (+ bias[n])       (IEEE ops in this order, no FMA)
// Packed weights: qweight uint8 [P, S, 64], panel p = 16 output channels, step s = 8 input channels;
// byte 4c + j of qweight[p, s] holds q[16p + c, 8s + j] (low nibble) and q[16p + c, 8s + 4 + j] (high).
// group_scale / zero: uint8 [G, 16P].
//
// Kernels:
// 1. quantize_rows: one block per row; absmax, q = rint(x * (127 / amax)) clamped to +-127, the row's
//    int8 codes padded with zeros to Kpad (a multiple of 32), its scale amax / 127, its group sums.
// 2. w4a8_mma: int8 tensor cores, mma.sync.m16n8k32 (s8 x s8 -> s32). One warp owns a 16 x 8 output
//    tile; per group it accumulates dot_g in fresh int32 registers (codes 0..15 are valid s8), then
//    applies the group's integer scale and zero point to them in registers and adds them into the
//    running int32 sum. Needs group_size % 32 == 0 (or one group per channel): groups then start on a
//    32-column chunk. Fragment layouts of m16n8k32 (.s8, PTX ISA "Matrix Fragments for mma.m16n8k32"):
//    lane = 4 * gid + tig;  A (16x32, row): a0 rows gid, cols 4 tig + 0..3; a1 rows gid + 8; a2/a3
//    the same rows, cols + 16.  B (32x8, col): b0 rows (k) 4 tig + 0..3, col gid; b1 rows + 16.
//    C (16x8): c0, c1 row gid, cols 2 tig + 0..1; c2, c3 row gid + 8.
// 3. w4a8_generic: one thread per output, any group size (multiples of 8): the fallback.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace infertrix_cuda {

constexpr float kMinAmax = 1e-10f;  // as infertrix.ops.quantize.MIN_AMAX
constexpr int kPanel = 16;
constexpr int kStep = 8;

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }

// x: [M, K] (any of float / __half / __nv_bfloat16 through to_float), row-major contiguous.
// Outputs: xq [M, Kpad] int8 (zero padded), sx [M], rowsum [M, G] (group sums over the real K).
template <typename T>
__global__ void quantize_rows(const T* __restrict__ x, int64_t K, int64_t Kpad, int64_t gs, int64_t G,
                              int8_t* __restrict__ xq, float* __restrict__ sx, int32_t* __restrict__ rowsum) {
  const int64_t m = blockIdx.x;
  const T* row = x + m * K;
  __shared__ float red[32];
  float amax = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(to_float(row[k])));
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < (blockDim.x + 31) / 32 ? red[threadIdx.x] : 0.f;
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (threadIdx.x == 0) red[0] = fmaxf(v, kMinAmax);
  }
  __syncthreads();
  amax = red[0];
  const float inv = __fdiv_rn(127.f, amax);  // exactly rounded, as the reference's tensor division
  if (threadIdx.x == 0) sx[m] = __fdiv_rn(amax, 127.f);
  int8_t* out = xq + m * Kpad;
  for (int64_t k = threadIdx.x; k < Kpad; k += blockDim.x) {
    float q = k < K ? rintf(__fmul_rn(to_float(row[k]), inv)) : 0.f;  // rint: half to even, as torch.round
    q = fminf(fmaxf(q, -127.f), 127.f);
    out[k] = static_cast<int8_t>(q);
  }
  __syncthreads();
  // group sums of the codes just written (the zero-point correction), one thread per group
  for (int64_t g = threadIdx.x; g < G; g += blockDim.x) {
    int32_t t = 0;
    const int64_t e = (g + 1) * gs < K ? (g + 1) * gs : K;
    for (int64_t k = g * gs; k < e; ++k) t += out[k];
    rowsum[m * G + g] = t;
  }
}

// Four 4-bit codes of output channel n, input channels k0..k0+3 (k0 % 4 == 0), as packed s8 bytes.
__device__ __forceinline__ uint32_t codes4(const uint8_t* __restrict__ w, int64_t S, int64_t n, int64_t k0) {
  const int64_t s = k0 / kStep;
  if (s >= S) return 0u;  // beyond the packed width: zero weights (the activations there are zero too)
  const int64_t p = n / kPanel, c = n % kPanel;
  const uint32_t word = *reinterpret_cast<const uint32_t*>(w + ((p * S + s) * 64 + 4 * c));
  return (k0 % kStep) == 0 ? (word & 0x0F0F0F0Fu) : ((word >> 4) & 0x0F0F0F0Fu);
}

__device__ __forceinline__ uint32_t load_a4(const int8_t* __restrict__ xq, int64_t M, int64_t Kpad, int64_t m,
                                            int64_t k) {
  return m < M ? *reinterpret_cast<const uint32_t*>(xq + m * Kpad + k) : 0u;
}

__device__ __forceinline__ void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  // no int8 mma.m16n8k32 before sm_80: the host side never launches this kernel there
  (void)c; (void)a; (void)b;
  __trap();
#endif
}

// One warp per 16 x 8 output tile; blockDim = (32, warps). Grid: (ceil(N / (8 * warps)), ceil(M / 16)).
// acc_out (int32 [M, N]) or, with y_out non-null, the float epilogue into y_out [M, N].
__global__ void w4a8_mma(const int8_t* __restrict__ xq, const float* __restrict__ sx,
                         const int32_t* __restrict__ rowsum, const uint8_t* __restrict__ w,
                         const uint8_t* __restrict__ s2, const uint8_t* __restrict__ zero, const float* __restrict__ s1,
                         const float* __restrict__ bias, int64_t M, int64_t N, int64_t K, int64_t Kpad, int64_t S,
                         int64_t gs, int64_t G, int64_t Npad, int32_t* __restrict__ acc_out, float* __restrict__ y_out) {
  const int lane = threadIdx.x, gid = lane >> 2, tig = lane & 3;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * 8;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * 16;
  if (n0 >= N) return;  // whole warp leaves together (n0 is per warp)
  const int64_t nb = n0 + gid;                 // this lane's B column (weights' output channel)
  const bool nb_ok = nb < N;
  const int64_t cn0 = n0 + 2 * tig;            // this lane's two C columns
  int32_t total[4] = {0, 0, 0, 0};
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k_begin = g * gs, k_end = (g + 1) * gs < Kpad ? (g + 1) * gs : Kpad;
    int32_t part[4] = {0, 0, 0, 0};
    for (int64_t k = k_begin; k < k_end; k += 32) {
      uint32_t a[4], b[2];
      a[0] = load_a4(xq, M, Kpad, m0 + gid, k + 4 * tig);
      a[1] = load_a4(xq, M, Kpad, m0 + gid + 8, k + 4 * tig);
      a[2] = load_a4(xq, M, Kpad, m0 + gid, k + 16 + 4 * tig);
      a[3] = load_a4(xq, M, Kpad, m0 + gid + 8, k + 16 + 4 * tig);
      b[0] = nb_ok ? codes4(w, S, nb, k + 4 * tig) : 0u;
      b[1] = nb_ok ? codes4(w, S, nb, k + 16 + 4 * tig) : 0u;
      mma_s8(part, a, b);
    }
    // the group's integer scale and zero point, applied in registers: total += s2 * (dot - z * rowsum)
    for (int i = 0; i < 4; ++i) {
      const int64_t m = m0 + gid + (i >= 2 ? 8 : 0), n = cn0 + (i & 1);
      if (m < M && n < N) {
        const int32_t sc = s2[g * Npad + n];
        const int32_t z = zero ? static_cast<int32_t>(zero[g * Npad + n]) : 8;
        total[i] += sc * (part[i] - z * rowsum[m * G + g]);
      }
    }
  }
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + gid + (i >= 2 ? 8 : 0), n = cn0 + (i & 1);
    if (m >= M || n >= N) continue;
    if (y_out) {
      float y = __fmul_rn(__fmul_rn(static_cast<float>(total[i]), sx[m]), s1[n]);
      if (bias) y = __fadd_rn(y, bias[n]);
      y_out[m * N + n] = y;
    } else {
      acc_out[m * N + n] = total[i];
    }
  }
}

// The fallback: one thread per output element, any group size.
__global__ void w4a8_generic(const int8_t* __restrict__ xq, const float* __restrict__ sx,
                             const int32_t* __restrict__ rowsum, const uint8_t* __restrict__ w,
                             const uint8_t* __restrict__ s2, const uint8_t* __restrict__ zero,
                             const float* __restrict__ s1, const float* __restrict__ bias, int64_t M, int64_t N,
                             int64_t K, int64_t Kpad, int64_t S, int64_t gs, int64_t G, int64_t Npad,
                             int32_t* __restrict__ acc_out, float* __restrict__ y_out) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t m = blockIdx.y;
  if (n >= N || m >= M) return;
  const int64_t p = n / kPanel, c = n % kPanel;
  int32_t total = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t e = (g + 1) * gs < K ? (g + 1) * gs : K;
    int32_t dot = 0;
    for (int64_t k = g * gs; k < e; ++k) {
      const uint8_t byte = w[(p * S + k / kStep) * 64 + 4 * c + (k % 4)];
      const int32_t q = (k % kStep) < 4 ? (byte & 0x0F) : (byte >> 4);
      dot += static_cast<int32_t>(xq[m * Kpad + k]) * q;
    }
    const int32_t z = zero ? static_cast<int32_t>(zero[g * Npad + n]) : 8;
    total += static_cast<int32_t>(s2[g * Npad + n]) * (dot - z * rowsum[m * G + g]);
  }
  if (y_out) {
    float y = __fmul_rn(__fmul_rn(static_cast<float>(total), sx[m]), s1[n]);
    if (bias) y = __fadd_rn(y, bias[n]);
    y_out[m * N + n] = y;
  } else {
    acc_out[m * N + n] = total;
  }
}

}  // namespace infertrix_cuda

namespace infertrix_cuda {

// x_q int8 [M, K] -> zero-padded [M, Kpad] and group sums [M, G] (for w4a8_matmul_int32).
__global__ void pad_rows(const int8_t* __restrict__ x, int64_t K, int64_t Kpad, int64_t gs, int64_t G,
                         int8_t* __restrict__ xq, int32_t* __restrict__ rowsum) {
  const int64_t m = blockIdx.x;
  for (int64_t k = threadIdx.x; k < Kpad; k += blockDim.x) xq[m * Kpad + k] = k < K ? x[m * K + k] : 0;
  for (int64_t g = threadIdx.x; g < G; g += blockDim.x) {
    int32_t t = 0;
    const int64_t e = (g + 1) * gs < K ? (g + 1) * gs : K;
    for (int64_t k = g * gs; k < e; ++k) t += x[m * K + k];
    rowsum[m * G + g] = t;
  }
}

}  // namespace infertrix_cuda
