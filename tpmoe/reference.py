"""The oracle: a loop-style, plain PyTorch MoE block that every fast path is checked against.

It is written to be read, not to be fast: a Python loop picks each token's experts, a loop
over experts runs each expert on the tokens routed to it, and every activation is spelled
out as its formula. It shares no code with tpmoe.routing or the kernels it checks. It runs
in float64 and under autograd: the input and every trained weight get gradients (the
top-k ids are fixed by the forward pass; gradients flow through the routing weights).

Math and layouts: docs/design.md section 1 and tpmoe/weights.py.
"""
import math
from typing import Dict, Optional, Tuple

import torch

from .config import ACTIVATIONS, GATED_ONLY_ACTIVATIONS, LAYOUTS, SCORINGS, MoEConfig
from .weights import check_moe_weights

# DeepSeek-V3 adds this to the sum of the kept sigmoid scores before dividing (HF does too),
# so a row whose scores all underflow gives zeros rather than NaN.
SIGMOID_RENORMALIZE_EPS = 1e-20


# --------------------------------------------------------------------------- activations

def _sigmoid(x: torch.Tensor) -> torch.Tensor:
    # torch.sigmoid rather than 1 / (1 + exp(-x)): exp(-x) overflows for x << 0 and its
    # gradient then turns into NaN, which an oracle must not do.
    return torch.sigmoid(x)


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    """The non-gated activations, each written as its formula."""
    if name == "silu":
        return x * _sigmoid(x)
    if name == "gelu":  # exact (erf) GELU
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    if name == "relu":
        # As torch.relu: gradient 0 at x == 0, relu(-inf) = 0, NaN passes through.
        return torch.where(x <= 0, torch.zeros_like(x), x)
    if name == "relu2":  # transformers' ReLUSquaredActivation (Nemotron-H experts, non-gated)
        relu = torch.where(x <= 0, torch.zeros_like(x), x)
        return relu * relu
    if name in GATED_ONLY_ACTIVATIONS:
        raise ValueError(f"activation: {name} is gated; it needs gated=True")
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def _softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(x / cap)


def gated_activation(name: str, gate: torch.Tensor, up: torch.Tensor, alpha: float = 1.702,
                     limit: float = 7.0) -> torch.Tensor:
    """h = act(gate) * up, or one of the gated-only activations (alpha and limit: tpmoe.MoEConfig)."""
    if name == "clamped_swiglu":
        # GPT-OSS: the gate is clamped from above only, the up from both sides; the +1 on up
        # is part of the formula (HF GptOssExperts._apply_gate).
        gate = torch.clamp(gate, max=limit)
        up = torch.clamp(up, min=-limit, max=limit)
        return (up + 1.0) * gate * _sigmoid(alpha * gate)
    if name == "clamped_silu":
        # GLM-5-Next, HY-V4, DeepSeek-V4: the same clamps before a plain silu(gate) * up.
        gate = torch.clamp(gate, max=limit)
        up = torch.clamp(up, min=-limit, max=limit)
        return gate * _sigmoid(gate) * up
    if name == "silu_clamped":
        # Bailing-Hybrid, Step-3.7: the clamp from above acts on silu(gate), not on the gate.
        gate_activation = torch.clamp(gate * _sigmoid(gate), max=limit)
        return gate_activation * torch.clamp(up, min=-limit, max=limit)
    if name == "softcapped_swiglu":
        # Inkling2: the softcaps (alpha on the gate, limit on the up) bound the linear factors;
        # the sigmoid sees the raw gate.
        return _softcap(gate, alpha) * _sigmoid(gate) * _softcap(up, limit)
    return _act(name, gate) * up


# --------------------------------------------------------------------------- routing

def _routing_dtype(logits: torch.Tensor) -> torch.dtype:
    # Weights come out in float64 for float64 logits, float32 otherwise (as tpmoe.routing).
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _descending(scores, candidates):
    """Candidates ordered by descending score; ties go to the lowest index."""
    return sorted(candidates, key=lambda index: (-scores[index], index))


