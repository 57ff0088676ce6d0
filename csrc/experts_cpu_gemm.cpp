// The bf16 GEMM of the experts: out[m, n] = sum_k a[m, k] b[n, k] with b's rows contiguous in
// k (x @ W^T of the concatenated/interleaved layouts), for any number of rows an expert gets.
//
// Why not ATen: oneDNN's bf16 GEMM repacks the weight on every call. With few rows that
// costs as much as the product (at M <= 8 it reads the weights at about half the memory
// bandwidth of the development machine, AMD EPYC Zen 4: 11 GB/s of 24 GB/s a core, and
// decode is nothing but that read); with dozens of rows it is still ~20% of an expert's
// time. Here the dot products run along k, where both operands are already contiguous, with
// AVX512-BF16 (vdpbf16ps: 32 bf16 products per instruction, float32 sums): tiles of 4 rows x
// 6 weight rows (24 accumulators, 10 loads per 24 instructions), weight rows in blocks that
// stay in L2 while every group of 4 rows reuses them, each weight row read from memory once
// and, past 8 rows, fetched a block ahead. Single core: 160 GFLOP/s at M = 32 and 190 at
// M = 128 on the Qwen3 gate_up shape, 200 at M = 128 for K = 4096 (oneDNN's dense GEMM: ~200,
// the vdpbf16ps peak: 232), measured before the tiles kept their sums in registers and stored
// them as vectors; with that the whole Qwen3 forward at T = 512 (~32 rows an expert) runs at
// 0.84-0.86 of a dense GEMM of the same FLOPs on 2 cores (was 0.74-0.82). It is compiled for
// that ISA with a function attribute and runs only where the CPU reports it (checked once at run
// time); everywhere else, and for other dtypes and the gpt_oss layout, ATen's GEMM runs.
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

#include "experts_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TPMOE_HAVE_BF16_KERNEL 1
#include <immintrin.h>
#endif

namespace tpmoe {
namespace cpu {

#ifdef TPMOE_HAVE_BF16_KERNEL
namespace {

#define TPMOE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Bytes of weight rows per L2 block (a multiple of the 6-row tiles, at least one tile): the
// block is read by every group of 4 input rows, so it stays in L2 (1 MiB a core), with room
// for the next block arriving. Single core, bf16 GEMM [M, K] x [K, N]^T: 144 KiB ran K = 768
// (Qwen3 down) at 159 GFLOP/s for M = 32 against 143 with 288 KiB, K = 14336 (Mixtral down)
// at 199 against 189 for M = 128.
constexpr int64_t kBlockBytes = 144 * 1024;
// Up to this many input rows each tile asks for its own weight rows a little ahead (below);
// with more, the next block is fetched into L2 while this one is computed (NextBlockPrefetch).
constexpr int64_t kMaxRowsForInTilePrefetch = 8;
// Up to this many rows the weights are streamed one row at a time (dot_one_weight_row): it
// reads at 17-21 GB/s on one core at M = 1, 2 (a plain sum: ~20 GB/s); at M = 3, 4 its 4-row
// inner loop loads 5 vectors per 4 products and the 6-row tiles read faster (16 against 11-14
// GB/s, K = 2048).
constexpr int64_t kMaxRowsForInOrderStream = 2;
// How far ahead the weight rows are prefetched, in elements (8 KiB; 2 and 16 KiB measured
// within noise of it on the Mixtral shape at T = 32 and 128).
constexpr int64_t kPrefetchElements = 4096;

// a + b lane-pairwise after interleaving: per 128-bit lane [a0+a2, b0+b2, a1+a3, b1+b3].
TPMOE_BF16_TARGET __attribute__((always_inline)) inline __m512 pair_sum_ps(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
}
// The same on pairs of floats: per 128-bit lane [a01 + a23, b01 + b23] as (a01, b01, a23, b23).
TPMOE_BF16_TARGET __attribute__((always_inline)) inline __m512 pair_sum_pd(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))),
                       _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))));
}
// The four horizontal sums of a, b, c, d: one shuffle tree instead of four reductions.
TPMOE_BF16_TARGET __attribute__((always_inline)) inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 abcd = pair_sum_pd(pair_sum_ps(a, b), pair_sum_ps(c, d));  // a, b, c, d per 128-bit lane
  const __m256 halves = _mm256_add_ps(_mm512_castps512_ps256(abcd),
                                      _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(abcd), 1)));
  return _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps(halves, 1));
}

