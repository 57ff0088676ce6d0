// tpmoe::experts_cpu_forward: y[t] = sum_k w[t,k] * (act(x_t W_gu[e]^T + b_gu[e]) W_d[e]^T + b_d[e]).
//
// Buffers (S = T*K rows in expert-sorted order), none larger than [S, max(H, R)]:
//   rows_sorted [S, H]  x gathered by row, then reused for the down output o
//   gate_up     [S, R]  the raw x W_gu^T (no bias); returned for the backward when asked
//   h           [S, I]  the activation output, the down GEMM's left operand
// (rows_sorted and h have their rows padded by one cache line, see below).
// Phase 1, per (column slice, expert): gate_up GEMM on the slice's columns, then bias and
// activation on those columns while they are in cache. Phase 2, per output column slice:
// the down GEMM of every expert, then the routing weight, the down bias and the sum over k
// in one fixed-order pass (k ascending) into y.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/zeros.h>

#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "experts_cpu.h"

namespace tpmoe {
namespace cpu {
namespace {

constexpr const char* kOp = "tpmoe::experts_cpu_forward";
// Elements of padding after each row of rows_sorted and h (see experts_cpu_forward): also at
// least the 31 that ATen's bf16 GEMM may read past a row, zeroed there.
constexpr int64_t kRowPad = 32;

template <typename scalar_t>
void gather_rows(const ExpertsProblem& problem, const RowMaps& maps, const scalar_t* source, scalar_t* rows_out,
                 int64_t ld_out) {
  const int64_t H = problem.hidden;
  at::parallel_for(0, problem.rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      std::memcpy(rows_out + row * ld_out, source + maps.token_of_row[row] * H, H * sizeof(scalar_t));
    }
  });
}

// h[rows, j0:j1] = act(gate_up[rows, gate/up columns of j0:j1] + b_gu[e]).
template <typename scalar_t>
void activate(const ExpertsProblem& problem, const scalar_t* gate_up, const scalar_t* bias, scalar_t* h, int64_t ld_h,
              int64_t row_begin, int64_t row_end, int64_t j0, int64_t j1) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t R = problem.gate_up_cols;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const scalar_t* in = gate_up + row * R;
    scalar_t* out = h + row * ld_h;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t gate_col = gate_column(problem, j);
      opmath_t gate = opmath_t(in[gate_col]) + (bias ? opmath_t(bias[gate_col]) : opmath_t(0));
      if (!problem.gated) {
        out[j] = scalar_t(unary_forward(problem.act.activation, gate));
        continue;
      }
      const int64_t up_col = up_column(problem, j);
      const opmath_t up = opmath_t(in[up_col]) + (bias ? opmath_t(bias[up_col]) : opmath_t(0));
      out[j] = scalar_t(gated_forward(problem.act, gate, up));
    }
  }
}

// The activation through ATen's vectorised kernels (exp/erf/tanh in AVX2/AVX-512 where the
// CPU has them) where the gate and up columns are contiguous blocks and there is no bias:
// the scalar loop above spends ~5 ns an element in libm, a tenth of the prefill time
// (Qwen3 shape, T = 512). It rounds act(g) to the dtype before the product with u, as
// PyTorch does. Small blocks stay on the scalar loop, cheaper than two op calls.
constexpr int64_t kMinElementsForAten = 2048;

bool activate_with_aten(const ExpertsProblem& problem, const at::Tensor& gate_up_rows, const at::Tensor& h_rows,
                        int64_t j0, int64_t j1) {
  const bool contiguous_blocks = !problem.gated || problem.layout == Layout::kConcatenated;
  if (!contiguous_blocks || gate_up_rows.size(0) * (j1 - j0) < kMinElementsForAten) {
    return false;
  }
  at::Tensor out = h_rows.narrow(1, j0, j1 - j0);
  const at::Tensor gate = gate_up_rows.narrow(1, gate_column(problem, j0), j1 - j0);
  switch (problem.act.activation) {
    case Activation::kSilu: at::silu_out(out, gate); break;
    case Activation::kGelu: at::gelu_out(out, gate, "none"); break;
    case Activation::kGeluTanh: at::gelu_out(out, gate, "tanh"); break;
    case Activation::kRelu: at::clamp_min_out(out, gate, 0); break;
    case Activation::kRelu2:
      // relu is exact in the dtype, so the square rounds once, as in the scalar loop.
      at::clamp_min_out(out, gate, 0);
      out.mul_(out);
      break;
    default:
      return false;  // the gated-only activations (clamps, softcaps): no ATen kernel, the scalar loop
  }
  if (problem.gated) out.mul_(gate_up_rows.narrow(1, up_column(problem, j0), j1 - j0));
  return true;
}