def reference_route(router_logits: torch.Tensor, top_k: int, *, scoring: str = "softmax",
                    renormalize: bool = False, correction_bias: Optional[torch.Tensor] = None,
                    n_group: int = 1, topk_group: int = 1,
                    routed_scaling_factor: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights [T, K], topk_ids [T, K] int64).

    scoring="softmax": p = softmax(logits); pick the k largest p; weights = those p
        (divided by their sum if renormalize).  Mixtral, Qwen2/3-MoE, OLMoE.
    scoring="topk_softmax": pick the k largest logits; weights = softmax over those k.  GPT-OSS.
    scoring="sigmoid_group": s = sigmoid(logits), choice = s + correction_bias; experts are split
        into n_group consecutive groups, a group's score is the sum of its 2 largest choices (its
        only one for groups of one expert), the topk_group best groups are kept, and the k largest
        choices among their experts are picked; weights = s of those (divided by sum + 1e-20 if
        renormalize).  DeepSeek-V3.
    Every scoring multiplies the weights by routed_scaling_factor at the end.

    Ids of a row are ordered by descending selection score, ties to the lowest expert index.
    Weights are float64 for float64 logits and float32 otherwise; they are differentiable
    w.r.t. router_logits (the ids are fixed by this forward pass).
    """
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        got = tuple(router_logits.shape) if isinstance(router_logits, torch.Tensor) else type(router_logits).__name__
        raise ValueError(f"router_logits: expected a 2-D tensor [T, E], got {got}")
    if not router_logits.is_floating_point():
        raise ValueError(f"router_logits: expected a floating-point tensor, got {router_logits.dtype}")
    num_tokens, num_experts = router_logits.shape
    if scoring not in SCORINGS:
        raise ValueError(f"scoring: expected one of {SCORINGS}, got {scoring!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: expected an int in [1, {num_experts}] (E of router_logits), got {top_k!r}")
    if scoring != "sigmoid_group":
        if correction_bias is not None:
            raise ValueError(f"correction_bias: only used by scoring='sigmoid_group', got it with {scoring!r}")
        if n_group != 1 or topk_group != 1:
            raise ValueError(f"n_group/topk_group: only used by scoring='sigmoid_group', got "
                             f"n_group={n_group}, topk_group={topk_group} with {scoring!r}")
    else:
        if not isinstance(n_group, int) or n_group < 1 or num_experts % n_group != 0:
            raise ValueError(f"n_group: expected a positive divisor of E={num_experts}, got {n_group!r}")
        if not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group: expected an int in [1, n_group={n_group}], got {topk_group!r}")
        if top_k > topk_group * (num_experts // n_group):
            raise ValueError(f"top_k: expected <= topk_group * experts per group = "
                             f"{topk_group * (num_experts // n_group)}, got {top_k}")
        if correction_bias is not None and tuple(correction_bias.shape) != (num_experts,):
            raise ValueError(f"correction_bias: expected shape ({num_experts},), got {tuple(correction_bias.shape)}")

    logits = router_logits.to(_routing_dtype(router_logits))
    if scoring == "softmax":
        shifted = logits - logits.amax(dim=-1, keepdim=True).detach()
        selection = torch.exp(shifted) / torch.exp(shifted).sum(dim=-1, keepdim=True)
        gate_values = selection
    elif scoring == "topk_softmax":
        selection = logits
        gate_values = None  # the softmax runs over the k picked logits, below
    else:
        gate_values = _sigmoid(logits)
        selection = gate_values
        if correction_bias is not None:
            selection = gate_values + correction_bias.to(logits.dtype)

    selection_rows = selection.detach().cpu().tolist()
    topk_ids = []
    for row in selection_rows:
        candidates = range(num_experts)
        if scoring == "sigmoid_group":
            group_size = num_experts // n_group
            groups = [list(range(g * group_size, (g + 1) * group_size)) for g in range(n_group)]
            group_scores = [sum(row[e] for e in _descending(row, group)[:2]) for group in groups]
            kept_groups = _descending(group_scores, range(n_group))[:topk_group]
            candidates = [e for g in sorted(kept_groups) for e in groups[g]]
        topk_ids.append(_descending(row, candidates)[:top_k])
    topk_ids = torch.tensor(topk_ids, dtype=torch.int64, device=router_logits.device).reshape(num_tokens, top_k)

    if scoring == "topk_softmax":
        picked = logits.gather(1, topk_ids)
        shifted = picked - picked.amax(dim=-1, keepdim=True).detach()
        topk_weights = torch.exp(shifted) / torch.exp(shifted).sum(dim=-1, keepdim=True)
    else:
        topk_weights = gate_values.gather(1, topk_ids)
        if renormalize:
            denominator = topk_weights.sum(dim=-1, keepdim=True)
            if scoring == "sigmoid_group":
                denominator = denominator + SIGMOID_RENORMALIZE_EPS
            topk_weights = topk_weights / denominator
    return topk_weights * routed_scaling_factor, topk_ids


# --------------------------------------------------------------------------- experts

def _check_experts_args(hidden_states, w_gate_up, w_down, topk_ids, topk_weights, activation_name, layout,
                        gated, b_gate_up, b_down):
    if activation_name not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation_name!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if activation_name in GATED_ONLY_ACTIVATIONS and not gated:
        raise ValueError(f"gated: {activation_name} is a gated activation, got gated=False")
    if hidden_states.dim() != 2:
        raise ValueError(f"hidden_states: expected [T, H], got shape {tuple(hidden_states.shape)}")
    T, H = hidden_states.shape
    if w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(f"w_gate_up/w_down: expected 3-D tensors, got {tuple(w_gate_up.shape)} "
                         f"and {tuple(w_down.shape)}")
    E = w_gate_up.shape[0]
    if layout == "gpt_oss":
        R = w_gate_up.shape[2]
        expected_gate_up = (E, H, R)
    else:
        R = w_gate_up.shape[1]
        expected_gate_up = (E, R, H)
    if tuple(w_gate_up.shape) != expected_gate_up:
        raise ValueError(f"w_gate_up: expected shape {expected_gate_up} for layout={layout!r} and H={H}, "
                         f"got {tuple(w_gate_up.shape)}")
    if gated and R % 2 != 0:
        raise ValueError(f"w_gate_up: gated experts need an even gate_up size 2I, got {R}")
    I = R // 2 if gated else R
    expected_down = (E, I, H) if layout == "gpt_oss" else (E, H, I)
    if tuple(w_down.shape) != expected_down:
        raise ValueError(f"w_down: expected shape {expected_down} for layout={layout!r}, got {tuple(w_down.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids: expected [T={T}, K], got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids: expected int32 or int64, got {topk_ids.dtype}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights: expected shape {tuple(topk_ids.shape)} (as topk_ids), "
                         f"got {tuple(topk_weights.shape)}")
    if topk_ids.numel() > 0 and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= E):
        raise ValueError(f"topk_ids: expected expert ids in [0, {E}), got values in "
                         f"[{int(topk_ids.min())}, {int(topk_ids.max())}]")
    if b_gate_up is not None and tuple(b_gate_up.shape) != (E, R):
        raise ValueError(f"b_gate_up: expected shape {(E, R)}, got {tuple(b_gate_up.shape)}")
    if b_down is not None and tuple(b_down.shape) != (E, H):
        raise ValueError(f"b_down: expected shape {(E, H)}, got {tuple(b_down.shape)}")
    return E, I


def reference_experts(hidden_states: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                      topk_ids: torch.Tensor, topk_weights: torch.Tensor, *, activation: str = "silu",
                      layout: str = "concatenated", gated: bool = True,
                      b_gate_up: Optional[torch.Tensor] = None, b_down: Optional[torch.Tensor] = None,
                      alpha: float = 1.702, limit: float = 7.0, weights_on_input: bool = False) -> torch.Tensor:
    """y_t = sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x_t), one expert at a time; with
    weights_on_input, y_t = sum_k expert_{topk_ids[t, k]}(topk_weights[t, k] * x_t) (Llama-4).

    hidden_states [T, H]; w_gate_up / w_down as in tpmoe.weights for `layout`; topk_ids and
    topk_weights [T, K]. Returns [T, H] in the dtype of hidden_states.
    """
    activation_name = activation
    E, I = _check_experts_args(hidden_states, w_gate_up, w_down, topk_ids, topk_weights, activation_name,
                               layout, gated, b_gate_up, b_down)
    accumulate_dtype = torch.promote_types(hidden_states.dtype, topk_weights.dtype)
    output = torch.zeros(hidden_states.shape, dtype=accumulate_dtype, device=hidden_states.device)
    for expert in range(E):
        token_index, slot_index = torch.nonzero(topk_ids == expert, as_tuple=True)
        if token_index.numel() == 0:
            continue
        weight = topk_weights[token_index, slot_index].unsqueeze(-1)
        x = hidden_states[token_index]
        if weights_on_input:
            x = x * weight.to(x.dtype)
            weight = torch.ones_like(weight)
        if layout == "gpt_oss":
            gate_up = x @ w_gate_up[expert]
        else:
            gate_up = x @ w_gate_up[expert].t()
        if b_gate_up is not None:
            gate_up = gate_up + b_gate_up[expert]
        if not gated:
            h = _act(activation_name, gate_up)
        else:
            if layout == "concatenated":
                gate, up = gate_up[:, :I], gate_up[:, I:]
            else:  # interleaved and gpt_oss: gate at even columns, up at odd ones
                gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
            h = gated_activation(activation_name, gate, up, alpha, limit)
        if layout == "gpt_oss":
            expert_out = h @ w_down[expert]
        else:
            expert_out = h @ w_down[expert].t()
        if b_down is not None:
            expert_out = expert_out + b_down[expert]
        output = output.index_add(0, token_index, (weight * expert_out).to(accumulate_dtype))
    return output.to(hidden_states.dtype)


# --------------------------------------------------------------------------- block

def reference_shared_expert(hidden_states: torch.Tensor, weights: Dict[str, torch.Tensor],
                            config: MoEConfig) -> torch.Tensor:
    """The shared expert (concatenated gate/up, no bias) times sigmoid(x W_sg^T) if gated."""
    gate_up = hidden_states @ weights["shared_gate_up"].t()
    if config.gated:
        shared_size = config.shared_intermediate_size
        h = gated_activation(config.activation, gate_up[:, :shared_size], gate_up[:, shared_size:],
                             config.swiglu_alpha, config.swiglu_limit)
    else:
        h = _act(config.activation, gate_up)
    out = h @ weights["shared_down"].t()
    if config.shared_expert_gate:
        out = _sigmoid(hidden_states @ weights["shared_gate"].t()) * out
    return out


def reference_router_logits(hidden_states: torch.Tensor, weights: Dict[str, torch.Tensor],
                            config: MoEConfig) -> torch.Tensor:
    """logits = x W_r^T (+ b_r), computed in config.router_dtype (default: the input's dtype)."""
    router_dtype = config.router_dtype or hidden_states.dtype
    logits = hidden_states.to(router_dtype) @ weights["router_weight"].to(router_dtype).t()
    if config.router_bias:
        logits = logits + weights["router_bias"].to(router_dtype)
    return logits


def reference_moe_block(hidden_states: torch.Tensor, weights: Dict[str, torch.Tensor],
                        config: MoEConfig) -> torch.Tensor:
    """The whole block: router -> top-k -> routed experts (+ shared expert). [..., H] -> [..., H]."""
    if not isinstance(config, MoEConfig):
        raise TypeError(f"config: expected a tpmoe.MoEConfig, got {type(config).__name__}")
    check_moe_weights(config, weights)
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 1 \
            or hidden_states.shape[-1] != config.hidden_size:
        got = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
        raise ValueError(f"hidden_states: expected shape [..., {config.hidden_size}] (config.hidden_size), got {got}")
    leading_shape = hidden_states.shape[:-1]
    x = hidden_states.reshape(-1, config.hidden_size)

    logits = reference_router_logits(x, weights, config)
    topk_weights, topk_ids = reference_route(
        logits, config.top_k, scoring=config.scoring, renormalize=config.renormalize,
        correction_bias=weights.get("correction_bias"),
        n_group=config.n_group if config.scoring == "sigmoid_group" else 1,
        topk_group=config.topk_group if config.scoring == "sigmoid_group" else 1,
        routed_scaling_factor=config.routed_scaling_factor)
    y = reference_experts(x, weights["w_gate_up"], weights["w_down"], topk_ids, topk_weights,
                          activation=config.activation, layout=config.layout, gated=config.gated,
                          b_gate_up=weights.get("b_gate_up"), b_down=weights.get("b_down"),
                          alpha=config.swiglu_alpha, limit=config.swiglu_limit,
                          weights_on_input=config.weights_on_input)
    if config.shared_intermediate_size > 0:
        y = y + reference_shared_expert(x, weights, config)
    return y.reshape(*leading_shape, config.hidden_size)
