// The widened bf16 GEMM of the experts and the choice of when it runs.
//
// Why: on a CPU without a bf16 dot product (AVX2 only: AMD Zen 2/3, many cloud instances and
// laptops) ATen's bf16 GEMM is emulated element by element: 0.81 GFLOP/s against 164 for
// float32 on such a machine (AMD EPYC family 25, 512 x 2048 x 1536, issue 36). So there the
// expert GEMMs widen their operands to float32 a tile at a time (widen_tile, the one place
// weights are converted), multiply the tiles in float32, keep the sums in float32 and round
// once on the store: the products and sums are those of a float32 GEMM of the bf16 values,
// so the result is within the bf16 rule of the native GEMM's. No fp32 copy of a whole expert
// is ever made: at most a panel of input rows and a tile of weight columns.
//
// The products run in hand-written float32 kernels (experts_cpu_widen_kernels.h, AVX2 and
// AVX-512 builds of one source, picked by the CPU): a weight tile is widened once into the
// kernel's own zero-padded layout and multiplied by every row of the panel, so the widening
// is paid once per weight element and nothing packs it again; weights stored x @ W^T (rows
// contiguous in k) take dot products along k with the next tile fetched ahead into L2 while
// a tile computes; weights stored x @ W, and every backward GEMM, take outer products over
// 256-deep k chunks. ATen's float32 GEMM on the tiles (the first version of this path) stays
// as the portable one: non-x86 builds, CPUs without AVX2, other operand layouts.
// TPMOE_CPU_WIDEN_KERNEL = avx512 | avx2 | aten | auto forces a kernel (tests, benchmarks).
// The dot kernel also multiplies the quantized experts' widened rows at prefill
// (widened_dot_f32: one set of float32 micro-kernels for every widened weight).
//
// Where the CPU has a bf16 dot product (avx512_bf16, amx_bf16, Arm bf16) the native path runs
// as before. TPMOE_CPU_BF16_GEMM = native | widen | auto (default) forces either; it is read
// at every call (like the other TPMOE_CPU_* knobs: a getenv is ~100 ns), the CPU check once.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "experts_cpu.h"
#include "experts_cpu_weight_tile.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TPMOE_WIDEN_X86_KERNELS 1
#include <immintrin.h>
#endif

namespace tpmoe {
namespace cpu {
namespace {

// The float32 panel of input rows widened once and reused by every weight tile (1 MiB: rows
// x K of the decode and small-prefill GEMMs, e.g. 128 rows at K = 2048), and one weight tile
// (512 KiB, so the tile, the panel and the next tile's bf16 stay in a 1-2 MiB L2; at
// K = 2048 that is 64 weight columns, 16 column groups of the dot kernel per row group).
constexpr int64_t kLhsPanelBytes = 1 << 20;
constexpr int64_t kRhsTileBytes = 512 << 10;
// Up to this many rows: tiles that fit L1 between their widening and their one use, and in
// the ATen path few_rows_dot rather than an ATen float32 GEMM.
constexpr int64_t kFewRows = 4;
constexpr int64_t kFewRowsTileBytes = 32 << 10;
// The outer path's k chunk, its panel rows and the bytes of a tile's sums.
constexpr int64_t kOuterChunk = 256;
constexpr int64_t kOuterPanelRows = 256;
constexpr int64_t kOuterSumsBytes = 256 << 10;
// The dot path asks this much of the weight ahead into L2 (at least the next tile).
constexpr int64_t kFetchAheadBytes = 128 << 10;

bool cpu_has_native_bf16_dot() {
  // cpuinfo through ATen (x86: avx512_bf16 / amx_bf16; Arm: bf16), and the compiler's own
  // check that the hand-written kernel uses.
  bool native = bf16_kernel_available();
  for (const char* key : {"avx512_bf16", "amx_bf16", "bf16"}) native = native || cpu_reports(key);
  return native;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TPMOE_WIDEN_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define TPMOE_WIDEN_CLONES
#endif

// sums[r, c] = lhs[r, :] . rhs[:, c] for a few rows (decode, and experts with a handful of
// tokens): a float32 GEMM call per tile costs several microseconds of dispatch, as much as
// the tile's products at one row, so these run here, on the tiles in L2, 8 lanes at a time.
TPMOE_WIDEN_CLONES void few_rows_dot(int64_t rows, int64_t cols, int64_t K, const float* lhs, int64_t ld_lhs,
                                     bool lhs_transposed, const float* rhs, int64_t ld_rhs, bool rhs_transposed,
                                     float* sums) {
  if (rhs_transposed && !lhs_transposed) {
    // Both along K (x @ W^T weights): one reduction per output, every row against a weight
    // column while it is in L1.
    // Four columns a pass: four independent sums (one would wait on the add latency every
    // 8 products) and each row value loaded once for the four.
    int64_t c = 0;
    for (; c + 4 <= cols; c += 4) {
      const float *b0 = rhs + c * ld_rhs, *b1 = b0 + ld_rhs, *b2 = b1 + ld_rhs, *b3 = b2 + ld_rhs;
      for (int64_t r = 0; r < rows; ++r) {
        const float* a = lhs + r * ld_lhs;
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t k = 0; k < K; ++k) {
          s0 += a[k] * b0[k];
          s1 += a[k] * b1[k];
          s2 += a[k] * b2[k];
          s3 += a[k] * b3[k];
        }
        float* out = sums + r * cols + c;
        out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
      }
    }
    for (; c < cols; ++c) {
      const float* b = rhs + c * ld_rhs;
      for (int64_t r = 0; r < rows; ++r) {
        const float* a = lhs + r * ld_lhs;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < K; ++k) sum += a[k] * b[k];
        sums[r * cols + c] = sum;
      }
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* out = sums + r * cols;
    {
      for (int64_t c = 0; c < cols; ++c) out[c] = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const float a = lhs_transposed ? lhs[k * ld_lhs + r] : lhs[r * ld_lhs + k];
        if (rhs_transposed) {
          for (int64_t c = 0; c < cols; ++c) out[c] += a * rhs[c * ld_rhs + k];
        } else {
          const float* b = rhs + k * ld_rhs;
#pragma omp simd
          for (int64_t c = 0; c < cols; ++c) out[c] += a * b[c];
        }
      }
    }
  }
}

template <typename out_t>
void store_rounded(const float* sums, int64_t ld_sums, int64_t rows, int64_t cols, out_t* out, int64_t stride_r,
                   int64_t stride_c) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) out[r * stride_r + c * stride_c] = static_cast<out_t>(sums[r * ld_sums + c]);
  }
}