// Per 128-bit lane of a and b: [a.l0+a.l1, a.l2+a.l3, b.l0+b.l1, b.l2+b.l3].
TPMOE_BF16_TARGET __attribute__((always_inline)) inline __m512 lane_pair_sum(__m512 a, __m512 b) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
}
// The horizontal sums of the 12 accumulators of two tile rows in one vector (lane 6i + c =
// sum of row i's column c; lanes 12-15 zero): a transposing tree, 3 instructions a pair.
TPMOE_BF16_TARGET __attribute__((always_inline)) inline __m512 sum_two_rows_of_6(
    __m512 a0, __m512 a1, __m512 a2, __m512 a3, __m512 a4, __m512 a5, __m512 b0, __m512 b1, __m512 b2, __m512 b3,
    __m512 b4, __m512 b5) {
  const __m512 q0 = pair_sum_pd(pair_sum_ps(a0, a1), pair_sum_ps(a2, a3));
  const __m512 q1 = pair_sum_pd(pair_sum_ps(a4, a5), pair_sum_ps(b0, b1));
  const __m512 q2 = pair_sum_pd(pair_sum_ps(b2, b3), pair_sum_ps(b4, b5));
  // q[i] holds, per 128-bit lane, partial sums of 4 accumulators; fold the four lanes.
  return lane_pair_sum(lane_pair_sum(q0, q1), lane_pair_sum(q2, _mm512_setzero_ps()));
}
// float32 -> bf16 bits, round to nearest even, NaN -> 0x7FC0: c10::BFloat16's conversion.
TPMOE_BF16_TARGET __attribute__((always_inline)) inline __m256i to_bf16_bits(__m512 values) {
  const __m512i bits = _mm512_castps_si512(values);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(rounded);
}

// out[r, c] for r < kRows, c < kCols: kRows x kCols float32 accumulators over K.
template <int kRows, int kCols, bool kInTilePrefetch>
TPMOE_BF16_TARGET void dot_tile(int64_t K, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t ldb,
                                c10::BFloat16* out, int64_t ld_out) {
  // Every loop over rows and columns unrolled by pragma: unrolled only later, GCC kept a copy
  // of the accumulators on the stack, zeroed, spilled and reloaded around every tile (that and
  // the scalar sums the 6-column tiles had cost 11% of the Qwen3 forward at T = 512).
  __m512 acc[kRows][kCols];
  #pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
    #pragma GCC unroll 8
    for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_setzero_ps();
  // The K % 32 tail first, with masked loads (the missing lanes read as zeros), then whole steps.
  const int64_t tail = K % 32;
  if (tail != 0) {
    const __mmask32 mask = static_cast<__mmask32>((uint64_t(1) << tail) - 1);
    __m512i b_vec[kCols];
    #pragma GCC unroll 8
    for (int c = 0; c < kCols; ++c) b_vec[c] = _mm512_maskz_loadu_epi16(mask, b + c * ldb);
    #pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512i a_vec = _mm512_maskz_loadu_epi16(mask, a + r * lda);
      #pragma GCC unroll 8
      for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)a_vec, (__m512bh)b_vec[c]);
    }
  }
  for (int64_t k = tail; k < K; k += 32) {
    __m512i b_vec[kCols];
    #pragma GCC unroll 8
    for (int c = 0; c < kCols; ++c) {
      // With few input rows the block is read from memory by this tile: ask for its rows a
      // little ahead (past a row's end this runs into the next row, next in memory for a
      // contiguous weight). With more rows the block is already in L2 and these cost time.
      if (kInTilePrefetch) {
        _mm_prefetch(reinterpret_cast<const char*>(b + c * ldb + k + kPrefetchElements), _MM_HINT_T0);
      }
      b_vec[c] = _mm512_loadu_si512(b + c * ldb + k);
    }
    #pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512i a_vec = _mm512_loadu_si512(a + r * lda + k);
      #pragma GCC unroll 8
      for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)a_vec, (__m512bh)b_vec[c]);
    }
  }
  if constexpr (kCols == 6) {
    // Two rows (12 sums) a vector, stored with masked stores (the second row's 6 lanes
    // through a pointer 6 elements before its start, so lanes 6-11 land on its columns 0-5).
    #pragma GCC unroll 8
    for (int r = 0; r < kRows; r += 2) {
      const int r2 = r + 1 < kRows ? r + 1 : r;  // an odd last row pairs with itself, unstored
      const __m256i sums = to_bf16_bits(sum_two_rows_of_6(acc[r][0], acc[r][1], acc[r][2], acc[r][3], acc[r][4],
                                                          acc[r][5], acc[r2][0], acc[r2][1], acc[r2][2],
                                                          acc[r2][3], acc[r2][4], acc[r2][5]));
      _mm256_mask_storeu_epi16(out + r * ld_out, 0x003F, sums);
      if (r2 != r) _mm256_mask_storeu_epi16(out + r2 * ld_out - 6, 0x0FC0, sums);
    }
    return;
  }
  #pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    c10::BFloat16* out_row = out + r * ld_out;
    int c = 0;
    for (; c + 4 <= kCols; c += 4) {
      alignas(16) float sums[4];
      _mm_store_ps(sums, sum4(acc[r][c], acc[r][c + 1], acc[r][c + 2], acc[r][c + 3]));
      for (int i = 0; i < 4; ++i) out_row[c + i] = c10::BFloat16(sums[i]);
    }
    for (; c < kCols; ++c) out_row[c] = c10::BFloat16(_mm512_reduce_add_ps(acc[r][c]));
  }
}

