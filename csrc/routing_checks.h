// Argument checks of the native routing ops, shared by the CPU and CUDA implementations.
// The public Python functions (tpmoe/routing.py) check first with friendlier messages; these
// keep a direct call of torch.ops.tpmoe.* from reaching a kernel with bad input.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <limits>
#include <string>

#include "routing_common.h"

namespace tpmoe {

inline Scoring parse_scoring(c10::string_view scoring) {
  const std::string name(scoring.data(), scoring.size());
  if (name == "softmax") return Scoring::kSoftmax;
  if (name == "topk_softmax") return Scoring::kTopkSoftmax;
  TORCH_CHECK(name == "sigmoid_group",
              "tpmoe::route: scoring: expected 'softmax', 'topk_softmax' or 'sigmoid_group', got '", name, "'");
  return Scoring::kSigmoidGroup;
}

inline void check_route_args(const at::Tensor& router_logits, int64_t top_k, Scoring scoring,
                             const c10::optional<at::Tensor>& correction_bias, int64_t n_group,
                             int64_t topk_group) {
  TORCH_CHECK(router_logits.dim() == 2, "tpmoe::route: router_logits: expected a 2-D tensor [T, E], got ",
              router_logits.dim(), "-D");
  const auto dtype = router_logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "tpmoe::route: router_logits: expected float32, float64, float16 or bfloat16, got ", dtype);
  const int64_t num_experts = router_logits.size(1);
  TORCH_CHECK(num_experts >= 1, "tpmoe::route: router_logits: expected at least one expert column, got 0");
  TORCH_CHECK(top_k >= 1 && top_k <= num_experts, "tpmoe::route: top_k: expected 1 <= top_k <= ", num_experts,
              ", got ", top_k);
  TORCH_CHECK(n_group >= 1 && num_experts % n_group == 0, "tpmoe::route: n_group: expected a divisor of ",
              num_experts, ", got ", n_group);
  TORCH_CHECK(topk_group >= 1 && topk_group <= n_group, "tpmoe::route: topk_group: expected 1 <= topk_group <= ",
              n_group, ", got ", topk_group);
  if (scoring == Scoring::kSigmoidGroup) {
    const int64_t kept_experts = topk_group * (num_experts / n_group);
    TORCH_CHECK(top_k <= kept_experts, "tpmoe::route: top_k: expected <= the experts of the kept groups (",
                kept_experts, "), got ", top_k);
  } else {
    TORCH_CHECK(n_group == 1 && topk_group == 1,
                "tpmoe::route: n_group/topk_group: group-limited routing needs scoring 'sigmoid_group'");
    TORCH_CHECK(!correction_bias.has_value(),
                "tpmoe::route: correction_bias: only scoring 'sigmoid_group' uses it");
  }
  if (correction_bias.has_value()) {
    const at::Tensor& bias = *correction_bias;
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == num_experts, "tpmoe::route: correction_bias: expected shape [",
                num_experts, "], got ", bias.sizes());
    TORCH_CHECK(at::isFloatingType(bias.scalar_type()), "tpmoe::route: correction_bias: expected a floating dtype, got ",
                bias.scalar_type());
    TORCH_CHECK(bias.device() == router_logits.device(), "tpmoe::route: correction_bias: expected device ",
                router_logits.device(), ", got ", bias.device());
  }
}

inline void check_align_args(const at::Tensor& topk_ids, int64_t num_experts, int64_t block_m) {
  TORCH_CHECK(topk_ids.dim() == 2, "tpmoe::align: topk_ids: expected a 2-D tensor [T, K], got ", topk_ids.dim(),
              "-D");
  TORCH_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
              "tpmoe::align: topk_ids: expected int32 or int64, got ", topk_ids.scalar_type());
  TORCH_CHECK(num_experts >= 1, "tpmoe::align: num_experts: expected >= 1, got ", num_experts);
  TORCH_CHECK(block_m >= 1, "tpmoe::align: block_m: expected >= 1, got ", block_m);
  // Pair indices and the sentinel T*K are stored as int32.
  TORCH_CHECK(topk_ids.numel() < std::numeric_limits<int32_t>::max(),
              "tpmoe::align: topk_ids: expected fewer than 2**31 - 1 (token, expert) pairs, got ", topk_ids.numel());
}

}  // namespace tpmoe
