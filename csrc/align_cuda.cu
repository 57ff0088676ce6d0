// tpmoe::align on CUDA: a stable counting sort of the T*K (token, expert) pairs by expert.
//   1. count:   one warp per tile of kTilePairs pairs counts the experts of its tile;
//   2. scan:    per-expert totals, then one block scans them into the (padded) offsets,
//               then every expert turns its column of tile counts into each tile's first row;
//   3. scatter: each warp walks its tile again in pair order and writes every pair at its
//               tile's next row for the expert, so rows of one expert keep the pair order;
//   4. blocks:  the expert of every block of block_m padded rows.
// The op around the kernels (checks, outputs, stream) is in align_cuda_op.cpp.
// Within a warp, lanes holding the same expert find each other with __match_any_sync and
// take consecutive rows by their lane order. No atomics: the result is the same every run.
#include <cuda_runtime.h>

#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT, kept when NDEBUG is defined
#include <cub/block/block_scan.cuh>

#include <cstdint>

#include "cuda_launchers.h"
#include "routing_common.h"

namespace tpmoe {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;
constexpr int kTilePairs = 32 * kWarpSize;  // pairs per tile (one warp)
constexpr int kWarpsPerBlock = 4;
constexpr int kScanThreads = 256;
constexpr int kThreadsPerBlock = 256;

__device__ __forceinline__ unsigned lanes_below(int lane) { return (1u << lane) - 1u; }

template <typename id_t>
__global__ void count_tile_experts_kernel(
    // pointers
    const id_t* __restrict__ expert_of_pair,   // [pairs]
    int32_t* __restrict__ tile_counts,         // [num_tiles, E], zero on entry
    // sizes
    int64_t pairs, int64_t num_tiles, int num_experts) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (tile >= num_tiles) return;
  int32_t* count = tile_counts + tile * num_experts;
  const int64_t tile_end = min(pairs, (tile + 1) * kTilePairs);
  for (int64_t chunk = tile * kTilePairs; chunk < tile_end; chunk += kWarpSize) {
    const int64_t pair = chunk + lane;
    const bool active = pair < tile_end;
    const int64_t id = active ? static_cast<int64_t>(expert_of_pair[pair]) : -1;
    // The public align checks ids on CPU only (a check here would need a device sync); an id
    // out of range stops the kernel with a device assert and is never used as an index.
    CUDA_KERNEL_ASSERT(!active || (id >= 0 && id < num_experts));
    const bool valid = active && id >= 0 && id < num_experts;
    const int expert = valid ? static_cast<int>(id) : -1;
    const unsigned peers = __match_any_sync(kFullWarpMask, expert);
    // The lowest lane of each expert's group adds the group's size; one writer per expert.
    if (valid && (peers & lanes_below(lane)) == 0) count[expert] += __popc(peers);
    __syncwarp();
  }
}

__global__ void sum_tile_counts_kernel(
    const int32_t* __restrict__ tile_counts,   // [num_tiles, E]
    int64_t* __restrict__ tokens_per_expert,   // [E]
    int64_t num_tiles, int num_experts) {
  const int expert = blockIdx.x * blockDim.x + threadIdx.x;
  if (expert >= num_experts) return;
  int64_t total = 0;
  for (int64_t tile = 0; tile < num_tiles; ++tile) total += tile_counts[tile * num_experts + expert];
  tokens_per_expert[expert] = total;
}

