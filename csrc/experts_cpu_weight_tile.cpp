// widen_tile: see experts_cpu_weight_tile.h.
#include "experts_cpu_weight_tile.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include <cstring>

namespace tpmoe {
namespace cpu {
namespace {

// Built for AVX2 too where the compiler can (picked at load time by the CPU): the base x86-64
// build has 4-lane SSE2 only, and on the AVX2-only CPUs this path is for the conversion would
// then take a noticeable share of a decode step's weight read.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TPMOE_WIDEN_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TPMOE_WIDEN_CLONES
#endif

// bf16 -> float32 of a contiguous run: the bf16 bits are the float32's upper half.
TPMOE_WIDEN_CLONES void widen_bf16_run(const c10::BFloat16* in, int64_t count, float* out) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(in);
  uint32_t* out_bits = reinterpret_cast<uint32_t*>(out);
  for (int64_t i = 0; i < count; ++i) out_bits[i] = uint32_t(bits[i]) << 16;
}

template <typename source_t>
void widen_run(const source_t* in, int64_t count, float* out) {
  if constexpr (std::is_same_v<source_t, c10::BFloat16>) {
    widen_bf16_run(in, count, out);
  } else {
    for (int64_t i = 0; i < count; ++i) out[i] = static_cast<float>(in[i]);
  }
}

// Contiguous runs through widen_run (vectorized), so a tile costs about one pass over its bytes.
template <typename source_t>
Fp32Tile widen(const source_t* source, int64_t stride_r, int64_t stride_c, int64_t rows, int64_t cols,
               float* buffer) {
  if (stride_c == 1 || cols == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      widen_run(source + r * stride_r, cols, buffer + r * cols);
    }
    return {buffer, cols, false};
  }
  if (stride_r == 1 || rows == 1) {
    // A transposed view (x @ W^T weights, dW's transposed activations): rows run along memory,
    // so the tile is kept transposed and the GEMM told so.
    for (int64_t c = 0; c < cols; ++c) {
      widen_run(source + c * stride_c, rows, buffer + c * rows);
    }
    return {buffer, rows, true};
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) buffer[r * cols + c] = static_cast<float>(source[r * stride_r + c * stride_c]);
  }
  return {buffer, cols, false};
}

}  // namespace

Fp32Tile widen_tile(const at::Tensor& operand, int64_t r0, int64_t rows, int64_t c0, int64_t cols, float* buffer) {
  const int64_t stride_r = operand.stride(0), stride_c = operand.stride(1);
  const int64_t offset = r0 * stride_r + c0 * stride_c;
  switch (operand.scalar_type()) {
    case at::kBFloat16:
      return widen(operand.const_data_ptr<c10::BFloat16>() + offset, stride_r, stride_c, rows, cols, buffer);
    case at::kHalf:
      return widen(operand.const_data_ptr<c10::Half>() + offset, stride_r, stride_c, rows, cols, buffer);
    case at::kFloat:
      return widen(operand.const_data_ptr<float>() + offset, stride_r, stride_c, rows, cols, buffer);
    default:
      TORCH_CHECK(false, "tpmoe: widen_tile: expected a bf16, fp16 or float32 operand, got ", operand.scalar_type());
  }
}

}  // namespace cpu
}  // namespace tpmoe
