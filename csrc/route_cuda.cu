// tpmoe::route on CUDA, the kernel: one warp per token. The warp keeps the token's
// selection scores in shared memory and picks the top-k by K rounds of a warp-wide arg-max,
// which gives the same order as the CPU kernel (larger score first, ties to the lower expert
// index). The op around it (checks, outputs, stream) is in route_cuda_op.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda_launchers.h"
#include "routing_common.h"

namespace tpmoe {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;
constexpr int kMaxWarpsPerBlock = 4;
// The default dynamic shared memory limit, so that no opt-in attribute is needed.
constexpr int64_t kMaxSharedBytesPerBlock = 48 * 1024;

__device__ __forceinline__ double to_double(float value) { return value; }
__device__ __forceinline__ double to_double(double value) { return value; }
__device__ __forceinline__ double to_double(__half value) { return __half2float(value); }
__device__ __forceinline__ double to_double(__nv_bfloat16 value) { return __bfloat162float(value); }

__device__ __forceinline__ double warp_sum(double value) {
  // A butterfly: every lane adds the same pairs (a + b == b + a), so all lanes agree.
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullWarpMask, value, offset);
  return value;
}

__device__ __forceinline__ double warp_max(double value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = fmax(value, __shfl_xor_sync(kFullWarpMask, value, offset));
  }
  return value;
}

// The index of the best score not yet excluded, by ranks_above; the same on every lane.
__device__ int warp_select(const double* score, const unsigned char* excluded, int count, int lane) {
  double best_score = 0.0;
  int best_index = -1;
  for (int i = lane; i < count; i += kWarpSize) {
    if (!excluded[i] && (best_index < 0 || ranks_above(score[i], i, best_score, best_index))) {
      best_score = score[i];
      best_index = i;
    }
  }
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const double other_score = __shfl_xor_sync(kFullWarpMask, best_score, offset);
    const int other_index = __shfl_xor_sync(kFullWarpMask, best_index, offset);
    if (other_index >= 0 && (best_index < 0 || ranks_above(other_score, other_index, best_score, best_index))) {
      best_score = other_score;
      best_index = other_index;
    }
  }
  return best_index;
}

// Per-warp shared memory: double selection[E], weight[K], group_score[n_group];
// then unsigned char excluded[E], group_kept[n_group].
__host__ __device__ inline int64_t shared_bytes_per_warp(int64_t E, int64_t K, int64_t n_group) {
  const int64_t bytes = 8 * (E + K + n_group) + E + n_group;
  return (bytes + 15) / 16 * 16;
}