// y[t, c0:c1] = sum_k w[t,k] (o[row(t,k), c0:c1] + b_d[e(t,k), c0:c1]), k ascending, in op-math.
template <typename scalar_t, typename weight_t>
void combine(const ExpertsProblem& problem, const RowMaps& maps, const scalar_t* expert_out, int64_t ld_out,
             const weight_t* topk_weights, const scalar_t* b_down, scalar_t* y, int64_t token_begin,
             int64_t token_end, int64_t c0, int64_t c1) {
  using opmath_t = at::opmath_type<scalar_t>;
  using acc_t = std::conditional_t<std::is_same<weight_t, double>::value, double, opmath_t>;
  const int64_t H = problem.hidden, K = problem.top_k;
  std::vector<acc_t> acc(c1 - c0);
  for (int64_t t = token_begin; t < token_end; ++t) {
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t k = 0; k < K; ++k) {
      const int64_t row = maps.row_of_pair[t * K + k];
      const acc_t weight = acc_t(topk_weights[t * K + k]);
      const scalar_t* o = expert_out + row * ld_out;
      if (b_down) {
        const scalar_t* bias = b_down + int64_t(maps.expert_of_row[row]) * H;
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] += weight * (acc_t(o[c]) + acc_t(bias[c]));
      } else {
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] += weight * acc_t(o[c]);
      }
    }
    scalar_t* out = y + t * H;
    for (int64_t c = c0; c < c1; ++c) out[c] = scalar_t(acc[c - c0]);
  }
}

