// Schemas and CPU registrations of the expert ops (tpmoe::experts_cpu_forward/backward).
// A fragment of the tpmoe library: csrc/tpmoe.cpp owns the library itself.
#include <torch/library.h>

#include "experts_cpu.h"

// The development build (tpmoe/cpu/ops.py, TPMOE_CPU_DEV_BUILD=1) compiles these files alone
// under another namespace, so it can be loaded next to an installed tpmoe._C that already
// holds them. The indirection expands the macro before the library macros paste it.
#ifndef TPMOE_EXPERTS_CPU_NAMESPACE
#define TPMOE_EXPERTS_CPU_NAMESPACE tpmoe
#endif
#define TPMOE_LIBRARY_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define TPMOE_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

TPMOE_LIBRARY_FRAGMENT(TPMOE_EXPERTS_CPU_NAMESPACE, m) {
  // Fake (meta) implementations and the autograd Function live in tpmoe.cpu.
  m.set_python_module("tpmoe.cpu.ops");
  // Rows are the T*K (token, slot) pairs sorted by expert (tpmoe.routing.align). Returns
  // y [T, H] and, when save_gate_up, the raw gate_up GEMM output [S, R] for the backward
  // (else an empty [0, R]). threading: "auto", "experts" (decode) or "gemm" (prefill).
  m.def(
      "experts_cpu_forward(Tensor hidden_states, Tensor w_gate_up, Tensor w_down, Tensor sorted_pair_ids, "
      "Tensor expert_offsets, Tensor topk_weights, Tensor? b_gate_up, Tensor? b_down, str activation, "
      "str layout, bool gated, float alpha, float limit, str threading, bool save_gate_up) "
      "-> (Tensor output, Tensor gate_up_sorted)");
  // output_mask: which of (dx, dw_gate_up, dw_down, dtopk_weights, db_gate_up, db_down) to
  // compute; the others (and the bias gradients without a bias) come back empty [0].
  m.def(
      "experts_cpu_backward(Tensor grad_output, Tensor hidden_states, Tensor w_gate_up, Tensor w_down, "
      "Tensor sorted_pair_ids, Tensor expert_offsets, Tensor topk_weights, Tensor? b_gate_up, Tensor? b_down, "
      "Tensor gate_up_sorted, str activation, str layout, bool gated, float alpha, float limit, str threading, "
      "bool[6] output_mask) -> (Tensor dx, Tensor dw_gate_up, Tensor dw_down, Tensor dtopk_weights, "
      "Tensor db_gate_up, Tensor db_down)");
  // Frees the forward's kept scratch buffer (csrc/experts_cpu_workspace.cpp); returns its bytes.
  m.def("experts_cpu_release_workspace() -> int", &tpmoe::cpu::release_workspace);
  // The bf16 GEMM in use: "native" or "widen" (csrc/experts_cpu_widen.cpp; TPMOE_CPU_BF16_GEMM).
  m.def("experts_cpu_bf16_gemm_path() -> str", &tpmoe::cpu::bf16_gemm_path_name);
  // The most rows an expert may have to run the native bf16 kernel (experts_cpu_gemm.cpp).
  m.def("experts_cpu_bf16_kernel_max_rows() -> int", &tpmoe::cpu::bf16_kernel_max_rows);
}

TPMOE_LIBRARY_IMPL(TPMOE_EXPERTS_CPU_NAMESPACE, CPU, m) {
  m.impl("experts_cpu_forward", &tpmoe::cpu::experts_cpu_forward);
  m.impl("experts_cpu_backward", &tpmoe::cpu::experts_cpu_backward);
}
