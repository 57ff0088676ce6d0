// tpmoe::route for CUDA tensors: checks, allocates, launches the kernel of route_cuda.cu on
// the current stream. Built only in CUDA builds of the extension (TPMOE_WITH_CUDA).
#ifdef TPMOE_WITH_CUDA

#include "cuda_compat.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "cuda_launchers.h"
#include "routing_checks.h"
#include "routing_common.h"

namespace tpmoe {
namespace {

// The route kernel's dynamic shared memory stays within the default 48 KiB per block.
constexpr int64_t kMaxSharedBytesPerWarp = 48 * 1024;

LogitType logit_type_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return LogitType::kFloat32;
    case at::kDouble: return LogitType::kFloat64;
    case at::kHalf: return LogitType::kFloat16;
    default: return LogitType::kBFloat16;  // check_route_args admits these four only
  }
}

std::tuple<at::Tensor, at::Tensor> route_cuda(const at::Tensor& router_logits, int64_t top_k,
                                              c10::string_view scoring_name, bool renormalize,
                                              const c10::optional<at::Tensor>& correction_bias, int64_t n_group,
                                              int64_t topk_group, double routed_scaling_factor) {
  const Scoring scoring = parse_scoring(scoring_name);
  check_route_args(router_logits, top_k, scoring, correction_bias, n_group, topk_group);
  const int64_t T = router_logits.size(0);
  const int64_t E = router_logits.size(1);
  TORCH_CHECK(route_shared_bytes_per_warp(E, top_k, n_group) <= kMaxSharedBytesPerWarp,
              "tpmoe::route: router_logits: the CUDA kernel holds a token's scores in shared memory and supports "
              "up to about 5000 experts, got ", E);
  const c10::cuda::OptionalCUDAGuard device_guard(router_logits.device());
  const at::Tensor logits = router_logits.contiguous();
  const auto weight_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor topk_weights = at::empty({T, top_k}, logits.options().dtype(weight_dtype));
  at::Tensor topk_ids = at::empty({T, top_k}, logits.options().dtype(at::kLong));
  if (T == 0) return {topk_weights, topk_ids};
  at::Tensor bias64;
  if (correction_bias.has_value()) bias64 = correction_bias->to(at::kDouble).contiguous();

  C10_CUDA_CHECK(launch_route(logits.const_data_ptr(), bias64.defined() ? bias64.const_data_ptr<double>() : nullptr,
                              topk_weights.mutable_data_ptr(), topk_ids.mutable_data_ptr<int64_t>(),
                              logit_type_of(logits.scalar_type()), T, static_cast<int>(E), static_cast<int>(top_k),
                              scoring, renormalize, static_cast<int>(n_group), static_cast<int>(topk_group),
                              routed_scaling_factor, c10::cuda::getCurrentCUDAStream()));
  return {topk_weights, topk_ids};
}

}  // namespace
}  // namespace tpmoe

TORCH_LIBRARY_IMPL(tpmoe, CUDA, m) { m.impl("route", &tpmoe::route_cuda); }

#endif  // TPMOE_WITH_CUDA
