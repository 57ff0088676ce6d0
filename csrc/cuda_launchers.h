// The launcher of the CUDA route kernel (route_cuda.cu), in plain types. The kernel file
// includes no ATen/torch headers, which keeps nvcc fast; the op glue (route_cuda_op.cpp)
// checks, allocates and picks the stream. (align on CUDA is Triton: tpmoe/triton/align.py.)
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "routing_common.h"

namespace tpmoe {

enum class LogitType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Shared memory one warp of the route kernel needs: the token's scores and flags.
int64_t route_shared_bytes_per_warp(int64_t num_experts, int64_t top_k, int64_t n_group);

// Weights are double for kFloat64 logits, float otherwise. Returns the launch status.
cudaError_t launch_route(
    // pointers
    const void* router_logits,       // [T, E] of logit_type
    const double* correction_bias,   // [E] or nullptr
    void* topk_weights,              // [T, K] float (double for kFloat64 logits)
    int64_t* topk_ids,               // [T, K]
    // sizes and types
    LogitType logit_type, int64_t num_tokens, int num_experts, int top_k,
    // scoring
    Scoring scoring, bool renormalize, int n_group, int topk_group, double routed_scaling_factor,
    cudaStream_t stream);

}  // namespace tpmoe
