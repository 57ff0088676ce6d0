// tpmoe::experts_cpu_backward: gradients of experts_cpu_forward.
//
// Saved by the forward: only the raw gate_up GEMM output [S, R] (no bias). Recomputed here:
//   - the gathers of x and dy (copies, memory-bound, cheaper than keeping [S, H] alive);
//   - h = act(gate_up + b_gu) (element-wise, done in the pass that needs it anyway);
//   - not the down output o: d topk_w[t,k] = dy_t . o = (dy_t W_d) . h + dy_t . b_d, and
//     G = dy W_d is computed for dh anyway.
// Keeping gate_up saves the x W_gu^T GEMM (a third of the forward FLOPs) in the backward.
//
// Phase 1, per (h-column slice, expert): G = dy_sorted W_d[e][:, slice]; then per element
//   dot += G h (for d topk_w), dh = w G, (d gate, d up) = act'(...) dh -> dA [S, R], and G is
//   overwritten with w h (the left operand of dW_d); d b_gu = column sums of dA.
// Phase 2, per hidden-column slice (all experts): dW_d, dW_gu and dx_sorted = dA W_gu on the
//   slice's columns of H, d b_d, then dx[t] = sum_k dx_sorted[row(t,k)] (k ascending).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <cstring>
#include <vector>

#include "experts_cpu.h"

namespace tpmoe {
namespace cpu {
namespace {

constexpr const char* kOp = "tpmoe::experts_cpu_backward";

struct Needs {
  bool dx, dw_gate_up, dw_down, dtopk, db_gate_up, db_down;
};

template <typename scalar_t, typename weight_t>
struct BackwardBuffers {
  // Inputs, contiguous.
  at::Tensor x, w_gate_up, w_down, b_gate_up, b_down, gate_up, weights, dy;
  // Scratch in sorted row order.
  at::Tensor dy_sorted, x_sorted, grad_h, grad_gate_up, dx_sorted;
  std::vector<double> partial_dots;  // [num_slices, S]: G . h per slice
  std::vector<double> bias_dots;     // [S]: dy . b_d
  // Outputs.
  at::Tensor dx, dw_gate_up, dw_down, dtopk, db_gate_up, db_down;
};

template <typename scalar_t, typename weight_t>
void gather_rows(const ExpertsProblem& problem, const RowMaps& maps, BackwardBuffers<scalar_t, weight_t>& buf,
                 bool with_x) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t H = problem.hidden;
  const scalar_t* dy = buf.dy.template data_ptr<scalar_t>();
  const scalar_t* x = buf.x.template data_ptr<scalar_t>();
  const scalar_t* b_down = buf.b_down.defined() ? buf.b_down.template data_ptr<scalar_t>() : nullptr;
  scalar_t* dy_sorted = buf.dy_sorted.template data_ptr<scalar_t>();
  scalar_t* x_sorted = with_x ? buf.x_sorted.template data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, problem.rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = maps.token_of_row[row];
      std::memcpy(dy_sorted + row * H, dy + t * H, H * sizeof(scalar_t));
      if (x_sorted) std::memcpy(x_sorted + row * H, x + t * H, H * sizeof(scalar_t));
      double dot = 0;
      if (b_down) {
        const scalar_t* bias = b_down + int64_t(maps.expert_of_row[row]) * H;
        for (int64_t c = 0; c < H; ++c) dot += double(opmath_t(dy[t * H + c])) * double(opmath_t(bias[c]));
      }
      buf.bias_dots[row] = dot;
    }
  });
}

// Rows [row_begin, row_end) of expert e, h-columns [j0, j1): see phase 1 above.
template <typename scalar_t, typename weight_t>
void activation_backward(const ExpertsProblem& problem, const RowMaps& maps, BackwardBuffers<scalar_t, weight_t>& buf,
                         int64_t expert, int64_t slice, int64_t row_begin, int64_t row_end, int64_t j0, int64_t j1) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t R = problem.gate_up_cols, I = problem.inter;
  const scalar_t* gate_up = buf.gate_up.template data_ptr<scalar_t>();
  const scalar_t* bias = buf.b_gate_up.defined() ? buf.b_gate_up.template data_ptr<scalar_t>() + expert * R : nullptr;
  const weight_t* weights = buf.weights.template data_ptr<weight_t>();
  scalar_t* grad_h = buf.grad_h.template data_ptr<scalar_t>();
  scalar_t* grad_gate_up = buf.grad_gate_up.template data_ptr<scalar_t>();
  double* dots = buf.partial_dots.data() + slice * problem.rows;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const scalar_t* in = gate_up + row * R;
    scalar_t* g_row = grad_h + row * I;
    scalar_t* da_row = grad_gate_up + row * R;
    const opmath_t weight = opmath_t(weights[maps.pair_of_row[row]]);
    double dot = 0;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t gate_col = gate_column(problem, j);
      const opmath_t gate = opmath_t(in[gate_col]) + (bias ? opmath_t(bias[gate_col]) : opmath_t(0));
      const opmath_t g_value = opmath_t(g_row[j]);
      opmath_t h_value;
      if (!problem.gated) {
        opmath_t derivative;
        unary_forward_backward(problem.act.activation, gate, &h_value, &derivative);
        da_row[gate_col] = scalar_t(weight * g_value * derivative);
      } else {
        const int64_t up_col = up_column(problem, j);
        const opmath_t up = opmath_t(in[up_col]) + (bias ? opmath_t(bias[up_col]) : opmath_t(0));
        opmath_t grad_gate, grad_up;
        h_value = gated_backward(problem.act, gate, up, weight * g_value, &grad_gate, &grad_up);
        da_row[gate_col] = scalar_t(grad_gate);
        da_row[up_col] = scalar_t(grad_up);
      }
      // h is rounded to scalar_t as the forward's down GEMM saw it.
      const opmath_t h_rounded = opmath_t(scalar_t(h_value));
      dot += double(g_value) * double(h_rounded);
      g_row[j] = scalar_t(weight * h_rounded);
    }
    dots[row] = dot;
  }
}

