"""Random expert-shard inputs and the cases shared by the tests of every fused_experts backend."""
import math

import torch

from tpmoe.config import GATED_ONLY_ACTIVATIONS

GRAD_NAMES = ("hidden_states", "w_gate_up", "w_down", "topk_weights", "b_gate_up", "b_down")

# (T, H, I_p, E, K, layout, gated, activation, bias, routing mode): every layout, activation
# and routing mode; an expert with no tokens ("skip_last"), every token on expert 0
# ("one_expert"), one token, K = 1 and K = E, H and I_p that are no multiple of a block.
CASES = [
    (37, 24, 40, 7, 2, "concatenated", True, "silu", False, "skip_last"),
    (37, 48, 40, 7, 2, "concatenated", True, "silu", False, "skip_last"),
    (1, 16, 12, 5, 3, "concatenated", True, "gelu", True, "random"),
    (1, 24, 12, 5, 3, "concatenated", True, "gelu", True, "random"),
    (13, 20, 9, 6, 2, "interleaved", True, "gelu_tanh", True, "one_expert"),
    (13, 40, 9, 6, 2, "interleaved", True, "gelu_tanh", True, "one_expert"),
    (11, 24, 10, 4, 2, "gpt_oss", True, "clamped_swiglu", True, "random"),
    (17, 16, 8, 5, 5, "concatenated", False, "relu", True, "random"),
    (9, 12, 7, 3, 1, "interleaved", True, "relu", False, "random"),
    (9, 20, 7, 3, 1, "interleaved", True, "relu", False, "random"),
    (8, 16, 6, 4, 2, "gpt_oss", False, "gelu", False, "skip_last"),
    (21, 33, 40, 4, 2, "interleaved", True, "silu", True, "one_expert"),
    (15, 36, 24, 5, 2, "gpt_oss", True, "silu", False, "random"),
    (12, 28, 16, 3, 2, "concatenated", True, "clamped_swiglu", False, "skip_last"),
    (10, 24, 12, 4, 2, "interleaved", False, "gelu_tanh", True, "random"),
    (19, 20, 14, 6, 3, "gpt_oss", True, "gelu", True, "random"),
    (12, 20, 11, 4, 2, "interleaved", True, "clamped_swiglu", True, "random"),
    (11, 20, 10, 4, 2, "interleaved", True, "clamped_swiglu", True, "random"),
    (15, 24, 10, 5, 2, "concatenated", True, "clamped_silu", True, "skip_last"),
    (11, 24, 10, 4, 2, "concatenated", True, "clamped_silu", True, "random"),
    (13, 20, 9, 4, 3, "gpt_oss", True, "clamped_silu", False, "random"),
    (11, 16, 12, 4, 2, "interleaved", True, "silu_clamped", True, "one_expert"),
    (13, 20, 9, 3, 2, "interleaved", True, "silu_clamped", False, "one_expert"),
    (10, 16, 8, 3, 2, "concatenated", True, "softcapped_swiglu", False, "random"),
    (14, 20, 10, 4, 2, "gpt_oss", True, "softcapped_swiglu", True, "random"),
    (9, 24, 12, 4, 2, "gpt_oss", True, "softcapped_swiglu", True, "skip_last"),
    (16, 12, 8, 4, 2, "interleaved", False, "relu2", True, "random"),
    (10, 16, 8, 4, 2, "gpt_oss", False, "relu2", True, "random"),
]

def case_id(case):
    return "-".join(map(str, case))


def make_routing(num_tokens, num_experts, top_k, *, mode="random", generator=None):
    """topk_ids [T, K] (distinct experts per token) and positive topk_weights [T, K] (float32).

    mode: "random"; "skip_last" (expert E-1 never chosen: an expert with no tokens);
    "one_expert" (every token's first choice is expert 0, so expert 0 holds all T tokens).
    """
    scores = torch.rand(num_tokens, num_experts, generator=generator)
    if mode == "skip_last":
        scores[:, -1] = -1.0
    elif mode == "one_expert":
        scores[:, 0] = 2.0
    elif mode != "random":
        raise ValueError(mode)
    topk_ids = scores.topk(top_k, dim=1).indices
    topk_weights = torch.rand(num_tokens, top_k, generator=generator) + 0.1
    return topk_ids, topk_weights


