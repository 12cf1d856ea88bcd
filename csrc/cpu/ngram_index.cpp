// infertrix::ngram_index_update / infertrix::ngram_lookup on the CPU: the incremental n-gram
// index of prompt-lookup / CopySpec drafting (see src/infertrix/ops/ngram_index.py for the
// layout and the PyTorch reference; results are identical to it).
//
// Per row and n-gram size, a hash table maps FNV-1a(last n tokens) to the end position of the
// latest occurrence. An update indexes only the positions added since the previous one; a lookup
// hashes the row's last n tokens, checks the stored occurrence token by token (collisions lose a
// match, never return a wrong one) and copies the tokens that followed it. The work is a handful
// of scalar integer operations per token with random table accesses, so there is no SIMD path:
// the same code runs whatever infertrix::active_isa() reports.
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstdint>

namespace infertrix {
namespace {

constexpr uint64_t kFnvOffset = 0xCBF29CE484222325ull;
constexpr uint64_t kFnvPrime = 0x100000001B3ull;

inline int64_t slot_of(const int64_t* ngram, int64_t n, int64_t size) {
  uint64_t h = kFnvOffset;
  for (int64_t j = 0; j < n; ++j) h = (h ^ static_cast<uint64_t>(ngram[j])) * kFnvPrime;
  return static_cast<int64_t>((h ^ (h >> 32)) & static_cast<uint64_t>(size - 1));
}

void check_inputs(const at::Tensor& table, const at::Tensor& tokens, const at::Tensor& lengths, int64_t min_n) {
  TORCH_CHECK(table.dim() == 3 && tokens.dim() == 2 && lengths.dim() == 1,
              "ngram index expects table [B, G, H], tokens [B, T] and lengths [B]");
  TORCH_CHECK(table.size(0) == tokens.size(0) && tokens.size(0) == lengths.size(0),
              "ngram index: batch sizes differ");
  const int64_t size = table.size(2);
  TORCH_CHECK(size > 0 && (size & (size - 1)) == 0,
              "ngram index: the table's last dimension must be a power of two, got ", size);
  TORCH_CHECK(min_n >= 1, "ngram index: min_n must be >= 1, got ", min_n);
  TORCH_CHECK(table.scalar_type() == at::kLong && tokens.scalar_type() == at::kLong &&
                  lengths.scalar_type() == at::kLong,
              "ngram index: expected int64 tensors");
  TORCH_CHECK(table.is_contiguous(), "ngram index: the table must be contiguous");
  if (lengths.numel() > 0) {
    TORCH_CHECK(lengths.max().item<int64_t>() <= tokens.size(1),
                "ngram index: a length exceeds the tokens tensor's width");
  }
}

void ngram_index_update_cpu(at::Tensor table, const at::Tensor& tokens_in, const at::Tensor& lengths_in,
                            at::Tensor indexed, int64_t min_n) {
  check_inputs(table, tokens_in, lengths_in, min_n);
  TORCH_CHECK(indexed.scalar_type() == at::kLong && indexed.dim() == 1 && indexed.size(0) == table.size(0) &&
                  indexed.is_contiguous(),
              "ngram index: indexed must be a contiguous int64 [B] tensor");
  const at::Tensor tokens = tokens_in.contiguous();
  const at::Tensor lengths = lengths_in.contiguous();
  const int64_t batch = table.size(0), groups = table.size(1), size = table.size(2), width = tokens.size(1);
  int64_t* tp = table.data_ptr<int64_t>();
  int64_t* ip = indexed.data_ptr<int64_t>();
  const int64_t* xp = tokens.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t length = lp[b];
      const int64_t* row = xp + b * width;
      int64_t* rt = tp + b * groups * size;
      for (int64_t i = ip[b]; i < length - 1; ++i) {
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t n = min_n + g;
          if (i >= n - 1) rt[g * size + slot_of(row + i - n + 1, n, size)] = i;
        }
      }
      if (ip[b] < length - 1) ip[b] = length - 1;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> ngram_lookup_cpu(const at::Tensor& table_in, const at::Tensor& tokens_in,
                                                    const at::Tensor& lengths_in, int64_t min_n,
                                                    int64_t num_tokens) {
  check_inputs(table_in, tokens_in, lengths_in, min_n);
  TORCH_CHECK(num_tokens >= 0, "ngram_lookup: num_tokens must be >= 0");
  const at::Tensor table = table_in.contiguous();
  const at::Tensor tokens = tokens_in.contiguous();
  const at::Tensor lengths = lengths_in.contiguous();
  const int64_t batch = table.size(0), groups = table.size(1), size = table.size(2), width = tokens.size(1);
  auto out = at::zeros({batch, num_tokens}, tokens.options());
  auto counts = at::zeros({batch}, tokens.options());
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* xp = tokens.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = lp[b];
    const int64_t* row = xp + b * width;
    for (int64_t g = groups - 1; g >= 0; --g) {
      const int64_t n = min_n + g;
      if (length < n + 1) continue;
      const int64_t* query = row + length - n;
      const int64_t p = tp[(b * groups + g) * size + slot_of(query, n, size)];
      if (p < n - 1 || p > length - 2) continue;
      bool same = true;
      for (int64_t j = 0; j < n && same; ++j) same = row[p - n + 1 + j] == query[j];
      if (!same) continue;
      const int64_t m = std::min(num_tokens, length - 1 - p);
      for (int64_t j = 0; j < m; ++j) op[b * num_tokens + j] = row[p + 1 + j];
      cp[b] = m < 0 ? 0 : m;
      break;
    }
  }
  return {out, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(infertrix, CPU, m) {
  m.impl("ngram_index_update", &ngram_index_update_cpu);
  m.impl("ngram_lookup", &ngram_lookup_cpu);
}

// No backward: the C++ "not implemented" kernel instead of custom_op's Python autograd wrapper
// (about 5 us per call outside inference_mode; see w4a8_gemm.cpp).
TORCH_LIBRARY_IMPL(infertrix, AutogradCPU, m) {
  m.impl("ngram_index_update", torch::autograd::autogradNotImplementedFallback());
  m.impl("ngram_lookup", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace infertrix
