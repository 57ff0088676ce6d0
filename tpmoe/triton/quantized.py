"""The Triton path of quantized experts (tpmoe.fp8's "fp8_block", tpmoe.mxfp4's "mxfp4"):
the forward kernels with the weights dequantized in their B-load (tpmoe.triton.dequant), so the
stored bytes are read at their own size and no dequantized copy of an expert is made.

Forward only: quantized weights are frozen. A call that needs a gradient (for the input, the
routing weights or the biases: a model training around frozen quantized experts) runs the
plain-PyTorch path instead, as the CPU backend does (tpmoe.cpu.quantized): tpmoe.cpu.experts_torch,
one expert dequantized at a time under autograd, on the tensors' own device.
"""
import torch

from ..config import ExpertSpec
from ..cpu.experts_torch import experts_torch
from ..weights import ExpertWeights
from .autograd import _bias_only, forward_launches


def experts_triton_quantized(hidden_states: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor,
                             topk_weights: torch.Tensor, spec: ExpertSpec) -> torch.Tensor:
    """tpmoe.routed_experts on quantized weights with backend "triton" (inputs validated by it)."""
    needs_grad = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad
        for tensor in (hidden_states, topk_weights, weights.b_gate_up, weights.b_down))
    if needs_grad:
        return experts_torch(hidden_states, weights, topk_ids, topk_weights, spec)
    rows = weights.w_gate_up.shape[1]
    intermediate_size = rows // 2 if spec.gated else rows
    if hidden_states.shape[0] == 0 or intermediate_size == 0:
        return _bias_only(hidden_states, topk_ids, topk_weights, weights.b_down)
    scales = weights.scales
    output, *_ = forward_launches(
        hidden_states, weights.w_gate_up, weights.w_down, topk_weights, weights.b_gate_up, weights.b_down, topk_ids,
        *spec.op_args(), intermediate_size,
        scales=(scales.gate_up, scales.down, weights.format, scales.block_size, scales.block_offset))
    return output
