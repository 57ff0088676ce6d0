"""tpmoe.reference checked against itself, hand-written formulas and brute-force loops.

(Its comparison with transformers' own modules is tests/hf/test_reference_hf.py.)
"""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from tpmoe.config import GATED_ONLY_ACTIVATIONS, MoEConfig
from tpmoe.reference import gated_activation, reference_experts, reference_moe_block, reference_route
from tpmoe.weights import random_moe_weights

F64 = torch.float64
TORCH_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda x: torch.square(F.relu(x)),  # transformers' ReLUSquaredActivation
}
UNARY_ACTIVATIONS = list(TORCH_ACTIVATIONS)


def _randn(*shape):
    return torch.randn(*shape, dtype=F64)


def _pack(layout, w_gate, w_up, b_gate, b_up, w_down):
    """The same logical expert weights (gate/up [E, I, H], biases [E, I], down [E, H, I]) packed
    the way `layout` stores them, built by hand here rather than by any tpmoe code."""
    E, I, H = w_gate.shape
    if layout == "concatenated":
        return torch.cat([w_gate, w_up], 1), torch.cat([b_gate, b_up], 1), w_down
    interleaved_w = torch.empty(E, 2 * I, H, dtype=F64)
    interleaved_b = torch.empty(E, 2 * I, dtype=F64)
    for i in range(I):
        interleaved_w[:, 2 * i], interleaved_w[:, 2 * i + 1] = w_gate[:, i], w_up[:, i]
        interleaved_b[:, 2 * i], interleaved_b[:, 2 * i + 1] = b_gate[:, i], b_up[:, i]
    if layout == "interleaved":
        return interleaved_w, interleaved_b, w_down
    return interleaved_w.transpose(1, 2).contiguous(), interleaved_b, w_down.transpose(1, 2).contiguous()


def _random_routing(T, E, K):
    topk_ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    return topk_ids, torch.rand(T, K, dtype=F64) + 0.1


def _token_loop_experts(x, w_gate, w_up, b_gate, b_up, w_down, b_down, topk_ids, topk_weights, act):
    """Per (token, k): the gated expert in its logical (unpacked) form, with F.* activations."""
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            h = act(w_gate[e] @ x[t] + b_gate[e]) * (w_up[e] @ x[t] + b_up[e])
            y[t] += topk_weights[t, k] * (w_down[e] @ h + b_down[e])
    return y


# --------------------------------------------------------------------------- experts

@pytest.mark.parametrize("activation", UNARY_ACTIVATIONS)
@pytest.mark.parametrize("T", [1, 13])
def test_layouts_agree_with_each_other_and_a_token_loop(activation, T, seed):
    E, K, H, I = 5, 2, 12, 7
    x = _randn(T, H)
    w_gate, w_up, w_down = _randn(E, I, H), _randn(E, I, H), _randn(E, H, I)
    b_gate, b_up, b_down = _randn(E, I), _randn(E, I), _randn(E, H)
    topk_ids, topk_weights = _random_routing(T, E, K)
    expected = _token_loop_experts(x, w_gate, w_up, b_gate, b_up, w_down, b_down, topk_ids, topk_weights,
                                   TORCH_ACTIVATIONS[activation])
    for layout in ("concatenated", "interleaved", "gpt_oss"):
        w_gate_up, b_gate_up, w_down_packed = _pack(layout, w_gate, w_up, b_gate, b_up, w_down)
        y = reference_experts(x, w_gate_up, w_down_packed, topk_ids, topk_weights, activation=activation,
                              layout=layout, b_gate_up=b_gate_up, b_down=b_down)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"{layout}: {m}")


