"""The native CPU expert path: C++ ops (csrc/experts_cpu_*.cpp) behind an autograd.Function.

`experts_forward_native(...)` is what `tpmoe.experts_cpu.fused_experts_cpu` calls when the
extension is built; `cpu_ops_available()` says whether it is. The forward keeps its scratch
buffer between calls; `release_workspace()` frees it.
"""
from .ops import ExpertsCpuFunction, cpu_ops, cpu_ops_available, experts_forward_native, release_workspace

__all__ = ["ExpertsCpuFunction", "cpu_ops", "cpu_ops_available", "experts_forward_native", "release_workspace"]