template <typename scalar_t, typename weight_t>
void forward_impl(const ExpertsProblem& problem, const RowMaps& maps, const at::Tensor& x, const at::Tensor& w_gate_up,
                  const at::Tensor& w_down, const at::Tensor& topk_weights, const at::Tensor& b_gate_up,
                  const at::Tensor& b_down, at::Tensor& rows_sorted, at::Tensor& gate_up, at::Tensor& h,
                  at::Tensor& y) {
  const int64_t H = problem.hidden, I = problem.inter;
  gather_rows(problem, maps, x.data_ptr<scalar_t>(), rows_sorted.data_ptr<scalar_t>(), rows_sorted.stride(0));
  // Only the bf16 kernel (the "experts" regime) uses the next GEMM's weight: no views otherwise.
  const bool hint_following = std::is_same<scalar_t, c10::BFloat16>::value && problem.use_expert_threads;
  const scalar_t* b_gate_up_data = b_gate_up.defined() ? b_gate_up.data_ptr<scalar_t>() : nullptr;
  const scalar_t* b_down_data = b_down.defined() ? b_down.data_ptr<scalar_t>() : nullptr;

  // Phase 1: gate_up GEMM and activation, per (h-column slice, expert).
  if (I > 0) {
    for_each_slice(problem, [&](int64_t slice) {
      const auto h_columns = slice_bounds(I, problem.num_slices, slice);
      const int64_t j0 = h_columns.first, j1 = h_columns.second;
      if (j0 == j1) return;
      const auto column_ranges = gate_up_column_ranges(problem, j0, j1);
      auto columns = [&](const at::Tensor& matrix, size_t range) {  // its gate_up columns of this range
        return matrix.narrow(1, column_ranges[range].first, column_ranges[range].second - column_ranges[range].first);
      };
      const auto& experts = maps.active_experts;
      for (size_t index = 0; index < experts.size(); ++index) {
        const int64_t e = experts[index];
        const int64_t r0 = maps.offsets[e], r1 = maps.offsets[e + 1];
        const at::Tensor lhs = rows_sorted.narrow(0, r0, r1 - r0);
        const at::Tensor rhs = gate_up_rhs(problem, w_gate_up, e);
        for (size_t range = 0; range < column_ranges.size(); ++range) {
          at::Tensor out = columns(gate_up.narrow(0, r0, r1 - r0), range);
          // The GEMM after this one (for the bf16 kernel's prefetch): the next column range, or
          // the next expert's first.
          at::Tensor following;
          if (hint_following && range + 1 < column_ranges.size()) {
            following = columns(rhs, range + 1);
          } else if (hint_following && index + 1 < experts.size()) {
            following = columns(gate_up_rhs(problem, w_gate_up, experts[index + 1]), 0);
          }
          expert_mm(problem, out, lhs, columns(rhs, range), following.defined() ? &following : nullptr);
        }
        const scalar_t* bias = b_gate_up_data ? b_gate_up_data + e * problem.gate_up_cols : nullptr;
        if (!bias && activate_with_aten(problem, gate_up.narrow(0, r0, r1 - r0), h.narrow(0, r0, r1 - r0), j0, j1)) {
          continue;
        }
        for_row_range(problem, r1 - r0, [&](int64_t begin, int64_t end) {
          activate(problem, gate_up.data_ptr<scalar_t>(), bias, h.data_ptr<scalar_t>(), h.stride(0), r0 + begin,
                   r0 + end, j0, j1);
        });
      }
    });
  }

  // Phase 2: down GEMM into rows_sorted (x rows are no longer needed), then the combine.
  at::Tensor& expert_out = rows_sorted;
  for_each_slice(problem, [&](int64_t slice) {
    const auto hidden_columns = slice_bounds(H, problem.num_slices, slice);
    const int64_t c0 = hidden_columns.first, c1 = hidden_columns.second;
    if (c0 == c1) return;
    const auto& experts = maps.active_experts;
    for (size_t index = 0; index < experts.size(); ++index) {
      const int64_t e = experts[index];
      const int64_t r0 = maps.offsets[e], r1 = maps.offsets[e + 1];
      at::Tensor out = expert_out.narrow(0, r0, r1 - r0).narrow(1, c0, c1 - c0);
      if (I == 0) {
        out.zero_();  // an empty intermediate shard: the expert adds only its bias
        continue;
      }
      const at::Tensor following = hint_following && index + 1 < experts.size()
                                       ? down_rhs(problem, w_down, experts[index + 1]).narrow(1, c0, c1 - c0)
                                       : at::Tensor();
      expert_mm(problem, out, h.narrow(0, r0, r1 - r0), down_rhs(problem, w_down, e).narrow(1, c0, c1 - c0),
                following.defined() ? &following : nullptr);
    }
    for_row_range(problem, problem.num_tokens, [&](int64_t begin, int64_t end) {
      combine(problem, maps, expert_out.data_ptr<scalar_t>(), expert_out.stride(0), topk_weights.data_ptr<weight_t>(),
              b_down_data, y.data_ptr<scalar_t>(), begin, end, c0, c1);
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> experts_cpu_forward(
    const at::Tensor& hidden_states, const at::Tensor& w_gate_up, const at::Tensor& w_down,
    const at::Tensor& sorted_pair_ids, const at::Tensor& expert_offsets, const at::Tensor& topk_weights,
    const c10::optional<at::Tensor>& b_gate_up, const c10::optional<at::Tensor>& b_down, c10::string_view activation,
    c10::string_view layout, bool gated, double alpha, double limit, c10::string_view threading,
    bool save_gate_up) {
  const ExpertsProblem problem =
      make_problem(kOp, hidden_states, w_gate_up, w_down, sorted_pair_ids, expert_offsets, topk_weights, b_gate_up,
                   b_down, activation, layout, gated, alpha, limit, threading);
  const RowMaps maps = make_row_maps(kOp, problem, sorted_pair_ids, expert_offsets);
  const auto options = hidden_states.options();
  const int64_t S = problem.rows, H = problem.hidden, R = problem.gate_up_cols, I = problem.inter;

  // contiguous() is free on the usual (contiguous) weights; a strided weight is copied once.
  const at::Tensor x = hidden_states.contiguous();
  const at::Tensor w_gate_up_c = w_gate_up.contiguous(), w_down_c = w_down.contiguous();
  const at::Tensor b_gate_up_c = b_gate_up.has_value() && b_gate_up->defined() ? b_gate_up->contiguous() : at::Tensor();
  const at::Tensor b_down_c = b_down.has_value() && b_down->defined() ? b_down->contiguous() : at::Tensor();
  at::Tensor weights = topk_weights.contiguous();
  if (weights.scalar_type() != at::kDouble) weights = weights.to(at::kFloat);

  at::Tensor y = at::empty({problem.num_tokens, H}, options);
  // Scratch from the kept workspace (experts_cpu_workspace.cpp); gate_up is its own tensor
  // when it is returned for the backward. Rows of the GEMM left operands padded by one cache
  // line: rows 2^k bytes apart (H = 2048 bf16 is 4 KiB) share L1 sets, and the bf16 GEMM
  // reads 4 of them side by side.
  const auto dtype = x.scalar_type();
  const int64_t element = static_cast<int64_t>(c10::elementSize(dtype));
  auto aligned = [](int64_t bytes) { return (bytes + 63) / 64 * 64; };
  const int64_t rows_bytes = aligned(S * (H + kRowPad) * element), h_bytes = aligned(S * (I + kRowPad) * element);
  const int64_t gate_up_bytes = save_gate_up ? 0 : aligned(S * R * element);
  at::Tensor workspace = take_workspace(rows_bytes + h_bytes + gate_up_bytes);
  const at::Tensor rows_padded = workspace_view(workspace, 0, S, H + kRowPad, dtype);
  const at::Tensor h_padded = workspace_view(workspace, rows_bytes, S, I + kRowPad, dtype);
  // The padding is zeroed, every call: ATen's bf16 GEMM (oneDNN with AMX, torch 2.13 on the
  // development Xeon) reads each row of its left operand past the K columns, up to K rounded
  // up to a multiple of 32 but never past the row stride (K = 2100: 12 more elements, K = 37:
  // 27 more), and multiplies them by the zeros it pads the weight with. Zeros there give 0;
  // but the padding is uninitialised workspace or what an earlier call left in it, and a NaN
  // or Inf bit pattern made whole output rows NaN, depending on what the process had allocated
  // before (tests/ops/test_cpu_uninitialized.py). kRowPad = 32 covers the whole overread. S * 32
  // elements a buffer: negligible beside the GEMMs.
  rows_padded.narrow(1, H, kRowPad).zero_();
  h_padded.narrow(1, I, kRowPad).zero_();
  at::Tensor rows_sorted = rows_padded.narrow(1, 0, H);
  at::Tensor h = h_padded.narrow(1, 0, I);
  at::Tensor gate_up = save_gate_up ? at::empty({S, R}, options)
                                    : workspace_view(workspace, rows_bytes + h_bytes, S, R, dtype);
  if (S > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "experts_cpu_forward", [&] {
      if (weights.scalar_type() == at::kDouble) {
        forward_impl<scalar_t, double>(problem, maps, x, w_gate_up_c, w_down_c, weights, b_gate_up_c, b_down_c,
                                       rows_sorted, gate_up, h, y);
      } else {
        forward_impl<scalar_t, float>(problem, maps, x, w_gate_up_c, w_down_c, weights, b_gate_up_c, b_down_c,
                                      rows_sorted, gate_up, h, y);
      }
    });
  }
  return_workspace(std::move(workspace));
  if (!save_gate_up) gate_up = at::empty({0, R}, options);
  return {y, gate_up};
}

}  // namespace cpu
}  // namespace tpmoe
