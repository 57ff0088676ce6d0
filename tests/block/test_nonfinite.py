"""NaN and Inf in the inputs: they propagate as they do in tpmoe.reference, never crash or hang.

Outputs are compared element by element: the NaN mask, the +Inf and -Inf masks, and the finite
values (fp32 tolerance) must all match the reference. Gradients are compared per row (per token
for dx and dtopk_weights, per expert for the weight gradients): which rows hold a non-finite
value. Element-wise equality of non-finite gradient patterns is not promised: an Inf meeting a
zero inside a fused activation derivative may come out as NaN where autograd's chain gives Inf,
and both say the same thing, "this token / expert is poisoned".

Routing with NaN logits (defined here, tested below): a NaN score ranks FIRST, above +Inf, as in
torch.topk; then descending scores, equal scores to the lowest expert. The weights follow the
formula: with softmax scoring one NaN logit makes the whole row's weights NaN (the normaliser
is NaN); with topk_softmax the NaN is always picked, so the row is NaN; with sigmoid_group only
the NaN expert's weight is NaN, the whole row when renormalised. Rows without NaN are untouched.
"""
import pytest
import torch

import tpmoe
from support.tolerances import assert_fp32_close
from tpmoe.config import GATED_ONLY_ACTIVATIONS
from tpmoe.reference import reference_experts, reference_moe_block, reference_route
from tpmoe.routing import route
from tpmoe.routing_torch import route_torch

NAN, INF = float("nan"), float("inf")
BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.triton)]


def assert_same_nonfinite(actual, expected, name):
    """Same NaN / +Inf / -Inf positions; the finite entries within the fp32 tolerance."""
    expected = expected.to(actual.dtype)
    for what, mask in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        ours, theirs = mask(actual), mask(expected)
        assert torch.equal(ours, theirs), (f"{name}: {what} at {ours.nonzero().tolist()}, "
                                           f"reference at {theirs.nonzero().tolist()}")
    finite = torch.isfinite(expected)
    assert_fp32_close(torch.where(finite, actual, 0), torch.where(finite, expected, 0), name)


def nonfinite_rows(tensor):
    return (~torch.isfinite(tensor)).flatten(1).any(dim=1).tolist()


# ----------------------------------------------------------------------------------- routing

def _nan_first_ids(scores, top_k):
    """The defined order: NaN first, then descending score, ties to the lowest index."""
    ids = []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda e: (row[e] == row[e], -row[e] if row[e] == row[e] else 0, e))
        ids.append(order[:top_k])
    return torch.tensor(ids)


def _logits_with_nonfinite():
    logits = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    logits[0, 2] = NAN            # one NaN
    logits[1] = NAN               # a row of NaN
    logits[2, 3] = INF            # +Inf
    logits[3, 1] = -INF           # -Inf
    logits[4, 4], logits[4, 0] = NAN, INF   # NaN beats +Inf
    logits[5, 5], logits[5, 0] = NAN, NAN   # two NaN: the lower index first
    return logits                 # row 6 finite


@pytest.mark.parametrize("route_fn", [route, route_torch], ids=["native", "torch_twin"])
@pytest.mark.parametrize("scoring, renormalize", [("softmax", False), ("softmax", True), ("topk_softmax", False),
                                                  ("sigmoid_group", False), ("sigmoid_group", True)])
def test_route_ranks_nan_first_and_propagates_it_by_the_formula(route_fn, scoring, renormalize):
    logits = _logits_with_nonfinite().requires_grad_()
    top_k = 3
    weights, ids = route_fn(logits, top_k, scoring=scoring, renormalize=renormalize)
    # Selection scores: softmax is monotone in the logits, so both softmax scorings rank the logits.
    scores = torch.sigmoid(logits.detach().double()) if scoring == "sigmoid_group" else logits.detach().double()
    assert torch.equal(ids, _nan_first_ids(scores, top_k)), (ids.tolist(), _nan_first_ids(scores, top_k).tolist())

    # The weights: the formula on these ids, in float64.
    logits64 = logits.detach().double()
    if scoring == "softmax":
        expected = torch.softmax(logits64, dim=-1).gather(1, ids)
    elif scoring == "topk_softmax":
        expected = torch.softmax(logits64.gather(1, ids), dim=-1)
    else:
        expected = torch.sigmoid(logits64).gather(1, ids)
    if renormalize:
        expected = expected / (expected.sum(dim=-1, keepdim=True) + (1e-20 if scoring == "sigmoid_group" else 0))
    assert_same_nonfinite(weights, expected, f"{scoring} weights")
    assert torch.isfinite(weights[6]).all()
    finite_row = logits[6:].detach()
    reference_weights, reference_ids = reference_route(finite_row, top_k, scoring=scoring, renormalize=renormalize)
    assert torch.equal(ids[6:], reference_ids)
    assert_fp32_close(weights[6:], reference_weights, "finite row")

    # The gradient: non-finite exactly in the rows whose weights are, never elsewhere.
    weights.backward(torch.ones_like(weights))
    grad_rows = nonfinite_rows(logits.grad)
    assert grad_rows[6] is False, logits.grad
    for row in range(6):
        if not torch.isfinite(weights[row]).all():
            assert grad_rows[row], (row, logits.grad[row])


