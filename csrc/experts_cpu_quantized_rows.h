// fp8 weight rows against 5..kRowsFp8 activation rows an expert (decode and small batches, AVX-512):
// between the fused kernels (a few rows: each stored byte dequantized once per row group, fine
// while there are at most 4) and the widened path (every row stored as float32, then a GEMM:
// the store and reload of 4 bytes per weight cost more than the FMAs until there are many rows).
//
// Each 16 stored values are dequantized in a register once per group of up to 8 activation
// rows and FMA'd into 2 x NX accumulators; the value is multiplied by its block's scale there
// (one rounding: the same float the widened rows hold), as registers leave no room for per-block
// partial sums next to 16 accumulators. Work runs in chunks of whole scale blocks (~512 values)
// so that a group's activation chunk (8 x 2 KiB) stays in L1 while every weight pair of the unit
// passes over it; the pairs' accumulators wait in a small buffer between chunks. Groups are
// the outer loop: the first reads the unit's weight bytes from memory (fetching each pair's
// next chunk ahead), the others find them in L2.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "experts_cpu_quantized_kernels.h"

namespace tpmoe {
namespace cpu {
namespace dequant {

constexpr int kRowsFp8 = 32;        // activation rows an expert this path takes (past: widened)
constexpr int kRowsPairRows = 2;    // weight rows a kernel call holds
constexpr int kRowsGroup = 8;       // activation rows a kernel call holds
constexpr int64_t kRowsChunk = 512;  // values a chunk spans (whole scale blocks, at least one)

// acc [kRowsPairRows][NX] vectors, zeroed or carried; adds rows . xs over values [start, stop),
// which begin in scale block `index`; prefetches `ahead` (the rows' next chunk) where given.
template <int NX>
TPMOE_AVX512 void fp8_rows_chunk_avx512(const uint8_t* const* bytes, const float* const* scales,
                                        const float* const* xs, int64_t start, int64_t stop, int64_t index,
                                        int64_t block, int64_t offset, bool first, bool ahead, float* acc) {
  constexpr int W = kRowsPairRows;
  __m512 total[W][NX];
  #pragma GCC unroll 8
  for (int w = 0; w < W; ++w)
    #pragma GCC unroll 8
    for (int x = 0; x < NX; ++x)
      total[w][x] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + (w * NX + x) * 16);
  const int64_t first_value = start, chunk = stop - start;
  for (; start < stop; ++index) {
    const int64_t end = std::min(stop, (index + 1) * block - offset);
    __m512 scale[W];
    #pragma GCC unroll 2
    for (int w = 0; w < W; ++w) scale[w] = _mm512_set1_ps(scales[w][index] * 256.0f);
    for (int64_t j = start; j < end; j += 16) {
      if (ahead && ((j - first_value) & 63) == 0)
        #pragma GCC unroll 2
        for (int w = 0; w < W; ++w) _mm_prefetch(reinterpret_cast<const char*>(bytes[w] + j + chunk), _MM_HINT_T0);
      const __mmask16 mask = tail_mask(end - j);
      __m512 xv[NX];
      #pragma GCC unroll 8
      for (int x = 0; x < NX; ++x) xv[x] = _mm512_maskz_loadu_ps(mask, xs[x] + j);
      #pragma GCC unroll 2
      for (int w = 0; w < W; ++w) {
        const __m512 value = _mm512_mul_ps(e4m3_times_2_pow_minus8(bytes[w] + j, mask), scale[w]);
        #pragma GCC unroll 8
        for (int x = 0; x < NX; ++x) total[w][x] = _mm512_fmadd_ps(value, xv[x], total[w][x]);
      }
    }
    start = end;
  }
  #pragma GCC unroll 8
  for (int w = 0; w < W; ++w)
    #pragma GCC unroll 8
    for (int x = 0; x < NX; ++x) _mm512_storeu_ps(acc + (w * NX + x) * 16, total[w][x]);
}

using RowsChunk = void (*)(const uint8_t* const*, const float* const*, const float* const*, int64_t, int64_t,
                           int64_t, int64_t, int64_t, bool, bool, float*);

inline RowsChunk fp8_rows_chunk(int nx) {
  static constexpr RowsChunk table[kRowsGroup] = {
      fp8_rows_chunk_avx512<1>, fp8_rows_chunk_avx512<2>, fp8_rows_chunk_avx512<3>, fp8_rows_chunk_avx512<4>,
      fp8_rows_chunk_avx512<5>, fp8_rows_chunk_avx512<6>, fp8_rows_chunk_avx512<7>, fp8_rows_chunk_avx512<8>};
  return table[nx - 1];
}

// Weight rows 0..n_weight_rows-1 (bytes[q], scales[q]: each row's first scale, later ones at
// stride 1) dotted with the n activation rows xs over `count` values, the first `offset` into
// its scale block: sums[r * ld + slots[q]]. `acc` is the caller's scratch (kept between calls).
TPMOE_AVX512 inline void fp8_rows(const uint8_t* const* bytes, const float* const* scales, int64_t n_weight_rows,
                                  const float* const* xs, int64_t n, int64_t count, int64_t block, int64_t offset,
                                  const int64_t* slots, float* sums, int64_t ld, std::vector<float>& acc) {
  const int64_t pairs = (n_weight_rows + kRowsPairRows - 1) / kRowsPairRows;
  const int64_t groups = (n + kRowsGroup - 1) / kRowsGroup;
  const int64_t blocks_per_chunk = std::max<int64_t>(1, kRowsChunk / block);
  acc.resize(static_cast<size_t>(pairs * kRowsPairRows * kRowsGroup * 16));
  for (int64_t g = 0, r0 = 0; g < groups; ++g) {
    const int nx = static_cast<int>((n - r0) / (groups - g));  // the rows spread evenly over the groups
    const RowsChunk chunk = fp8_rows_chunk(nx);
    for (int64_t index = 0, start = 0; start < count; index += blocks_per_chunk) {
      const int64_t stop = std::min(count, (index + blocks_per_chunk) * block - offset);
      for (int64_t p = 0; p < pairs; ++p) {
        const int64_t q0 = p * kRowsPairRows;
        const uint8_t* pair_bytes[kRowsPairRows];
        const float* pair_scales[kRowsPairRows];
        for (int w = 0; w < kRowsPairRows; ++w) {  // a short pair repeats its last row
          const int64_t q = std::min(q0 + w, n_weight_rows - 1);
          pair_bytes[w] = bytes[q];
          pair_scales[w] = scales[q];
        }
        chunk(pair_bytes, pair_scales, xs + r0, start, stop, index, block, offset, start == 0,
              g == 0 && stop < count, acc.data() + p * kRowsPairRows * kRowsGroup * 16);
      }
      start = stop;
    }
    for (int64_t p = 0; p < pairs; ++p)
      for (int w = 0; w < kRowsPairRows && p * kRowsPairRows + w < n_weight_rows; ++w)
        for (int x = 0; x < nx; ++x)
          sums[(r0 + x) * ld + slots[p * kRowsPairRows + w]] =
              _mm512_reduce_add_ps(_mm512_loadu_ps(acc.data() + (p * kRowsPairRows * kRowsGroup + w * nx + x) * 16));
    r0 += nx;
  }
}

}  // namespace dequant
}  // namespace cpu
}  // namespace tpmoe
