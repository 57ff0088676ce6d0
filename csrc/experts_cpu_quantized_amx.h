// fp8 weight rows against 5..kRowsFp8 activation rows an expert on AMX (bf16 tiles), where the CPU
// has it: between the fused decode kernels (each stored byte dequantized once per group of up to 4
// rows) and the widened path (every row stored as float32, then a float32 GEMM), both of which
// spend vector instructions per multiply and were FMA-bound there (Mixtral at 8 rows an expert ran
// at 0.85x the bf16 path). AMX does the multiplies of 16 weight rows x 32 values x 16 activation
// rows in one instruction, leaving the e4m3 -> bf16 conversion (7 instructions per 32 values) as
// the work per stored byte.
//
// Exact to float32: every e4m3 value, subnormals included, is a normal bf16, and each float32
// activation is the sum of three bf16 parts (its top 8 significant bits, the next 8, the last 8:
// each remainder is exact), so the tiles multiply exact products and sum them in float32. A
// panel whose values are all bf16 already (bf16 inputs) needs one part. Sums are per scale block
// (a block's tiles at a time), scaled once per block into float32 accumulators.
//
// Layout: A tile = 16 weight rows x 32 bf16 values (converted into a 1 KiB buffer), B tile =
// the activation panel in the tiles' pair layout (row kk: value pairs 2kk, 2kk+1 of 16 activation
// rows), C tile = 16 weight rows x 16 activation rows.
#pragma once

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "experts_cpu_quantized_kernels.h"

