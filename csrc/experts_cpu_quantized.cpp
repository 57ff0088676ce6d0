// tpmoe::experts_cpu_quantized_forward: the routed experts' forward with quantized weights,
// read at their own size: "fp8_block" (float8 e4m3 with float32 scales per B x B block,
// tpmoe/fp8.py) and "mxfp4" (e2m1 pairs a byte with an e8m0 scale per 32 values, GPT-OSS's,
// tpmoe/mxfp4.py).
//
// Each weight row is dequantized into a float32 row buffer right before its products (one
// row of at most H or I_p floats, in L1: never an expert's full-size copy), then multiplied
// with every row routed to that expert: at decode every stored byte is read once and used once,
// so the call streams the bytes it touches. Activations, sums and the weighted combine are
// float32; the caller casts the result back.
//
// Work split: threads take (expert, slice of output columns) units, first of gate_up, then of
// down; every output element has one writer and every sum a fixed order, so a call is bitwise
// reproducible for a thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "experts_cpu_activation.h"

#ifndef TPMOE_EXPERTS_CPU_NAMESPACE
#define TPMOE_EXPERTS_CPU_NAMESPACE tpmoe
#endif
#define TPMOE_QUANTIZED_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define TPMOE_QUANTIZED_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

namespace tpmoe {
namespace cpu {

// The activation of that name, or an error naming op and the names it knows (experts_cpu_common.cpp).
Activation activation_named(const char* op, c10::string_view name);

namespace {

constexpr const char* kOp = "experts_cpu_quantized_forward";

// e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal (m 2^-9).
// The all-ones pattern (NaN) is read as 480 here; checkpoints hold no NaN weights.
std::array<float, 256> e4m3_table() {
  std::array<float, 256> table{};
  for (int bits = 0; bits < 256; ++bits) {
    const int exponent = (bits >> 3) & 0xF, mantissa = bits & 7;
    const float magnitude = exponent == 0 ? std::ldexp(float(mantissa), -9)
                                          : std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
    table[bits] = (bits & 0x80) ? -magnitude : magnitude;
  }
  return table;
}

const std::array<float, 256>& e4m3_values() {
  static const std::array<float, 256> table = e4m3_table();
  return table;
}

void widen_fp8_portable(const uint8_t* source, int64_t count, float scale, float* out) {
  const auto& table = e4m3_values();
  for (int64_t j = 0; j < count; ++j) out[j] = table[source[j]] * scale;
}

// e4m3's bits placed into a half's (sign to bit 15, exponent and mantissa shifted by 7) are
// the same number times 2^-8 (the exponent biases differ by 8), subnormals included: F16C then
// widens 8 at a time, and the 2^8 rides on the scale (a power of two: no extra rounding, so
// the products equal the portable table's bit for bit).
__attribute__((target("avx2,fma,f16c"))) void widen_fp8_avx2(const uint8_t* source, int64_t count, float scale,
                                                             float* out) {
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

void widen_mxfp4_portable(const uint8_t* bytes, int64_t first, int64_t count, float scale, float* out) {
  for (int64_t j = 0; j < count; ++j) {
    const int64_t v = first + j;
    out[j] = kE2m1[(bytes[v >> 1] >> ((v & 1) * 4)) & 0xF] * scale;
  }
}

__attribute__((target("avx2,fma"))) void widen_mxfp4_avx2(const uint8_t* bytes, int64_t first, int64_t count,
                                                          float scale, float* out) {
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

float dot_portable(const float* a, const float* b, int64_t count) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= count; j += 8)
    for (int lane = 0; lane < 8; ++lane) lanes[lane] += a[j + lane] * b[j + lane];
  float total = 0;
  for (int lane = 0; lane < 8; ++lane) total += lanes[lane];
  for (; j < count; ++j) total += a[j] * b[j];
  return total;
}

__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t count) {
  __m256 first = _mm256_setzero_ps(), second = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) {
    first = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), first);
    second = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), second);
  }
  for (; j + 8 <= count; j += 8) first = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), first);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(first, second));
  float total = 0;
  for (int lane = 0; lane < 8; ++lane) total += lanes[lane];
  for (; j < count; ++j) total += a[j] * b[j];
  return total;
}

// Chosen once per process from the CPU's capabilities; TPMOE_CPU_DEQUANT_KERNEL = portable |
// avx2 | auto forces one (the tests run both on any machine with AVX2).
struct Kernels {
  void (*widen)(const uint8_t*, int64_t, float, float*);
  void (*widen_mxfp4)(const uint8_t*, int64_t, int64_t, float, float*);
  float (*dot)(const float*, const float*, int64_t);
};

