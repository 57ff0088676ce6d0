// Widening one tile of a GEMM operand to float32 (csrc/experts_cpu_weight_tile.cpp): the one
// place where the expert weights are converted on their way into a GEMM, for every stored
// format but one. The widened bf16 GEMM (experts_cpu_widen.cpp) loads its weight and
// activation tiles through it, except that its hand-written kernels widen bf16 weights with
// rows contiguous in k inside their own loads (a shift or an unpack a vector: bf16 is the
// upper half of a float32, and a tile written out and read back cost as much as the
// products at few rows). The quantized formats (fp8 with block scales, MXFP4 blocks) are
// widened row by row by their own op (widen_row, experts_cpu_quantized.cpp: a row's scales
// change along it) into the same zero-padded float32 layout, and multiplied by the same dot
// kernel (widened_dot_f32, experts_cpu.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace tpmoe {
namespace cpu {

// A float32 tile of `rows` x `cols` in a caller's buffer. Stored in the order its source is
// contiguous (so the load reads whole cache lines): row-major with leading dimension ld, or,
// where `transposed`, its transpose (cols x rows, row-major, leading dimension ld).
struct Fp32Tile {
  const float* data = nullptr;
  int64_t ld = 0;
  bool transposed = false;
};

// Widens operand[r0 : r0 + rows, c0 : c0 + cols] of a 2-D view (bf16, fp16 or float32, any
// strides) into buffer (at least rows * cols floats). Exact: every such value is a float32.
Fp32Tile widen_tile(const at::Tensor& operand, int64_t r0, int64_t rows, int64_t c0, int64_t cols, float* buffer);

}  // namespace cpu
}  // namespace tpmoe
