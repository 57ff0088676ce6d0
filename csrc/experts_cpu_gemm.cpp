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
// stay in L2 while every group of 4 rows reuses them, each weight row read from memory once,
// into L2 a block ahead while the tiles compute (NextBlockPrefetch). Single core: 160 GFLOP/s
// at M = 32 and 190 at M = 128 on the Qwen3 gate_up shape, 200 at M = 128 for K = 4096
// (oneDNN's dense GEMM: ~200, the vdpbf16ps peak: 232), measured before the tiles kept their
// sums in registers and stored them as vectors; with that the whole Qwen3 forward at T = 512
// (~32 rows an expert) runs at 0.82-0.87 of a dense GEMM of the same FLOPs on 2 cores. It is
// compiled for that ISA with a function attribute and runs only where the CPU reports it
// (checked once at run time); everywhere else, and for other dtypes and the gpt_oss layout,
// ATen's GEMM runs. Where the CPU also has AMX-BF16 (Intel Sapphire Rapids and later) oneDNN
// runs ATen's bf16 GEMM on AMX tiles at several times the vdpbf16ps rate (a dense GEMM at ~980
// GFLOP/s a core there), and past a few rows an expert that pays back its repacking: there
// the kernel keeps only the experts with few rows (default_bf16_kernel_max_rows).
#include <ATen/cpu/Utils.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>

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

// The weight rows of the next block, asked into L2 a few lines at every k step of every tile
// of this block, so that memory streams while the tiles compute: the first group of 4 input
// rows then finds the block in L2 like the others (without it that group waits on memory,
// and a core computes or streams, seldom both). Spread evenly over the block's tiles, the
// prefetches never wait on each other in bursts. The schemes measured against this one, and
// its figures, are in benchmarks/RESULTS.md (CPU expert path, fourth session).
struct NextBlockPrefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  int64_t lines_per_step = 0;
};

// out[r, c] for r < kRows, c < kCols: kRows x kCols float32 accumulators over K.
template <int kRows, int kCols>
TPMOE_BF16_TARGET void dot_tile(int64_t K, const c10::BFloat16* a, int64_t lda, const c10::BFloat16* b, int64_t ldb,
                                c10::BFloat16* out, int64_t ld_out, NextBlockPrefetch& prefetch) {
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
  // Kept in registers for the loop (through the struct GCC stored `next` back every step).
  const char* prefetch_next = prefetch.next;
  const char* const prefetch_end = prefetch.end;
  const int64_t prefetch_lines = prefetch.lines_per_step;
  for (int64_t k = tail; k < K; k += 32) {
    // The last step may run up to lines_per_step - 1 lines past end: prefetches never fault.
    if (prefetch_next < prefetch_end) {
      for (int64_t i = 0; i < prefetch_lines; ++i, prefetch_next += 64) _mm_prefetch(prefetch_next, _MM_HINT_T1);
    }
    __m512i b_vec[kCols];
    #pragma GCC unroll 8
    for (int c = 0; c < kCols; ++c) b_vec[c] = _mm512_loadu_si512(b + c * ldb + k);
    #pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512i a_vec = _mm512_loadu_si512(a + r * lda + k);
      #pragma GCC unroll 8
      for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)a_vec, (__m512bh)b_vec[c]);
    }
  }
  prefetch.next = prefetch_next;
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

// The [rows, K] weight the caller multiplies after this one (rows ld apart), if it said.
struct FollowingWeight {
  const c10::BFloat16* data = nullptr;
  int64_t ld = 0;
  int64_t rows = 0;
};

// kCols = 6: 24 accumulators + 6 weight vectors + 1 row vector fill 31 of the 32 registers,
// 10 loads for 24 dot products.
template <int kRows>
TPMOE_BF16_TARGET void rows_times_weight_block(int64_t N, int64_t K, const c10::BFloat16* a, int64_t lda,
                                               const c10::BFloat16* b, int64_t ldb, c10::BFloat16* out,
                                               int64_t ld_out, NextBlockPrefetch& prefetch) {
  int64_t n = 0;
  for (; n + 6 <= N; n += 6) dot_tile<kRows, 6>(K, a, lda, b + n * ldb, ldb, out + n, ld_out, prefetch);
  for (; n + 4 <= N; n += 4) dot_tile<kRows, 4>(K, a, lda, b + n * ldb, ldb, out + n, ld_out, prefetch);
  for (; n < N; ++n) dot_tile<kRows, 1>(K, a, lda, b + n * ldb, ldb, out + n, ld_out, prefetch);
}