def test_route_with_nan_in_a_group_keeps_that_group():
    """sigmoid_group: a group holding a NaN scores NaN and ranks first among the groups."""
    logits = torch.randn(2, 8, generator=torch.Generator().manual_seed(5))
    logits[0, 6] = NAN
    weights, ids = route(logits, 2, scoring="sigmoid_group", n_group=4, topk_group=1, renormalize=False)
    assert ids[0].tolist()[0] == 6 and ids[0].tolist()[1] == 7, ids
    assert torch.isnan(weights[0, 0]) and torch.isfinite(weights[0, 1])
    assert torch.isfinite(weights[1]).all()


# ----------------------------------------------------------------------------------- experts

T, H, I, E, K = 7, 8, 4, 4, 2


def _experts_inputs(seed, layout="concatenated", gated=True):
    generator = torch.Generator().manual_seed(seed)
    rows = (2 if gated else 1) * I
    w_gate_up = torch.randn(E, rows, H, generator=generator) / H ** 0.5
    w_down = torch.randn(E, H, I, generator=generator) / I ** 0.5
    if layout == "gpt_oss":
        w_gate_up, w_down = w_gate_up.transpose(1, 2).contiguous(), w_down.transpose(1, 2).contiguous()
    # Expert 3 gets no token; token 6 goes to experts 1 and 2 only.
    topk_ids = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 2], [1, 0], [2, 1], [1, 2]])
    return dict(hidden_states=torch.randn(T, H, generator=generator), w_gate_up=w_gate_up, w_down=w_down,
                topk_ids=topk_ids, topk_weights=torch.rand(T, K, generator=generator) + 0.1,
                b_gate_up=torch.randn(E, rows, generator=generator) / 4,
                b_down=torch.randn(E, H, generator=generator) / 4)


def _poison(inputs, where, layout):
    """Puts one non-finite value at `where`; returns what it poisons, for the record."""
    x, w_gate_up, w_down = inputs["hidden_states"], inputs["w_gate_up"], inputs["w_down"]
    if where == "nan_token":
        x[2, 5] = NAN
    elif where == "inf_token":
        x[4, 1] = INF
    elif where == "neg_inf_token":
        x[5, 0] = -INF
    elif where == "nan_weight_used_expert":   # an up row/column: every activation passes it on
        if layout == "gpt_oss":
            w_gate_up[0, 3, 1] = NAN
        else:
            w_gate_up[0, I + 1 if layout == "concatenated" else 1, 3] = NAN
    elif where == "nan_weight_unused_expert":
        w_gate_up[3].fill_(NAN)
        w_down[3].fill_(NAN)
    elif where == "inf_down_bias":
        inputs["b_down"][2, 4] = INF
    elif where == "nan_routing_weight":
        inputs["topk_weights"][3, 1] = NAN
    else:
        raise ValueError(where)


def _run(backend, inputs, **options):
    names = ("hidden_states", "w_gate_up", "w_down", "topk_weights", "b_gate_up", "b_down")
    leaves = {n: inputs[n].detach().clone().requires_grad_() for n in names}
    if backend == "reference":
        leaves = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
        y = reference_experts(leaves["hidden_states"], leaves["w_gate_up"], leaves["w_down"], inputs["topk_ids"],
                              leaves["topk_weights"], b_gate_up=leaves["b_gate_up"], b_down=leaves["b_down"],
                              **options)
    else:
        y = tpmoe.fused_experts(leaves["hidden_states"], leaves["w_gate_up"], leaves["w_down"], inputs["topk_ids"],
                                leaves["topk_weights"], b_gate_up=leaves["b_gate_up"], b_down=leaves["b_down"],
                                backend=backend, **options)
    y.backward(torch.ones_like(y))
    return y.detach(), {n: t.grad for n, t in leaves.items()}


