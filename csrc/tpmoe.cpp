// The one binding file of tpmoe._C: the schemas of the routing ops. Their implementations
// register themselves per device: route_cpu.cpp, align_cpu.cpp (CPU); route_cuda_op.cpp
// (CUDA, launching the kernel of route_cuda.cu). align has no CUDA kernel here: on CUDA
// tensors tpmoe.routing.align runs the Triton kernels of tpmoe/triton/align.py.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(tpmoe, m) {
  // The fake (meta) implementations and the autograd formula live in this Python module;
  // naming it lets torch import it when an op is used before `tpmoe.routing` was imported.
  m.set_python_module("tpmoe.routing");
  m.def(
      "route(Tensor router_logits, int top_k, str scoring, bool renormalize, Tensor? correction_bias, "
      "int n_group, int topk_group, float routed_scaling_factor) -> (Tensor topk_weights, Tensor topk_ids)");
  m.def(
      "align(Tensor topk_ids, int num_experts, int block_m) -> (Tensor sorted_pair_ids, "
      "Tensor tokens_per_expert, Tensor expert_offsets, Tensor sorted_ids_padded, Tensor padded_offsets, "
      "Tensor block_expert, Tensor num_padded)");
}

// `import tpmoe._C` loads this library, which runs the registrations above; the module
// itself exports nothing (the ops are reached through torch.ops.tpmoe).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