// One block: exclusive scans of the counts and of the counts rounded up to block_m.
__global__ void scan_offsets_kernel(
    const int64_t* __restrict__ tokens_per_expert,   // [E]
    int64_t* __restrict__ expert_offsets,            // [E+1]
    int64_t* __restrict__ padded_offsets,            // [E+1]
    int64_t* __restrict__ num_padded,                // [1]
    int num_experts, int64_t block_m) {
  using BlockScan = cub::BlockScan<int64_t, kScanThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ int64_t carry[2];
  if (threadIdx.x == 0) carry[0] = carry[1] = 0;
  __syncthreads();
  for (int base = 0; base < num_experts; base += kScanThreads) {
    const int expert = base + threadIdx.x;
    const int64_t count = expert < num_experts ? tokens_per_expert[expert] : 0;
    const int64_t padded_count = ceil_div(count, block_m) * block_m;
    int64_t row, padded_row, chunk_total, padded_chunk_total;
    BlockScan(scan_storage).ExclusiveSum(count, row, chunk_total);
    __syncthreads();
    BlockScan(scan_storage).ExclusiveSum(padded_count, padded_row, padded_chunk_total);
    if (expert < num_experts) {
      expert_offsets[expert] = carry[0] + row;
      padded_offsets[expert] = carry[1] + padded_row;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      carry[0] += chunk_total;
      carry[1] += padded_chunk_total;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    expert_offsets[num_experts] = carry[0];
    padded_offsets[num_experts] = carry[1];
    num_padded[0] = carry[1];
  }
}

// Turns each expert's column of tile counts into the first row of each tile (in place).
__global__ void tile_first_rows_kernel(
    int32_t* __restrict__ tile_counts,             // [num_tiles, E] in: counts, out: first rows
    const int64_t* __restrict__ expert_offsets,    // [E+1]
    int64_t num_tiles, int num_experts) {
  const int expert = blockIdx.x * blockDim.x + threadIdx.x;
  if (expert >= num_experts) return;
  // Rows fit in int32: the op rejects T*K >= 2**31 - 1.
  int32_t row = static_cast<int32_t>(expert_offsets[expert]);
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    const int32_t count = tile_counts[tile * num_experts + expert];
    tile_counts[tile * num_experts + expert] = row;
    row += count;
  }
}

template <typename id_t>
__global__ void scatter_pairs_kernel(
    // pointers
    const id_t* __restrict__ expert_of_pair,       // [pairs]
    int32_t* __restrict__ tile_next_row,           // [num_tiles, E]
    const int64_t* __restrict__ expert_offsets,    // [E+1]
    const int64_t* __restrict__ padded_offsets,    // [E+1]
    int32_t* __restrict__ sorted_pair_ids,         // [pairs]
    int32_t* __restrict__ sorted_ids_padded,       // [M], sentinel on entry
    // sizes
    int64_t pairs, int64_t num_tiles, int num_experts) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (tile >= num_tiles) return;
  int32_t* next_row = tile_next_row + tile * num_experts;
  const int64_t tile_end = min(pairs, (tile + 1) * kTilePairs);
  for (int64_t chunk = tile * kTilePairs; chunk < tile_end; chunk += kWarpSize) {
    const int64_t pair = chunk + lane;
    const bool active = pair < tile_end;
    const int64_t id = active ? static_cast<int64_t>(expert_of_pair[pair]) : -1;
    const bool valid = active && id >= 0 && id < num_experts;  // invalid ids asserted in the count
    const int expert = valid ? static_cast<int>(id) : -1;
    const unsigned peers = __match_any_sync(kFullWarpMask, expert);
    int32_t row = 0;
    if (valid) {
      row = next_row[expert] + __popc(peers & lanes_below(lane));
      sorted_pair_ids[row] = static_cast<int32_t>(pair);
      sorted_ids_padded[padded_offsets[expert] + (row - expert_offsets[expert])] = static_cast<int32_t>(pair);
    }
    __syncwarp();  // every peer has read next_row[expert] before its lowest lane moves it
    if (valid && (peers & lanes_below(lane)) == 0) next_row[expert] += __popc(peers);
    __syncwarp();
  }
}