// A float32 tile as the [rows, cols] operand of at::mm, without a copy.
at::Tensor as_matrix(const Fp32Tile& tile, int64_t rows, int64_t cols) {
  const auto options = at::TensorOptions().dtype(at::kFloat);
  float* data = const_cast<float*>(tile.data);
  if (tile.transposed) return at::from_blob(data, {rows, cols}, {1, std::max<int64_t>(tile.ld, 1)}, options);
  return at::from_blob(data, {rows, cols}, {std::max<int64_t>(tile.ld, 1), 1}, options);
}


// Lines the dot kernel asks into L2 as it runs: [next, end), lines_per_step at every k step.
struct Prefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  int64_t lines_per_step = 0;
  // The few-row kernel's second stretch, asked for once the first is done: the first rows of
  // the caller's next weight.
  const char* then_next = nullptr;
  const char* then_end = nullptr;
};

#ifdef TPMOE_WIDEN_X86_KERNELS
// The kernels of experts_cpu_widen_kernels.h for AVX2 + FMA (the CPUs this path is for: 16
// registers, so 6 x 2 dot tiles and 6 x 16 outer tiles) and for AVX-512 (32 registers: 6 x 4
// and 8 x 48), picked at run time (widen_kernels below). The AVX2 dot tile is 6 x 2, not 3 x
// 4: 12 accumulators, 2 weight vectors, a row vector and the zeros the unpack widens with fill
// the 16 registers; 3 x 4 needed 18, and GCC kept 3 accumulators on the stack (a load and a
// store around every third FMA: the T = 512 forward ran at a third of the dense GEMM).
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
using V = __m256;
constexpr int kLanes = 8, kDotRows = 6, kDotCols = 2, kOuterRows = 6, kOuterVectors = 2;
static_assert(kWidenedDotPadCols % kDotCols == 0 && kWidenedDotPadK % kLanes == 0, "widened_dot_f32's padding");
inline V zero() { return _mm256_setzero_ps(); }
inline V load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, V v) { _mm256_storeu_ps(p, v); }
inline V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V in_register(V v) {
  __asm__("" : "+x"(v));
  return v;
}
inline V widen_low(const uint16_t* p) {  // of 16 bf16: k 0-3, 8-11 as float32 (bits to the upper halves)
  return _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
inline V widen_high(const uint16_t* p) {  // k 4-7, 12-15
  return _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
inline V load_bf16(const uint16_t* p) {  // 8 bf16 -> float32: the bits are the upper halves
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline void store_bf16_bits(uint16_t* out, V values) {
  const __m256i bits = _mm256_castps_si256(values);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(values, values, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  // Packing works within 128-bit halves: [0-3, 0-3 | 4-7, 4-7] -> 0-7 in the low half.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
}
inline __m128 sum4(V a, V b, V c, V d) {
  const V abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // a b c d per 128-bit half
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}
#include "experts_cpu_widen_kernels.h"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx2,fma")
namespace avx512 {
using V = __m512;
constexpr int kLanes = 16, kDotRows = 6, kDotCols = 4, kOuterRows = 8, kOuterVectors = 3;
static_assert(kWidenedDotPadCols % kDotCols == 0 && kWidenedDotPadK % kLanes == 0, "widened_dot_f32's padding");
inline V zero() { return _mm512_setzero_ps(); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline V broadcast(const float* p) { return _mm512_set1_ps(*p); }
inline V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V in_register(V v) {
  __asm__("" : "+v"(v));
  return v;
}
inline V widen_low(const uint16_t* p) {  // of 32 bf16: k 0-3, 8-11, 16-19, 24-27 as float32
  return _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), _mm512_loadu_si512(p)));
}
inline V widen_high(const uint16_t* p) {  // k 4-7, 12-15, 20-23, 28-31
  return _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), _mm512_loadu_si512(p)));
}
inline V load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline void store_bf16_bits(uint16_t* out, V values) {
  const __m512i bits = _mm512_castps_si512(values);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(values, values, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(rounded));
}
inline __m256 halves(V a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}
inline __m128 sum4(V a, V b, V c, V d) { return avx2::sum4(halves(a), halves(b), halves(c), halves(d)); }
#include "experts_cpu_widen_kernels.h"
}  // namespace avx512
#pragma GCC pop_options
#endif  // TPMOE_WIDEN_X86_KERNELS

