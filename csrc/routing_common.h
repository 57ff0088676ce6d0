// Pieces of the routing ops shared by the CPU (.cpp) and CUDA (.cu) kernels: the scoring
// codes, the ranking rule that fixes the order of the selected experts, and the size of the
// padded arrays of `align` (which the Python fake implementation computes the same way).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define TPMOE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TPMOE_HOST_DEVICE inline
#endif

namespace tpmoe {

enum class Scoring : int { kSoftmax = 0, kTopkSoftmax = 1, kSigmoidGroup = 2 };

// DeepSeek-V3 renormalises with this epsilon (w / (sum + 1e-20)).
constexpr double kRenormEpsilon = 1e-20;

// True when (value_a, index_a) is selected before (value_b, index_b): the larger score first,
// equal scores by the lower expert index. NaN ranks above every number, as in torch.sort and
// torch.topk, so that a NaN logit selects the same ids on every path instead of breaking the
// strict ordering the selection relies on.
TPMOE_HOST_DEVICE bool ranks_above(double value_a, int64_t index_a, double value_b, int64_t index_b) {
  const bool a_is_nan = value_a != value_a;
  const bool b_is_nan = value_b != value_b;
  if (a_is_nan || b_is_nan) {
    return a_is_nan && (!b_is_nan || index_a < index_b);
  }
  return value_a > value_b || (value_a == value_b && index_a < index_b);
}

// Scores are computed in float64 and rounded once to the output dtype: the order of the
// selected experts then depends on float64 values, whose last-bit differences between libm
// implementations (CPU, CUDA, torch) cannot reorder scores that are not exactly equal.
TPMOE_HOST_DEVICE double sigmoid_f64(double x) { return 1.0 / (1.0 + exp(-x)); }

// Rows of sorted_ids_padded: every expert that has tokens can add at most block_m - 1 pad
// rows, and at most min(E, pairs) experts have tokens. Known from shapes alone.
TPMOE_HOST_DEVICE int64_t padded_rows_bound(int64_t pairs, int64_t num_experts, int64_t block_m) {
  const int64_t experts_with_tokens = num_experts < pairs ? num_experts : pairs;
  return pairs + experts_with_tokens * (block_m - 1);
}

TPMOE_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace tpmoe