// Tiles rows_times_weight_block runs over a block of `block` weight rows (kept in step with
// its three loops: the prefetch is spread over this many tiles' k steps).
int64_t tiles_in_block(int64_t block) { return block / 6 + block % 6 / 4 + block % 6 % 4; }

// One group of up to 4 input rows against a block of weight rows.
TPMOE_BF16_TARGET void group_times_block(int64_t rows, int64_t N, int64_t K, const c10::BFloat16* a, int64_t lda,
                                         const c10::BFloat16* b, int64_t ldb, c10::BFloat16* out, int64_t ld_out,
                                         NextBlockPrefetch& prefetch) {
  switch (rows) {
    case 1: rows_times_weight_block<1>(N, K, a, lda, b, ldb, out, ld_out, prefetch); break;
    case 2: rows_times_weight_block<2>(N, K, a, lda, b, ldb, out, ld_out, prefetch); break;
    case 3: rows_times_weight_block<3>(N, K, a, lda, b, ldb, out, ld_out, prefetch); break;
    default: rows_times_weight_block<4>(N, K, a, lda, b, ldb, out, ld_out, prefetch); break;
  }
}

TPMOE_BF16_TARGET void bf16_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* a, int64_t lda,
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
    const int64_t steps = groups * tiles_in_block(block) * (K / 32);
    if (next_rows > 0 && steps > 0) {
      // [next, end) covers the next block's rows and, for a strided weight, the gaps between.
      prefetch.next = reinterpret_cast<const char*>(next);
      prefetch.end = reinterpret_cast<const char*>(next + (next_rows - 1) * next_ld + K);
      const int64_t lines = (prefetch.end - prefetch.next + 63) / 64;
      prefetch.lines_per_step = (lines + steps - 1) / steps;
    }
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      group_times_block(std::min<int64_t>(4, M - m0), block, K, a + m0 * lda, lda, b + n0 * ldb, ldb,
                        out + m0 * ld_out + n0, ld_out, prefetch);
    }
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

namespace {

bool cpu_has_amx_bf16() {
  // cpuinfo through ATen; and oneDNN not held below AMX (ONEDNN_MAX_CPU_ISA, which it reads
  // once: an ISA name, AMX ones contain "AMX"; ALL or unset allows every ISA).
  if (!cpu_reports("amx_bf16")) return false;
  const char* isa = std::getenv("ONEDNN_MAX_CPU_ISA");
  const std::string cap = isa == nullptr ? "ALL" : isa;
  return cap == "ALL" || cap == "all" || cap.find("AMX") != std::string::npos || cap.find("amx") != std::string::npos;
}

int64_t default_bf16_kernel_max_rows() {
  // With AMX: experts of up to 4 rows in the kernel, more through oneDNN. One thread, all experts
  // in the kernel against all through oneDNN: Qwen3-30B-A3B's experts (H = 2048, I = 768,
  // E = 128, top-8) at T = 512 (~32 rows an expert) 206 ms against 460, T = 192 (~12) 156
  // against 195, T = 128 (~8) a tie, T = 32 (~2) 106 against 148 the other way; Mixtral-8x7B's
  // (H = 4096, I = 14336, E = 8, top-2) at T = 24 (~6 rows) 384 against 584, T = 16 (~4) a tie,
  // T = 4 (1) 332 against 531 the other way. The crossover is shape-dependent (4 rows for
  // Mixtral, 8 for Qwen3); 4 costs Qwen3 ~4% at 5-8 rows, 8 would cost Mixtral ~1.5x.
  static const int64_t rows = cpu_has_amx_bf16() ? 4 : std::numeric_limits<int64_t>::max();
  return rows;
}

}  // namespace

int64_t bf16_kernel_max_rows() {
  const char* env = std::getenv("TPMOE_CPU_BF16_KERNEL_MAX_ROWS");
  return env == nullptr ? default_bf16_kernel_max_rows() : std::atoll(env);
}

bool cpu_reports(const char* capability) {
  const auto capabilities = at::cpu::get_cpu_capabilities();
  const auto found = capabilities.find(capability);
  return found != capabilities.end() && found->second.isBool() && found->second.toBool();
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