// One ISA's kernels and their shapes. Both kernels need their operands padded: the dot kernel
// k to kPadK and columns to 4, the outer kernel columns to outer_width.
struct WidenKernels {
  const char* name;
  int64_t outer_width;
  void (*dot)(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, const char*,
              const char*);
  void (*outer)(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, float*, int64_t, bool);
  void (*store_bf16)(const float*, int64_t, int64_t, int64_t, uint16_t*, int64_t);
  void (*dot_bf16)(int64_t, int64_t, int64_t, const float*, int64_t, const uint16_t*, int64_t, float*, int64_t,
                   Prefetch);
  void (*widen_permuted)(const uint16_t*, int64_t, float*);
  void (*dot_packed)(int64_t, int64_t, int64_t, const float*, int64_t, const uint16_t*, int64_t, float*, int64_t,
                     const char*, const char*);
};
// k multiple of this for dot_packed (2 kLanes of every ISA).
constexpr int64_t kPackedK = 32;
constexpr int64_t kPadK = kWidenedDotPadK;  // a multiple of every ISA's lanes
constexpr int64_t kPanelPad = 16;  // floats: one cache line

#ifdef TPMOE_WIDEN_X86_KERNELS
const WidenKernels kAvx2Kernels{"avx2", avx2::kOuterWidth, avx2::dot_gemm, avx2::outer_gemm, avx2::store_bf16_rows,
                                avx2::dot_gemm_bf16, avx2::widen_permuted, avx2::dot_gemm_packed};
const WidenKernels kAvx512Kernels{"avx512", avx512::kOuterWidth, avx512::dot_gemm, avx512::outer_gemm,
                                  avx512::store_bf16_rows, avx512::dot_gemm_bf16, avx512::widen_permuted,
                                  avx512::dot_gemm_packed};

