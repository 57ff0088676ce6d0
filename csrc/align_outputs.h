// The seven outputs of tpmoe::align on CPU (align_cpu.cpp). Sizes come from shapes alone, as
// in the Python fake (tpmoe.routing.empty_align_outputs), which the Triton align on CUDA uses.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <tuple>

#include "routing_common.h"

namespace tpmoe {

struct AlignBuffers {
  at::Tensor sorted_pair_ids;    // [T*K] int32
  at::Tensor tokens_per_expert;  // [E] int64
  at::Tensor expert_offsets;     // [E+1] int64
  at::Tensor sorted_ids_padded;  // [bound] int32, the sentinel T*K marks padding
  at::Tensor padded_offsets;     // [E+1] int64
  at::Tensor block_expert;       // [ceil(bound / block_m)] int32, -1 past the used rows
  at::Tensor num_padded;         // [1] int64

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple() const {
    return {sorted_pair_ids, tokens_per_expert, expert_offsets, sorted_ids_padded, padded_offsets, block_expert,
            num_padded};
  }
};

inline AlignBuffers allocate_align_outputs(const at::Tensor& ids, int64_t num_experts, int64_t block_m) {
  const int64_t pairs = ids.numel();
  const int64_t padded_rows = padded_rows_bound(pairs, num_experts, block_m);
  const auto int32 = ids.options().dtype(at::kInt);
  const auto int64 = ids.options().dtype(at::kLong);
  return {at::zeros({pairs}, int32),
          at::zeros({num_experts}, int64),
          at::zeros({num_experts + 1}, int64),
          at::full({padded_rows}, pairs, int32),
          at::zeros({num_experts + 1}, int64),
          at::full({ceil_div(padded_rows, block_m)}, -1, int32),
          at::zeros({1}, int64)};
}

}  // namespace tpmoe
