"""Random expert-shard inputs shared by the tests of every fused_experts backend."""
import math

import torch


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
