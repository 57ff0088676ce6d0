// Argument checks, routing maps, work split and weight views of the CPU expert ops.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <cstdlib>

#include <algorithm>
#include <string>
#include <utility>

#include "experts_cpu.h"

namespace tpmoe {
namespace cpu {
namespace {

// Up to this many rows per active expert, splitting each expert's columns over the threads
// (single-threaded GEMMs) is used rather than giving every GEMM all threads. On the 2-core
// development machine the split won up to 128 rows (Qwen3 shape T = 128..2048: 0.30/0.60/
// 0.84 of the dense-GEMM rate against 0.22/0.51/0.81; Mixtral T = 512: 0.95 s against
// 1.0 s); past that the GEMMs are large enough for oneDNN's own threading.
constexpr int64_t kMaxRowsPerExpertForExpertThreads = 256;
// In the "experts" regime bf16 experts run the GEMM of experts_cpu_gemm.cpp: it reads the
// weights in place where oneDNN repacks them on every call. Without AMX, whatever their row
// count (AMD Zen 4, 2 threads, Qwen3 shape: T = 512 at 124 ms against 164 ms with oneDNN past
// 48 rows, T = 2048 at 462 against 519 ms; Mixtral T = 512: 917 against 937 ms); with AMX only
// the experts with few rows (bf16_kernel_max_rows, experts_cpu_gemm.cpp).
constexpr int64_t kMinMultiplyAddsForThreads = 1 << 18;

std::string to_string(c10::string_view view) { return std::string(view.data(), view.size()); }

// The names of tpmoe.config.ACTIVATIONS; tests/ops/test_cpu_kernels.py runs each one.
constexpr std::pair<const char*, Activation> kActivationNames[] = {
    {"silu", Activation::kSilu},
    {"gelu", Activation::kGelu},
    {"gelu_tanh", Activation::kGeluTanh},
    {"relu", Activation::kRelu},
    {"clamped_swiglu", Activation::kClampedSwiglu},
    {"relu2", Activation::kRelu2},
    {"clamped_silu", Activation::kClampedSilu},
    {"silu_clamped", Activation::kSiluClamped},
    {"softcapped_swiglu", Activation::kSoftcappedSwiglu},
};

Activation parse_activation(const char* op, c10::string_view name) {
  const std::string value = to_string(name);
  std::string expected;
  for (const auto& entry : kActivationNames) {
    if (value == entry.first) return entry.second;
    expected += std::string(expected.empty() ? "'" : ", '") + entry.first + "'";
  }
  TORCH_CHECK(false, op, ": activation: expected one of ", expected, ", got '", value, "'");
}

Layout parse_layout(const char* op, c10::string_view name) {
  const std::string value = to_string(name);
  if (value == "concatenated") return Layout::kConcatenated;
  if (value == "interleaved") return Layout::kInterleaved;
  if (value == "gpt_oss") return Layout::kGptOss;
  TORCH_CHECK(false, op, ": layout: expected 'concatenated', 'interleaved' or 'gpt_oss', got '", value, "'");
}

void check_cpu_float(const char* op, const at::Tensor& tensor, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(tensor.defined(), op, ": ", name, ": expected a tensor, got None");
  TORCH_CHECK(tensor.device().is_cpu(), op, ": ", name, ": expected a CPU tensor, got one on ", tensor.device());
  TORCH_CHECK(tensor.scalar_type() == dtype, op, ": ", name, ": expected dtype ", dtype,
              " (that of hidden_states), got ", tensor.scalar_type());
}

void check_shape(const char* op, const at::Tensor& tensor, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(tensor.sizes() == expected, op, ": ", name, ": expected shape ", expected, ", got ", tensor.sizes());
}

}  // namespace

ExpertsProblem make_problem(const char* op, const at::Tensor& hidden_states, const at::Tensor& w_gate_up,
                            const at::Tensor& w_down, const at::Tensor& sorted_pair_ids,
                            const at::Tensor& expert_offsets, const at::Tensor& topk_weights,
                            const c10::optional<at::Tensor>& b_gate_up, const c10::optional<at::Tensor>& b_down,
                            c10::string_view activation, c10::string_view layout, bool gated, double alpha,
                            double limit, c10::string_view threading) {
  ExpertsProblem problem;
  problem.layout = parse_layout(op, layout);
  problem.act = GatedParams{parse_activation(op, activation), alpha, limit};
  problem.gated = gated;
  TORCH_CHECK(gated || !is_gated_only(problem.act.activation), op, ": gated: ", to_string(activation),
              " is a gated activation, expected gated=True, got False");

  TORCH_CHECK(hidden_states.dim() == 2, op, ": hidden_states: expected a 2-D tensor [T, H], got shape ",
              hidden_states.sizes());
  const auto dtype = hidden_states.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": hidden_states: expected float32, float64, bfloat16 or float16, got ", dtype);
  check_cpu_float(op, hidden_states, "hidden_states", dtype);
  check_cpu_float(op, w_gate_up, "w_gate_up", dtype);
  check_cpu_float(op, w_down, "w_down", dtype);
  problem.num_tokens = hidden_states.size(0);
  problem.hidden = hidden_states.size(1);