// Phase 1 for one h-column slice: G, the activation backward, d b_gu.
template <typename scalar_t, typename weight_t>
void phase_hidden_columns(const ExpertsProblem& problem, const RowMaps& maps, BackwardBuffers<scalar_t, weight_t>& buf,
                          const Needs& needs, int64_t slice) {
  const auto h_columns = slice_bounds(problem.inter, problem.num_slices, slice);
  const int64_t j0 = h_columns.first, j1 = h_columns.second;
  if (j0 == j1) return;
  const auto column_ranges = gate_up_column_ranges(problem, j0, j1);
  for (const int64_t e : maps.active_experts) {
    const int64_t r0 = maps.offsets[e], rows = maps.offsets[e + 1] - r0;
    // G[rows, j0:j1] = dy_sorted[rows] @ (down_rhs [I, H])[j0:j1]^T
    at::Tensor g_out = buf.grad_h.narrow(0, r0, rows).narrow(1, j0, j1 - j0);
    gemm_out(problem, g_out, buf.dy_sorted.narrow(0, r0, rows), down_rhs(problem, buf.w_down, e).narrow(0, j0, j1 - j0).t());
    for_row_range(problem, rows, [&](int64_t begin, int64_t end) {
      activation_backward(problem, maps, buf, e, slice, r0 + begin, r0 + end, j0, j1);
    });
    if (needs.db_gate_up) {
      for (const auto& [c0, c1] : column_ranges) {
        at::Tensor db = buf.db_gate_up.select(0, e).narrow(0, c0, c1 - c0);
        at::sum_out(db, buf.grad_gate_up.narrow(0, r0, rows).narrow(1, c0, c1 - c0), {0});
      }
    }
  }
}