bool cpu_supports(const char* isa) {
  __builtin_cpu_init();
  if (std::string(isa) == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
  }
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

// The kernels the widened GEMM runs, or null for ATen's float32 GEMM on the tiles (the
// portable path: non-x86 builds, CPUs without AVX2, and any operand layout the kernels do
// not take). TPMOE_CPU_WIDEN_KERNEL = avx512 | avx2 | aten | auto (default: the widest the
// CPU has) forces one, so the tests run every kernel on a machine that has them; read at
// every call like TPMOE_CPU_BF16_GEMM.
const WidenKernels* widen_kernels() {
  const char* env = std::getenv("TPMOE_CPU_WIDEN_KERNEL");
  const std::string value = env == nullptr ? "" : env;
  TORCH_CHECK(value.empty() || value == "auto" || value == "avx512" || value == "avx2" || value == "aten",
              "tpmoe: TPMOE_CPU_WIDEN_KERNEL: expected 'avx512', 'avx2', 'aten' or 'auto' (or unset), got '", value,
              "'");
  if (value == "aten") return nullptr;
#ifdef TPMOE_WIDEN_X86_KERNELS
  static const bool has_avx512 = cpu_supports("avx512"), has_avx2 = cpu_supports("avx2");
  if (value == "avx512" || value == "avx2") {
    TORCH_CHECK(value == "avx512" ? has_avx512 : has_avx2, "tpmoe: TPMOE_CPU_WIDEN_KERNEL='", value,
                "': this CPU does not support it");
    return value == "avx512" ? &kAvx512Kernels : &kAvx2Kernels;
  }
  if (has_avx512) return &kAvx512Kernels;
  if (has_avx2) return &kAvx2Kernels;
  return nullptr;
#else
  TORCH_CHECK(value.empty() || value == "auto", "tpmoe: TPMOE_CPU_WIDEN_KERNEL='", value,
              "': this build has no x86 kernels");
  return nullptr;
#endif
}

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Threads a GEMM's tiles can spread over: one inside an "experts" worker (nested regions run
// in order), all of them in "gemm" mode.
int64_t tile_threads() { return at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads()); }

// A buffer's first `count` floats from a 64-byte boundary: std::vector's floats are 16-byte
// aligned, so every other 32-byte load of an AVX2 kernel (and every 64-byte load of an
// AVX-512 one) would straddle two cache lines and cost two.
float* aligned_buffer(std::vector<float>& buffer, int64_t count) {
  buffer.resize(count + 16);
  const uintptr_t address = reinterpret_cast<uintptr_t>(buffer.data());
  return buffer.data() + ((64 - address % 64) % 64) / sizeof(float);
}

// Rounds float32 sums (ld_sums apart) into out, bf16 or fp16.
void store_sums(const WidenKernels& kernels, at::Tensor& out, int64_t m0, int64_t n0, const float* sums,
                int64_t ld_sums, int64_t rows, int64_t cols) {
  const int64_t offset = m0 * out.stride(0) + n0 * out.stride(1);
  if (out.scalar_type() == at::kBFloat16 && out.stride(1) == 1) {
    kernels.store_bf16(sums, ld_sums, rows, cols, reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>()) + offset,
                       out.stride(0));
  } else if (out.scalar_type() == at::kBFloat16) {
    store_rounded(sums, ld_sums, rows, cols, out.data_ptr<c10::BFloat16>() + offset, out.stride(0), out.stride(1));
  } else {
    TORCH_CHECK(out.scalar_type() == at::kHalf, "tpmoe: widened_mm_out: expected a bf16 or fp16 output, got ",
                out.scalar_type());
    store_rounded(sums, ld_sums, rows, cols, out.data_ptr<c10::Half>() + offset, out.stride(0), out.stride(1));
  }
}

// out = lhs @ rhs with rhs's columns contiguous in k (x @ W^T weights): every weight column
// widened once into a zero-padded row of a tile and dotted with every row of the lhs panel
// (widened once a call per panel), so the conversion is paid once per weight element, not
// once per row.
// The bytes of rows [r0, r1) of a row-contiguous [N, K] weight (and the gaps between them).
std::pair<const char*, const char*> weight_rows_bytes(const at::Tensor& weight, int64_t r0, int64_t r1) {
  if (r1 <= r0) return {nullptr, nullptr};
  const char* base = static_cast<const char*>(weight.const_data_ptr());
  const int64_t item = weight.element_size();
  return {base + r0 * weight.stride(0) * item, base + ((r1 - 1) * weight.stride(0) + weight.size(1)) * item};
}

