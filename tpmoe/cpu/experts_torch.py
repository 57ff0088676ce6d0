"""The plain-PyTorch twin of the native CPU experts: what tpmoe.fused_experts(backend="cpu")
runs where tpmoe._C is not built (or TPMOE_SKIP_NATIVE=1), correct and slower; and, for now,
the CPU path of quantized expert weights (tpmoe.fp8, tpmoe.mxfp4) that need gradients or have
no native op, dequantized one expert at a time.

One PyTorch GEMM pair per expert under PyTorch's autograd; the rows are grouped by
tpmoe.routing_torch.align_torch, as the native `align` is missing too.
"""
import torch

from ..activations import expert_activation
from ..config import ExpertSpec
from ..routing_torch import align_torch
from ..quantized import dequantize_experts
from ..weights import ExpertWeights


def grouped_experts_torch(hidden_states, w_gate_up, w_down, topk_ids, topk_weights, *, activation, layout,
                          gated, b_gate_up, b_down, alpha, limit):
    """experts_torch with tpmoe.fused_experts' keywords."""
    return experts_torch(hidden_states, ExpertWeights(w_gate_up, w_down, b_gate_up, b_down), topk_ids, topk_weights,
                         ExpertSpec(activation, layout, gated, alpha, limit))


def experts_torch(hidden_states, weights, topk_ids, topk_weights, spec):
    """y[t] = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(hidden_states[t]), as tpmoe.routed_experts."""
    b_gate_up, b_down = weights.b_gate_up, weights.b_down
    layout = spec.layout
    num_tokens, hidden_size = hidden_states.shape
    top_k = topk_ids.shape[1]
    num_experts = weights.w_gate_up.shape[0]
    transposed = layout == "gpt_oss"  # GPT-OSS stores x @ W, the others x @ W^T

    routing = align_torch(topk_ids, num_experts)
    pair_ids = routing.sorted_pair_ids.long()
    rows_per_expert = routing.tokens_per_expert.tolist()
    x_sorted = hidden_states.index_select(0, pair_ids // top_k)

    expert_outputs = []
    start = 0
    for expert, rows in enumerate(rows_per_expert):
        if rows == 0:
            continue
        x_rows = x_sorted[start:start + rows]
        start += rows
        w_gu, w_d = _expert_matrices(weights, expert, spec, hidden_states.dtype)
        gate_up = x_rows @ (w_gu if transposed else w_gu.t())
        if b_gate_up is not None:
            gate_up = gate_up + b_gate_up[expert]
        h = expert_activation(gate_up, **spec.keywords())
        out = h @ (w_d if transposed else w_d.t())
        if b_down is not None:
            out = out + b_down[expert]
        expert_outputs.append(out)

    out_sorted = torch.cat(expert_outputs) if expert_outputs else hidden_states.new_zeros(0, hidden_size)
    # Weighting in the routing weights' precision (float32 for half inputs) and summing over k
    # before the single cast back keeps one rounding per output element.
    combine_dtype = torch.promote_types(out_sorted.dtype, topk_weights.dtype)
    weight_sorted = topk_weights.reshape(-1).index_select(0, pair_ids).to(combine_dtype)
    weighted = out_sorted.to(combine_dtype) * weight_sorted[:, None]
    per_pair = weighted.new_zeros(num_tokens * top_k, hidden_size).index_copy(0, pair_ids, weighted)
    return per_pair.view(num_tokens, top_k, hidden_size).sum(dim=1).to(hidden_states.dtype)


def _expert_matrices(weights, expert, spec, dtype):
    """(gate_up, down) of one expert in `dtype`: views of dense weights; quantized ones
    dequantized, one expert at a time (tpmoe.quantized)."""
    if weights.format != "dense":
        dense = dequantize_experts(weights, spec, dtype, experts=(expert, 1))
        return dense.w_gate_up[0], dense.w_down[0]
    return weights.w_gate_up[expert], weights.w_down[expert]