def test_layouts_give_the_same_gradients(seed):
    E, K, T, H, I = 4, 2, 9, 10, 6
    logical = [_randn(E, I, H), _randn(E, I, H), _randn(E, I), _randn(E, I), _randn(E, H, I)]
    x, b_down = _randn(T, H), _randn(E, H)
    topk_ids, topk_weights = _random_routing(T, E, K)
    grad_y = _randn(T, H)
    grads = {}
    for layout in ("concatenated", "interleaved", "gpt_oss"):
        leaves = [t.clone().requires_grad_() for t in logical + [x, topk_weights]]
        w_gate_up, b_gate_up, w_down = _pack(layout, *leaves[:5])
        y = reference_experts(leaves[5], w_gate_up, w_down, topk_ids, leaves[6], activation="clamped_swiglu",
                              layout=layout, b_gate_up=b_gate_up, b_down=b_down, limit=1.0)
        (y * grad_y).sum().backward()
        grads[layout] = [leaf.grad for leaf in leaves]
    for layout in ("interleaved", "gpt_oss"):
        for index, (ours, concatenated) in enumerate(zip(grads[layout], grads["concatenated"])):
            torch.testing.assert_close(ours, concatenated, rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"{layout} gradient #{index}: {m}")


@pytest.mark.parametrize("layout", ["concatenated", "interleaved", "gpt_oss"])
@pytest.mark.parametrize("activation", UNARY_ACTIVATIONS)
def test_non_gated_matches_formula(activation, layout, seed):
    E, K, T, H, I = 4, 3, 7, 11, 5
    x = _randn(T, H)
    w_up, b_up, w_down, b_down = _randn(E, I, H), _randn(E, I), _randn(E, H, I), _randn(E, H)
    topk_ids, topk_weights = _random_routing(T, E, K)
    act = TORCH_ACTIVATIONS[activation]
    expected = torch.zeros(T, H, dtype=F64)
    for t in range(T):
        for k in range(K):
            e = int(topk_ids[t, k])
            expected[t] += topk_weights[t, k] * (w_down[e] @ act(w_up[e] @ x[t] + b_up[e]) + b_down[e])
    w_up_packed, w_down_packed = w_up, w_down
    if layout == "gpt_oss":
        w_up_packed, w_down_packed = w_up.transpose(1, 2), w_down.transpose(1, 2)
    y = reference_experts(x, w_up_packed, w_down_packed, topk_ids, topk_weights, activation=activation,
                          layout=layout, gated=False, b_gate_up=b_up, b_down=b_down)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", UNARY_ACTIVATIONS)
def test_gated_activation_matches_torch(activation, seed):
    gate, up = _randn(64) * 3, _randn(64)
    gate[0] = 0.0  # relu's kink: value 0, gradient 0 (as torch.relu)
    gate_ours, gate_torch = gate.clone().requires_grad_(), gate.clone().requires_grad_()
    ours = gated_activation(activation, gate_ours, up)
    theirs = TORCH_ACTIVATIONS[activation](gate_torch) * up
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-13)
    ours.sum().backward()
    theirs.sum().backward()
    torch.testing.assert_close(gate_ours.grad, gate_torch.grad, rtol=1e-12, atol=1e-12)


def test_clamped_swiglu_beyond_limit(seed):
    alpha, limit = 1.702, 7.0
    gate = torch.linspace(-3 * limit, 3 * limit, 61, dtype=F64)
    up = torch.linspace(3 * limit, -3 * limit, 61, dtype=F64)
    gate_leaf, up_leaf = gate.clone().requires_grad_(), up.clone().requires_grad_()
    h = gated_activation("clamped_swiglu", gate_leaf, up_leaf, alpha=alpha, limit=limit)
    for g, u, value in zip(gate.tolist(), up.tolist(), h.tolist()):
        g_clamped = min(g, limit)
        u_clamped = max(-limit, min(u, limit))
        expected = (u_clamped + 1.0) * g_clamped / (1.0 + math.exp(-alpha * g_clamped))
        assert value == pytest.approx(expected, rel=1e-13, abs=1e-13), (g, u)
    h.sum().backward()
    # Beyond the limits the clamped input is constant: no gradient flows to it there.
    assert torch.all(gate_leaf.grad[gate > limit] == 0)
    assert torch.all(up_leaf.grad[up.abs() > limit] == 0)
    assert torch.all(gate_leaf.grad[gate < limit] != 0)
    assert torch.all(up_leaf.grad[(up.abs() < limit) & (gate != 0)] != 0)
    # Below the limit the gate is not clamped from below: large negative gates still count.
    assert gate.min() < -limit and h[0].item() != 0