// out = lhs @ weight^T for at most kFewRows rows and a bf16 weight [N, K] with rows contiguous:
// the weight widened in the kernel's loads (dot_gemm_bf16), in tiles whose float32 sums fit
// L1, the stream fetched kFetchAheadBytes ahead, on into the following weight's first rows.
void few_rows_bf16_mm(const WidenKernels& kernels, at::Tensor& out, const at::Tensor& lhs, const at::Tensor& weight,
                      const at::Tensor& following) {
  const int64_t M = lhs.size(0), K = lhs.size(1), N = weight.size(0);
  const int64_t Kp = round_up(K, kPadK);
  constexpr int64_t kTileCols = 256;
  const int64_t tile_cols = std::min(round_up((N + tile_threads() - 1) / tile_threads(), 4), kTileCols);
  const int64_t tiles = (N + tile_cols - 1) / tile_cols;
  thread_local std::vector<float> lhs_buffer;
  float* const lhs_data = aligned_buffer(lhs_buffer, M * Kp);
  for (int64_t r = 0; r < M; ++r) {
    float* row = lhs_data + r * Kp;
    widen_tile(lhs, r, 1, 0, K, row);
    std::fill(row + K, row + Kp, 0.f);
  }
  const float* const panel = lhs_data;
  const uint16_t* const bits = reinterpret_cast<const uint16_t*>(weight.const_data_ptr<c10::BFloat16>());
  const int64_t ldb = weight.stride(0);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> sums_buffer;
    float* const sums_data = aligned_buffer(sums_buffer, M * tile_cols);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * tile_cols, cols = std::min(tile_cols, N - n0);
      // The stream ahead of this tile: the rest of this thread's tiles, and past its last tile
      // the following weight's first kFetchAheadBytes.
      const auto current = weight_rows_bytes(weight, n0, n0 + cols);
      const auto rest = weight_rows_bytes(weight, n0, std::min(N, end * tile_cols));
      std::pair<const char*, const char*> then{nullptr, nullptr};
      if (tile + 1 == end && following.defined() && following.scalar_type() == at::kBFloat16) {
        then = weight_rows_bytes(following, 0, following.size(0));
        then.second = std::min(then.second, then.first + kFetchAheadBytes);
      }
      kernels.dot_bf16(M, cols, K, panel, Kp, bits + n0 * ldb, ldb, sums_data, tile_cols,
                       {current.first + kFetchAheadBytes, rest.second, 0, then.first, then.second});
      store_sums(kernels, out, 0, n0, sums_data, tile_cols, M, cols);
    }
  });
}

// out = lhs @ weight^T, both bf16 with rows contiguous, K a multiple of kPackedK: the weight
// widened in the kernel's loads (dot_gemm_packed), the rows once a call in the same order,
// the next tile (or the following weight's first) fetched into L2 while a tile computes.
void packed_bf16_mm(const WidenKernels& kernels, at::Tensor& out, const at::Tensor& lhs, const at::Tensor& weight,
                    const at::Tensor& following) {
  const int64_t M = lhs.size(0), K = lhs.size(1), N = weight.size(0);
  const int64_t panel_rows = std::clamp<int64_t>(kLhsPanelBytes / (4 * K), 1, M);
  // bf16 tiles of kRhsTileBytes / 2: the same columns as the widened float32 tiles had.
  int64_t tile_cols = std::clamp<int64_t>(kRhsTileBytes / (4 * K) / 4 * 4, 4, round_up(N, 4));
  tile_cols = std::min(tile_cols, round_up((N + tile_threads() - 1) / tile_threads(), 4));
  const int64_t tiles = (N + tile_cols - 1) / tile_cols;
  const uint16_t* const bits = reinterpret_cast<const uint16_t*>(weight.const_data_ptr<c10::BFloat16>());
  const int64_t ldb = weight.stride(0);
  // Panel rows a cache line more than K apart: at K = 2048 (8 KiB) a tile's 6 rows and its
  // weight rows (4 KiB apart) would all fall in the same L1 sets, as many lines as a set has ways.
  const int64_t ld_panel = K + kPanelPad;
  thread_local std::vector<float> lhs_buffer;
  float* const lhs_data = aligned_buffer(lhs_buffer, panel_rows * ld_panel);
  for (int64_t m0 = 0; m0 < M; m0 += panel_rows) {
    const int64_t rows = std::min(panel_rows, M - m0);
    const uint16_t* lhs_bits = reinterpret_cast<const uint16_t*>(lhs.const_data_ptr<c10::BFloat16>());
    for (int64_t r = 0; r < rows; ++r) {
      kernels.widen_permuted(lhs_bits + (m0 + r) * lhs.stride(0), K, lhs_data + r * ld_panel);
    }
    const float* const panel = lhs_data;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> sums_buffer;
      const int64_t ld_sums = tile_cols + 4;  // 4 scratch columns for dot_packed's last group
      float* const sums_data = aligned_buffer(sums_buffer, rows * ld_sums);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t n0 = tile * tile_cols, cols = std::min(tile_cols, N - n0);
        // The last tile may be narrower than 4: it then ends on the weight's last 4 columns.
        const int64_t first = std::min(n0, N - 4), width = n0 + cols - first;
        std::pair<const char*, const char*> next{nullptr, nullptr};
        if (tile + 1 < end) {
          next = weight_rows_bytes(weight, n0 + cols, std::min(N, n0 + cols + tile_cols));
        } else if (m0 + rows < M) {
          next = weight_rows_bytes(weight, begin * tile_cols, std::min(N, (begin + 1) * tile_cols));
        } else if (following.defined()) {
          next = weight_rows_bytes(following, 0, std::min(following.size(0), tile_cols));
        }
        kernels.dot_packed(rows, width, K, panel, ld_panel, bits + first * ldb, ldb, sums_data, ld_sums, next.first,
                           next.second);
        store_sums(kernels, out, m0, n0, sums_data + (n0 - first), ld_sums, rows, cols);
      }
    });
  }
}