template <typename scalar_t, typename weight_t>
__global__ void route_kernel(
    // pointers
    const scalar_t* __restrict__ router_logits,   // [T, E]
    const double* __restrict__ correction_bias,   // [E] or nullptr
    weight_t* __restrict__ topk_weights,          // [T, K]
    int64_t* __restrict__ topk_ids,               // [T, K]
    // sizes
    int64_t num_tokens, int num_experts, int top_k,
    // scoring
    Scoring scoring, bool renormalize, int n_group, int topk_group, double routed_scaling_factor) {
  extern __shared__ __align__(16) unsigned char shared_memory[];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarpSize) + warp;
  if (token >= num_tokens) return;  // the whole warp leaves together

  const int E = num_experts;
  const int K = top_k;
  unsigned char* warp_memory = shared_memory + warp * shared_bytes_per_warp(E, K, n_group);
  double* selection = reinterpret_cast<double*>(warp_memory);
  double* weight = selection + E;
  double* group_score = weight + K;
  unsigned char* excluded = reinterpret_cast<unsigned char*>(group_score + n_group);
  unsigned char* group_kept = excluded + E;
  const scalar_t* logits_row = router_logits + token * E;

  // softmax is monotone, so ranking by the logit ranks by the probability, exactly.
  double local_max = -INFINITY;
  for (int e = lane; e < E; e += kWarpSize) {
    const double logit = to_double(logits_row[e]);
    selection[e] = scoring == Scoring::kSigmoidGroup
                       ? sigmoid_f64(logit) + (correction_bias != nullptr ? correction_bias[e] : 0.0)
                       : logit;
    excluded[e] = 0;
    local_max = fmax(local_max, logit);
  }
  __syncwarp();
  double softmax_denominator = 1.0;
  double max_logit = 0.0;
  if (scoring == Scoring::kSoftmax) {
    max_logit = warp_max(local_max);
    double local_sum = 0.0;
    for (int e = lane; e < E; e += kWarpSize) local_sum += exp(selection[e] - max_logit);
    softmax_denominator = warp_sum(local_sum);
  }

  if (scoring == Scoring::kSigmoidGroup && n_group > 1) {
    // The DeepSeek-V3 group score: the sum of the two best scores of the group.
    const int group_size = E / n_group;
    for (int g = lane; g < n_group; g += kWarpSize) {
      const double* scores = selection + g * group_size;
      int first = 0;
      for (int i = 1; i < group_size; ++i) {
        if (ranks_above(scores[i], i, scores[first], first)) first = i;
      }
      double score = scores[first];
      if (group_size > 1) {
        int second = first == 0 ? 1 : 0;
        for (int i = 0; i < group_size; ++i) {
          if (i != first && ranks_above(scores[i], i, scores[second], second)) second = i;
        }
        score = scores[first] + scores[second];
      }
      group_score[g] = score;
      group_kept[g] = 0;
    }
    __syncwarp();
    for (int round = 0; round < topk_group; ++round) {
      // group_kept doubles as the exclusion mask of the groups already taken.
      const int best_group = warp_select(group_score, group_kept, n_group, lane);
      if (lane == 0) group_kept[best_group] = 1;
      __syncwarp();
    }
    for (int e = lane; e < E; e += kWarpSize) excluded[e] = group_kept[e / group_size] ? 0 : 1;
    __syncwarp();
  }

  double first_logit = 0.0;
  for (int k = 0; k < K; ++k) {
    const int expert = warp_select(selection, excluded, E, lane);
    if (k == 0) first_logit = to_double(logits_row[expert]);
    if (lane == k % kWarpSize) {
      excluded[expert] = 1;
      topk_ids[token * K + k] = expert;
      const double logit = to_double(logits_row[expert]);
      switch (scoring) {
        case Scoring::kSoftmax: weight[k] = exp(logit - max_logit) / softmax_denominator; break;
        // The first selected logit is the largest one.
        case Scoring::kTopkSoftmax: weight[k] = exp(logit - first_logit); break;
        case Scoring::kSigmoidGroup: weight[k] = sigmoid_f64(logit); break;
      }
    }
    __syncwarp();
  }

  double local_total = 0.0;
  for (int k = lane; k < K; k += kWarpSize) local_total += weight[k];
  const double total = warp_sum(local_total);
  double divisor = 1.0;
  if (scoring == Scoring::kTopkSoftmax) {
    divisor = total;  // the softmax over the selected logits; renormalize changes nothing
  } else if (renormalize) {
    divisor = total + (scoring == Scoring::kSigmoidGroup ? kRenormEpsilon : 0.0);
  }
  for (int k = lane; k < K; k += kWarpSize) {
    topk_weights[token * K + k] = static_cast<weight_t>((weight[k] / divisor) * routed_scaling_factor);
  }
}

}  // namespace

int64_t route_shared_bytes_per_warp(int64_t num_experts, int64_t top_k, int64_t n_group) {
  return shared_bytes_per_warp(num_experts, top_k, n_group);
}

cudaError_t launch_route(const void* router_logits, const double* correction_bias, void* topk_weights,
                         int64_t* topk_ids, LogitType logit_type, int64_t num_tokens, int num_experts, int top_k,
                         Scoring scoring, bool renormalize, int n_group, int topk_group,
                         double routed_scaling_factor, cudaStream_t stream) {
  const int64_t bytes_per_warp = shared_bytes_per_warp(num_experts, top_k, n_group);
  if (bytes_per_warp > kMaxSharedBytesPerBlock) return cudaErrorInvalidValue;  // the op checks first
  const int64_t warps_per_block = std::min<int64_t>(kMaxWarpsPerBlock, kMaxSharedBytesPerBlock / bytes_per_warp);
  const dim3 grid(static_cast<unsigned>(ceil_div(num_tokens, warps_per_block)));
  const dim3 block(static_cast<unsigned>(warps_per_block * kWarpSize));
  const size_t shared_bytes = static_cast<size_t>(warps_per_block * bytes_per_warp);
  auto launch = [&](auto* logits, auto* weights) {
    route_kernel<<<grid, block, shared_bytes, stream>>>(logits, correction_bias, weights, topk_ids, num_tokens,
                                                        num_experts, top_k, scoring, renormalize, n_group,
                                                        topk_group, routed_scaling_factor);
  };
  float* weights_f32 = static_cast<float*>(topk_weights);
  switch (logit_type) {
    case LogitType::kFloat32: launch(static_cast<const float*>(router_logits), weights_f32); break;
    case LogitType::kFloat64:
      launch(static_cast<const double*>(router_logits), static_cast<double*>(topk_weights));
      break;
    case LogitType::kFloat16: launch(static_cast<const __half*>(router_logits), weights_f32); break;
    case LogitType::kBFloat16: launch(static_cast<const __nv_bfloat16*>(router_logits), weights_f32); break;
  }
  return cudaGetLastError();
}

}  // namespace tpmoe