# The gated-only activations as transformers writes them (tensor code, torch autograd), and
# as scalar formulas with their derivatives written out by hand (math module, no autograd).
# alpha and limit are the tpmoe parameters (tpmoe.MoEConfig's table).
TRANSFORMERS_GATED = {
    # GLM-5-Next, HY-V4, DeepSeek-V4: gate.clamp(max=L); up.clamp(-L, L); silu(gate) * up
    "clamped_silu": lambda gate, up, alpha, limit: F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit),
    # Bailing-Hybrid, Step-3.7: act_fn(gate).clamp(max=L) * up.clamp(-L, L)
    "silu_clamped": lambda gate, up, alpha, limit: F.silu(gate).clamp(max=limit) * up.clamp(-limit, limit),
    # Inkling2SoftcappedSwiGLU: gate_softcap(gate) * sigmoid(gate) * up_softcap(up), softcap(z) = tanh(z / c) * c
    "softcapped_swiglu": lambda gate, up, alpha, limit: (torch.tanh(gate / alpha) * alpha * torch.sigmoid(gate)
                                                         * torch.tanh(up / limit) * limit),
}


def _scalar_sigmoid(x):
    # Either branch's exp stays <= 1: no OverflowError at x = -800.
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _scalar_gated(name, g, u, alpha, limit):
    """(h, dh/dg, dh/du) of one element; a clamp's derivative is 1 on its closed interval, else 0."""
    clamp_up = max(-limit, min(u, limit))
    up_passes = 1.0 if -limit <= u <= limit else 0.0
    if name == "clamped_silu":
        g_clamped = min(g, limit)
        s = _scalar_sigmoid(g_clamped)
        silu_grad = s * (1.0 + g_clamped * (1.0 - s))
        return (g_clamped * s * clamp_up, clamp_up * silu_grad * (1.0 if g <= limit else 0.0),
                g_clamped * s * up_passes)
    if name == "silu_clamped":
        s = _scalar_sigmoid(g)
        silu, silu_grad = g * s, s * (1.0 + g * (1.0 - s))
        return (min(silu, limit) * clamp_up, clamp_up * silu_grad * (1.0 if silu <= limit else 0.0),
                min(silu, limit) * up_passes)
    assert name == "softcapped_swiglu"
    s, tanh_g, tanh_u = _scalar_sigmoid(g), math.tanh(g / alpha), math.tanh(u / limit)
    capped_g, capped_u = alpha * tanh_g, limit * tanh_u
    d_gate = capped_u * ((1.0 - tanh_g ** 2) * s + capped_g * s * (1.0 - s))
    return capped_g * s * capped_u, d_gate, capped_g * s * (1.0 - tanh_u ** 2)


# (alpha, limit) per activation: a limit small enough that silu(gate) crosses it, softcaps
# (alpha = gate softcap, limit = up softcap) different from each other.
GATED_ONLY_PARAMETERS = {"clamped_silu": (1.702, 2.0), "silu_clamped": (1.702, 1.5),
                         "softcapped_swiglu": (3.0, 5.0)}


def _beyond_the_limits(alpha, limit):
    """gate and up over [-25 L, 25 L] (past every clamp and deep in the softcaps' saturation),
    plus -800 (sigmoid underflow) and the clamps' end points themselves."""
    extent = 25 * max(alpha, limit)
    gate = torch.cat([torch.linspace(-extent, extent, 101, dtype=F64),
                      torch.tensor([-800.0, limit, -limit, 0.0], dtype=F64)])
    up = torch.cat([torch.linspace(extent, -extent, 101, dtype=F64) * 0.9,
                    torch.tensor([-limit, limit, 800.0, -800.0], dtype=F64)])
    return gate, up