void widened_dot_mm(const WidenKernels& kernels, at::Tensor& out, const at::Tensor& lhs, const at::Tensor& rhs,
                    const at::Tensor* following_rhs) {
  const int64_t M = lhs.size(0), K = lhs.size(1), N = rhs.size(1);
  const int64_t Kp = round_up(K, kPadK);
  const at::Tensor weight = rhs.t();  // [N, K], rows contiguous
  // The next GEMM's weight as the same [N', K] rows, where it has that layout and this K.
  at::Tensor following;
  if (following_rhs != nullptr && following_rhs->dim() == 2 && following_rhs->size(0) == K &&
      following_rhs->stride(0) == 1) {
    following = following_rhs->t();
  }
  if (M <= kFewRows && weight.scalar_type() == at::kBFloat16 && weight.stride(1) == 1) {
    return few_rows_bf16_mm(kernels, out, lhs, weight, following);
  }
  if (K % kPackedK == 0 && N >= 4 && weight.scalar_type() == at::kBFloat16 && weight.stride(1) == 1 &&
      lhs.scalar_type() == at::kBFloat16 && lhs.stride(1) == 1) {
    return packed_bf16_mm(kernels, out, lhs, weight, following);
  }
  const int64_t panel_rows = std::clamp<int64_t>(kLhsPanelBytes / (4 * Kp), 1, M);
  int64_t tile_cols = M <= kFewRows ? kFewRowsTileBytes / (4 * Kp) : kRhsTileBytes / (4 * Kp);
  tile_cols = std::clamp<int64_t>(tile_cols / 4 * 4, 4, round_up(N, 4));
  tile_cols = std::min(tile_cols, round_up((N + tile_threads() - 1) / tile_threads(), 4));
  const int64_t tiles = (N + tile_cols - 1) / tile_cols;
  // How far ahead the weight is fetched, in tiles: with few rows a tile (16 KiB of bf16 at
  // K = 2048) is done long before memory delivers the next one, so the stream must be asked
  // for well ahead to keep enough lines in flight (one tile ahead, decode ran at ~3x the
  // native path's time); with many rows one tile of compute covers the next tile's read.
  const int64_t ahead = std::max<int64_t>(1, kFetchAheadBytes / (tile_cols * K * rhs.element_size()));
  thread_local std::vector<float> lhs_buffer;
  float* const lhs_data = aligned_buffer(lhs_buffer, panel_rows * Kp);
  for (int64_t m0 = 0; m0 < M; m0 += panel_rows) {
    const int64_t rows = std::min(panel_rows, M - m0);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = lhs_data + r * Kp;
      widen_tile(lhs, m0 + r, 1, 0, K, row);  // one row: contiguous in the buffer whatever lhs's strides
      std::fill(row + K, row + Kp, 0.f);
    }
    // The panel by pointer: inside the workers `lhs_buffer` would name each worker's own.
    const float* const panel = lhs_data;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> rhs_buffer, sums_buffer;
      float* const rhs_data = aligned_buffer(rhs_buffer, tile_cols * Kp);
      float* const sums_data = aligned_buffer(sums_buffer, rows * tile_cols);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t n0 = tile * tile_cols, cols = std::min(tile_cols, N - n0), padded = round_up(cols, 4);
        for (int64_t c = 0; c < cols; ++c) {
          float* column = rhs_data + c * Kp;
          widen_tile(weight, n0 + c, 1, 0, K, column);
          std::fill(column + K, column + Kp, 0.f);
        }
        std::fill(rhs_data + cols * Kp, rhs_data + padded * Kp, 0.f);
        // The tile this thread widens `ahead` tiles from now: in its own range, else in the next
        // panel's pass over the same range, else in the caller's next GEMM (same K, so the same
        // tile width); the tiles before it were asked for by the tiles before this one.
        std::pair<const char*, const char*> next{nullptr, nullptr};
        const int64_t later = tile + ahead - end;  // its index past this thread's range
        if (later < 0) {
          next = weight_rows_bytes(weight, (tile + ahead) * tile_cols, std::min(N, (tile + ahead + 1) * tile_cols));
        } else if (m0 + rows < M) {
          if (begin + later < end) {
            next = weight_rows_bytes(weight, (begin + later) * tile_cols, std::min(N, (begin + later + 1) * tile_cols));
          }
        } else if (following.defined()) {
          next = weight_rows_bytes(following, later * tile_cols, std::min(following.size(0), (later + 1) * tile_cols));
        }
        kernels.dot(rows, padded, Kp, panel, Kp, rhs_data, Kp, sums_data, padded, next.first,
                    next.second);
        store_sums(kernels, out, m0, n0, sums_data, padded, rows, cols);
      }
    });
  }
}

