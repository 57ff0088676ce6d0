// tpmoe::align on CPU: a counting sort of the T*K (token, expert) pairs by expert. The pairs
// are cut into chunks (one per thread); each chunk counts its experts, a prefix sum over
// (expert, chunk) gives every chunk its first row per expert, and each chunk scatters its
// pairs in order. Rows of one expert therefore keep the pair order (stable), whatever the
// number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "align_outputs.h"
#include "routing_checks.h"
#include "routing_common.h"

namespace tpmoe {
namespace {

// Below this many pairs per chunk the threads cost more than they save.
constexpr int64_t kMinPairsPerChunk = 1 << 15;

using AlignOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename id_t>
void sort_pairs_by_expert(const id_t* expert_of_pair, int64_t pairs, int64_t num_experts, int32_t* sorted_pair_ids,
                          int64_t* tokens_per_expert, int64_t* expert_offsets) {
  const int64_t num_chunks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), ceil_div(pairs, kMinPairsPerChunk)));
  const int64_t chunk_size = ceil_div(pairs, num_chunks);
  // [num_chunks, E]: first the count of each expert in the chunk, then the chunk's next row.
  std::vector<int64_t> chunk_cursor(num_chunks * num_experts, 0);
  std::vector<int64_t> first_bad_pair(num_chunks, -1);

  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      int64_t* count = chunk_cursor.data() + c * num_experts;
      for (int64_t p = c * chunk_size; p < std::min(pairs, (c + 1) * chunk_size); ++p) {
        const int64_t e = static_cast<int64_t>(expert_of_pair[p]);
        if (e < 0 || e >= num_experts) {
          first_bad_pair[c] = p;
          break;
        }
        ++count[e];
      }
    }
  });
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t p = first_bad_pair[c];
    TORCH_CHECK(p < 0, "tpmoe::align: topk_ids: expected expert ids in [0, ", num_experts, "), got ",
                static_cast<int64_t>(expert_of_pair[p]), " at flat position ", p);
  }

  int64_t row = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    expert_offsets[e] = row;
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t count = chunk_cursor[c * num_experts + e];
      chunk_cursor[c * num_experts + e] = row;
      row += count;
    }
    tokens_per_expert[e] = row - expert_offsets[e];
  }
  expert_offsets[num_experts] = row;

  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      int64_t* cursor = chunk_cursor.data() + c * num_experts;
      for (int64_t p = c * chunk_size; p < std::min(pairs, (c + 1) * chunk_size); ++p) {
        sorted_pair_ids[cursor[static_cast<int64_t>(expert_of_pair[p])]++] = static_cast<int32_t>(p);
      }
    }
  });
}

AlignOutputs align_cpu(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_m) {
  check_align_args(topk_ids, num_experts, block_m);
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t pairs = ids.numel();
  AlignBuffers out = allocate_align_outputs(ids, num_experts, block_m);

  int32_t* sorted = out.sorted_pair_ids.data_ptr<int32_t>();
  int64_t* counts = out.tokens_per_expert.data_ptr<int64_t>();
  int64_t* offsets = out.expert_offsets.data_ptr<int64_t>();
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "tpmoe_align_cpu", [&] {
    sort_pairs_by_expert(ids.data_ptr<index_t>(), pairs, num_experts, sorted, counts, offsets);
  });

  int64_t* padded = out.padded_offsets.data_ptr<int64_t>();
  padded[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) padded[e + 1] = padded[e] + ceil_div(counts[e], block_m) * block_m;
  out.num_padded.data_ptr<int64_t>()[0] = padded[num_experts];

  int32_t* sorted_padded = out.sorted_ids_padded.data_ptr<int32_t>();
  int32_t* expert_of_block = out.block_expert.data_ptr<int32_t>();
  at::parallel_for(0, num_experts, std::max<int64_t>(1, kMinPairsPerChunk / std::max<int64_t>(1, pairs / num_experts)),
                   [&](int64_t expert_begin, int64_t expert_end) {
                     for (int64_t e = expert_begin; e < expert_end; ++e) {
                       std::copy(sorted + offsets[e], sorted + offsets[e + 1], sorted_padded + padded[e]);
                       std::fill(expert_of_block + padded[e] / block_m, expert_of_block + padded[e + 1] / block_m,
                                 static_cast<int32_t>(e));
                     }
                   });
  return out.as_tuple();
}

}  // namespace
}  // namespace tpmoe

TORCH_LIBRARY_IMPL(tpmoe, CPU, m) { m.impl("align", &tpmoe::align_cpu); }
