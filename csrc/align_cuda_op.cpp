// tpmoe::align for CUDA tensors: checks, allocates and presets the outputs, launches the
// kernels of align_cuda.cu on the current stream. Built only in CUDA builds (TPMOE_WITH_CUDA).
#ifdef TPMOE_WITH_CUDA

#include "cuda_compat.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>

#include "align_outputs.h"
#include "cuda_launchers.h"
#include "routing_checks.h"
#include "routing_common.h"

namespace tpmoe {
namespace {

using AlignOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

AlignOutputs align_cuda(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_m) {
  check_align_args(topk_ids, num_experts, block_m);
  TORCH_CHECK(num_experts < (int64_t{1} << 30), "tpmoe::align: num_experts: expected < 2**30, got ", num_experts);
  const c10::cuda::OptionalCUDAGuard device_guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t pairs = ids.numel();
  AlignBuffers out = allocate_align_outputs(ids, num_experts, block_m);
  const int64_t num_blocks = out.block_expert.size(0);

  if (pairs > 0) {
    at::Tensor tile_counts = at::zeros({align_num_tiles(pairs), num_experts}, ids.options().dtype(at::kInt));
    C10_CUDA_CHECK(launch_align(
        ids.const_data_ptr(), tile_counts.mutable_data_ptr<int32_t>(), out.tokens_per_expert.mutable_data_ptr<int64_t>(),
        out.expert_offsets.mutable_data_ptr<int64_t>(), out.padded_offsets.mutable_data_ptr<int64_t>(),
        out.num_padded.mutable_data_ptr<int64_t>(), out.sorted_pair_ids.mutable_data_ptr<int32_t>(),
        out.sorted_ids_padded.mutable_data_ptr<int32_t>(), out.block_expert.mutable_data_ptr<int32_t>(),
        ids.scalar_type() == at::kLong, pairs, static_cast<int>(num_experts), block_m, num_blocks,
        c10::cuda::getCurrentCUDAStream()));
  }
  return out.as_tuple();
}

}  // namespace
}  // namespace tpmoe

TORCH_LIBRARY_IMPL(tpmoe, CUDA, m) { m.impl("align", &tpmoe::align_cuda); }

#endif  // TPMOE_WITH_CUDA