const Kernels& kernels() {
  static const Kernels chosen = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const char* forced = std::getenv("TPMOE_CPU_DEQUANT_KERNEL");
    const std::string choice = forced == nullptr ? "auto" : forced;
    TORCH_CHECK(choice == "auto" || choice == "portable" || choice == "avx2", kOp,
                ": TPMOE_CPU_DEQUANT_KERNEL: expected portable, avx2 or auto, got '", choice, "'");
    TORCH_CHECK(choice != "avx2" || avx2, kOp,
                ": TPMOE_CPU_DEQUANT_KERNEL=avx2, but this CPU lacks AVX2, FMA or F16C");
    return avx2 && choice != "portable" ? Kernels{widen_fp8_avx2, widen_mxfp4_avx2, dot_avx2}
                                        : Kernels{widen_fp8_portable, widen_mxfp4_portable, dot_portable};
  }();
  return chosen;
}

// One weight row of `count` values along an axis cut into scale blocks of `block`, its first
// value `offset` into its first block, dequantized into `out`. fp8: the row's bytes are its
// values, the scales float32 `scale_stride` apart; mxfp4: the row's bytes hold its whole
// blocks (the values from `offset` on are the row's), the scales e8m0 bytes, one per block.
void widen_row(bool mxfp4, const uint8_t* row, int64_t count, const void* scales, int64_t scale_stride,
               int64_t block, int64_t offset, float* out) {
  int64_t start = 0, index = 0;
  while (start < count) {
    const int64_t stop = std::min(count, (index + 1) * block - offset);
    if (mxfp4) {
      const float scale = std::ldexp(1.0f, int(static_cast<const uint8_t*>(scales)[index]) - 127);
      kernels().widen_mxfp4(row, offset + start, stop - start, scale, out + start);
    } else {
      kernels().widen(row + start, stop - start, static_cast<const float*>(scales)[index * scale_stride], out + start);
    }
    start = stop;
    ++index;
  }
}

void check(const at::Tensor& tensor, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(tensor.device().is_cpu(), kOp, ": ", name, ": expected a CPU tensor, got ", tensor.device());
  TORCH_CHECK(tensor.scalar_type() == dtype, kOp, ": ", name, ": expected ", dtype, ", got ", tensor.scalar_type());
  TORCH_CHECK(tensor.dim() == dim, kOp, ": ", name, ": expected ", dim, " dimensions, got ", tensor.dim());
  TORCH_CHECK(tensor.is_contiguous(), kOp, ": ", name, ": expected a contiguous tensor");
}

}  // namespace