  TORCH_CHECK(w_gate_up.dim() == 3, op, ": w_gate_up: expected a 3-D tensor, got shape ", w_gate_up.sizes());
  problem.num_experts = w_gate_up.size(0);
  const bool transposed = problem.layout == Layout::kGptOss;
  const int64_t hidden_axis = transposed ? 1 : 2;
  TORCH_CHECK(w_gate_up.size(hidden_axis) == problem.hidden, op, ": w_gate_up: expected H = ", problem.hidden,
              " on axis ", hidden_axis, " for this layout, got shape ", w_gate_up.sizes());
  problem.gate_up_cols = w_gate_up.size(transposed ? 2 : 1);
  TORCH_CHECK(!gated || problem.gate_up_cols % 2 == 0, op,
              ": w_gate_up: gated experts need an even gate+up size, got shape ", w_gate_up.sizes());
  problem.inter = gated ? problem.gate_up_cols / 2 : problem.gate_up_cols;
  const int64_t E = problem.num_experts, H = problem.hidden, I = problem.inter;
  if (transposed) {
    check_shape(op, w_down, "w_down", {E, I, H});
  } else {
    check_shape(op, w_down, "w_down", {E, H, I});
  }

  TORCH_CHECK(topk_weights.dim() == 2 && topk_weights.size(0) == problem.num_tokens, op,
              ": topk_weights: expected shape [T = ", problem.num_tokens, ", K], got ", topk_weights.sizes());
  TORCH_CHECK(topk_weights.device().is_cpu() && topk_weights.is_floating_point(), op,
              ": topk_weights: expected a floating-point CPU tensor, got ", topk_weights.scalar_type(), " on ",
              topk_weights.device());
  problem.top_k = topk_weights.size(1);
  TORCH_CHECK(problem.top_k >= 1, op, ": topk_weights: expected K >= 1 columns, got shape ", topk_weights.sizes());
  problem.rows = problem.num_tokens * problem.top_k;

  TORCH_CHECK(sorted_pair_ids.dim() == 1 && sorted_pair_ids.numel() == problem.rows, op,
              ": sorted_pair_ids: expected shape [T*K = ", problem.rows, "], got ", sorted_pair_ids.sizes());
  TORCH_CHECK(sorted_pair_ids.scalar_type() == at::kInt || sorted_pair_ids.scalar_type() == at::kLong, op,
              ": sorted_pair_ids: expected int32 or int64, got ", sorted_pair_ids.scalar_type());
  TORCH_CHECK(expert_offsets.dim() == 1 && expert_offsets.numel() == E + 1, op,
              ": expert_offsets: expected shape [E + 1 = ", E + 1, "], got ", expert_offsets.sizes());
  TORCH_CHECK(expert_offsets.scalar_type() == at::kLong, op, ": expert_offsets: expected int64, got ",
              expert_offsets.scalar_type());
  TORCH_CHECK(sorted_pair_ids.device().is_cpu() && expert_offsets.device().is_cpu(), op,
              ": sorted_pair_ids, expert_offsets: expected CPU tensors");