// out[r, 0] for r < kRows against ONE weight row, k unrolled 4x (4 independent sums a row).
// For few rows this streams the weights strictly in order: the 6-row tiles below read 6
// rows side by side, 2*K bytes apart (4 KiB for K = 2048), and the L1 sets they share and
// the interleaved streams held a core to ~60% of its read bandwidth (measured at T = 1 on
// the Qwen3 shape; in order it reads at ~95% of a plain sum's rate).
template <int kRows>
TPMOE_BF16_TARGET void dot_one_weight_row(int64_t K, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b,
                                          c10::BFloat16* out, int64_t ld_out) {
  __m512 acc[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int u = 0; u < 4; ++u) acc[r][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 128 <= K; k += 128) {
    __m512i b_vec[4];
    for (int u = 0; u < 4; ++u) b_vec[u] = _mm512_loadu_si512(b + k + 32 * u);
    for (int r = 0; r < kRows; ++r) {
      for (int u = 0; u < 4; ++u) {
        const __m512i a_vec = _mm512_loadu_si512(a + r * lda + k + 32 * u);
        acc[r][u] = _mm512_dpbf16_ps(acc[r][u], (__m512bh)a_vec, (__m512bh)b_vec[u]);
      }
    }
  }
  for (; k < K; k += 32) {  // the tail, 32 lanes at a time, the last one masked
    const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t(1) << (K - k)) - 1);
    const __m512i b_vec = _mm512_maskz_loadu_epi16(mask, b + k);
    for (int r = 0; r < kRows; ++r) {
      const __m512i a_vec = _mm512_maskz_loadu_epi16(mask, a + r * lda + k);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)a_vec, (__m512bh)b_vec);
    }
  }
  for (int r = 0; r < kRows; ++r) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
    out[r * ld_out] = c10::BFloat16(_mm512_reduce_add_ps(sum));
  }
}

