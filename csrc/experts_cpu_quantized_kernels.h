// The dequantizing kernels of tpmoe::experts_cpu_quantized_forward (experts_cpu_quantized.cpp),
// one set per ISA, chosen once per process (TPMOE_CPU_DEQUANT_KERNEL = portable | avx2 | avx512
// | auto forces one; the tests run each one the CPU has).
//
// Two ways to a weight row's dot products with the activation rows routed to its expert:
//   fused   (AVX-512, at most kFusedRows* activation rows): 16 stored values dequantized into a
//           register and multiplied there with each activation row, four weight rows at once; no
//           float row is written. At decode a stored byte is used once or twice, so the call is a
//           stream of the stored bytes and anything extra per byte shows.
//   widened (any ISA; with AVX-512 past kFusedRows*): a unit's weight rows dequantized into
//           zero-padded float32 rows once (the widen_* kernels here), then multiplied with all
//           of the expert's activation rows by the widened bf16 GEMM's float32 dot kernel
//           (widened_dot_f32, experts_cpu_widen.cpp), so the conversion is paid once per row
//           and every widened weight, bf16 or quantized, goes through the same micro-kernels.
// MXFP4 with AVX-512 keeps activation rows in a "split" layout: per 32-value block, the 16 even
// values then the 16 odd ones, zero-padded to whole blocks and starting at the block offset. A
// packed byte holds an even value (low nibble) and the next odd one, so 16 bytes widen into two
// vectors that line up with the split halves without any shuffle of the activations.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

namespace tpmoe {
namespace cpu {
namespace dequant {

constexpr int kWeightRows = 4;  // weight rows per kernel call (a 4 x NX tile of sums)
// The fused kernels' limit on activation rows per expert: past it, widening once beats
// dequantizing again per group of activation rows. An MXFP4 block widens in 5 instructions per
// 32 values against 2 FMAs per row, so two passes of 4 rows still win; fp8 (4 instructions per
// 16 values, 2 rows a pass) stops at 4.
constexpr int kFusedRowsFp8 = 4, kFusedRowsMxfp4 = 8;

// Up to kWeightRows stored rows of one expert's matrix (a short group repeats its last row),
// each with its first scale; later scales follow at stride 1 (both formats store them so).
// `next` are the rows the following call will read (or these again): the fused kernels fetch
// them into cache while they work on these, and the bytes `far` past them too. Rows are short
// (an fp8 gate_up row of Qwen3 is 2 KiB, 32 lines), too short for the hardware prefetcher to
// ramp up on each of four streams: without the fetches a decode call waited on its loads at
// about half the read floor's rate, and with the next rows' alone at ~85% of it.
struct WeightRows {
  const uint8_t* bytes[kWeightRows];
  const void* scales[kWeightRows];
  const uint8_t* next[kWeightRows];
  int64_t far = 0;
};

// How far past the next rows the second fetch reads, in rows of the matrix: adjacent rows are
// adjacent in memory (down, each gate_up half, MXFP4's interleaved gate_up), so this is a call
// or two further on. Odd: with 2 KiB rows (Qwen3's gate_up) an even count put both fetches at
// the same 4 KiB offset, and that measured no faster than one fetch.
constexpr int64_t kFarRows = 5;

// e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal (m 2^-9).
// The all-ones pattern (NaN) is read as 480 here; checkpoints hold no NaN weights.
inline const std::array<float, 256>& e4m3_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> values{};
    for (int bits = 0; bits < 256; ++bits) {
      const int exponent = (bits >> 3) & 0xF, mantissa = bits & 7;
      const float magnitude = exponent == 0 ? std::ldexp(float(mantissa), -9)
                                            : std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
      values[bits] = (bits & 0x80) ? -magnitude : magnitude;
    }
    return values;
  }();
  return table;
}

// e8m0 scale bytes as floats (2^(byte - 127)): a table, so a block's scale is one load.
inline const float* e8m0_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> values{};
    for (int bits = 0; bits < 256; ++bits) values[bits] = std::ldexp(1.0f, bits - 127);
    return values;
  }();
  return table.data();
}