// out = lhs @ rhs with rhs's rows contiguous in n (the gpt_oss weights, and the backward's
// right operands): the tile widened into strips of outer_width columns, each [K, width]
// contiguous, multiplied by every row of the lhs panel (either layout).
void widened_outer_mm(const WidenKernels& kernels, at::Tensor& out, const at::Tensor& lhs, const at::Tensor& rhs) {
  const int64_t M = lhs.size(0), K = lhs.size(1), N = rhs.size(1), width = kernels.outer_width;
  // k in chunks of kOuterChunk (the sums of later chunks added to the earlier ones, in
  // order): a tile is then chunk x tile_cols, so its rows are long runs of the weight's
  // rows (at K = 2048 a whole-k tile would be 64 columns: 128 bytes of every 1.5 KiB row).
  const int64_t chunk = std::min(K, kOuterChunk);
  // The sums of a panel's tile stay in L2 (the weight gradients have ~32-deep k and a
  // panel of every row of the [I, T] or [R, T] activations).
  const int64_t panel_rows = std::clamp<int64_t>(kLhsPanelBytes / (4 * K), 1, std::min(M, kOuterPanelRows));
  int64_t tile_cols = std::min(kRhsTileBytes / (4 * chunk), kOuterSumsBytes / (4 * panel_rows));
  tile_cols = std::clamp<int64_t>(tile_cols / width * width, width, round_up(N, width));
  tile_cols = std::min(tile_cols, round_up((N + tile_threads() - 1) / tile_threads(), width));
  const int64_t tiles = (N + tile_cols - 1) / tile_cols;
  thread_local std::vector<float> lhs_buffer;
  float* const lhs_data = aligned_buffer(lhs_buffer, panel_rows * K);
  for (int64_t m0 = 0; m0 < M; m0 += panel_rows) {
    const int64_t rows = std::min(panel_rows, M - m0);
    const Fp32Tile panel = widen_tile(lhs, m0, rows, 0, K, lhs_data);
    const int64_t a_row = panel.transposed ? 1 : panel.ld, a_k = panel.transposed ? panel.ld : 1;
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> rhs_buffer, sums_buffer;
      float* const rhs_data = aligned_buffer(rhs_buffer, chunk * tile_cols);
      float* const sums_data = aligned_buffer(sums_buffer, rows * tile_cols);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t n0 = tile * tile_cols, cols = std::min(tile_cols, N - n0), strips = (cols + width - 1) / width;
        for (int64_t k0 = 0; k0 < K; k0 += chunk) {
          const int64_t depth = std::min(chunk, K - k0);
          for (int64_t strip = 0; strip < strips; ++strip) {
            const int64_t c0 = n0 + strip * width, strip_cols = std::min(width, N - c0);
            float* packed = rhs_data + strip * depth * width;
            if (strip_cols == width) {
              widen_tile(rhs, k0, depth, c0, width, packed);  // rows contiguous: [depth, width], leading dimension width
            } else {
              for (int64_t k = 0; k < depth; ++k) {
                widen_tile(rhs, k0 + k, 1, c0, strip_cols, packed + k * width);
                std::fill(packed + k * width + strip_cols, packed + (k + 1) * width, 0.f);
              }
            }
          }
          kernels.outer(rows, strips, depth, panel.data + k0 * a_k, a_row, a_k, rhs_data, sums_data,
                        strips * width, k0 > 0);
        }
        store_sums(kernels, out, m0, n0, sums_data, strips * width, rows, cols);
      }
    });
  }
}

// widened_dot_f32's kernel where there is no ISA kernel: few_rows_dot a row at a time (its
// sums are rows x cols packed; one row is any ld_sums).
void portable_widened_dot(int64_t rows, int64_t cols, int64_t Kp, const float* a, int64_t lda, const float* b,
                          int64_t ldb, float* sums, int64_t ld_sums, const char*, const char*) {
  for (int64_t r = 0; r < rows; ++r) few_rows_dot(1, cols, Kp, a + r * lda, lda, false, b, ldb, true, sums + r * ld_sums);
}

}  // namespace

