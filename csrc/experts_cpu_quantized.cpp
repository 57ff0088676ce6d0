// tpmoe::experts_cpu_quantized_forward: the routed experts' forward with quantized weights,
// read at their own size: "fp8_block" (float8 e4m3 with float32 scales per B x B block,
// tpmoe/fp8.py) and "mxfp4" (e2m1 pairs a byte with an e8m0 scale per 32 values, GPT-OSS's,
// tpmoe/mxfp4.py).
//
// Weight rows are dequantized where they are used, never into an expert's full-size copy: at
// decode (a few rows an expert) 16 values at a time into registers, straight into the dot
// products (AVX-512), so every stored byte is read once and the call streams the bytes it
// touches; otherwise a unit's rows (16 output columns) once into zero-padded float32 rows,
// multiplied with all the expert's rows by the widened bf16 GEMM's float32 dot kernel
// (widened_dot_f32, experts_cpu_widen.cpp: the one set of micro-kernels every widened weight
// goes through; the 4 x 4 tile this path had ran at ~60% of a float32 GEMM). Activations, sums
// and the weighted combine are float32; the caller casts the result back.
//
// Work split: threads take (expert, slice of output columns) units, first of gate_up, then of
// down; every output element has one writer and every sum a fixed order, so a call is bitwise
// reproducible for a thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
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

#include "experts_cpu.h"
#include "experts_cpu_activation.h"
#include "experts_cpu_quantized_kernels.h"
#include "experts_cpu_quantized_amx.h"

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

using namespace dequant;

constexpr const char* kOp = "experts_cpu_quantized_forward";

// Chosen once per process from the CPU's capabilities; TPMOE_CPU_DEQUANT_KERNEL = portable |
// avx2 | avx512 | auto forces one (the tests run each one the machine has).
const Kernels& kernels() {
  static const Kernels chosen = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
    const char* forced = std::getenv("TPMOE_CPU_DEQUANT_KERNEL");
    const std::string choice = forced == nullptr ? "auto" : forced;
    TORCH_CHECK(choice == "auto" || choice == "portable" || choice == "avx2" || choice == "avx512", kOp,
                ": TPMOE_CPU_DEQUANT_KERNEL: expected portable, avx2, avx512 or auto, got '", choice, "'");
    TORCH_CHECK(choice != "avx2" || avx2, kOp,
                ": TPMOE_CPU_DEQUANT_KERNEL=avx2, but this CPU lacks AVX2, FMA or F16C");
    TORCH_CHECK(choice != "avx512" || avx512, kOp,
                ": TPMOE_CPU_DEQUANT_KERNEL=avx512, but this CPU lacks AVX-512 F, BW or VL");
    if (avx512 && (choice == "auto" || choice == "avx512")) return Kernels{true, widen_fp8_avx512, widen_mxfp4_avx2};
    if (avx2 && choice != "portable") return Kernels{false, widen_fp8_avx2, widen_mxfp4_avx2};
    return Kernels{false, widen_fp8_portable, widen_mxfp4_portable};
  }();
  return chosen;
}

// fp8 experts with 5..kRowsFp8 activation rows on AMX tiles (experts_cpu_quantized_amx.h),
// chosen once per process: where the CPU and the OS allow them and the AVX-512 dequant kernels
// run; else the widened path. TPMOE_CPU_FP8_ROWS = amx | off | auto forces it (the tests run both).
// An AVX-512 float32 kernel of 2 weight x 8 activation rows was tried first: 1.3x the widened
// path at 5..8 rows, no gain at 16 (FMA-bound like it), so the widened path stays the fallback.
bool fp8_rows_amx_chosen() {
  static const bool chosen = [] {
    const char* forced = std::getenv("TPMOE_CPU_FP8_ROWS");
    const std::string choice = forced == nullptr ? "auto" : forced;
    TORCH_CHECK(choice == "auto" || choice == "amx" || choice == "off", kOp,
                ": TPMOE_CPU_FP8_ROWS: expected amx, off or auto, got '", choice, "'");
    const bool amx = choice != "off" && kernels().avx512 && amx_usable();
    TORCH_CHECK(choice != "amx" || amx, kOp,
                ": TPMOE_CPU_FP8_ROWS=amx, but this CPU or OS lacks AMX-BF16 tiles (or the AVX-512 kernels are off)");
    return amx;
  }();
  return chosen;
}