// Every weight row against all M rows (groups of up to 4): the row is read from memory for
// the first group and from L1 for the others.
TPMOE_BF16_TARGET void rows_times_weight_rows(int64_t M, int64_t N, int64_t K, const c10::BFloat16* a, int64_t lda,
                                              const c10::BFloat16* b, int64_t ldb, c10::BFloat16* out,
                                              int64_t ld_out) {
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const c10::BFloat16* a_rows = a + m0 * lda;
      c10::BFloat16* out_rows = out + m0 * ld_out + n;
      switch (M - m0 < 4 ? M - m0 : 4) {
        case 1: dot_one_weight_row<1>(K, a_rows, lda, b + n * ldb, out_rows, ld_out); break;
        case 2: dot_one_weight_row<2>(K, a_rows, lda, b + n * ldb, out_rows, ld_out); break;
        case 3: dot_one_weight_row<3>(K, a_rows, lda, b + n * ldb, out_rows, ld_out); break;
        default: dot_one_weight_row<4>(K, a_rows, lda, b + n * ldb, out_rows, ld_out); break;
      }
    }
  }
}

// The [rows, K] weight the caller multiplies after this one (rows ld apart), if it said.
struct FollowingWeight {
  const c10::BFloat16* data = nullptr;
  int64_t ld = 0;
  int64_t rows = 0;
};

// The weight rows of the next block, asked into L2 a share at a time while this block is
// computed: one group of 4 input rows would otherwise wait for the whole block from memory
// (one core streams ~14 GB/s, a 4-row group computes a 144 KiB block in ~3 us), the other
// groups would not wait at all. Single core, M = 128: 191 GFLOP/s against 168 with the
// in-tile prefetch (K = 2048), 200 against 159 (K = 4096). Measured and slower: one prefetch
// per step of the tile's k loop (~25% slower, with the loop's code unchanged otherwise;
// likely the prefetches waiting on memory hold the miss buffers the tile's own L2 loads
// need; a few lines every 8 steps: 4% slower at Qwen3 T = 512), two blocks ahead, one line
// in two, the T0 and NTA hints (~15% slower; T2 ties T1), copying each block to rows
// padded against L1 set conflicts, 8x3 / 6x4 / 5x5 tiles.
struct NextBlockPrefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  int64_t lines_per_tile = 0;

  TPMOE_BF16_TARGET void issue() {
    for (int64_t i = 0; i < lines_per_tile && next < end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_T1);
  }
};

// kCols = 6: 24 accumulators + 6 weight vectors + 1 row vector fill 31 of the 32 registers,
// 10 loads for 24 dot products.
template <int kRows, bool kInTilePrefetch>
TPMOE_BF16_TARGET void rows_times_weight_block(int64_t N, int64_t K, const c10::BFloat16* a, int64_t lda,
                                               const c10::BFloat16* b, int64_t ldb, c10::BFloat16* out,
                                               int64_t ld_out, NextBlockPrefetch& prefetch) {
  int64_t n = 0;
  for (; n + 6 <= N; n += 6) {
    prefetch.issue();
    dot_tile<kRows, 6, kInTilePrefetch>(K, a, lda, b + n * ldb, ldb, out + n, ld_out);
  }
  for (; n + 4 <= N; n += 4) dot_tile<kRows, 4, kInTilePrefetch>(K, a, lda, b + n * ldb, ldb, out + n, ld_out);
  for (; n < N; ++n) dot_tile<kRows, 1, kInTilePrefetch>(K, a, lda, b + n * ldb, ldb, out + n, ld_out);
}

// One group of up to 4 input rows against a block of weight rows.
template <bool kInTilePrefetch>
TPMOE_BF16_TARGET void group_times_block(int64_t rows, int64_t N, int64_t K, const c10::BFloat16* a, int64_t lda,
                                         const c10::BFloat16* b, int64_t ldb, c10::BFloat16* out, int64_t ld_out,
                                         NextBlockPrefetch& prefetch) {
  switch (rows) {
    case 1: rows_times_weight_block<1, kInTilePrefetch>(N, K, a, lda, b, ldb, out, ld_out, prefetch); break;
    case 2: rows_times_weight_block<2, kInTilePrefetch>(N, K, a, lda, b, ldb, out, ld_out, prefetch); break;
    case 3: rows_times_weight_block<3, kInTilePrefetch>(N, K, a, lda, b, ldb, out, ld_out, prefetch); break;
    default: rows_times_weight_block<4, kInTilePrefetch>(N, K, a, lda, b, ldb, out, ld_out, prefetch); break;
  }
}