// Phase 2 for one slice of the hidden columns: weight gradients, dx, d b_d.
template <typename scalar_t, typename weight_t>
void phase_output_columns(const ExpertsProblem& problem, const RowMaps& maps, BackwardBuffers<scalar_t, weight_t>& buf,
                          const Needs& needs, int64_t slice) {
  using opmath_t = at::opmath_type<scalar_t>;
  const auto hidden_columns = slice_bounds(problem.hidden, problem.num_slices, slice);
  const int64_t c0 = hidden_columns.first, c1 = hidden_columns.second;
  if (c0 == c1) return;
  const int64_t width = c1 - c0, H = problem.hidden, K = problem.top_k;
  const bool transposed = problem.layout == Layout::kGptOss;
  const bool has_inter = problem.inter > 0;
  for (int64_t e = 0; e < problem.num_experts; ++e) {
    const int64_t r0 = maps.offsets[e], rows = maps.offsets[e + 1] - r0;
    // This slice of an expert's weight gradients: [rows of H] or [columns of H].
    auto weight_slice = [&](const at::Tensor& grad, bool hidden_on_rows) {
      return hidden_on_rows ? grad.select(0, e).narrow(0, c0, width) : grad.select(0, e).narrow(1, c0, width);
    };
    if (rows == 0) {  // an expert without tokens: zero gradients, written by the slice owner
      if (needs.dw_down) weight_slice(buf.dw_down, !transposed).zero_();
      if (needs.dw_gate_up) weight_slice(buf.dw_gate_up, transposed).zero_();
      if (needs.db_down) buf.db_down.select(0, e).narrow(0, c0, width).zero_();
      continue;
    }
    const at::Tensor dy_rows = buf.dy_sorted.narrow(0, r0, rows).narrow(1, c0, width);
    const at::Tensor h_weighted = buf.grad_h.narrow(0, r0, rows);   // [rows, I]: w * h
    const at::Tensor grad_gate_up = buf.grad_gate_up.narrow(0, r0, rows);  // [rows, R]
    if (needs.dw_down) {
      at::Tensor out = weight_slice(buf.dw_down, !transposed);
      if (!has_inter) {
        out.zero_();
      } else if (transposed) {
        gemm_out(problem, out, h_weighted.t(), dy_rows);  // [I, width]
      } else {
        gemm_out(problem, out, dy_rows.t(), h_weighted);  // [width, I]
      }
    }
    if (needs.dw_gate_up) {
      at::Tensor out = weight_slice(buf.dw_gate_up, transposed);
      const at::Tensor x_rows = buf.x_sorted.narrow(0, r0, rows).narrow(1, c0, width);
      if (!has_inter) {
        out.zero_();
      } else if (transposed) {
        gemm_out(problem, out, x_rows.t(), grad_gate_up);  // [width, R]
      } else {
        gemm_out(problem, out, grad_gate_up.t(), x_rows);  // [R, width]
      }
    }
    if (needs.dx) {
      at::Tensor out = buf.dx_sorted.narrow(0, r0, rows).narrow(1, c0, width);
      if (!has_inter) {
        out.zero_();
      } else {
        gemm_out(problem, out, grad_gate_up, gate_up_rhs(problem, buf.w_gate_up, e).narrow(0, c0, width).t());
      }
    }
    if (needs.db_down) {
      std::vector<double> acc(width, 0.0);
      const weight_t* weights = buf.weights.template data_ptr<weight_t>();
      const scalar_t* dy = buf.dy_sorted.template data_ptr<scalar_t>();
      for (int64_t row = r0; row < r0 + rows; ++row) {
        const double weight = double(weights[maps.pair_of_row[row]]);
        for (int64_t c = c0; c < c1; ++c) acc[c - c0] += weight * double(opmath_t(dy[row * H + c]));
      }
      scalar_t* db = buf.db_down.template data_ptr<scalar_t>() + e * H;
      for (int64_t c = c0; c < c1; ++c) db[c] = scalar_t(acc[c - c0]);
    }
  }
  if (needs.dx) {
    const scalar_t* dx_sorted = buf.dx_sorted.template data_ptr<scalar_t>();
    scalar_t* dx = buf.dx.template data_ptr<scalar_t>();
    for_row_range(problem, problem.num_tokens, [&](int64_t begin, int64_t end) {
      std::vector<opmath_t> acc(width);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), opmath_t(0));
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* in = dx_sorted + maps.row_of_pair[t * K + k] * H;
          for (int64_t c = c0; c < c1; ++c) acc[c - c0] += opmath_t(in[c]);
        }
        for (int64_t c = c0; c < c1; ++c) dx[t * H + c] = scalar_t(acc[c - c0]);
      }
    });
  }
}

