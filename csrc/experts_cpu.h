// The CPU expert compute (tpmoe::experts_cpu_forward / experts_cpu_backward): the shared
// description of one call, its checks, and the work split between threads.
//
// Rows are the T*K (token, slot) pairs in expert-sorted order (tpmoe::align's
// sorted_pair_ids); expert e owns rows [expert_offsets[e], expert_offsets[e+1]).
// Every weight is used through a strided view, never repacked: "concatenated" and
// "interleaved" store W_gate_up [E, R, H] and W_down [E, H, I] (x @ W^T), "gpt_oss" stores
// W_gate_up [E, H, R] and W_down [E, I, H] (x @ W).
//
// Two ways to use the threads, chosen per call (`threading`):
//  - "experts" (decode, and prefill with up to 256 rows per expert): every expert's output
//    columns are cut into one slice per thread; a thread runs its slice of every active
//    expert with single-threaded GEMMs (the bf16 kernel of experts_cpu_gemm.cpp where the
//    CPU has AVX512-BF16, else ATen), so each thread reads an equal share of the touched weights
//    whatever the routing, and owns its output columns (the bias, activation and combine
//    run there too).
//  - "gemm" (prefill: many rows per expert): experts one after another, each GEMM given all
//    threads by ATen/oneDNN/MKL, the element-wise passes split over rows.
// Either way each output element is written by one thread and every sum has a fixed order,
// so a call is bitwise reproducible for a given thread count.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <array>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "experts_cpu_activation.h"