__global__ void block_expert_kernel(
    const int64_t* __restrict__ padded_offsets,   // [E+1]
    const int64_t* __restrict__ num_padded,       // [1]
    int32_t* __restrict__ block_expert,           // [num_blocks]
    int64_t num_blocks, int num_experts, int64_t block_m) {
  const int64_t block = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (block >= num_blocks) return;
  const int64_t row = block * block_m;
  if (row >= num_padded[0]) {
    block_expert[block] = -1;
    return;
  }
  // The last expert whose padded segment starts at or before the row (empty segments are
  // skipped, since the next expert starts at the same row).
  int low = 0, high = num_experts;  // padded_offsets[low] <= row < padded_offsets[high]
  while (high - low > 1) {
    const int middle = (low + high) / 2;
    if (padded_offsets[middle] <= row) low = middle; else high = middle;
  }
  block_expert[block] = low;
}

template <typename id_t>
void launch_align_kernels(const id_t* topk_ids, int32_t* tile_counts, int64_t* tokens_per_expert,
                          int64_t* expert_offsets, int64_t* padded_offsets, int64_t* num_padded,
                          int32_t* sorted_pair_ids, int32_t* sorted_ids_padded, int32_t* block_expert, int64_t pairs,
                          int num_experts, int64_t block_m, int64_t num_blocks, cudaStream_t stream) {
  const int64_t num_tiles = align_num_tiles(pairs);
  const dim3 tile_grid(static_cast<unsigned>(ceil_div(num_tiles, kWarpsPerBlock)));
  const dim3 expert_grid(static_cast<unsigned>(ceil_div(num_experts, kThreadsPerBlock)));
  count_tile_experts_kernel<<<tile_grid, kWarpsPerBlock * kWarpSize, 0, stream>>>(topk_ids, tile_counts, pairs,
                                                                                 num_tiles, num_experts);
  sum_tile_counts_kernel<<<expert_grid, kThreadsPerBlock, 0, stream>>>(tile_counts, tokens_per_expert, num_tiles,
                                                                       num_experts);
  scan_offsets_kernel<<<1, kScanThreads, 0, stream>>>(tokens_per_expert, expert_offsets, padded_offsets, num_padded,
                                                      num_experts, block_m);
  tile_first_rows_kernel<<<expert_grid, kThreadsPerBlock, 0, stream>>>(tile_counts, expert_offsets, num_tiles,
                                                                       num_experts);
  scatter_pairs_kernel<<<tile_grid, kWarpsPerBlock * kWarpSize, 0, stream>>>(
      topk_ids, tile_counts, expert_offsets, padded_offsets, sorted_pair_ids, sorted_ids_padded, pairs, num_tiles,
      num_experts);
  if (num_blocks > 0) {
    block_expert_kernel<<<static_cast<unsigned>(ceil_div(num_blocks, kThreadsPerBlock)), kThreadsPerBlock, 0,
                          stream>>>(padded_offsets, num_padded, block_expert, num_blocks, num_experts, block_m);
  }
}

}  // namespace

int64_t align_num_tiles(int64_t pairs) { return ceil_div(pairs, kTilePairs); }

cudaError_t launch_align(const void* topk_ids, int32_t* tile_counts, int64_t* tokens_per_expert,
                         int64_t* expert_offsets, int64_t* padded_offsets, int64_t* num_padded,
                         int32_t* sorted_pair_ids, int32_t* sorted_ids_padded, int32_t* block_expert,
                         bool ids_are_int64, int64_t pairs, int num_experts, int64_t block_m, int64_t num_blocks,
                         cudaStream_t stream) {
  if (ids_are_int64) {
    launch_align_kernels(static_cast<const int64_t*>(topk_ids), tile_counts, tokens_per_expert, expert_offsets,
                         padded_offsets, num_padded, sorted_pair_ids, sorted_ids_padded, block_expert, pairs,
                         num_experts, block_m, num_blocks, stream);
  } else {
    launch_align_kernels(static_cast<const int32_t*>(topk_ids), tile_counts, tokens_per_expert, expert_offsets,
                         padded_offsets, num_padded, sorted_pair_ids, sorted_ids_padded, block_expert, pairs,
                         num_experts, block_m, num_blocks, stream);
  }
  return cudaGetLastError();
}

}  // namespace tpmoe