namespace tpmoe {
namespace cpu {
namespace dequant {

#define TPMOE_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

// AMX-TILE and AMX-BF16 (CPUID 7.0 EDX bits 24 and 22), and Linux's leave to use the tile data
// (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, once per process).
inline bool amx_usable() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  if (!(edx & (1u << 24)) || !(edx & (1u << 22))) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

constexpr int kAmxRows = 16;  // activation rows a C tile holds, weight rows an A tile holds
// Activation rows an expert this kernel takes (past: widened). It beats the widened path at every
// count measured (Mixtral prefill, 128 rows an expert: ~4x); the cap bounds the bf16 panel a
// thread holds (256 rows of 14336 values in three parts: 22 MiB).
constexpr int kRowsFp8 = 256;

// The activation panel in B tiles' layout, per part and group of 16 rows: value pair kk of row r
// at ((part * groups + g) * pairs + kk) * 32 + (r % 16) * 2, rows past n zero.
struct AmxPanel {
  const void* phase = nullptr;  // which panel this is: the caller's phase and expert
  int64_t expert = -1;
  int parts = 0, groups = 0;
  int64_t pairs = 0;
  std::vector<uint16_t> data;
};

// xs: n rows of `count` floats; fills panel unless it already holds (phase, expert).
inline void amx_panel(const float* const* xs, int64_t n, int64_t count, const void* phase, int64_t expert,
                      AmxPanel& panel) {
  if (panel.phase == phase && panel.expert == expert) return;
  panel.phase = phase;
  panel.expert = expert;
  panel.groups = static_cast<int>((n + kAmxRows - 1) / kAmxRows);
  panel.pairs = (count + 31) / 32 * 16;
  bool exact = true;
  for (int64_t r = 0; r < n && exact; ++r)
    for (int64_t j = 0; j < count; ++j) {
      uint32_t bits;
      std::memcpy(&bits, xs[r] + j, 4);
      if (bits & 0xFFFF) {
        exact = false;
        break;
      }
    }
  panel.parts = exact ? 1 : 3;
  const int64_t stride = panel.pairs * 32;
  panel.data.assign(static_cast<size_t>(panel.parts * panel.groups * stride), 0);
  for (int64_t r = 0; r < n; ++r) {
    uint16_t* out = panel.data.data() + (r / kAmxRows) * stride + (r % kAmxRows) * 2;
    for (int64_t j = 0; j < count; ++j) {
      float rest = xs[r][j];
      uint16_t* at = out + (j / 2) * 32 + (j & 1);
      for (int p = 0; p < panel.parts; ++p) {
        uint32_t bits;
        std::memcpy(&bits, &rest, 4);
        const uint32_t top = bits & 0xFFFF0000u;
        float part;
        std::memcpy(&part, &top, 4);
        at[p * panel.groups * stride] = static_cast<uint16_t>(top >> 16);
        rest -= part;
      }
    }
  }
}

// 32 e4m3 bytes (masked lanes zero) as bf16: normal values are their bits moved into bf16's
// fields with the exponent bias raised by 120; the 8 magnitudes with exponent 0 (zero and the
// subnormals m 2^-9, normal in bf16) come from a table.
TPMOE_AMX inline __m512i e4m3_to_bf16(const uint8_t* source, __mmask32 mask) {
  alignas(64) static constexpr uint16_t kSubnormals[32] = {0, 0x3B00, 0x3B80, 0x3BC0, 0x3C00, 0x3C20, 0x3C40, 0x3C60};
  const __m512i table = _mm512_load_si512(kSubnormals);
  const __m512i wide = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, source));
  const __m512i magnitude = _mm512_and_si512(wide, _mm512_set1_epi16(0x7F));
  __m512i value = _mm512_add_epi16(_mm512_slli_epi16(magnitude, 4), _mm512_set1_epi16(120 << 7));
  value = _mm512_mask_permutexvar_epi16(value, _mm512_cmplt_epu16_mask(magnitude, _mm512_set1_epi16(8)), magnitude,
                                        table);
  return _mm512_ternarylogic_epi32(value, wide, _mm512_set1_epi16(static_cast<short>(0x8000)), 0xF8);  // a | (b & c)
}

struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int kAmxTiles = 4;           // C tiles: weight tiles x activation groups of a pass
constexpr int kAmxUnitColumns = 64;    // output columns of a unit this kernel takes (see below)
constexpr int kAmxWeightRows = 2 * kAmxUnitColumns;

// C tile t (an immediate in the instructions) += A (tile 4) . B (tile 5), or stored to `to`.
TPMOE_AMX inline void amx_dot(int t) {
  switch (t) {
    case 0: _tile_dpbf16ps(0, 4, 5); return;
    case 1: _tile_dpbf16ps(1, 4, 5); return;
    case 2: _tile_dpbf16ps(2, 4, 5); return;
    default: _tile_dpbf16ps(3, 4, 5); return;
  }
}
TPMOE_AMX inline void amx_store(int t, float* to) {
  switch (t) {
    case 0: _tile_stored(0, to, 64); return;
    case 1: _tile_stored(1, to, 64); return;
    case 2: _tile_stored(2, to, 64); return;
    default: _tile_stored(3, to, 64); return;
  }
}

// Weight rows 0..n_weight_rows-1 (<= kAmxWeightRows; bytes[q], scales[q]: each row's first scale,
// later ones at stride 1) dotted with the panel's n rows over `count` values, the first `offset`
// into its scale block: sums[r * ld + slots[q]]. Activation rows go 32 at a time (two C tiles
// each for up to 2 weight tiles, or one for up to 4); a pass takes its weight tiles through the
// values together, so that each B chunk (up to 3 parts x 2 groups x 1 KiB) is read from L2 once
// per pass and from L1 by the pass's other tiles: a down panel of 32 float32 rows of Mixtral
// (14336 values, three parts) is 2.6 MiB, past L2, and read once per tile it was the bound.
// Hence units of kAmxUnitColumns columns for this kernel: 64 down rows, 4 tiles a pass.
TPMOE_AMX inline void fp8_rows_amx(const uint8_t* const* bytes, const float* const* scales, int64_t n_weight_rows,
                                   const AmxPanel& panel, int64_t n, int64_t count, int64_t block, int64_t offset,
                                   const int64_t* slots, float* sums, int64_t ld) {
  AmxConfig config;
  for (int t = 0; t < 6; ++t) {  // C0..C3, A, B: all 16 rows x 64 bytes
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
  alignas(64) uint16_t a[kAmxRows * 32];
  alignas(64) float c[kAmxRows * kAmxRows];
  alignas(64) float acc[kAmxTiles][kAmxRows * kAmxRows];
  const int64_t stride = panel.pairs * 32;
  for (int first_group = 0; first_group < panel.groups; first_group += 2) {
    const int groups = std::min(2, panel.groups - first_group), per_pass = kAmxTiles / groups;
    for (int64_t m0 = 0; m0 < n_weight_rows; m0 += per_pass * kAmxRows) {
      const int tiles = static_cast<int>(std::min<int64_t>(per_pass, (n_weight_rows - m0 + kAmxRows - 1) / kAmxRows));
      const uint8_t* rows[kAmxTiles][kAmxRows];
      const float* row_scales[kAmxTiles][kAmxRows];
      for (int w = 0; w < tiles; ++w)
        for (int m = 0; m < kAmxRows; ++m) {  // a short tile repeats its last row
          const int64_t q = std::min<int64_t>(m0 + w * kAmxRows + m, n_weight_rows - 1);
          rows[w][m] = bytes[q];
          row_scales[w][m] = scales[q];
        }
      std::memset(acc, 0, sizeof(acc));
      for (int64_t index = 0, start = 0; start < count; ++index) {
        const int64_t stop = std::min(count, (index + 1) * block - offset);
        for (int t = 0; t < tiles * groups; ++t) {
          switch (t) {
            case 0: _tile_zero(0); break;
            case 1: _tile_zero(1); break;
            case 2: _tile_zero(2); break;
            default: _tile_zero(3);
          }
        }
        for (int64_t chunk = start / 32; chunk * 32 < stop; ++chunk) {
          const int64_t lo = std::max(start, chunk * 32) - chunk * 32, hi = std::min(stop, chunk * 32 + 32) - chunk * 32;
          const __mmask32 mask = static_cast<__mmask32>(((uint64_t(1) << hi) - 1) & ~((uint64_t(1) << lo) - 1));
          for (int w = 0; w < tiles; ++w) {
            for (int m = 0; m < kAmxRows; ++m) {
              _mm_prefetch(reinterpret_cast<const char*>(rows[w][m] + chunk * 32 + 512), _MM_HINT_T0);
              _mm512_store_si512(a + m * 32, e4m3_to_bf16(rows[w][m] + chunk * 32, mask));
            }
            _tile_loadd(4, a, 64);
            for (int p = 0; p < panel.parts; ++p)
              for (int g = 0; g < groups; ++g) {
                _tile_loadd(5, panel.data.data() + (p * panel.groups + first_group + g) * stride + chunk * 16 * 32, 64);
                amx_dot(w * groups + g);
              }
          }
        }
        for (int t = 0; t < tiles * groups; ++t) {
          amx_store(t, c);
          const int w = t / groups;
          for (int m = 0; m < kAmxRows; ++m) {
            float* row = acc[t] + m * kAmxRows;
            _mm512_store_ps(row, _mm512_fmadd_ps(_mm512_set1_ps(row_scales[w][m][index]),
                                                 _mm512_load_ps(c + m * kAmxRows), _mm512_load_ps(row)));
          }
        }
        start = stop;
      }
      const int64_t r0 = first_group * kAmxRows, r1 = std::min<int64_t>(n, r0 + groups * kAmxRows);
      for (int w = 0; w < tiles; ++w)
        for (int m = 0; m < kAmxRows && m0 + w * kAmxRows + m < n_weight_rows; ++m)
          for (int64_t r = r0; r < r1; ++r)
            sums[r * ld + slots[m0 + w * kAmxRows + m]] =
                acc[w * groups + (r - r0) / kAmxRows][m * kAmxRows + (r - r0) % kAmxRows];
    }
  }
  _tile_release();
}

}  // namespace dequant
}  // namespace cpu
}  // namespace tpmoe