@pytest.mark.parametrize("activation", ["clamped_silu", "silu_clamped", "softcapped_swiglu"])
def test_gated_only_activation_matches_its_scalar_formula(activation, seed):
    alpha, limit = GATED_ONLY_PARAMETERS[activation]
    gate, up = _beyond_the_limits(alpha, limit)
    gate_leaf, up_leaf = gate.clone().requires_grad_(), up.clone().requires_grad_()
    h = gated_activation(activation, gate_leaf, up_leaf, alpha=alpha, limit=limit)
    grad_h = torch.linspace(0.5, 1.5, len(gate), dtype=F64)
    h.backward(grad_h)
    for index, (g, u, dh) in enumerate(zip(gate.tolist(), up.tolist(), grad_h.tolist())):
        value, d_gate, d_up = _scalar_gated(activation, g, u, alpha, limit)
        assert h[index].item() == pytest.approx(value, rel=1e-12, abs=1e-12), (g, u)
        assert gate_leaf.grad[index].item() == pytest.approx(dh * d_gate, rel=1e-12, abs=1e-12), (g, u)
        assert up_leaf.grad[index].item() == pytest.approx(dh * d_up, rel=1e-12, abs=1e-12), (g, u)
    if activation != "softcapped_swiglu":
        # The cases reach both sides of every clamp: gradients that are 0 and ones that are not.
        assert (gate_leaf.grad == 0).any() and (gate_leaf.grad != 0).any()
        assert (up_leaf.grad == 0).any() and (up_leaf.grad != 0).any()
    else:
        # The softcaps bound h by alpha * limit, however large the arguments.
        assert h.abs().max() <= alpha * limit and h.abs().max() > 0.9 * alpha * limit


@pytest.mark.parametrize("activation", ["clamped_silu", "silu_clamped", "softcapped_swiglu"])
def test_gated_only_activation_is_transformers_formula(activation, seed):
    alpha, limit = GATED_ONLY_PARAMETERS[activation]
    gate, up = _beyond_the_limits(alpha, limit)
    gate = torch.cat([gate, torch.randn(64, dtype=F64) * 2 * limit, torch.tensor([math.nan, 1.0, math.nan])])
    up = torch.cat([up, torch.randn(64, dtype=F64) * 2 * limit, torch.tensor([1.0, math.nan, math.nan])])
    grad_h = torch.randn(len(gate), dtype=F64)
    results = []
    for formula in (lambda g, u: gated_activation(activation, g, u, alpha=alpha, limit=limit),
                    lambda g, u: TRANSFORMERS_GATED[activation](g, u, alpha, limit)):
        gate_leaf, up_leaf = gate.clone().requires_grad_(), up.clone().requires_grad_()
        h = formula(gate_leaf, up_leaf)
        h.backward(grad_h)
        results.append((h.detach(), gate_leaf.grad, up_leaf.grad))
    ours, theirs = results
    assert ours[0][-3:].isnan().all(), "NaN in gate or up must pass through to h, as torch.clamp lets it"
    for name, mine, expected in zip(("h", "d_gate", "d_up"), ours, theirs):
        torch.testing.assert_close(mine, expected, rtol=1e-13, atol=1e-13, equal_nan=True, msg=lambda m: f"{name}: {m}")


def test_expert_with_no_tokens_and_all_on_one_expert(seed):
    E, K, T, H, I = 6, 2, 11, 8, 5
    x = _randn(T, H)
    w_gate_up, w_down = _randn(E, 2 * I, H).requires_grad_(), _randn(E, H, I).requires_grad_()
    # Every token's first choice is expert 2, the second is expert 4 or 5: experts 0, 1, 3 get none.
    topk_ids = torch.stack([torch.full((T,), 2), 4 + torch.arange(T) % 2], dim=1)
    topk_weights = torch.rand(T, K, dtype=F64)
    y = reference_experts(x, w_gate_up, w_down, topk_ids, topk_weights)
    y.sum().backward()
    for expert in (0, 1, 3):
        assert torch.all(w_gate_up.grad[expert] == 0) and torch.all(w_down.grad[expert] == 0)
    for expert in (2, 4, 5):
        assert w_gate_up.grad[expert].abs().sum() > 0 and w_down.grad[expert].abs().sum() > 0
    no_bias_gate_up, no_bias_down = torch.zeros(E, I, dtype=F64), torch.zeros(E, H, dtype=F64)
    expected = _token_loop_experts(x, w_gate_up[:, :I].detach(), w_gate_up[:, I:].detach(), no_bias_gate_up,
                                   no_bias_gate_up, w_down.detach(), no_bias_down, topk_ids, topk_weights, F.silu)
    torch.testing.assert_close(y.detach(), expected, rtol=1e-12, atol=1e-12)