inline void widen_fp8_portable(const uint8_t* source, int64_t count, float scale, float* out) {
  const auto& table = e4m3_values();
  for (int64_t j = 0; j < count; ++j) out[j] = table[source[j]] * scale;
}

// e4m3's bits placed into a half's (sign to bit 15, exponent and mantissa shifted by 7) are
// the same number times 2^-8 (the exponent biases differ by 8), subnormals included: F16C then
// widens 8 at a time, and the 2^8 rides on the scale (a power of two: no extra rounding, so
// the products equal the portable table's bit for bit).
__attribute__((target("avx2,fma,f16c"))) inline void widen_fp8_avx2(const uint8_t* source, int64_t count,
                                                                    float scale, float* out) {
  const __m256 scaled = _mm256_set1_ps(scale * 256.0f);
  const __m128i sign_mask = _mm_set1_epi16(0x80), rest_mask = _mm_set1_epi16(0x7F);
  int64_t j = 0;
  for (; j + 8 <= count; j += 8) {
    const __m128i bytes = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(source + j)));
    const __m128i half = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(bytes, sign_mask), 8),
                                      _mm_slli_epi16(_mm_and_si128(bytes, rest_mask), 7));
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_cvtph_ps(half), scaled));
  }
  widen_fp8_portable(source + j, count - j, scale, out + j);
}

// e2m1 nibbles: value v of a packed row is the low nibble of byte v / 2 when v is even, the high
// one when odd. Twice each e2m1 value is an integer (0, 1, 2, 3, 4, 6, 8, 12 and negatives),
// which a byte shuffle looks up 16 at a time; the halving rides on the scale (exact).
constexpr float kE2m1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                             -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

inline void widen_mxfp4_portable(const uint8_t* bytes, int64_t first, int64_t count, float scale, float* out) {
  for (int64_t j = 0; j < count; ++j) {
    const int64_t v = first + j;
    out[j] = kE2m1[(bytes[v >> 1] >> ((v & 1) * 4)) & 0xF] * scale;
  }
}

__attribute__((target("avx2,fma"))) inline void widen_mxfp4_avx2(const uint8_t* bytes, int64_t first,
                                                                 int64_t count, float scale, float* out) {
  int64_t j = 0;
  if (first & 1) {  // an odd start: its high nibble alone, then whole bytes
    widen_mxfp4_portable(bytes, first, 1, scale, out);
    j = 1;
  }
  const __m128i doubled = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m256 half_scale = _mm256_set1_ps(scale * 0.5f);
  for (; j + 32 <= count; j += 32) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + ((first + j) >> 1)));
    const __m128i low = _mm_shuffle_epi8(doubled, _mm_and_si128(packed, nibble));
    const __m128i high = _mm_shuffle_epi8(doubled, _mm_and_si128(_mm_srli_epi16(packed, 4), nibble));
    const __m128i first16 = _mm_unpacklo_epi8(low, high), last16 = _mm_unpackhi_epi8(low, high);
    const __m128i parts[4] = {first16, _mm_srli_si128(first16, 8), last16, _mm_srli_si128(last16, 8)};
    for (int part = 0; part < 4; ++part)
      _mm256_storeu_ps(out + j + 8 * part,
                       _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[part])), half_scale));
  }
  widen_mxfp4_portable(bytes, first + j, count - j, scale, out + j);
}

#define TPMOE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

// 16 e4m3 bytes (masked lanes zero) as float32 times 2^-8: the byte sign-extended to 16 bits
// and shifted by 7 puts sign, exponent and mantissa where a half has them, except that bit 14
// then repeats the sign; clearing it leaves the half of the same number times 2^-8.
TPMOE_AVX512 inline __m512 e4m3_times_2_pow_minus8(const uint8_t* source, __mmask16 mask) {
  const __m256i wide = _mm256_cvtepi8_epi16(_mm_maskz_loadu_epi8(mask, source));
  return _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(wide, 7), _mm256_set1_epi16(0x3FFF | 0x8000)));
}