def make_expert_weights(num_experts, hidden_size, intermediate_local, *, layout="concatenated", gated=True,
                        bias=False, generator=None):
    rows = (2 if gated else 1) * intermediate_local
    w_gate_up = torch.randn(num_experts, rows, hidden_size, generator=generator, dtype=torch.float64)
    w_gate_up /= math.sqrt(hidden_size)
    w_down = torch.randn(num_experts, hidden_size, intermediate_local, generator=generator, dtype=torch.float64)
    w_down /= math.sqrt(max(intermediate_local, 1))
    if layout == "gpt_oss":
        w_gate_up = w_gate_up.transpose(1, 2).contiguous()
        w_down = w_down.transpose(1, 2).contiguous()
    weights = {"w_gate_up": w_gate_up, "w_down": w_down}
    if bias:
        weights["b_gate_up"] = torch.randn(num_experts, rows, generator=generator, dtype=torch.float64) / 4
        weights["b_down"] = torch.randn(num_experts, hidden_size, generator=generator, dtype=torch.float64) / 4
    return weights


def make_inputs(seed, num_tokens, hidden, inter, experts, top_k, *, layout, gated, bias, mode="random", scale=1.0):
    """(inputs, grad_out): float64 hidden_states [T, H] (times scale), the expert weights (and
    biases), topk_ids, topk_weights; and an output gradient [T, H]."""
    generator = torch.Generator().manual_seed(seed)
    topk_ids, topk_weights = make_routing(num_tokens, experts, top_k, mode=mode, generator=generator)
    inputs = make_expert_weights(experts, hidden, inter, layout=layout, gated=gated, bias=bias, generator=generator)
    inputs["hidden_states"] = torch.randn(num_tokens, hidden, generator=generator, dtype=torch.float64) * scale
    inputs["topk_ids"] = topk_ids
    inputs["topk_weights"] = topk_weights.double()
    grad_out = torch.randn(num_tokens, hidden, generator=generator, dtype=torch.float64)
    return inputs, grad_out


def input_scale(activation, gated_only_scale=20.0):
    """The gated-only activations get large inputs, which push pre-activations past the clamps
    on both branches and deep into the softcaps' saturation."""
    return gated_only_scale if activation in GATED_ONLY_ACTIVATIONS else 1.0


def case_inputs(case, seed):
    """make_inputs of a case (T, H, I_p, E, K, layout, gated, activation, bias, routing mode)."""
    num_tokens, hidden, inter, experts, top_k, layout, gated, activation, bias, mode = case
    return make_inputs(seed, num_tokens, hidden, inter, experts, top_k, layout=layout, gated=gated, bias=bias,
                       mode=mode, scale=input_scale(activation))


def case_options(case):
    _, _, _, _, _, layout, gated, activation, _, _ = case
    return options_for(activation, layout, gated)


def options_for(activation, layout, gated):
    return dict(activation=activation, layout=layout, gated=gated, alpha=1.702, limit=7.0)


def cast(inputs, dtype, device="cpu"):
    """inputs at dtype (None: their own) on device; the routing weights stay float32 at half
    precision, as tpmoe.route returns them, and topk_ids keep their dtype."""
    weight_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return {name: value.to(device) if name == "topk_ids" or dtype is None else
            value.to(device=device, dtype=weight_dtype if name == "topk_weights" else dtype)
            for name, value in inputs.items()}


def run_with_grads(fn, inputs, options, grad_out, dtype=None, device="cpu"):
    """fn's output and the gradient of each float input, run at dtype (None: that of the inputs)
    on device, back on the CPU."""
    leaves = {name: value.detach().clone().requires_grad_(True) for name, value in cast(inputs, dtype, device).items()
              if name != "topk_ids"}
    out = fn(leaves["hidden_states"], leaves["w_gate_up"], leaves["w_down"], inputs["topk_ids"].to(device),
             leaves["topk_weights"], b_gate_up=leaves.get("b_gate_up"), b_down=leaves.get("b_down"), **options)
    out.backward(grad_out.to(device=device, dtype=out.dtype))
    grads = {name: leaves[name].grad for name in GRAD_NAMES if name in leaves}
    return out.detach().cpu(), {name: None if grad is None else grad.cpu() for name, grad in grads.items()}
