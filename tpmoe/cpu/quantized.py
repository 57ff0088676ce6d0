"""The CPU path of quantized experts (tpmoe.fp8's "fp8_block", tpmoe.mxfp4's "mxfp4"): the
native op tpmoe::experts_cpu_quantized_forward (csrc/experts_cpu_quantized.cpp), which
dequantizes the weights where they are used (in registers at decode, a few rows at a time at
prefill) and so reads the stored bytes at their own size.

The op is forward only: quantized weights are frozen, and where a gradient is wanted (for the
input, the routing weights or the biases: the rest of a model training around frozen quantized
experts) the call runs the plain-PyTorch path instead (tpmoe.cpu.experts_torch, one expert
dequantized at a time under autograd).
"""

import torch

from ..quantized import quantized_call_needs_grad
from ..routing import align
from .experts_torch import experts_torch
from .ops import cpu_ops


def experts_cpu_quantized(hidden_states, weights, topk_ids, topk_weights, spec):
    """tpmoe.routed_experts on quantized weights (inputs validated by it)."""
    if quantized_call_needs_grad(hidden_states, weights, topk_weights) or hidden_states.shape[0] == 0 or weights.w_gate_up.shape[1] == 0:
        return experts_torch(hidden_states, weights, topk_ids, topk_weights, spec)
    routing = align(topk_ids, weights.w_gate_up.shape[0])
    scales = weights.scales

    def float32(tensor):
        return None if tensor is None else tensor.float().contiguous()
    output = cpu_ops().experts_cpu_quantized_forward(
        float32(hidden_states), weights.w_gate_up.contiguous(), weights.w_down.contiguous(),
        scales.gate_up.contiguous(), scales.down.contiguous(), weights.format, scales.block_size, scales.block_offset,
        routing.sorted_pair_ids.long(), routing.expert_offsets.long(), float32(topk_weights),
        float32(weights.b_gate_up), float32(weights.b_down), *spec.op_args(),
        hidden_states.dtype == torch.bfloat16)  # a bf16 model's intermediate is bf16, as in PyTorch
    return output.to(hidden_states.dtype)