template <typename scalar_t, typename weight_t>
void backward_impl(const ExpertsProblem& problem, const RowMaps& maps, BackwardBuffers<scalar_t, weight_t>& buf,
                   const Needs& needs) {
  gather_rows(problem, maps, buf, needs.dw_gate_up);
  if (problem.inter > 0) {
    for_each_slice(problem, [&](int64_t slice) { phase_hidden_columns(problem, maps, buf, needs, slice); });
  }
  if (needs.dx || needs.dw_gate_up || needs.dw_down || needs.db_down) {
    for_each_slice(problem, [&](int64_t slice) { phase_output_columns(problem, maps, buf, needs, slice); });
  }
  if (needs.dtopk) {
    weight_t* dtopk = buf.dtopk.template data_ptr<weight_t>();
    for (int64_t row = 0; row < problem.rows; ++row) {
      double value = buf.bias_dots[row];
      if (problem.inter > 0) {
        for (int64_t slice = 0; slice < problem.num_slices; ++slice) {
          value += buf.partial_dots[slice * problem.rows + row];
        }
      }
      dtopk[maps.pair_of_row[row]] = weight_t(value);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_cpu_backward(
    const at::Tensor& grad_output, const at::Tensor& hidden_states, const at::Tensor& w_gate_up,
    const at::Tensor& w_down, const at::Tensor& sorted_pair_ids, const at::Tensor& expert_offsets,
    const at::Tensor& topk_weights, const c10::optional<at::Tensor>& b_gate_up,
    const c10::optional<at::Tensor>& b_down, const at::Tensor& gate_up_sorted, c10::string_view activation,
    c10::string_view layout, bool gated, double alpha, double limit, c10::string_view threading,
    std::array<bool, 6> output_mask) {
  const ExpertsProblem problem =
      make_problem(kOp, hidden_states, w_gate_up, w_down, sorted_pair_ids, expert_offsets, topk_weights, b_gate_up,
                   b_down, activation, layout, gated, alpha, limit, threading);
  const int64_t T = problem.num_tokens, H = problem.hidden, S = problem.rows, R = problem.gate_up_cols,
                I = problem.inter, E = problem.num_experts;
  TORCH_CHECK(grad_output.sizes() == hidden_states.sizes() && grad_output.scalar_type() == hidden_states.scalar_type()
                  && grad_output.device().is_cpu(),
              kOp, ": grad_output: expected a CPU tensor of shape ", hidden_states.sizes(), " and dtype ",
              hidden_states.scalar_type(), ", got ", grad_output.sizes(), " ", grad_output.scalar_type());
  TORCH_CHECK(gate_up_sorted.sizes() == at::IntArrayRef({S, R}) && gate_up_sorted.scalar_type() == hidden_states.scalar_type(),
              kOp, ": gate_up_sorted: expected the forward's saved gate_up of shape [", S, ", ", R, "] and dtype ",
              hidden_states.scalar_type(), ", got ", gate_up_sorted.sizes(), " ", gate_up_sorted.scalar_type());
  const RowMaps maps = make_row_maps(kOp, problem, sorted_pair_ids, expert_offsets);
  const bool has_b_gate_up = b_gate_up.has_value() && b_gate_up->defined();
  const bool has_b_down = b_down.has_value() && b_down->defined();
  const Needs needs{output_mask[0], output_mask[1], output_mask[2], output_mask[3],
                    output_mask[4] && has_b_gate_up, output_mask[5] && has_b_down};
  const auto options = hidden_states.options();
  const at::Tensor empty = at::empty({0}, options);
  at::Tensor weights = topk_weights.contiguous();
  if (weights.scalar_type() != at::kDouble) weights = weights.to(at::kFloat);

  // Every element of dx, dW and d b_d is written by the phases (an expert without rows gets
  // zeros from its slice owners), so only a call without rows and d b_gu (active experts
  // only) start from zeros: zero-filling dW up front would be a pass over all E experts.
  auto allocate = [&](bool needed, at::IntArrayRef sizes, const at::TensorOptions& dtype_options) {
    if (!needed) return at::empty({0}, dtype_options);
    return S > 0 ? at::empty(sizes, dtype_options) : at::zeros(sizes, dtype_options);
  };
  at::Tensor dx = allocate(needs.dx, {T, H}, options);
  at::Tensor dw_gate_up = allocate(needs.dw_gate_up, w_gate_up.sizes(), options);
  at::Tensor dw_down = allocate(needs.dw_down, w_down.sizes(), options);
  at::Tensor dtopk = allocate(needs.dtopk, topk_weights.sizes(), weights.options());
  at::Tensor db_gate_up = needs.db_gate_up ? at::zeros({E, R}, options) : empty;
  at::Tensor db_down = allocate(needs.db_down, {E, H}, options);
  if (S > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, hidden_states.scalar_type(), "experts_cpu_backward", [&] {
      auto run = [&](auto weight_tag) {
        using weight_t = decltype(weight_tag);
        BackwardBuffers<scalar_t, weight_t> buf;
        buf.x = hidden_states.contiguous();
        buf.w_gate_up = w_gate_up.contiguous();
        buf.w_down = w_down.contiguous();
        buf.b_gate_up = has_b_gate_up ? b_gate_up->contiguous() : at::Tensor();
        buf.b_down = has_b_down ? b_down->contiguous() : at::Tensor();
        buf.gate_up = gate_up_sorted.contiguous();
        buf.weights = weights;
        buf.dy = grad_output.contiguous();
        buf.dy_sorted = at::empty({S, H}, options);
        buf.x_sorted = needs.dw_gate_up ? at::empty({S, H}, options) : empty;
        buf.grad_h = at::empty({S, I}, options);
        buf.grad_gate_up = at::empty({S, R}, options);
        buf.dx_sorted = needs.dx ? at::empty({S, H}, options) : empty;
        buf.partial_dots.assign(problem.num_slices * S, 0.0);
        buf.bias_dots.assign(S, 0.0);
        buf.dx = dx;
        buf.dw_gate_up = dw_gate_up;
        buf.dw_down = dw_down;
        buf.dtopk = dtopk;
        buf.db_gate_up = db_gate_up;
        buf.db_down = db_down;
        backward_impl<scalar_t, weight_t>(problem, maps, buf, needs);
      };
      if (weights.scalar_type() == at::kDouble) {
        run(double(0));
      } else {
        run(float(0));
      }
    });
  }
  // dtopk keeps the dtype of topk_weights.
  if (needs.dtopk && dtopk.scalar_type() != topk_weights.scalar_type()) dtopk = dtopk.to(topk_weights.scalar_type());
  return {dx, dw_gate_up, dw_down, dtopk, db_gate_up, db_down};
}

}  // namespace cpu
}  // namespace tpmoe