  if (b_gate_up.has_value() && b_gate_up->defined()) {
    check_cpu_float(op, *b_gate_up, "b_gate_up", dtype);
    check_shape(op, *b_gate_up, "b_gate_up", {E, problem.gate_up_cols});
  }
  if (b_down.has_value() && b_down->defined()) {
    check_cpu_float(op, *b_down, "b_down", dtype);
    check_shape(op, *b_down, "b_down", {E, H});
  }

  const std::string mode = to_string(threading);
  // TPMOE_CPU_EXPERT_THREADS_MAX_ROWS overrides the "auto" bound below (for measuring).
  const char* rows_env = std::getenv("TPMOE_CPU_EXPERT_THREADS_MAX_ROWS");
  const int64_t max_rows_for_expert_threads =
      rows_env == nullptr ? kMaxRowsPerExpertForExpertThreads : std::atoll(rows_env);
  TORCH_CHECK(mode == "auto" || mode == "experts" || mode == "gemm", op,
              ": threading: expected 'auto', 'experts' or 'gemm', got '", mode, "'");
  const int64_t threads = at::get_num_threads();
#ifndef _OPENMP
  // at::parallel_for is a header template: compiled without -fopenmp it runs every range on
  // the calling thread, and marks it as inside a parallel region, so even ATen's own GEMMs
  // below run on one thread. The build must pass -fopenmp (as torch's own extensions do).
  if (threads > 1) {
    TORCH_WARN_ONCE("tpmoe: the CPU expert ops were compiled without OpenMP (-fopenmp) and run on one thread "
                    "of the ", threads, " torch uses; rebuild tpmoe._C with -fopenmp in its compile and link flags");
  }
#endif
  if (mode == "auto") {
    // Rows per active expert, bounded by the rows per expert when every expert is hit.
    const int64_t active = std::max<int64_t>(1, std::min(E, problem.rows));
    problem.use_expert_threads = problem.rows <= max_rows_for_expert_threads * active;
  } else {
    problem.use_expert_threads = mode == "experts";
  }
  problem.bf16_kernel_max_rows = bf16_kernel_max_rows();
  problem.widen_bf16 = dtype == at::kBFloat16 && bf16_gemm_path() == Bf16GemmPath::kWiden;
  problem.num_slices = problem.use_expert_threads ? std::max<int64_t>(1, threads) : 1;
  // "auto": a call this small costs less than waking the other threads.
  if (mode == "auto" && problem.rows * H * (problem.gate_up_cols + I) < kMinMultiplyAddsForThreads) {
    problem.num_slices = 1;
  }
  return problem;
}

RowMaps make_row_maps(const char* op, const ExpertsProblem& problem, const at::Tensor& sorted_pair_ids,
                      const at::Tensor& expert_offsets) {
  RowMaps maps;
  const int64_t S = problem.rows, E = problem.num_experts;
  const at::Tensor offsets = expert_offsets.contiguous();
  const int64_t* offsets_data = offsets.data_ptr<int64_t>();
  maps.offsets.assign(offsets_data, offsets_data + E + 1);
  TORCH_CHECK(maps.offsets[0] == 0 && maps.offsets[E] == S, op,
              ": expert_offsets: expected cumulative row counts from 0 to T*K = ", S, ", got ", maps.offsets[0],
              " .. ", maps.offsets[E]);
  maps.expert_of_row.resize(S);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(maps.offsets[e] <= maps.offsets[e + 1], op, ": expert_offsets: expected non-decreasing values, got ",
                maps.offsets[e], " then ", maps.offsets[e + 1], " at expert ", e);
    if (maps.offsets[e + 1] > maps.offsets[e]) maps.active_experts.push_back(e);
    std::fill(maps.expert_of_row.begin() + maps.offsets[e], maps.expert_of_row.begin() + maps.offsets[e + 1],
              static_cast<int32_t>(e));
  }
  maps.row_of_pair.assign(S, -1);
  maps.token_of_row.resize(S);
  maps.pair_of_row.resize(S);
  const at::Tensor pairs = sorted_pair_ids.to(at::kLong).contiguous();
  const int64_t* pair_data = pairs.data_ptr<int64_t>();
  for (int64_t row = 0; row < S; ++row) {
    const int64_t pair = pair_data[row];
    TORCH_CHECK(pair >= 0 && pair < S, op, ": sorted_pair_ids: expected pair indices in [0, T*K = ", S, "), got ",
                pair, " at row ", row);
    TORCH_CHECK(maps.row_of_pair[pair] < 0, op, ": sorted_pair_ids: expected a permutation of [0, T*K), got pair ",
                pair, " twice");
    maps.row_of_pair[pair] = row;
    maps.pair_of_row[row] = pair;
    maps.token_of_row[row] = pair / problem.top_k;
  }
  return maps;
}

