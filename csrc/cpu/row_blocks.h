// The blocking that skinny_linear (float32) and w8a8_linear (int8) share: a linear layer over a
// few rows of x (M <= 32) makes one pass over the weights. Output blocks of `nr` weight rows run in
// parallel, each taking every chunk of rows of x in turn (a block's few weight rows stay in L1
// between chunks); a last, shorter chunk reuses the same block shape with repeated rows, so every
// block has the same output rows. Each kernel provides its block functions per ISA: one for chunks
// of 1, 2, 4 and 8 rows on AVX-512 (16 / rows weight rows per block), of 1, 2 and 4 on AVX2
// (8 / rows: 8 accumulators + 4 rows of x + a weight vector fit AVX2's 16 registers), and a
// scalar one (8 weight rows per block).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu_isa.h"

namespace infertrix {

// Block(args, m0, mrows, n0, nrows): rows [m0, m0 + mrows) of x times weight rows [n0, n0 + nrows).
template <class Args>
using RowBlockFn = void (*)(const Args&, int64_t, int64_t, int64_t, int64_t);

// avx512: 4 functions (1, 2, 4, 8 rows) or nullptr; avx2: 3 functions (1, 2, 4 rows) or nullptr.
// weight_row_bytes sets the parallel grain (at least 64 KiB of weights per task).
template <class Args>
void run_row_blocks(const Args& a, int64_t M, int64_t N, int64_t weight_row_bytes, Isa isa,
                    RowBlockFn<Args> scalar, const RowBlockFn<Args>* avx512, const RowBlockFn<Args>* avx2) {
  if (M <= 0 || N <= 0) return;
  const bool wide = isa == Isa::Avx512Vnni && avx512 != nullptr;
  const int64_t chunk = wide ? 8 : 4;
  const int64_t rows = std::min(M, chunk);
  RowBlockFn<Args> fn = scalar;
  int64_t nr = 8;
  if (wide) {
    const int i = rows == 1 ? 0 : rows == 2 ? 1 : rows <= 4 ? 2 : 3;
    fn = avx512[i];
    nr = 16 >> i;
  } else if (isa >= Isa::Avx2 && avx2 != nullptr) {
    const int i = rows == 1 ? 0 : rows == 2 ? 1 : 2;
    fn = avx2[i];
    nr = 8 >> i;
  }
  const int64_t blocks = (N + nr - 1) / nr;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, nr * weight_row_bytes));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * nr, nrows = std::min(nr, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += chunk) fn(a, m0, std::min(chunk, M - m0), n0, nrows);
    }
  });
}

}  // namespace infertrix