// fp8 rows widened 16 at a time (prefill: the widened path's rows).
TPMOE_AVX512 inline void widen_fp8_avx512(const uint8_t* source, int64_t count, float scale, float* out) {
  const __m512 scaled = _mm512_set1_ps(scale * 256.0f);
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 mask = tail_mask(count - j);
    _mm512_mask_storeu_ps(out + j, mask, _mm512_mul_ps(e4m3_times_2_pow_minus8(source + j, mask), scaled));
  }
}

// 32 e4m3 bytes as two float32 vectors times 2^-8: e4m3_times_2_pow_minus8's bits, its integer
// steps done once on 32 halves (a 512-bit vector) instead of twice on 16: the fused kernel's
// instructions, not memory, had set its rate (in cache it ran no faster than the read floor).
TPMOE_AVX512 inline void e4m3_pair_times_2_pow_minus8(const uint8_t* source, __m512& low, __m512& high) {
  const __m512i wide = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(source)));
  const __m512i half = _mm512_and_si512(_mm512_slli_epi16(wide, 7), _mm512_set1_epi16(0x3FFF | 0x8000));
  low = _mm512_cvtph_ps(_mm512_castsi512_si256(half));
  high = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(half, 1));
}

// The line `at` bytes into each next row, and the one `far` past it, into L2.
inline void fetch_next(const WeightRows& rows, int64_t at) {
  #pragma GCC unroll 4
  for (int w = 0; w < kWeightRows; ++w) {
    _mm_prefetch(reinterpret_cast<const char*>(rows.next[w] + at), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(rows.next[w] + at + rows.far), _MM_HINT_T1);
  }
}

// One weight row's 16 values (times 2^-8) into its fp8_fused_avx512 accumulators.
template <int NX, bool ScaleEach>
TPMOE_AVX512 inline void fp8_add(__m512 (&total)[NX], __m512 (&part)[NX], __m512 value, const __m512* xv,
                                 __m512 scale) {
  if constexpr (ScaleEach) value = _mm512_mul_ps(value, scale);
  #pragma GCC unroll 4
  for (int x = 0; x < NX; ++x) {
    if constexpr (ScaleEach)
      total[x] = _mm512_fmadd_ps(value, xv[x], total[x]);
    else
      part[x] = _mm512_fmadd_ps(value, xv[x], part[x]);
  }
}