std::pair<int64_t, int64_t> slice_bounds(int64_t extent, int64_t num_slices, int64_t slice) {
  auto boundary = [&](int64_t index) -> int64_t {
    if (index >= num_slices) return extent;
    const int64_t even = extent * index / num_slices;
    const int64_t rounded = (even + 8) / 16 * 16;
    return extent >= 16 * num_slices ? std::min(rounded, extent) : even;
  };
  return {boundary(slice), boundary(slice + 1)};
}

at::Tensor gate_up_rhs(const ExpertsProblem& problem, const at::Tensor& w_gate_up, int64_t expert) {
  const at::Tensor weight = w_gate_up.select(0, expert);
  return problem.layout == Layout::kGptOss ? weight : weight.t();
}

at::Tensor down_rhs(const ExpertsProblem& problem, const at::Tensor& w_down, int64_t expert) {
  const at::Tensor weight = w_down.select(0, expert);
  return problem.layout == Layout::kGptOss ? weight : weight.t();
}

void gemm_out(const ExpertsProblem& problem, at::Tensor& out, const at::Tensor& lhs, const at::Tensor& rhs) {
  if (problem.widen_bf16 && lhs.scalar_type() == at::kBFloat16) {
    widened_mm_out(out, lhs, rhs);
    return;
  }
  at::mm_out(out, lhs, rhs);
}

void expert_mm(const ExpertsProblem& problem, at::Tensor& out, const at::Tensor& lhs, const at::Tensor& rhs,
               const at::Tensor* following_rhs) {
  if (!problem.widen_bf16 && problem.use_expert_threads &&
      try_bf16_kernel_gemm(lhs, rhs, out, problem.bf16_kernel_max_rows, following_rhs)) {
    return;
  }
  if (problem.widen_bf16 && lhs.scalar_type() == at::kBFloat16) {
    widened_mm_out(out, lhs, rhs, following_rhs);  // it fetches the following weight's first tile ahead
    return;
  }
  gemm_out(problem, out, lhs, rhs);
}

std::vector<std::pair<int64_t, int64_t>> gate_up_column_ranges(const ExpertsProblem& problem, int64_t j0,
                                                               int64_t j1) {
  if (!problem.gated) return {{j0, j1}};
  if (problem.layout == Layout::kConcatenated) return {{j0, j1}, {problem.inter + j0, problem.inter + j1}};
  return {{2 * j0, 2 * j1}};
}

Activation activation_named(const char* op, c10::string_view name) { return parse_activation(op, name); }

}  // namespace cpu
}  // namespace tpmoe
