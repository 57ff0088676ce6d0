"""The routing alignment the kernels read (docs/contracts.md, AlignResult): pairs p = t*K + k stably
sorted by expert, each expert's rows padded to a multiple of block_m with the sentinel T*K,
`block_expert` -1 past num_padded.
"""
import torch

from .._native import NativeExtensionMissing
from ..routing_torch import AlignResult, align_torch


def routing_metadata(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignResult:
    """tpmoe.routing.align (the native op, CPU and CUDA); its PyTorch twin where the extension is
    not built (TPMOE_SKIP_NATIVE=1), so the Triton path never depends on the C++ build."""
    from ..routing import align as native_align
    try:
        return native_align(topk_ids, num_experts, block_m)
    except NativeExtensionMissing:
        return align_torch(topk_ids, num_experts, block_m)