// One weight row of `count` values along an axis cut into scale blocks of `block`, its first
// value `offset` into its first block, dequantized into `out`. fp8: the row's bytes are its
// values, the scales float32, one per block; mxfp4: the row's bytes hold its whole blocks (the
// values from `offset` on are the row's), the scales e8m0 bytes, one per block; under AVX-512
// in the split layout (whole blocks, see experts_cpu_quantized_kernels.h).
void widen_row(bool mxfp4, const uint8_t* row, int64_t count, const void* scales, int64_t block, int64_t offset,
               float* out) {
  const Kernels& k = kernels();
  if (mxfp4 && k.avx512)
    return widen_mxfp4_split_avx512(row, static_cast<const uint8_t*>(scales), (offset + count + 31) / 32, out);
  int64_t start = 0, index = 0;
  while (start < count) {
    const int64_t stop = std::min(count, (index + 1) * block - offset);
    if (mxfp4) {
      const float scale = e8m0_values()[static_cast<const uint8_t*>(scales)[index]];
      k.widen_mxfp4(row, offset + start, stop - start, scale, out + start);
    } else {
      k.widen_fp8(row + start, stop - start, static_cast<const float*>(scales)[index], out + start);
    }
    start = stop;
    ++index;
  }
}

// Fused (decode): weight rows q < kWeightRows dotted with the n activation rows xs in the
// registers; row q's sums go to sums[r * ld + slots[q]] (none where slots[q] < 0: a short
// group's repeated rows).
void fused_sums(bool mxfp4, const WeightRows& rows, const float* const* xs, int64_t n, int64_t count, int64_t block,
                int64_t offset, int64_t length, const int64_t* slots, float* sums, int64_t ld) {
  float tile[kWeightRows * 4];
  for (int64_t r = 0; r < n; r += 4) {
    const int nx = static_cast<int>(std::min<int64_t>(4, n - r));
    if (mxfp4)
      mxfp4_fused(nx, rows, xs + r, length / 32, tile);
    else
      fp8_fused(nx, rows, xs + r, count, block, offset, tile);
    for (int q = 0; q < kWeightRows; ++q)
      for (int x = 0; x < nx && slots[q] >= 0; ++x) sums[(r + x) * ld + slots[q]] = tile[q * nx + x];
  }
}

