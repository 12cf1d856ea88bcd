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

// The block for chunks of min(M, chunk) rows: its function, its weight rows (nr) and the chunk.
template <class Args>
struct RowBlock {
  RowBlockFn<Args> fn;
  int64_t nr, chunk;
};

// avx512: 4 functions (1, 2, 4, 8 rows) or nullptr; avx2: 3 functions (1, 2, 4 rows) or nullptr.
template <class Args>
RowBlock<Args> choose_row_block(int64_t M, Isa isa, RowBlockFn<Args> scalar, const RowBlockFn<Args>* avx512,
                                const RowBlockFn<Args>* avx2) {
  const bool wide = isa == Isa::Avx512Vnni && avx512 != nullptr;
  const int64_t chunk = wide ? 8 : 4;
  const int64_t rows = std::min(M, chunk);
  if (wide) {
    const int i = rows == 1 ? 0 : rows == 2 ? 1 : rows <= 4 ? 2 : 3;
    return {avx512[i], 16 >> i, chunk};
  }
  if (isa >= Isa::Avx2 && avx2 != nullptr) {
    const int i = rows == 1 ? 0 : rows == 2 ? 1 : 2;
    return {avx2[i], 8 >> i, chunk};
  }
  return {scalar, 8, chunk};
}

// Outputs [n0, n1) for every chunk of rows of x, block after block.
template <class Args>
void run_outputs(const Args& a, const RowBlock<Args>& c, int64_t M, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += c.nr)
    for (int64_t m0 = 0; m0 < M; m0 += c.chunk) c.fn(a, m0, std::min(c.chunk, M - m0), n, std::min(c.nr, n1 - n));
}

// Tasks of at least 64 KiB of weights: blocks of `rows` weight rows each.
inline int64_t task_grain(int64_t rows, int64_t weight_row_bytes) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, rows * weight_row_bytes));
}

// weight_row_bytes sets the parallel grain (task_grain).
template <class Args>
void run_row_blocks(const Args& a, int64_t M, int64_t N, int64_t weight_row_bytes, Isa isa,
                    RowBlockFn<Args> scalar, const RowBlockFn<Args>* avx512, const RowBlockFn<Args>* avx2) {
  if (M <= 0 || N <= 0) return;
  const RowBlock<Args> c = choose_row_block(M, isa, scalar, avx512, avx2);
  const int64_t blocks = (N + c.nr - 1) / c.nr;
  at::parallel_for(0, blocks, task_grain(c.nr, weight_row_bytes), [&](int64_t begin, int64_t end) {
    run_outputs(a, c, M, begin * c.nr, std::min(N, end * c.nr));
  });
}

}  // namespace infertrix