namespace tpmoe {
namespace cpu {

enum class Layout { kConcatenated, kInterleaved, kGptOss };

struct ExpertsProblem {
  int64_t num_tokens = 0;    // T
  int64_t hidden = 0;        // H
  int64_t top_k = 0;         // K
  int64_t num_experts = 0;   // E
  int64_t inter = 0;         // I_p: this rank's intermediate columns
  int64_t gate_up_cols = 0;  // R = 2 I_p gated, I_p not gated
  int64_t rows = 0;          // S = T * K
  Layout layout = Layout::kConcatenated;
  bool gated = true;
  GatedParams act{Activation::kSilu, 1.702, 7.0};
  bool use_expert_threads = true;  // "experts" (true) or "gemm" (false)
  int64_t bf16_kernel_max_rows = 0;  // experts with at most this many rows use the bf16 GEMM
  bool widen_bf16 = false;           // bf16 GEMMs widen their tiles to float32 (experts_cpu_widen.cpp)
  int64_t num_slices = 1;          // column slices per expert ("experts": one per thread)
};

// Routing read once per call: sorted row of each pair, expert of each sorted row, token of
// each sorted row, and the experts that have rows.
struct RowMaps {
  std::vector<int64_t> pair_of_row;     // [S] sorted_pair_ids
  std::vector<int64_t> row_of_pair;     // [S] its inverse
  std::vector<int64_t> token_of_row;    // [S]
  std::vector<int32_t> expert_of_row;   // [S]
  std::vector<int64_t> offsets;         // [E + 1]
  std::vector<int64_t> active_experts;  // experts with at least one row, ascending
};

// Parses and checks the arguments shared by forward and backward (RuntimeError on bad input).
ExpertsProblem make_problem(const char* op, const at::Tensor& hidden_states, const at::Tensor& w_gate_up,
                            const at::Tensor& w_down, const at::Tensor& sorted_pair_ids,
                            const at::Tensor& expert_offsets, const at::Tensor& topk_weights,
                            const c10::optional<at::Tensor>& b_gate_up, const c10::optional<at::Tensor>& b_down,
                            c10::string_view activation, c10::string_view layout, bool gated, double alpha,
                            double limit, c10::string_view threading);

RowMaps make_row_maps(const char* op, const ExpertsProblem& problem, const at::Tensor& sorted_pair_ids,
                      const at::Tensor& expert_offsets);

// [begin, end) of slice `slice` of `extent` columns cut into `num_slices`, boundaries on
// multiples of 16 columns where the extent allows (whole vector registers and cache lines).
std::pair<int64_t, int64_t> slice_bounds(int64_t extent, int64_t num_slices, int64_t slice);

// Views of expert e's weights as right-hand GEMM operands: gate_up_rhs [H, R] (x @ it),
// down_rhs [I, H] (h @ it). Strided views of the stored tensor, no copy.
at::Tensor gate_up_rhs(const ExpertsProblem& problem, const at::Tensor& w_gate_up, int64_t expert);
at::Tensor down_rhs(const ExpertsProblem& problem, const at::Tensor& w_down, int64_t expert);

// The gate_up output columns that hold h-columns [j0, j1): one or two column ranges
// (concatenated gated: gate [j0, j1) and up [I+j0, I+j1); interleaved/gpt_oss gated:
// [2 j0, 2 j1); non-gated: [j0, j1)).
std::vector<std::pair<int64_t, int64_t>> gate_up_column_ranges(const ExpertsProblem& problem, int64_t j0,
                                                               int64_t j1);

// Columns of the gate and up values of h-column j in a gate_up row.
inline int64_t gate_column(const ExpertsProblem& problem, int64_t j) {
  if (!problem.gated) return j;
  return problem.layout == Layout::kConcatenated ? j : 2 * j;
}
inline int64_t up_column(const ExpertsProblem& problem, int64_t j) {
  return problem.layout == Layout::kConcatenated ? problem.inter + j : 2 * j + 1;
}

// The bf16 GEMM (csrc/experts_cpu_gemm.cpp): out = lhs @ rhs for bf16, at most
// max_rows rows, rhs a transposed view of a row-major [N, K] weight, on CPUs with
// AVX512-BF16. Returns false, writing nothing, where it does not apply. following_rhs (may be
// null): the right operand of the caller's next GEMM, whose first rows it fetches ahead.
bool bf16_kernel_available();
// Whether ATen's cpuinfo reports the CPU capability `capability` ("avx512_bf16", "amx_bf16", ...).
bool cpu_reports(const char* capability);
// The most rows an expert may have to run the bf16 GEMM above (more: ATen's): from
// TPMOE_CPU_BF16_KERNEL_MAX_ROWS (0: every GEMM through ATen; for measuring and tests), read per
// call (a getenv is ~100 ns), else 4 where oneDNN runs ATen's on AMX, else no bound.
int64_t bf16_kernel_max_rows();
bool try_bf16_kernel_gemm(const at::Tensor& lhs, const at::Tensor& rhs, at::Tensor& out, int64_t max_rows,
                          const at::Tensor* following_rhs = nullptr);

// Which bf16 GEMM the experts run (csrc/experts_cpu_widen.cpp): the native one (the kernel
// above or ATen's) or the widened one (float32 GEMMs on tiles widened from bf16), from
// TPMOE_CPU_BF16_GEMM = native | widen | auto (RuntimeError naming it on any other value);
// auto, the default: native where the CPU has a bf16 dot product (checked once a process).
enum class Bf16GemmPath { kNative, kWiden };
bool native_bf16_dot_available();
Bf16GemmPath bf16_gemm_path();
std::string bf16_gemm_path_name();  // "native" or "widen"

// out = lhs @ rhs (bf16 or fp16 out, any strides) as float32 GEMMs on tiles widened by
// widen_tile, sums kept in float32 and rounded once on the store. following_rhs (may be
// null): the right operand of the caller's next GEMM, whose first tile it fetches ahead.
void widened_mm_out(at::Tensor& out, const at::Tensor& lhs, const at::Tensor& rhs,
                    const at::Tensor* following_rhs = nullptr);

// The widened GEMM's float32 dot kernel (experts_cpu_widen.cpp), for callers that widen
// weights of their own: the quantized experts at prefill (experts_cpu_quantized.cpp) widen
// fp8 / MXFP4 rows and multiply them here, so every widened weight goes through one set of
// micro-kernels. sums[r * ld_sums + c] = a[r, :Kp] . b[c, :Kp] for r < rows, c < cols: a's and
// b's rows float32, lda / ldb apart, zero-padded to Kp (a multiple of kWidenedDotPadK) and
// cols a multiple of kWidenedDotPadCols. [prefetch_begin, prefetch_end) (may be null): bytes
// the caller reads next, asked into L2 while the products run. widened_dot_f32() picks the
// kernel as the bf16 path does (TPMOE_CPU_WIDEN_KERNEL, read at each call: call it once per
// op); where there is none ("aten", no AVX2) a portable loop.
constexpr int64_t kWidenedDotPadK = 16, kWidenedDotPadCols = 4;
using WidenedDot = void (*)(int64_t rows, int64_t cols, int64_t Kp, const float* a, int64_t lda, const float* b,
                            int64_t ldb, float* sums, int64_t ld_sums, const char* prefetch_begin,
                            const char* prefetch_end);
WidenedDot widened_dot_f32();

// out = lhs @ rhs without the few-row bf16 kernel: the widened GEMM for bf16 where
// problem.widen_bf16, else ATen (the backward's GEMMs, and expert_mm's fallback).
void gemm_out(const ExpertsProblem& problem, at::Tensor& out, const at::Tensor& lhs, const at::Tensor& rhs);

// out = lhs @ rhs for one expert: the widened GEMM where problem.widen_bf16, else the bf16 kernel in "experts" mode where it applies, else
// ATen (oneDNN/MKL; single-threaded inside the "experts" workers, all threads in "gemm").
// following_rhs: the right operand of the GEMM that comes next on this thread, if known.
void expert_mm(const ExpertsProblem& problem, at::Tensor& out, const at::Tensor& lhs, const at::Tensor& rhs,
               const at::Tensor* following_rhs = nullptr);

// Runs fn(slice) for every slice: spread over threads in "experts" mode, else in order on
// the calling thread (whose GEMMs then use all threads).
template <typename Fn>
void for_each_slice(const ExpertsProblem& problem, const Fn& fn) {
  if (problem.use_expert_threads && problem.num_slices > 1) {
    at::parallel_for(0, problem.num_slices, 1, [&](int64_t begin, int64_t end) {
      // Dispatch state is thread-local and OpenMP workers start from the defaults: without
      // this the ATen GEMMs of a worker go through autograd and refuse out= on weights that
      // require grad. The calling thread is already below autograd (custom op dispatch).
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (int64_t slice = begin; slice < end; ++slice) fn(slice);
    });
  } else {
    for (int64_t slice = 0; slice < problem.num_slices; ++slice) fn(slice);
  }
}

// Runs fn(begin, end) over rows [0, count): on the calling thread in "experts" mode (it is
// already one of the workers), split over threads in "gemm" mode.
template <typename Fn>
void for_row_range(const ExpertsProblem& problem, int64_t count, const Fn& fn) {
  if (problem.use_expert_threads) {
    fn(int64_t(0), count);
  } else {
    at::parallel_for(0, count, 16, fn);
  }
}

// The forward's scratch memory, kept between calls (experts_cpu_workspace.cpp): take a byte
// buffer of at least `bytes`, give it back after the call; release_workspace frees the kept
// one and returns its size. workspace_view: a [rows, cols] dtype view at a byte offset (a
// multiple of the dtype's size).
at::Tensor take_workspace(int64_t bytes);
void return_workspace(at::Tensor workspace);
int64_t release_workspace();
at::Tensor workspace_view(const at::Tensor& workspace, int64_t offset_bytes, int64_t rows, int64_t cols,
                          at::ScalarType dtype);

std::tuple<at::Tensor, at::Tensor> experts_cpu_forward(
    const at::Tensor& hidden_states, const at::Tensor& w_gate_up, const at::Tensor& w_down,
    const at::Tensor& sorted_pair_ids, const at::Tensor& expert_offsets, const at::Tensor& topk_weights,
    const c10::optional<at::Tensor>& b_gate_up, const c10::optional<at::Tensor>& b_down, c10::string_view activation,
    c10::string_view layout, bool gated, double alpha, double limit, c10::string_view threading,
    bool save_gate_up);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> experts_cpu_backward(
    const at::Tensor& grad_output, const at::Tensor& hidden_states, const at::Tensor& w_gate_up,
    const at::Tensor& w_down, const at::Tensor& sorted_pair_ids, const at::Tensor& expert_offsets,
    const at::Tensor& topk_weights, const c10::optional<at::Tensor>& b_gate_up,
    const c10::optional<at::Tensor>& b_down, const at::Tensor& gate_up_sorted, c10::string_view activation,
    c10::string_view layout, bool gated, double alpha, double limit, c10::string_view threading,
    std::array<bool, 6> output_mask);

}  // namespace cpu
}  // namespace tpmoe
