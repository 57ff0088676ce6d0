"""ExpertsCpuFunction: the native CPU ops (tpmoe.cpu.ops) behind autograd, and
`experts_cpu`, the native CPU path of tpmoe.routed_experts (`fused_experts_cpu`: its keywords' form)."""
import torch
from torch.autograd.function import once_differentiable

from ..config import ExpertSpec
from ..routing import align
from ..weights import ExpertWeights
from .ops import cpu_ops

THREADINGS = ("auto", "experts", "gemm")


class ExpertsCpuFunction(torch.autograd.Function):
    """y = sum_k w[t,k] expert_k(x_t) on CPU; gradients for x, both weights, topk_weights and
    both biases. Saves the raw gate_up GEMM output [T*K, R] (see experts_cpu_backward.cpp
    for what is recomputed instead)."""

    @staticmethod
    def forward(ctx, hidden_states, w_gate_up, w_down, topk_weights, b_gate_up, b_down, sorted_pair_ids,
                expert_offsets, activation, layout, gated, alpha, limit, threading):
        ops = cpu_ops()
        needs_grad = any(ctx.needs_input_grad[:6])
        output, gate_up_sorted = ops.experts_cpu_forward(
            hidden_states, w_gate_up, w_down, sorted_pair_ids, expert_offsets, topk_weights, b_gate_up, b_down,
            activation, layout, gated, alpha, limit, threading, needs_grad)
        if needs_grad:
            ctx.save_for_backward(hidden_states, w_gate_up, w_down, topk_weights, b_gate_up, b_down, sorted_pair_ids,
                                  expert_offsets, gate_up_sorted)
            ctx.options = (activation, layout, gated, alpha, limit, threading)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (hidden_states, w_gate_up, w_down, topk_weights, b_gate_up, b_down, sorted_pair_ids, expert_offsets,
         gate_up_sorted) = ctx.saved_tensors
        output_mask = [bool(flag) for flag in ctx.needs_input_grad[:6]]
        grads = cpu_ops().experts_cpu_backward(
            grad_output.contiguous(), hidden_states, w_gate_up, w_down, sorted_pair_ids, expert_offsets, topk_weights,
            b_gate_up, b_down, gate_up_sorted, *ctx.options, output_mask)
        grads = [grad if needed else None for grad, needed in zip(grads, output_mask)]
        return (*grads, None, None, None, None, None, None, None, None)


def experts_cpu(hidden_states, weights, topk_ids, topk_weights, spec, threading="auto"):
    """The native CPU path of tpmoe.routed_experts (inputs already validated by it): a
    tpmoe.weights.ExpertWeights and a tpmoe.ExpertSpec.

    threading: "auto", "experts" (threads split each expert's columns, for decode) or "gemm"
    (all threads inside each GEMM, for prefill); "auto" picks by rows per expert."""
    if threading not in THREADINGS:
        raise ValueError(f"threading: expected one of {THREADINGS}, got {threading!r}")
    routing = align(topk_ids, weights.w_gate_up.shape[0])
    return ExpertsCpuFunction.apply(hidden_states, weights.w_gate_up, weights.w_down, topk_weights, weights.b_gate_up,
                                    weights.b_down, routing.sorted_pair_ids, routing.expert_offsets, *spec.op_args(),
                                    threading)


def fused_experts_cpu(hidden_states, w_gate_up, w_down, topk_ids, topk_weights, *, activation, layout, gated,
                      b_gate_up, b_down, alpha, limit, threading="auto"):
    """experts_cpu with tpmoe.fused_experts' keywords (inputs already validated)."""
    return experts_cpu(hidden_states, ExpertWeights(w_gate_up, w_down, b_gate_up, b_down), topk_ids, topk_weights,
                       ExpertSpec(activation, layout, gated, alpha, limit), threading)
