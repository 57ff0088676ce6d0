"""Triton kernels for one rank's expert shard, forward and backward (docs/design.md section 3).

Importing this package needs triton, not CUDA. The kernels run on CUDA tensors, or on CPU
tensors under the Triton interpreter (TRITON_INTERPRET=1 set before this package is first
imported); any other case raises a RuntimeError that says so.
"""
from .autograd import FusedExpertsFunction, experts_triton, fused_experts_triton

__all__ = ["FusedExpertsFunction", "experts_triton", "fused_experts_triton"]