inline int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// Where value v of a packed MXFP4 row sits in the split layout (its block's even values, then
// its odd ones).
inline int64_t split_index(int64_t v) { return (v & ~int64_t(31)) + (v & 1) * 16 + ((v & 31) >> 1); }

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
// with nb(I) counted from `offset`. Returns y [T, H] float32. bf16_hidden: the caller computes in
// bf16, so the activated intermediate is rounded to bf16 as a bf16 PyTorch run rounds it (the AMX
// path then multiplies it in one bf16 pass instead of three exact parts).
at::Tensor experts_cpu_quantized_forward(const at::Tensor& hidden_states, const at::Tensor& w_gate_up,
                                         const at::Tensor& w_down, const at::Tensor& gate_up_scale,
                                         const at::Tensor& down_scale, c10::string_view format, int64_t block,
                                         int64_t offset, const at::Tensor& sorted_pair_ids,
                                         const at::Tensor& expert_offsets, const at::Tensor& topk_weights,
                                         const c10::optional<at::Tensor>& b_gate_up,
                                         const c10::optional<at::Tensor>& b_down, c10::string_view activation,
                                         c10::string_view layout, bool gated, double alpha, double limit,
                                         bool bf16_hidden) {
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

  const int64_t rows_total = tokens * top_k;
  const Kernels& k = kernels();
  const WidenedDot dot = widened_dot_f32();
  const int64_t fused_rows = k.avx512 ? (mxfp4 ? kFusedRowsMxfp4 : kFusedRowsFp8) : 0;
  const bool rows_amx = !mxfp4 && fp8_rows_amx_chosen();
  // (expert, first column, columns) units over the experts that have rows; wider where the AMX
  // kernel takes the expert (it reads the activations once per 4 weight tiles).
  constexpr int64_t kColumnsPerUnit = 16;
  static_assert(2 * kColumnsPerUnit <= kAmxWeightRows, "a unit's weight rows overflow the AMX kernel's arrays");
  auto units_of = [&](int64_t columns) {
    std::vector<std::array<int64_t, 3>> units;
    for (int64_t e = 0; e < experts; ++e) {
      const int64_t n = offsets[e + 1] - offsets[e];
      if (n == 0) continue;
      const int64_t width = rows_amx && n > fused_rows && n <= kRowsFp8 ? kAmxUnitColumns
                                                                                        : kColumnsPerUnit;
      for (int64_t c = 0; c < columns; c += width) units.push_back({e, c, std::min(width, columns - c)});
    }
    return units;
  };
  // The activation rows in the kernels' layout, each expert's as one panel (the dot kernel's
  // operand): zero-padded to the kernel's k multiple, or (MXFP4 under AVX-512) split and
  // zero-padded to whole blocks. x's are gathered by each thread for the expert it is on
  // (expert_panel); h is written in expert order and its layout by the gate_up phase.
  const bool split = mxfp4 && k.avx512;
  const int64_t x_length = split ? hidden_blocks * 32 : round_up(hidden, kWidenedDotPadK);
  const int64_t h_length = split ? inter_blocks * 32 : round_up(inter, kWidenedDotPadK);
  auto expert_panel = [&](int64_t e, std::vector<float>& panel, int64_t& panel_expert) {
    if (panel_expert == e) return;
    panel_expert = e;
    panel.assign(static_cast<size_t>((offsets[e + 1] - offsets[e]) * x_length), 0.0f);
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
      const float* token = x + pairs[r] / top_k * hidden;
      float* out = panel.data() + (r - offsets[e]) * x_length;
      if (split)
        for (int64_t v = 0; v < hidden; ++v) out[split_index(v)] = token[v];
      else
        std::copy(token, token + hidden, out);
    }
  };
  std::vector<float> h(static_cast<size_t>(rows_total * h_length), 0.0f);
  std::vector<float> pair_out(static_cast<size_t>(rows_total * hidden));

  // Unit u's weight rows against its expert's n activation rows (`panel`, `length` apart) into
  // sums[r * ld + slot] (returns ld): weight row q = c * per_column + g (column c, half g, found
  // by row(u, q, bytes, scales)) at slot g * padded + c, each half's columns padded to the dot
  // kernel's multiple. Few rows: fused, kWeightRows at a time, reading ahead into unit `next`'s
  // rows (the thread's next unit). fp8 with up to kRowsFp8 rows where AMX is chosen: bf16 tiles
  // (the expert's activations converted once per thread into `tiles`). Else every row widened
  // once (widen_row) into `buffer` and multiplied by the widened GEMM's dot kernel, which fetches
  // `next`'s rows meanwhile.
  auto unit_sums = [&](const auto& units, auto&& row, int64_t per_column, int64_t u, int64_t next,
                       const float* panel, int64_t n, int64_t count, int64_t row_offset, int64_t length,
                       int64_t row_bytes, std::vector<float>& buffer, AmxPanel& tiles,
                       std::vector<float>& sums) {
    const int64_t padded = round_up(units[u][2], kWidenedDotPadCols), ld = per_column * padded;
    const int64_t n_weight_rows = units[u][2] * per_column, next_rows = units[next][2] * per_column;
    auto slot = [&](int64_t q) { return q % per_column * padded + q / per_column; };
    sums.resize(static_cast<size_t>(n * ld));
    const void* unused;
    if (n <= fused_rows) {
      const float* xs[std::max(kFusedRowsFp8, kFusedRowsMxfp4)];
      for (int64_t r = 0; r < n; ++r) xs[r] = panel + r * length;
      for (int64_t q0 = 0; q0 < n_weight_rows; q0 += kWeightRows) {
        WeightRows rows;
        rows.far = kFarRows * row_bytes;
        int64_t slots[kWeightRows];
        const bool last = q0 + kWeightRows >= n_weight_rows;
        for (int q = 0; q < kWeightRows; ++q) {
          slots[q] = q0 + q < n_weight_rows ? slot(q0 + q) : -1;  // a short group repeats its last row
          row(u, std::min(q0 + q, n_weight_rows - 1), rows.bytes[q], rows.scales[q]);
          if (last)
            row(next, std::min<int64_t>(q, next_rows - 1), rows.next[q], unused);
          else
            row(u, std::min(q0 + kWeightRows + q, n_weight_rows - 1), rows.next[q], unused);
        }
        fused_sums(mxfp4, rows, xs, n, count, block, row_offset, length, slots, sums.data(), ld);
      }
      return ld;
    }
    if (rows_amx && n <= kRowsFp8) {
      const float* xs[kRowsFp8];
      for (int64_t r = 0; r < n; ++r) xs[r] = panel + r * length;
      const uint8_t* bytes[kAmxWeightRows];
      const float* scales[kAmxWeightRows];
      int64_t slots[kAmxWeightRows];
      for (int64_t q = 0; q < n_weight_rows; ++q) {
        const void* first_scale;
        row(u, q, bytes[q], first_scale);
        scales[q] = static_cast<const float*>(first_scale);
        slots[q] = slot(q);
      }
      amx_panel(xs, n, count, &units, units[u][0], tiles);
      fp8_rows_amx(bytes, scales, n_weight_rows, tiles, n, count, block, row_offset, slots, sums.data(), ld);
      return ld;
    }
    // Zeroed once: the padding past a row's values is never written.
    if (buffer.size() < static_cast<size_t>(ld * length)) buffer.assign(static_cast<size_t>(ld * length), 0.0f);
    for (int64_t q = 0; q < n_weight_rows; ++q) {
      const uint8_t* bytes;
      const void* scales;
      row(u, q, bytes, scales);
      widen_row(mxfp4, bytes, count, scales, block, row_offset, buffer.data() + slot(q) * length);
    }
    // The next unit's rows a half at a time: one stretch where the halves interleave (or there
    // is one half), else a dot call a half, each fetching its half's stretch.
    std::pair<const char*, const char*> ahead[2] = {};
    const uint8_t* bytes;
    for (int64_t g = 0; g < per_column && next != u; ++g) {
      row(next, g, bytes, unused);
      ahead[g].first = reinterpret_cast<const char*>(bytes);
      row(next, next_rows - per_column + g, bytes, unused);
      ahead[g].second = reinterpret_cast<const char*>(bytes + row_bytes);
    }
    if (per_column == 1 || ahead[1].first <= ahead[0].second) {
      dot(n, ld, length, panel, length, buffer.data(), length, sums.data(), ld, ahead[0].first,
          std::max(ahead[0].second, ahead[per_column - 1].second));
    } else {
      for (int64_t g = 0; g < per_column; ++g)
        dot(n, padded, length, panel, length, buffer.data() + g * padded * length, length, sums.data() + g * padded,
            ld, ahead[g].first, ahead[g].second);
    }
    return ld;
  };

  const auto gate_up_units = units_of(inter);
  // Weight row q of a gate_up unit: column first + q / groups, half q % groups.
  auto gate_up_row = [&](int64_t unit, int64_t q, const uint8_t*& bytes, const void*& scales) {
    const auto [e, first, count] = gate_up_units[unit];
    const int64_t i = first + q / groups, g = q % groups;
    const int64_t packed = !gated ? i : interleaved ? 2 * i + g : g * inter + i;
    bytes = gate_up_bytes + (e * rows + packed) * gate_up_row_bytes;
    scales = gate_up_row_scales(e, g, i, packed);
  };
  at::parallel_for(0, static_cast<int64_t>(gate_up_units.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer, sums, panel;
    AmxPanel tiles;
    int64_t panel_expert = -1;
    for (int64_t u = begin; u < end; ++u) {
      const auto [e, first, count] = gate_up_units[u];
      const int64_t row_begin = offsets[e], n = offsets[e + 1] - row_begin;
      expert_panel(e, panel, panel_expert);
      const int64_t ld = unit_sums(gate_up_units, gate_up_row, groups, u, u + 1 < end ? u + 1 : u, panel.data(), n,
                                   hidden, 0, x_length, gate_up_row_bytes, buffer, tiles, sums);
      const int64_t second = ld / groups;  // where the up half's sums start
      // Row by row: the sums and h rows read and written along their lines.
      for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c < count; ++c) {
          const int64_t i = first + c;
          float bias[2] = {0.0f, 0.0f};
          for (int64_t g = 0; g < groups && gate_up_b; ++g)
            bias[g] = gate_up_b[e * groups * inter + (!gated ? i : interleaved ? 2 * i + g : g * inter + i)];
          const float first_sum = sums[r * ld + c] + bias[0];
          const float value = gated ? gated_forward<float>(params, first_sum, sums[r * ld + second + c] + bias[1])
                                    : unary_forward<float>(params.activation, first_sum);
          h[(row_begin + r) * h_length + (split ? split_index(offset + i) : i)] =
              bf16_hidden ? static_cast<float>(c10::BFloat16(value)) : value;
        }
    }
  });

  const auto down_units = units_of(hidden);
  auto down_row = [&](int64_t unit, int64_t q, const uint8_t*& bytes, const void*& scales) {
    const auto [e, first, count] = down_units[unit];
    bytes = down_bytes + (e * hidden + first + q) * down_row_bytes;
    scales = down_row_scales(e, first + q);
  };
  at::parallel_for(0, static_cast<int64_t>(down_units.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buffer, sums;
    AmxPanel tiles;
    for (int64_t u = begin; u < end; ++u) {
      const auto [e, first, count] = down_units[u];
      const int64_t row_begin = offsets[e], n = offsets[e + 1] - row_begin;
      const int64_t ld = unit_sums(down_units, down_row, 1, u, u + 1 < end ? u + 1 : u,
                                   h.data() + row_begin * h_length, n, inter, offset, h_length, down_row_bytes, buffer,
                                   tiles, sums);
      for (int64_t r = 0; r < n; ++r) {
        const int64_t pair = pairs[row_begin + r];
        for (int64_t c = 0; c < count; ++c)
          pair_out[pair * hidden + first + c] = (sums[r * ld + c] + (down_b ? down_b[e * hidden + first + c] : 0.0f)) *
                                                weights[pair];
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
      "float alpha, float limit, bool bf16_hidden=False) -> Tensor");
}

TPMOE_QUANTIZED_LIBRARY_IMPL(TPMOE_EXPERTS_CPU_NAMESPACE, CPU, m) {
  m.impl("experts_cpu_quantized_forward", &tpmoe::cpu::experts_cpu_quantized_forward);
}
