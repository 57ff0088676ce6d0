"""A MoEBlock's routed experts held quantized (tpmoe.fp8's "fp8_block", tpmoe.mxfp4's "mxfp4"):
this rank's slice of them, frozen, as MoEBlock.load_quantized_experts_ puts them in place of the
dense w_gate_up / w_down.

The stored tensors are kept as integer views (fp8 values as uint8, float32 scales as int32) so
that a dtype cast of the block (`block.to(torch.bfloat16)`, FSDP2's mixed precision) moves them
but never converts them; they are viewed back, free, when the experts run. They are buffers
outside the state dict (persistent=False): a quantized checkpoint is loaded whole through
load_quantized_experts_, and tpmoe's own checkpoints hold the trained parameters around them.
"""
import torch
from torch import nn

from .fp8 import FP8_DTYPE, BlockScales
from .weights import FP8_FORMAT, ExpertWeights


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """An integer view of a stored tensor: no dtype cast of a module converts it."""
    if tensor.dtype == FP8_DTYPE:
        return tensor.view(torch.uint8)
    if tensor.dtype == torch.float32:
        return tensor.view(torch.int32)
    return tensor


def dense_expert_placeholders(shapes, dtype: torch.dtype, device) -> dict:
    """Zero-stride stand-ins (no memory of their own) for a block's dense w_gate_up / w_down of
    these shapes, where its experts are quantized: they meet the placement's shape and agreement
    checks and are never copied (MoEBlock._place with `quantized`)."""
    return {name: torch.zeros((), dtype=dtype, device=device).expand(shapes[name]) for name in ("w_gate_up", "w_down")}


class QuantizedExperts(nn.Module):
    """One rank's slice of quantized routed experts: what tpmoe.routed_experts takes, without the
    biases (they stay the block's trained parameters)."""

    def __init__(self, local: ExpertWeights):
        super().__init__()
        self.format = local.format
        self.block_size, self.block_offset = local.scales.block_size, local.scales.block_offset
        for name, tensor in (("w_gate_up", local.w_gate_up), ("w_down", local.w_down),
                             ("gate_up_scale", local.scales.gate_up), ("down_scale", local.scales.down)):
            self.register_buffer(name, _stored(tensor.detach()), persistent=False)

    def weights(self, b_gate_up=None) -> ExpertWeights:
        fp8 = self.format == FP8_FORMAT
        values = (self.w_gate_up.view(FP8_DTYPE), self.w_down.view(FP8_DTYPE)) if fp8 else (self.w_gate_up,
                                                                                              self.w_down)
        scales = (self.gate_up_scale.view(torch.float32), self.down_scale.view(torch.float32)) if fp8 else (
            self.gate_up_scale, self.down_scale)
        return ExpertWeights(*values, b_gate_up, None, self.format,
                             BlockScales(*scales, self.block_size, self.block_offset))

    def extra_repr(self) -> str:
        return f"format={self.format}, block={self.block_size}, offset={self.block_offset}"