def test_block_routes_all_tokens_to_one_expert(seed):
    config = MoEConfig(hidden_size=8, intermediate_size=5, num_experts=6, top_k=1)
    weights = random_moe_weights(config, dtype=F64)
    x = _randn(3, 5, 8)
    x[..., 0] = x[..., 0].abs() + 1.0
    # Make expert 3's logit win for every token: a large weight on a feature that is always > 0.
    weights["router_weight"][:, 0] = 0.0
    weights["router_weight"][3, 0] = 100.0
    y = reference_moe_block(x, weights, config)
    logits = x.reshape(-1, 8) @ weights["router_weight"].t()
    probability = torch.softmax(logits, dim=-1)[:, 3:4]
    assert torch.all(logits.argmax(-1) == 3)
    w_gate_up, w_down = weights["w_gate_up"][3], weights["w_down"][3]
    gate_up = x.reshape(-1, 8) @ w_gate_up.t()
    expected = probability * ((F.silu(gate_up[:, :5]) * gate_up[:, 5:]) @ w_down.t())
    torch.testing.assert_close(y.reshape(-1, 8), expected, rtol=1e-12, atol=1e-12)


def test_leading_dims_and_single_token(seed):
    config = MoEConfig(hidden_size=9, intermediate_size=4, num_experts=5, top_k=2, renormalize=True,
                       shared_intermediate_size=3, shared_expert_gate=True)
    weights = random_moe_weights(config, dtype=F64)
    x = _randn(2, 3, 9)
    y = reference_moe_block(x, weights, config)
    assert y.shape == (2, 3, 9)
    torch.testing.assert_close(y.reshape(6, 9), reference_moe_block(x.reshape(6, 9), weights, config),
                               rtol=0, atol=0)
    for t in range(6):  # one token at a time (T=1) gives the same rows
        torch.testing.assert_close(reference_moe_block(x.reshape(6, 9)[t:t + 1], weights, config),
                                   y.reshape(6, 9)[t:t + 1], rtol=1e-14, atol=1e-14)
    assert reference_moe_block(x[0, 0], weights, config).shape == (9,)


@pytest.mark.parametrize("shared_expert_gate", [False, True])
@pytest.mark.parametrize("gated", [True, False])
def test_shared_expert(shared_expert_gate, gated, seed):
    Is = 6
    config = MoEConfig(hidden_size=10, intermediate_size=4, num_experts=5, top_k=2, gated=gated,
                       activation="gelu", shared_intermediate_size=Is, shared_expert_gate=shared_expert_gate)
    weights = random_moe_weights(config, dtype=F64)
    x = _randn(7, 10)
    routed_only = dataclasses.replace(config, shared_intermediate_size=0, shared_expert_gate=False)
    routed_weights = {k: v for k, v in weights.items() if not k.startswith("shared")}
    shared_out = reference_moe_block(x, weights, config) - reference_moe_block(x, routed_weights, routed_only)
    expected = torch.zeros(7, 10, dtype=F64)
    for t in range(7):
        gate_up = weights["shared_gate_up"] @ x[t]
        h = F.gelu(gate_up[:Is]) * gate_up[Is:] if gated else F.gelu(gate_up)
        out = weights["shared_down"] @ h
        if shared_expert_gate:
            out = out / (1.0 + math.exp(-(weights["shared_gate"][0] @ x[t]).item()))
        expected[t] = out
    torch.testing.assert_close(shared_out, expected, rtol=1e-11, atol=1e-12)


# --------------------------------------------------------------------------- routing

def _argmax_first(values, allowed):
    """Index of the largest value among `allowed`, the lowest index on ties (strict >)."""
    best = None
    for index in allowed:
        if best is None or values[index] > values[best]:
            best = index
    return best