# relu and the clamps keep a NaN pre-activation NaN in both kernel families, as torch.relu /
# torch.clamp (the reference) do: a NaN token or weight never comes out finite.
POISONS = ["nan_token", "inf_token", "neg_inf_token", "nan_weight_used_expert", "nan_weight_unused_expert",
           "inf_down_bias", "nan_routing_weight"]
# The softcaps saturate: an infinite gate or up gives a finite h (tanh -> +-1, sigmoid -> 0 or 1),
# so an infinite token comes out finite, in the reference as in the kernels.
SATURATED = {("softcapped_swiglu", "inf_token"), ("softcapped_swiglu", "neg_inf_token")}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation, layout", [("silu", "concatenated"), ("gelu", "interleaved"),
                                                ("gelu_tanh", "concatenated"), ("clamped_swiglu", "gpt_oss"),
                                                ("clamped_silu", "interleaved"), ("silu_clamped", "concatenated"),
                                                ("softcapped_swiglu", "gpt_oss")])
@pytest.mark.parametrize("where", POISONS)
def test_nonfinite_inputs_propagate_like_the_reference(backend, activation, layout, where, seed):
    inputs = _experts_inputs(seed, layout)
    _poison(inputs, where, layout)
    options = dict(activation=activation, layout=layout)
    y, grads = _run(backend, inputs, **options)
    y_ref, grads_ref = _run("reference", inputs, **options)
    assert_same_nonfinite(y, y_ref, "output")
    if (activation, where) in SATURATED:
        assert torch.isfinite(y_ref).all()
    else:  # the case is not vacuous
        assert (~torch.isfinite(y_ref)).any() or where == "nan_weight_unused_expert"
    for name in grads:
        assert nonfinite_rows(grads[name]) == nonfinite_rows(grads_ref[name]), (
            f"{name}: non-finite rows {nonfinite_rows(grads[name])}, reference {nonfinite_rows(grads_ref[name])}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "relu2"])
def test_nan_token_through_non_gated_relu(backend, activation, seed):
    inputs = _experts_inputs(seed, gated=False)
    inputs["hidden_states"][2, 5] = NAN
    y, _ = _run(backend, inputs, activation=activation, gated=False)
    y_ref, _ = _run("reference", inputs, activation=activation, gated=False)
    assert torch.isnan(y_ref[2]).all()
    assert_same_nonfinite(y, y_ref, "output")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", GATED_ONLY_ACTIVATIONS)
def test_nan_gate_weight_through_the_gated_only_activations(backend, activation, seed):
    inputs = _experts_inputs(seed)
    inputs["w_gate_up"][0, 1, 3] = NAN  # a gate row (concatenated: rows [0, I) are gates)
    y, _ = _run(backend, inputs, activation=activation)
    y_ref, _ = _run("reference", inputs, activation=activation)
    assert (~torch.isfinite(y_ref)).any()
    assert_same_nonfinite(y, y_ref, "output")


# ----------------------------------------------------------------------------------- block

@pytest.mark.parametrize("scoring", ["softmax", "sigmoid_group"])
def test_block_with_a_nan_token_poisons_that_token_only(scoring, seed):
    config = tpmoe.MoEConfig(hidden_size=H, intermediate_size=6, num_experts=E, top_k=K, scoring=scoring,
                             renormalize=True, shared_intermediate_size=3, shared_expert_gate=True)
    weights = tpmoe.random_moe_weights(config, generator=torch.Generator().manual_seed(seed))
    block = tpmoe.MoEBlock.from_full(config, weights)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 1))
    x[3, 2] = NAN
    x = x.requires_grad_()
    y = block(x)
    y.sum().backward()
    y_ref = reference_moe_block(x.detach().double(), {n: w.double() for n, w in weights.items()}, config)
    assert torch.isnan(y[3]).all() and torch.isnan(y_ref[3]).all()
    others = [t for t in range(T) if t != 3]
    assert_fp32_close(y[others], y_ref[others], "other tokens")
    assert nonfinite_rows(x.grad) == [t == 3 for t in range(T)]