template <bool kInTilePrefetch>
TPMOE_BF16_TARGET void blocked_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* a, int64_t lda,
                                    const c10::BFloat16* b, int64_t ldb, c10::BFloat16* out, int64_t ld_out,
                                    const FollowingWeight& following) {
  const int64_t rows_per_block = std::max<int64_t>(6, kBlockBytes / (2 * K) / 6 * 6);
  const int64_t groups = (M + 3) / 4;
  for (int64_t n0 = 0; n0 < N; n0 += rows_per_block) {
    const int64_t block = std::min(rows_per_block, N - n0);
    NextBlockPrefetch prefetch;
    // The next block of this weight, or after the last one the first block of the weight the
    // caller multiplies next (its first block would otherwise come from memory unannounced).
    const c10::BFloat16* next = b + (n0 + block) * ldb;
    int64_t next_ld = ldb, next_rows = std::min(rows_per_block, N - n0 - block);
    if (next_rows == 0 && following.data != nullptr) {
      next = following.data, next_ld = following.ld, next_rows = std::min(rows_per_block, following.rows);
    }
    if (!kInTilePrefetch && next_rows > 0) {
      // [next, end) covers the next block's rows and, for a strided weight, the gaps between.
      prefetch.next = reinterpret_cast<const char*>(next);
      prefetch.end = reinterpret_cast<const char*>(next + (next_rows - 1) * next_ld + K);
      const int64_t lines = (prefetch.end - prefetch.next + 63) / 64, tiles = groups * (block / 6);
      prefetch.lines_per_tile = tiles > 0 ? (lines + tiles - 1) / tiles : 0;
    }
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      group_times_block<kInTilePrefetch>(std::min<int64_t>(4, M - m0), block, K, a + m0 * lda, lda, b + n0 * ldb,
                                         ldb, out + m0 * ld_out + n0, ld_out, prefetch);
    }
  }
}

TPMOE_BF16_TARGET void bf16_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* a, int64_t lda,
                               const c10::BFloat16* b, int64_t ldb, c10::BFloat16* out, int64_t ld_out,
                               const FollowingWeight& following) {
  if (M <= kMaxRowsForInOrderStream) {
    rows_times_weight_rows(M, N, K, a, lda, b, ldb, out, ld_out);
  } else if (M <= kMaxRowsForInTilePrefetch) {
    blocked_gemm<true>(M, N, K, a, lda, b, ldb, out, ld_out, following);
  } else {
    blocked_gemm<false>(M, N, K, a, lda, b, ldb, out, ld_out, following);
  }
}

bool cpu_has_avx512_bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

}  // namespace
#endif  // TPMOE_HAVE_BF16_KERNEL

bool bf16_kernel_available() {
#ifdef TPMOE_HAVE_BF16_KERNEL
  static const bool available = cpu_has_avx512_bf16();
  return available;
#else
  return false;
#endif
}

bool try_bf16_kernel_gemm(const at::Tensor& lhs, const at::Tensor& rhs, at::Tensor& out, int64_t max_rows,
                          const at::Tensor* following_rhs) {
  // lhs [M, K] rows contiguous; rhs [K, N] a transposed view of a [N, K] row-major weight;
  // out [M, N] rows contiguous.
  if (lhs.scalar_type() != at::kBFloat16 || lhs.size(0) > max_rows) return false;
  if (lhs.stride(1) != 1 || rhs.stride(0) != 1 || out.stride(1) != 1) return false;
  if (!bf16_kernel_available()) return false;
#ifdef TPMOE_HAVE_BF16_KERNEL
  FollowingWeight following;
  if (following_rhs != nullptr && following_rhs->scalar_type() == at::kBFloat16 && following_rhs->stride(0) == 1 &&
      following_rhs->size(0) == lhs.size(1)) {
    following = {following_rhs->data_ptr<c10::BFloat16>(), following_rhs->stride(1), following_rhs->size(1)};
  }
  bf16_gemm(lhs.size(0), rhs.size(1), lhs.size(1), lhs.data_ptr<c10::BFloat16>(), lhs.stride(0),
            rhs.data_ptr<c10::BFloat16>(), rhs.stride(1), out.data_ptr<c10::BFloat16>(), out.stride(0), following);
  return true;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace tpmoe