// hidden_states [T, H] float32; sorted_pair_ids [T*K] and expert_offsets [E + 1] int64
// (tpmoe.routing.align); topk_weights [T, K] float32; biases float32. Weights by `format`:
//   fp8_block  w_gate_up [E, R, H], w_down [E, H, I] float8_e4m3fn; gate_up_scale [E, G, nb(I),
//              nb(H)], down_scale [E, nb(H), nb(I)] float32 (tpmoe/fp8.py)
//   mxfp4      w_gate_up [E, R, nb(H), 16], w_down [E, H, nb(I), 16] uint8; gate_up_scale
//              [E, R, nb(H)], down_scale [E, H, nb(I)] uint8 e8m0; block 32 (tpmoe/mxfp4.py)
// with nb(I) counted from `offset`. Returns y [T, H] float32.
at::Tensor experts_cpu_quantized_forward(const at::Tensor& hidden_states, const at::Tensor& w_gate_up,
                                         const at::Tensor& w_down, const at::Tensor& gate_up_scale,
                                         const at::Tensor& down_scale, c10::string_view format, int64_t block,
                                         int64_t offset, const at::Tensor& sorted_pair_ids,
                                         const at::Tensor& expert_offsets, const at::Tensor& topk_weights,
                                         const c10::optional<at::Tensor>& b_gate_up,
                                         const c10::optional<at::Tensor>& b_down, c10::string_view activation,
                                         c10::string_view layout, bool gated, double alpha, double limit) {
  const bool mxfp4 = format == "mxfp4";
  TORCH_CHECK(mxfp4 || format == "fp8_block", kOp, ": format: expected 'fp8_block' or 'mxfp4', got '",
              std::string(format), "'");
  const at::ScalarType stored = mxfp4 ? at::kByte : at::kFloat8_e4m3fn, scale_type = mxfp4 ? at::kByte : at::kFloat;
  check(hidden_states, "hidden_states", at::kFloat, 2);
  check(w_gate_up, "w_gate_up", stored, mxfp4 ? 4 : 3);
  check(w_down, "w_down", stored, mxfp4 ? 4 : 3);
  check(gate_up_scale, "gate_up_scale", scale_type, mxfp4 ? 3 : 4);
  check(down_scale, "down_scale", scale_type, 3);
  check(sorted_pair_ids, "sorted_pair_ids", at::kLong, 1);
  check(expert_offsets, "expert_offsets", at::kLong, 1);
  check(topk_weights, "topk_weights", at::kFloat, 2);
  const bool interleaved = layout == "interleaved";
  TORCH_CHECK(interleaved || layout == "concatenated", kOp, ": layout: expected 'concatenated' or 'interleaved', got '",
              std::string(layout), "'");
  TORCH_CHECK(block >= 1 && offset >= 0 && offset < block && (!mxfp4 || block == 32), kOp, ": block ", block,
              ", offset ", offset);
  const int64_t tokens = hidden_states.size(0), hidden = hidden_states.size(1), top_k = topk_weights.size(1);
  const int64_t experts = w_gate_up.size(0), groups = gated ? 2 : 1, rows = w_gate_up.size(1);
  TORCH_CHECK(rows % groups == 0, kOp, ": w_gate_up: rows ", rows);
  const int64_t inter = rows / groups;
  const int64_t hidden_blocks = (hidden + block - 1) / block, inter_blocks = (offset + inter + block - 1) / block;
  const bool shapes_agree = mxfp4
      ? (w_gate_up.sizes() == at::IntArrayRef{experts, rows, hidden_blocks, 16} &&
         w_down.sizes() == at::IntArrayRef{experts, hidden, inter_blocks, 16} &&
         gate_up_scale.sizes() == at::IntArrayRef{experts, rows, hidden_blocks} &&
         down_scale.sizes() == at::IntArrayRef{experts, hidden, inter_blocks})
      : (w_gate_up.size(2) == hidden && w_down.sizes() == at::IntArrayRef{experts, hidden, inter} &&
         gate_up_scale.sizes() == at::IntArrayRef{experts, groups, inter_blocks, hidden_blocks} &&
         down_scale.sizes() == at::IntArrayRef{experts, hidden_blocks, inter_blocks});
  TORCH_CHECK(shapes_agree, kOp, ": the ", std::string(format), " weights and scales disagree in shape with H = ",
              hidden, ", I_p = ", inter, " (tpmoe.fused checks them first)");
  TORCH_CHECK(sorted_pair_ids.size(0) == tokens * top_k && expert_offsets.size(0) == experts + 1, kOp,
              ": routing: shape");
  at::Tensor gate_up_bias, down_bias;
  if (b_gate_up.has_value()) {
    gate_up_bias = *b_gate_up;
    check(gate_up_bias, "b_gate_up", at::kFloat, 2);
  }
  if (b_down.has_value()) {
    down_bias = *b_down;
    check(down_bias, "b_down", at::kFloat, 2);
  }
  const GatedParams params{activation_named(kOp, activation), alpha, limit};

  const float* x = hidden_states.data_ptr<float>();
  const auto* gate_up_bytes = reinterpret_cast<const uint8_t*>(w_gate_up.data_ptr());
  const auto* down_bytes = reinterpret_cast<const uint8_t*>(w_down.data_ptr());
  const auto* gate_up_scales = static_cast<const uint8_t*>(gate_up_scale.data_ptr());
  const auto* down_scales = static_cast<const uint8_t*>(down_scale.data_ptr());
  const int64_t scale_bytes = gate_up_scale.element_size();
  // Where row `packed` of expert e's gate_up (half g, intermediate column i) and row `column` of
  // its down start, in bytes, and their scales.
  const int64_t gate_up_row_bytes = mxfp4 ? hidden_blocks * 16 : hidden;
  const int64_t down_row_bytes = mxfp4 ? inter_blocks * 16 : inter;
  auto gate_up_row_scales = [&](int64_t e, int64_t g, int64_t i, int64_t packed) {
    const int64_t index = mxfp4 ? (e * rows + packed) * hidden_blocks
                                : ((e * groups + g) * inter_blocks + (offset + i) / block) * hidden_blocks;
    return gate_up_scales + index * scale_bytes;
  };
  auto down_row_scales = [&](int64_t e, int64_t column) {
    const int64_t index = mxfp4 ? (e * hidden + column) * inter_blocks
                                : (e * hidden_blocks + column / block) * inter_blocks;
    return down_scales + index * scale_bytes;
  };
  const int64_t* pairs = sorted_pair_ids.data_ptr<int64_t>();
  const int64_t* offsets = expert_offsets.data_ptr<int64_t>();
  const float* weights = topk_weights.data_ptr<float>();
  const float* gate_up_b = gate_up_bias.defined() ? gate_up_bias.data_ptr<float>() : nullptr;
  const float* down_b = down_bias.defined() ? down_bias.data_ptr<float>() : nullptr;

  // (expert, first column, columns) units over the experts that have rows.
  constexpr int64_t kColumnsPerUnit = 16;
  auto units_of = [&](int64_t columns) {
    std::vector<std::array<int64_t, 3>> units;
    for (int64_t e = 0; e < experts; ++e) {
      if (offsets[e + 1] == offsets[e]) continue;
      for (int64_t c = 0; c < columns; c += kColumnsPerUnit) units.push_back({e, c, std::min(kColumnsPerUnit, columns - c)});
    }
    return units;
  };
  const int64_t rows_total = tokens * top_k;
  std::vector<float> h(static_cast<size_t>(rows_total * inter));
  std::vector<float> pair_out(static_cast<size_t>(rows_total * hidden));

  const auto gate_up_units = units_of(inter);
  at::parallel_for(0, static_cast<int64_t>(gate_up_units.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(groups * hidden));
    std::vector<float> sums(static_cast<size_t>(groups));
    for (int64_t u = begin; u < end; ++u) {
      const auto [e, first, count] = gate_up_units[u];
      const int64_t row_begin = offsets[e], row_end = offsets[e + 1];
      for (int64_t i = first; i < first + count; ++i) {
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t packed = !gated ? i : interleaved ? 2 * i + g : g * inter + i;
          widen_row(mxfp4, gate_up_bytes + (e * rows + packed) * gate_up_row_bytes, hidden,
                    gate_up_row_scales(e, g, i, packed), 1, block, 0, row.data() + g * hidden);
        }
        for (int64_t r = row_begin; r < row_end; ++r) {
          const float* x_row = x + (pairs[r] / top_k) * hidden;
          for (int64_t g = 0; g < groups; ++g) {
            const int64_t packed = !gated ? i : interleaved ? 2 * i + g : g * inter + i;
            sums[g] = kernels().dot(x_row, row.data() + g * hidden, hidden) +
                      (gate_up_b ? gate_up_b[e * groups * inter + packed] : 0.0f);
          }
          h[r * inter + i] = gated ? gated_forward<float>(params, sums[0], sums[1])
                                   : unary_forward<float>(params.activation, sums[0]);
        }
      }
    }
  });

  const auto down_units = units_of(hidden);
  at::parallel_for(0, static_cast<int64_t>(down_units.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(std::max<int64_t>(inter, 1)));
    for (int64_t u = begin; u < end; ++u) {
      const auto [e, first, count] = down_units[u];
      for (int64_t column = first; column < first + count; ++column) {
        widen_row(mxfp4, down_bytes + (e * hidden + column) * down_row_bytes, inter, down_row_scales(e, column), 1,
                  block, offset, row.data());
        const float bias = down_b ? down_b[e * hidden + column] : 0.0f;
        for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
          const float value = kernels().dot(h.data() + r * inter, row.data(), inter) + bias;
          pair_out[pairs[r] * hidden + column] = value * weights[pairs[r]];
        }
      }
    }
  });

  at::Tensor output = at::empty({tokens, hidden}, hidden_states.options());
  float* y = output.data_ptr<float>();
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t c = 0; c < hidden; ++c) {
        float total = 0;
        for (int64_t k = 0; k < top_k; ++k) total += pair_out[(t * top_k + k) * hidden + c];
        y[t * hidden + c] = total;
      }
  });
  return output;
}

}  // namespace cpu
}  // namespace tpmoe

TPMOE_QUANTIZED_LIBRARY_FRAGMENT(TPMOE_EXPERTS_CPU_NAMESPACE, m) {
  m.def(
      "experts_cpu_quantized_forward(Tensor hidden_states, Tensor w_gate_up, Tensor w_down, Tensor gate_up_scale, "
      "Tensor down_scale, str format, int block, int offset, Tensor sorted_pair_ids, Tensor expert_offsets, "
      "Tensor topk_weights, Tensor? b_gate_up, Tensor? b_down, str activation, str layout, bool gated, "
      "float alpha, float limit) -> Tensor");
}

TPMOE_QUANTIZED_LIBRARY_IMPL(TPMOE_EXPERTS_CPU_NAMESPACE, CPU, m) {
  m.impl("experts_cpu_quantized_forward", &tpmoe::cpu::experts_cpu_quantized_forward);
}
