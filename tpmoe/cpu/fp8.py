"""The CPU path of block-scaled fp8 experts (tpmoe.fp8, format "fp8_block"): the native op
tpmoe::experts_cpu_fp8_forward (csrc/experts_cpu_fp8.cpp), which dequantizes one weight row at a
time right before its products and so reads the fp8 bytes at their own size.

The op is forward only: the fp8 weights are frozen, and where a gradient is wanted (for the
input, the routing weights or the biases: the rest of a model training around frozen quantized
experts) the call runs the plain-PyTorch path instead (tpmoe.cpu.experts_torch, one expert
dequantized at a time under autograd).
"""
import torch

from ..routing import align
from .experts_torch import experts_torch
from .ops import cpu_ops


def experts_cpu_fp8(hidden_states, weights, topk_ids, topk_weights, spec):
    """tpmoe.routed_experts on "fp8_block" weights (inputs validated by it)."""
    needs_grad = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad
        for tensor in (hidden_states, topk_weights, weights.b_gate_up, weights.b_down))
    num_tokens = hidden_states.shape[0]
    if needs_grad or num_tokens == 0 or weights.w_down.shape[2] == 0:
        return experts_torch(hidden_states, weights, topk_ids, topk_weights, spec)
    routing = align(topk_ids, weights.w_gate_up.shape[0])
    scales = weights.scales

    def float32(tensor):
        return None if tensor is None else tensor.float().contiguous()
    output = cpu_ops().experts_cpu_fp8_forward(
        float32(hidden_states), weights.w_gate_up.contiguous(), weights.w_down.contiguous(),
        scales.gate_up.contiguous(), scales.down.contiguous(), scales.block_size, scales.block_offset,
        routing.sorted_pair_ids.long(), routing.expert_offsets.long(), float32(topk_weights),
        float32(weights.b_gate_up), float32(weights.b_down), *spec.op_args())
    return output.to(hidden_states.dtype)