WidenedDot widened_dot_f32() {
  const WidenKernels* kernels = widen_kernels();
  return kernels != nullptr ? kernels->dot : portable_widened_dot;
}

bool native_bf16_dot_available() {
  static const bool available = cpu_has_native_bf16_dot();
  return available;
}

Bf16GemmPath bf16_gemm_path() {
  const char* env = std::getenv("TPMOE_CPU_BF16_GEMM");
  const std::string value = env == nullptr ? "" : env;
  if (value == "native") return Bf16GemmPath::kNative;
  if (value == "widen") return Bf16GemmPath::kWiden;
  TORCH_CHECK(value.empty() || value == "auto",
              "tpmoe: TPMOE_CPU_BF16_GEMM: expected 'native', 'widen' or 'auto' (or unset), got '", value, "'");
  return native_bf16_dot_available() ? Bf16GemmPath::kNative : Bf16GemmPath::kWiden;
}

std::string bf16_gemm_path_name() { return bf16_gemm_path() == Bf16GemmPath::kWiden ? "widen" : "native"; }

void widened_mm_out(at::Tensor& out, const at::Tensor& lhs, const at::Tensor& rhs, const at::Tensor* following_rhs) {
  const int64_t M = lhs.size(0), K = lhs.size(1), N = rhs.size(1);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    out.zero_();
    return;
  }
  if (const WidenKernels* kernels = widen_kernels()) {
    if (rhs.stride(1) == 1) return widened_outer_mm(*kernels, out, lhs, rhs);
    if (rhs.stride(0) == 1) return widened_dot_mm(*kernels, out, lhs, rhs, following_rhs);
  }
  // ATen's float32 GEMM on the widened tiles: the portable path, and any other operand layout.
  const int64_t panel_rows = std::clamp<int64_t>(kLhsPanelBytes / (4 * K), 1, M);
  // Few rows: tiles that stay in L1 between their widening and their one use (a 512 KiB tile
  // went out to L2 and back, and decode ran 2.6x its weight-read floor instead of ~1x).
  const int64_t tile_cols = M <= kFewRows ? std::min(N, std::max<int64_t>(1, kFewRowsTileBytes / (4 * K)))
                                          : std::min(N, std::max<int64_t>(16, kRhsTileBytes / (4 * K) / 16 * 16));
  const int64_t tiles = (N + tile_cols - 1) / tile_cols;
  // One buffer set per thread, kept: a call allocates nothing once the shapes have been seen.
  thread_local std::vector<float> lhs_buffer;
  lhs_buffer.resize(panel_rows * K);
  for (int64_t m0 = 0; m0 < M; m0 += panel_rows) {
    const int64_t rows = std::min(panel_rows, M - m0);
    const Fp32Tile lhs_panel = widen_tile(lhs, m0, rows, 0, K, lhs_buffer.data());
    // Weight tiles over threads in "gemm" mode; inside an "experts" worker this runs in order.
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // workers start from default dispatch state
      thread_local std::vector<float> rhs_buffer, sums_buffer;
      rhs_buffer.resize(K * tile_cols);
      sums_buffer.resize(rows * tile_cols);
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t n0 = tile * tile_cols, cols = std::min(tile_cols, N - n0);
        const Fp32Tile rhs_tile = widen_tile(rhs, 0, K, n0, cols, rhs_buffer.data());
        if (rows <= kFewRows) {
          few_rows_dot(rows, cols, K, lhs_panel.data, lhs_panel.ld, lhs_panel.transposed, rhs_tile.data, rhs_tile.ld,
                       rhs_tile.transposed, sums_buffer.data());
        } else {
          at::Tensor sums = at::from_blob(sums_buffer.data(), {rows, cols}, at::TensorOptions().dtype(at::kFloat));
          at::mm_out(sums, as_matrix(lhs_panel, rows, K), as_matrix(rhs_tile, K, cols));
        }
        const int64_t offset = m0 * out.stride(0) + n0 * out.stride(1);
        if (out.scalar_type() == at::kBFloat16) {
          store_rounded(sums_buffer.data(), cols, rows, cols, out.data_ptr<c10::BFloat16>() + offset, out.stride(0),
                        out.stride(1));
        } else {
          TORCH_CHECK(out.scalar_type() == at::kHalf, "tpmoe: widened_mm_out: expected a bf16 or fp16 output, got ",
                      out.scalar_type());
          store_rounded(sums_buffer.data(), cols, rows, cols, out.data_ptr<c10::Half>() + offset, out.stride(0),
                        out.stride(1));
        }
      }
    });
  }
}

}  // namespace cpu
}  // namespace tpmoe