// fp8 fused: sums[w * NX + x] = row w . xs[x] over `count` values, the first `offset` into its
// scale block. Up to 2 activation rows, each block's products are summed first and scaled once
// (its one float scale); 3 or 4 rows (ScaleEach), where 2 x 4 x NX accumulators would spill, each
// 16 values are multiplied by their scale in the register (one rounding, the product the widened
// rows hold) and go straight into the 4 x NX sums: one pass reads and dequantizes each byte once
// where two passes of 2 rows did it twice (Qwen3 at T = 32: ~2 rows an expert, many 3 or 4).
// A block's values go 32 at a time unmasked, then its tail 16 at a time masked; the sums take the
// 16-value steps in order either way.
template <int NX, bool ScaleEach>
TPMOE_AVX512 void fp8_fused_avx512(const WeightRows& rows, const float* const* xs, int64_t count, int64_t block,
                                   int64_t offset, float* sums) {
  __m512 total[kWeightRows][NX], part[kWeightRows][NX];
  #pragma GCC unroll 4
  for (int w = 0; w < kWeightRows; ++w)
    #pragma GCC unroll 4
    for (int x = 0; x < NX; ++x) total[w][x] = part[w][x] = _mm512_setzero_ps();
  for (int64_t start = 0, index = 0; start < count; ++index) {
    const int64_t stop = std::min(count, (index + 1) * block - offset);
    __m512 scale[kWeightRows];
    #pragma GCC unroll 4
    for (int w = 0; w < kWeightRows; ++w)
      scale[w] = _mm512_set1_ps(static_cast<const float*>(rows.scales[w])[index] * 256.0f);
    int64_t j = start;
    for (; j + 32 <= stop; j += 32) {
      if ((j & 63) < 32) fetch_next(rows, j);
      __m512 x_low[NX], x_high[NX];
      #pragma GCC unroll 4
      for (int x = 0; x < NX; ++x) {
        x_low[x] = _mm512_loadu_ps(xs[x] + j);
        x_high[x] = _mm512_loadu_ps(xs[x] + j + 16);
      }
      #pragma GCC unroll 4
      for (int w = 0; w < kWeightRows; ++w) {
        __m512 low, high;
        e4m3_pair_times_2_pow_minus8(rows.bytes[w] + j, low, high);
        fp8_add<NX, ScaleEach>(total[w], part[w], low, x_low, scale[w]);
        fp8_add<NX, ScaleEach>(total[w], part[w], high, x_high, scale[w]);
      }
    }
    for (; j < stop; j += 16) {
      if ((j & 63) < 16) fetch_next(rows, j);
      const __mmask16 mask = tail_mask(stop - j);
      __m512 xv[NX];
      #pragma GCC unroll 4
      for (int x = 0; x < NX; ++x) xv[x] = _mm512_maskz_loadu_ps(mask, xs[x] + j);
      #pragma GCC unroll 4
      for (int w = 0; w < kWeightRows; ++w)
        fp8_add<NX, ScaleEach>(total[w], part[w], e4m3_times_2_pow_minus8(rows.bytes[w] + j, mask), xv, scale[w]);
    }
    if constexpr (!ScaleEach)
      #pragma GCC unroll 4
      for (int w = 0; w < kWeightRows; ++w)
        #pragma GCC unroll 4
        for (int x = 0; x < NX; ++x) {
          total[w][x] = _mm512_fmadd_ps(part[w][x], scale[w], total[w][x]);
          part[w][x] = _mm512_setzero_ps();
        }
    start = stop;
  }
  #pragma GCC unroll 4
  for (int w = 0; w < kWeightRows; ++w)
    #pragma GCC unroll 4
    for (int x = 0; x < NX; ++x) sums[w * NX + x] = _mm512_reduce_add_ps(total[w][x]);
}

// The e2m1 table times each e8m0 scale (exact: a power of two), one 64-byte row a scale byte:
// a block's lookups then read their table from memory (a load port) where multiplying the table
// by the scale took a vector instruction a block and row, and the fused kernel is bound by those.
inline const float* e2m1_scaled_tables() {
  struct alignas(64) Tables { float values[256][16]; };
  static const Tables tables = [] {
    Tables made;
    for (int bits = 0; bits < 256; ++bits)
      for (int v = 0; v < 16; ++v) made.values[bits][v] = kE2m1[v] * e8m0_values()[bits];
    return made;
  }();
  return &tables.values[0][0];
}

// A 32-value MXFP4 block (16 bytes) as its even and odd values times the block's scale, looked
// up by each nibble in the block's scaled table (vpermps reads an index's low 4 bits, so the low
// nibble needs no mask).
TPMOE_AVX512 inline void e2m1_block(const uint8_t* bytes, const float* table, __m512& even, __m512& odd) {
  const __m512 scaled = _mm512_load_ps(table);
  const __m512i packed = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  even = _mm512_permutexvar_ps(packed, scaled);
  odd = _mm512_permutexvar_ps(_mm512_srli_epi32(packed, 4), scaled);
}

// Block b of each weight row into the 4 x NX sums of mxfp4_fused_avx512. The table offset is
// formed in 64 bits (a scale byte times 64): the int arithmetic the index had cost a sign
// extension a row, and the loop is bound by its instructions.
template <int NX>
TPMOE_AVX512 inline void mxfp4_block_sums(const WeightRows& rows, const char* tables, const float* const* xs,
                                          int64_t b, __m512 (&total)[kWeightRows][NX]) {
  __m512 even_x[NX], odd_x[NX];
  #pragma GCC unroll 4
  for (int x = 0; x < NX; ++x) {
    even_x[x] = _mm512_loadu_ps(xs[x] + 32 * b);
    odd_x[x] = _mm512_loadu_ps(xs[x] + 32 * b + 16);
  }
  #pragma GCC unroll 4
  for (int w = 0; w < kWeightRows; ++w) {
    const uint64_t scale = static_cast<const uint8_t*>(rows.scales[w])[b];
    __m512 even, odd;
    e2m1_block(rows.bytes[w] + 16 * b, reinterpret_cast<const float*>(tables + scale * 64), even, odd);
    #pragma GCC unroll 4
    for (int x = 0; x < NX; ++x)
      total[w][x] = _mm512_fmadd_ps(odd, odd_x[x], _mm512_fmadd_ps(even, even_x[x], total[w][x]));
  }
}

