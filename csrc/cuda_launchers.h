// The launchers of the CUDA kernels (route_cuda.cu, align_cuda.cu), in plain types. The
// kernel files include no ATen/torch headers, which keeps nvcc fast; the op glue
// (route_cuda_op.cpp, align_cuda_op.cpp) checks, allocates and picks the stream.
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

// Pair ids are int64 when ids_are_int64, int32 otherwise. Outputs are preset by the caller:
// tile_counts zero, sorted_ids_padded the sentinel, block_expert -1. Needs pairs > 0.
cudaError_t launch_align(
    // pointers
    const void* topk_ids,            // [pairs] int32 or int64
    int32_t* tile_counts,            // [align_num_tiles(pairs), E] zero, scratch
    int64_t* tokens_per_expert,      // [E]
    int64_t* expert_offsets,         // [E+1]
    int64_t* padded_offsets,         // [E+1]
    int64_t* num_padded,             // [1]
    int32_t* sorted_pair_ids,        // [pairs]
    int32_t* sorted_ids_padded,      // [M]
    int32_t* block_expert,           // [num_blocks]
    // sizes
    bool ids_are_int64, int64_t pairs, int num_experts, int64_t block_m, int64_t num_blocks, cudaStream_t stream);

int64_t align_num_tiles(int64_t pairs);

}  // namespace tpmoe