def _brute_force_route(logits, top_k, scoring, renormalize, correction_bias, n_group, topk_group, scaling):
    """Repeated first-argmax selection and math-module weight formulas, one row at a time."""
    T, E = logits.shape
    ids, weights = [], []
    for row in logits.tolist():
        if scoring == "softmax":
            peak = max(row)
            exps = [math.exp(v - peak) for v in row]
            gate_values = [v / sum(exps) for v in exps]
            selection = gate_values
        elif scoring == "topk_softmax":
            selection = row
        else:
            # sigmoid in torch: the selection must see exactly the scores the router sees.
            gate_values = torch.sigmoid(torch.tensor(row, dtype=F64)).tolist()
            bias = correction_bias.tolist() if correction_bias is not None else [0.0] * E
            selection = [s + b for s, b in zip(gate_values, bias)]
        allowed = list(range(E))
        if scoring == "sigmoid_group":
            size = E // n_group
            group_scores = []
            for g in range(n_group):
                members = list(range(g * size, (g + 1) * size))
                first = _argmax_first(selection, members)
                second = _argmax_first(selection, [e for e in members if e != first])
                group_scores.append(selection[first] + selection[second])
            kept = []
            for _ in range(topk_group):
                kept.append(_argmax_first(group_scores, [g for g in range(n_group) if g not in kept]))
            allowed = [e for e in range(E) if e // size in kept]
        picked = []
        for _ in range(top_k):
            picked.append(_argmax_first(selection, [e for e in allowed if e not in picked]))
        if scoring == "topk_softmax":
            peak = max(row[e] for e in picked)
            exps = [math.exp(row[e] - peak) for e in picked]
            values = [v / sum(exps) for v in exps]
        else:
            values = [gate_values[e] for e in picked]
            if renormalize:
                total = sum(values) + (1e-20 if scoring == "sigmoid_group" else 0.0)
                values = [v / total for v in values]
        ids.append(picked)
        weights.append([v * scaling for v in values])
    return torch.tensor(weights, dtype=F64), torch.tensor(ids, dtype=torch.int64)


ROUTING_CASES = [
    dict(scoring="softmax", renormalize=False),
    dict(scoring="softmax", renormalize=True),
    dict(scoring="softmax", renormalize=True, routed_scaling_factor=1.5),
    dict(scoring="topk_softmax"),
    dict(scoring="sigmoid_group", renormalize=True, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    dict(scoring="sigmoid_group", renormalize=False, n_group=2, topk_group=1),
    dict(scoring="sigmoid_group", renormalize=True, n_group=1, topk_group=1),
]


def _route_both(logits, top_k, case, correction_bias):
    options = dict(case)
    scaling = options.pop("routed_scaling_factor", 1.0)
    if case["scoring"] != "sigmoid_group":
        correction_bias = None
    ours = reference_route(logits, top_k, correction_bias=correction_bias, routed_scaling_factor=scaling,
                           **options)
    theirs = _brute_force_route(logits, top_k, case["scoring"], case.get("renormalize", False), correction_bias,
                                case.get("n_group", 1), case.get("topk_group", 1), scaling)
    return ours, theirs


@pytest.mark.parametrize("case", ROUTING_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("ties", [False, True])
def test_route_matches_brute_force(case, ties, seed):
    T, E, K = 13, 8, 3
    if ties:
        # Few distinct values: ties within rows and within groups; they must go to the lowest index.
        logits = torch.randint(-1, 2, (T, E)).to(F64)
        correction_bias = torch.randint(0, 2, (E,)).to(F64) * 0.25
    else:
        logits = _randn(T, E) * 2
        correction_bias = _randn(E) * 0.3
    (weights, ids), (expected_weights, expected_ids) = _route_both(logits, K, case, correction_bias)
    assert ids.dtype == torch.int64 and weights.dtype == F64
    assert torch.equal(ids, expected_ids), f"ids\n{ids}\nexpected\n{expected_ids}"
    torch.testing.assert_close(weights, expected_weights, rtol=1e-13, atol=1e-14)


def test_group_limit_changes_the_choice():
    # Group 0 = experts 0-3, group 1 = experts 4-7. Expert 0 has the single best score, but
    # group 1's top-2 sum is larger: with one group kept, expert 0 must not be picked.
    logits = torch.tensor([[3.0, -3.0, -3.0, -3.0, 2.0, 2.0, -3.0, -3.0]], dtype=F64)
    _, ids_grouped = reference_route(logits, 2, scoring="sigmoid_group", n_group=2, topk_group=1)
    _, ids_free = reference_route(logits, 2, scoring="sigmoid_group", n_group=1, topk_group=1)
    assert ids_grouped.tolist() == [[4, 5]]
    assert ids_free.tolist() == [[0, 4]]
    # The correction bias steers the choice but not the weights.
    bias = torch.tensor([0.0] * 7 + [1.0], dtype=F64)
    weights, ids = reference_route(logits, 2, scoring="sigmoid_group", correction_bias=bias)
    assert ids.tolist() == [[7, 0]]
    torch.testing.assert_close(weights, torch.sigmoid(logits[:, [7, 0]]), rtol=0, atol=0)


@pytest.mark.parametrize("case", ROUTING_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_route_gradcheck(case, seed):
    logits = (_randn(5, 8) * 2).requires_grad_()
    options = dict(case)
    bias = _randn(8) * 0.3 if case["scoring"] == "sigmoid_group" else None
    assert torch.autograd.gradcheck(lambda l: reference_route(l, 3, correction_bias=bias, **options)[0], (logits,))


def test_route_low_precision_weights_are_float32(seed):
    weights, ids = reference_route(_randn(4, 6).to(torch.bfloat16), 2)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64


def test_router_dtype(seed):
    config = MoEConfig(hidden_size=12, intermediate_size=5, num_experts=8, top_k=3, scoring="sigmoid_group",
                       renormalize=True, n_group=4, topk_group=2, correction_bias=True, router_dtype=torch.float32)
    weights = random_moe_weights(config, dtype=F64)
    x = _randn(9, 12)
    in_float32 = reference_moe_block(x, weights, config)
    in_float64 = reference_moe_block(x, weights, dataclasses.replace(config, router_dtype=None))
    assert in_float32.dtype == F64
    # The float32 router rounds the routing weights: a difference at float32's scale, not 0.
    difference = ((in_float32 - in_float64).abs().max() / in_float64.abs().max()).item()
    assert 0 < difference < 1e-5


# --------------------------------------------------------------------------- autograd

GRADCHECK_CONFIGS = {
    "softmax-renorm-shared-gate-bias": dict(renormalize=True, expert_bias=True, shared_intermediate_size=3,
                                            shared_expert_gate=True),
    "topk_softmax-gpt_oss-clamped": dict(scoring="topk_softmax", router_bias=True, activation="clamped_swiglu",
                                         layout="gpt_oss", expert_bias=True, swiglu_limit=0.5),
    "sigmoid_group-shared": dict(scoring="sigmoid_group", renormalize=True, n_group=2, topk_group=1,
                                 correction_bias=True, routed_scaling_factor=2.5, shared_intermediate_size=2),
    "interleaved-gelu_tanh": dict(layout="interleaved", activation="gelu_tanh"),
    "non_gated-gelu": dict(gated=False, activation="gelu", expert_bias=True, shared_intermediate_size=2),
    "non_gated-relu2": dict(gated=False, activation="relu2", expert_bias=True),
    "concatenated-clamped_silu": dict(activation="clamped_silu", expert_bias=True, swiglu_limit=0.5),
    "interleaved-silu_clamped": dict(layout="interleaved", activation="silu_clamped", swiglu_limit=0.2),
    "gpt_oss-softcapped_swiglu": dict(layout="gpt_oss", activation="softcapped_swiglu", expert_bias=True,
                                      swiglu_alpha=0.5, swiglu_limit=0.8, shared_intermediate_size=2),
}


@pytest.mark.parametrize("options", GRADCHECK_CONFIGS.values(), ids=GRADCHECK_CONFIGS.keys())
def test_block_gradcheck(options, seed):
    config = MoEConfig(hidden_size=5, intermediate_size=3, num_experts=4, top_k=2, **options)
    weights = random_moe_weights(config, dtype=F64)
    trained = sorted(name for name in weights if name != "correction_bias")
    x = _randn(6, 5).requires_grad_()
    leaves = [weights[name].clone().requires_grad_() for name in trained]

    def block(x, *trained_values):
        return reference_moe_block(x, {**weights, **dict(zip(trained, trained_values))}, config)

    assert torch.autograd.gradcheck(block, (x, *leaves))
    # Every trained weight and the input really get a nonzero gradient.
    block(x, *leaves).sum().backward()
    for name, leaf in zip(["hidden_states"] + trained, [x] + leaves):
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0, f"{name}: no gradient"


# --------------------------------------------------------------------------- bad input

def test_bad_weights_name_the_weight():
    config = MoEConfig(hidden_size=6, intermediate_size=4, num_experts=3, top_k=2)
    weights = random_moe_weights(config, dtype=F64)
    x = _randn(2, 6)
    with pytest.raises(ValueError, match="w_down"):
        reference_moe_block(x, {**weights, "w_down": _randn(3, 4, 6)}, config)
    with pytest.raises(ValueError, match="w_gate_up"):
        reference_moe_block(x, {k: v for k, v in weights.items() if k != "w_gate_up"}, config)
    with pytest.raises(ValueError, match="b_down"):
        reference_moe_block(x, {**weights, "b_down": _randn(3, 6)}, config)
    with pytest.raises(ValueError, match="hidden_states"):
        reference_moe_block(_randn(2, 7), weights, config)
    with pytest.raises(TypeError, match="config"):
        reference_moe_block(x, weights, {"hidden_size": 6})


def test_bad_experts_arguments_raise():
    T, H, I, E = 3, 6, 4, 5
    x, w_gate_up, w_down = _randn(T, H), _randn(E, 2 * I, H), _randn(E, H, I)
    ids, weights = torch.zeros(T, 2, dtype=torch.int64), torch.ones(T, 2, dtype=F64)
    with pytest.raises(ValueError, match="topk_ids"):
        reference_experts(x, w_gate_up, w_down, ids + E, weights)
    with pytest.raises(ValueError, match="topk_ids"):
        reference_experts(x, w_gate_up, w_down, ids.float(), weights)
    with pytest.raises(ValueError, match="topk_weights"):
        reference_experts(x, w_gate_up, w_down, ids, weights[:, :1])
    with pytest.raises(ValueError, match="w_down"):
        reference_experts(x, w_gate_up, w_down.transpose(1, 2), ids, weights)
    with pytest.raises(ValueError, match="w_gate_up"):
        reference_experts(x, w_gate_up, w_down, ids, weights, layout="gpt_oss")
    with pytest.raises(ValueError, match="b_gate_up"):
        reference_experts(x, w_gate_up, w_down, ids, weights, b_gate_up=_randn(E, I))
    with pytest.raises(ValueError, match="activation"):
        reference_experts(x, w_gate_up, w_down, ids, weights, activation="swish")
    for activation in GATED_ONLY_ACTIVATIONS:
        with pytest.raises(ValueError, match=f"gated: {activation}"):
            reference_experts(x, w_gate_up[:, :I], w_down, ids, weights, activation=activation, gated=False)


def test_bad_route_arguments_raise():
    logits = _randn(3, 8)
    with pytest.raises(ValueError, match="top_k"):
        reference_route(logits, 9)
    with pytest.raises(ValueError, match="scoring"):
        reference_route(logits, 2, scoring="sigmoid")
    with pytest.raises(ValueError, match="correction_bias"):
        reference_route(logits, 2, correction_bias=torch.zeros(8, dtype=F64))
    with pytest.raises(ValueError, match="n_group"):
        reference_route(logits, 2, scoring="sigmoid_group", n_group=3)
    with pytest.raises(ValueError, match="top_k"):
        reference_route(logits, 3, scoring="sigmoid_group", n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="router_logits"):
        reference_route(logits[0], 2)


@pytest.mark.parametrize("activation", ["relu", "relu2"])
def test_reference_relu_is_torch_relu_on_special_values(activation):
    from tpmoe.reference import _act
    x = torch.tensor([-math.inf, -1.0, 0.0, 2.0, math.inf, math.nan], dtype=torch.float64, requires_grad=True)
    ours = _act(activation, x)
    ours.sum().backward()
    x_torch = x.detach().clone().requires_grad_()
    theirs = TORCH_ACTIVATIONS[activation](x_torch)
    theirs.sum().backward()
    assert ours[-1].isnan()
    # Bitwise, NaN where torch has NaN (relu2's gradient 2 relu(x) is NaN at NaN, inf at inf).
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(x.grad, x_torch.grad, rtol=0, atol=0, equal_nan=True)