// mxfp4 fused: sums[w * NX + x] = row w . xs[x] over `blocks` whole blocks, xs split; a line
// (4 blocks) of each row a step, then the last blocks one at a time.
template <int NX>
TPMOE_AVX512 void mxfp4_fused_avx512(const WeightRows& rows, const float* const* xs, int64_t blocks, float* sums) {
  const char* tables = reinterpret_cast<const char*>(e2m1_scaled_tables());
  __m512 total[kWeightRows][NX];
  #pragma GCC unroll 4
  for (int w = 0; w < kWeightRows; ++w)
    #pragma GCC unroll 4
    for (int x = 0; x < NX; ++x) total[w][x] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 4 <= blocks; b += 4) {
    fetch_next(rows, 16 * b);
    #pragma GCC unroll 4
    for (int step = 0; step < 4; ++step) mxfp4_block_sums<NX>(rows, tables, xs, b + step, total);
  }
  if (b < blocks) fetch_next(rows, 16 * b);
  for (; b < blocks; ++b) mxfp4_block_sums<NX>(rows, tables, xs, b, total);
  #pragma GCC unroll 4
  for (int w = 0; w < kWeightRows; ++w)
    #pragma GCC unroll 4
    for (int x = 0; x < NX; ++x) sums[w * NX + x] = _mm512_reduce_add_ps(total[w][x]);
}

// MXFP4 rows widened in the split layout (whole blocks), for the widened path under AVX-512.
TPMOE_AVX512 inline void widen_mxfp4_split_avx512(const uint8_t* bytes, const uint8_t* scales, int64_t blocks,
                                                  float* out) {
  const float* tables = e2m1_scaled_tables();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 even, odd;
    e2m1_block(bytes + 16 * b, tables + 16 * scales[b], even, odd);
    _mm512_storeu_ps(out + 32 * b, even);
    _mm512_storeu_ps(out + 32 * b + 16, odd);
  }
}

template <template <int> class Call, typename... Args>
void with_nx(int nx, Args&&... args) {
  switch (nx) {
    case 1: return Call<1>::run(args...);
    case 2: return Call<2>::run(args...);
    case 3: return Call<3>::run(args...);
    default: return Call<4>::run(args...);
  }
}

template <int NX>
struct Fp8Fused {
  static void run(const WeightRows& r, const float* const* xs, int64_t count, int64_t block, int64_t offset,
                  float* sums) {
    fp8_fused_avx512<NX, (NX > 2)>(r, xs, count, block, offset, sums);
  }
};
template <int NX>
struct Mxfp4Fused {
  static void run(const WeightRows& r, const float* const* xs, int64_t blocks, float* sums) {
    mxfp4_fused_avx512<NX>(r, xs, blocks, sums);
  }
};
inline void fp8_fused(int nx, const WeightRows& r, const float* const* xs, int64_t count, int64_t block,
                      int64_t offset, float* sums) {
  with_nx<Fp8Fused>(nx, r, xs, count, block, offset, sums);
}
inline void mxfp4_fused(int nx, const WeightRows& r, const float* const* xs, int64_t blocks, float* sums) {
  with_nx<Mxfp4Fused>(nx, r, xs, blocks, sums);
}
struct Kernels {
  bool avx512;  // the fused kernels and the split MXFP4 layout
  void (*widen_fp8)(const uint8_t*, int64_t, float, float*);
  void (*widen_mxfp4)(const uint8_t*, int64_t, int64_t, float, float*);
};

}  // namespace dequant
}  // namespace cpu
}  // namespace tpmoe
