// widen_tile: see experts_cpu_weight_tile.h.
#include "experts_cpu_weight_tile.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace tpmoe {
namespace cpu {
namespace {

// Plain loops over a contiguous run: the compiler vectorizes the bf16 -> float32 conversion
// (a 16-bit shift) at -O3, so a tile costs about one pass over its bytes.
template <typename source_t>
Fp32Tile widen(const source_t* source, int64_t stride_r, int64_t stride_c, int64_t rows, int64_t cols,
               float* buffer) {
  if (stride_c == 1 || cols == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      const source_t* in = source + r * stride_r;
      float* out = buffer + r * cols;
      for (int64_t c = 0; c < cols; ++c) out[c] = static_cast<float>(in[c]);
    }
    return {buffer, cols, false};
  }
  if (stride_r == 1 || rows == 1) {
    // A transposed view (x @ W^T weights, dW's transposed activations): rows run along memory,
    // so the tile is kept transposed and the GEMM told so.
    for (int64_t c = 0; c < cols; ++c) {
      const source_t* in = source + c * stride_c;
      float* out = buffer + c * rows;
      for (int64_t r = 0; r < rows; ++r) out[r] = static_cast<float>(in[r]);
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
