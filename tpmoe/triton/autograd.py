"""The autograd.Function joining the Triton launches, and the functional entry point.

Saved for backward: x, the weights and biases, topk_weights, h [S, I_p] and the routing
alignment. Recomputed: the gate/up pre-activation (inside backward_dh; see its docstring).

Forward:   align -> gate_up (h, saved) -> grouped_scatter with W_down (·w, +b_down; SPLIT partials
           per pair) -> combine (sum over splits and k, fixed order, in the output dtype): with
           route, five launches and no torch op between them
Backward:  backward_dh (dh, activation backward with gate/up recomputed, d topk_weights)
           -> grouped_scatter with W_gate_up (dx per pair) -> combine
           -> backward_dw twice (dW_gate_up + db_gate_up, dW_down + db_down)
"""
from typing import Optional

import torch

from . import ops
from ..config import ExpertSpec
from ..weights import ExpertWeights
from .layouts import down_axes, gate_up_axes
from ..routing import align  # the alignment the kernels read: docs/contracts.md, AlignResult
from .tile_configs import block_m_for, fp8_activation_config, launch_configs, quantized_config, token_bucket


def forward_launches(hidden_states, w_gate_up, w_down, topk_weights, b_gate_up, b_down, topk_ids, activation,
                     layout, gated, alpha, limit, intermediate_size, scales=None, fp8_activations=False):
    """(y, h, routing, configs): the forward's launches (align, gate_up, grouped_scatter, combine).
    scales: None for dense weights, else (gate_up scale, down scale, format, block size, block
    offset) of quantized ones, dequantized in the kernels' B-load (tpmoe.triton.dequant);
    fp8_activations (fp8_block): the fp8 x fp8 variant, x and h quantized per token and scale
    block in the kernels (tile_configs.fp8_activation_config)."""
    num_tokens, hidden_size = hidden_states.shape
    num_experts, top_k = w_gate_up.shape[0], topk_ids.shape[1]
    down_hidden_axis, down_inter_axis = down_axes(layout)
    routing = align(topk_ids, num_experts, block_m_for(token_bucket(num_tokens, top_k, num_experts)))
    # As plain int lists: what the custom ops take, and constants to torch.compile on ctx.
    chosen = launch_configs(num_tokens, top_k, num_experts, hidden_size, intermediate_size,
                            w_gate_up.shape[gate_up_axes(layout)[0]], hidden_states.element_size(),
                            device_capability(hidden_states.device))
    gate_up_scale, down_scale, *quantized = scales if scales is not None else (None, None)
    if scales is not None:  # the narrower tiles that dequantize without spills
        for launch in ("gate_up", "down"):
            chosen[launch] = quantized_config(launch, chosen[launch])
            if fp8_activations:
                chosen[launch] = fp8_activation_config(launch, chosen[launch], quantized[1])
    configs = {launch: ops.config_list(config) for launch, config in chosen.items()}

    h = ops.gate_up(hidden_states, w_gate_up, b_gate_up, routing.sorted_ids_padded, routing.block_expert, top_k,
                    activation, layout, gated, alpha, limit, configs["gate_up"], gate_up_scale, *quantized,
                    fp8_activations=fp8_activations)
    pair_out = ops.grouped_scatter(h, w_down, down_hidden_axis, down_inter_axis, b_down, topk_weights.contiguous(),
                                   routing.sorted_ids_padded, routing.block_expert, num_tokens * top_k,
                                   configs["down"], down_scale, *quantized,
                                   fp8_activations=fp8_activations)
    return ops.combine(pair_out, num_tokens, top_k, hidden_states.dtype), h, routing, configs


class FusedExpertsFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, hidden_states, w_gate_up, w_down, topk_weights, b_gate_up, b_down, topk_ids, activation,
                layout, gated, alpha, limit):
        output, h, routing, configs = forward_launches(
            hidden_states, w_gate_up, w_down, topk_weights, b_gate_up, b_down, topk_ids, activation, layout, gated,
            alpha, limit, w_down.shape[down_axes(layout)[1]])
        ctx.save_for_backward(hidden_states, w_gate_up, w_down, topk_weights, b_gate_up, b_down, h,
                              routing.sorted_ids_padded, routing.block_expert, routing.padded_offsets)
        ctx.options = (activation, layout, gated, alpha, limit, configs)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (hidden_states, w_gate_up, w_down, topk_weights, b_gate_up, b_down, h, sorted_ids_padded, block_expert,
         padded_offsets) = ctx.saved_tensors
        activation, layout, gated, alpha, limit, configs = ctx.options
        needs = ctx.needs_input_grad
        num_tokens = hidden_states.shape[0]
        top_k = topk_weights.shape[1]
        num_pairs = num_tokens * top_k
        gu_rows_axis, gu_hidden_axis = gate_up_axes(layout)
        down_hidden_axis, down_inter_axis = down_axes(layout)
        grad_output = grad_output.to(hidden_states.dtype).contiguous()
        topk_weights = topk_weights.contiguous()

        d_preact, d_topk_weights = ops.backward_dh(
            grad_output, hidden_states, w_gate_up, b_gate_up, w_down, b_down, topk_weights, h, sorted_ids_padded,
            block_expert, top_k, activation, layout, gated, alpha, limit, configs["backward_dh"])

        d_hidden = d_w_gate_up = d_w_down = d_b_gate_up = d_b_down = None
        if needs[0]:
            dx_pairs = ops.grouped_scatter(d_preact, w_gate_up, gu_hidden_axis, gu_rows_axis, None, None,
                                           sorted_ids_padded, block_expert, num_pairs, configs["dx"])
            d_hidden = ops.combine(dx_pairs, num_tokens, top_k, hidden_states.dtype)
        # d_preact's rows are 16-byte aligned (padded stride, backward_dh): both readers below
        # take its strides. Each backward_dw is one launch, plus one fixed-order sum of its fp32
        # partials when its config splits the rows (SPLIT > 1, tile_configs.backward_dw_split).
        if needs[1] or needs[4]:
            d_w_gate_up, d_b_gate_up = ops.backward_dw(
                d_preact, hidden_states, None, sorted_ids_padded, padded_offsets, w_gate_up, gu_rows_axis,
                gu_hidden_axis, num_pairs, top_k, False, True, b_gate_up is not None and needs[4],
                configs["backward_dw_gate_up"])
        if needs[2] or needs[5]:
            d_w_down, d_b_down = ops.backward_dw(
                grad_output, h, topk_weights, sorted_ids_padded, padded_offsets, w_down, down_hidden_axis,
                down_inter_axis, num_pairs, top_k, True, False, b_down is not None and needs[5],
                configs["backward_dw_down"])
        d_topk_weights = d_topk_weights.to(topk_weights.dtype) if needs[3] else None
        return (d_hidden, d_w_gate_up if needs[1] else None, d_w_down if needs[2] else None, d_topk_weights,
                d_b_gate_up if needs[4] else None, d_b_down if needs[5] else None,
                None, None, None, None, None, None)


def experts_triton(hidden_states: torch.Tensor, weights: ExpertWeights, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor, spec: ExpertSpec) -> torch.Tensor:
    """y [T, H] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden_states[t]), on the Triton kernels.

    Inputs are validated by tpmoe.routed_experts (shapes and layouts as in tpmoe.weights; hidden_states
    contiguous; ids in range). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (set before
    tpmoe.triton is imported). Differentiable in hidden_states, both weights, both biases and
    topk_weights.
    """
    w_gate_up, w_down, b_gate_up, b_down = weights.w_gate_up, weights.w_down, weights.b_gate_up, weights.b_down
    num_tokens, hidden_size = hidden_states.shape
    intermediate_size = w_down.shape[down_axes(spec.layout)[1]]
    if num_tokens == 0 or intermediate_size == 0:
        # Nothing for the kernels to do: y is the weighted down bias (zero without one).
        return _bias_only(hidden_states, topk_ids, topk_weights, b_down)
    return FusedExpertsFunction.apply(hidden_states, w_gate_up, w_down, topk_weights, b_gate_up, b_down, topk_ids,
                                      *spec.op_args())


def fused_experts_triton(hidden_states: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                         topk_ids: torch.Tensor, topk_weights: torch.Tensor, *, activation: str = "silu",
                         layout: str = "concatenated", gated: bool = True, b_gate_up: Optional[torch.Tensor] = None,
                         b_down: Optional[torch.Tensor] = None, alpha: float = 1.702,
                         limit: float = 7.0) -> torch.Tensor:
    """experts_triton with tpmoe.fused_experts' keywords (inputs validated as there)."""
    return experts_triton(hidden_states, ExpertWeights(w_gate_up, w_down, b_gate_up, b_down), topk_ids, topk_weights,
                          ExpertSpec(activation, layout, gated, alpha, limit))


def device_capability(device: torch.device) -> Optional[int]:
    """The device's compute capability as 10 * major + minor, which picks the tile tables (sm_80
    has its own where the sm_90 configs spill: tile_configs); None on CPU (the interpreter), which
    takes the sm_90 tables. get_device_properties is a cached host query (no sync), and
    torch.compile folds it to a constant."""
    if device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(device)
    return 10 * properties.major + properties.minor


def _bias_only(hidden_states, topk_ids, topk_weights, b_down):
    if b_down is None:
        return hidden_states.new_zeros(hidden_states.shape)
    weighted = topk_weights.unsqueeze(-1) * b_down[topk_ids]
    return weighted.sum(dim=1).to(hidden_states.dtype)
