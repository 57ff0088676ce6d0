"""The CPU expert path of tpmoe.fused_experts, laid out as tpmoe.triton is.

- ops.py: the native ops of tpmoe._C (csrc/experts_cpu_*.cpp) and their fakes;
- autograd.py: ExpertsCpuFunction and `experts_cpu`, what tpmoe.routed_experts calls
  where tpmoe._C is built (expert-sorted rows, per-expert GEMMs into preallocated buffers,
  the activation and the weighted sum over k fused into passes over the GEMM outputs,
  forward and backward, every dtype);
- experts_torch.py: `experts_torch`, the plain-PyTorch twin that runs where it is not
  (tpmoe.fused decides which; tpmoe._native.use_native_ops). `fused_experts_cpu` and
  `grouped_experts_torch` are the same two with tpmoe.fused_experts' keywords.

`bf16_gemm_path()` says which bf16 GEMM the native ops run ("native" or "widen", forced by
TPMOE_CPU_BF16_GEMM), and `bf16_kernel_max_rows()` up to how many rows an expert the native
path runs tpmoe's own bf16 kernel rather than ATen's GEMM. The native forward keeps its scratch buffer between calls; `release_workspace()` frees it.
"""
from .autograd import ExpertsCpuFunction, experts_cpu, fused_experts_cpu
from .experts_torch import experts_torch, grouped_experts_torch
from .ops import bf16_gemm_path, bf16_kernel_max_rows, cpu_ops, release_workspace

__all__ = ["ExpertsCpuFunction", "bf16_gemm_path", "bf16_kernel_max_rows", "cpu_ops", "experts_cpu", "experts_torch", "fused_experts_cpu",
           "grouped_experts_torch", "release_workspace"]
